"""Builds the base of the default bundle (models/demo) reproducibly, without downloads.

CLIP itself cannot be downloaded here, so the demo's image encoder is a small convolutional
object detector trained (fixed seed) on the synthetic set's *training* split: from the scene
descriptions `clipcap synth` writes (scenes.jsonl), it learns to name the shape, colour and
size of an object centred in a 40x40 window (and "nothing" elsewhere). Applied densely to the
whole image it yields per-location probabilities, which the encoder pools into a coarse 6x6
grid (where is what), a whole-image maximum per shape-colour pair (what is there) and the mean
colour (the background): a 501-d embedding that plays CLIP's role. Grid order keeps left/right
and top/bottom, which the captions describe.

The bundle also gets a small random GPT-2 (real GPT-2 vocabulary) and a random mapper;
`clipcap train` then trains mapper + GPT-2 on the synthetic captions (scripts/build-demo.sh).
Only training-split images are used here; the test split stays unseen until `clipcap eval`.

  python scripts/make_demo_base.py --synth DIR --out DIR [--epochs 12] [--seed 0]
"""
import argparse
import json
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "ref"))
from clipcap_reference import ClipCaptionModel  # noqa: E402
from transformers import GPT2Config  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from ref_preprocess import reference  # noqa: E402

SHAPES = ["circle", "square", "triangle", "star", "cross"]
COLORS = ["red", "orange", "yellow", "green", "blue", "purple"]
SIZES = ["small", "large"]
WINDOW = 40  # detector window, pixels of the 112x112 working image (stride 8 -> 5x5 map)
GRID = 6

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def clip_preprocess(path, size=224):
    """CLIP's transform (PIL, as the preprocessing parity tests' reference), then normalized."""
    chw = reference(path, size)[0]
    return torch.from_numpy((chw - MEAN[:, None, None]) / STD[:, None, None])


class Detector(nn.Module):
    """Fully convolutional: [B,3,112,112] -> logits maps [B, 6+7+3, 14, 14] (stride 8).

    Channel groups: shape (5 + none), colour (6 + none), size (2 + none). Receptive field
    38 px, enough to see the largest objects' outlines from their centre.
    """

    def __init__(self):
        super().__init__()
        c = [3, 32, 64, 96, 128]
        layers = []
        for i in range(4):
            layers += [nn.Conv2d(c[i], c[i + 1], 3, padding=1), nn.ReLU()]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Conv2d(128, 16, 1)

    def forward(self, x):
        return self.head(self.trunk(x))


def probability_maps(logits):
    """Per-location probabilities: 5 shapes, 6 colours, large, and 'an object is centred here'."""
    shape = logits[:, 0:6].softmax(1)
    color = logits[:, 6:13].softmax(1)
    size = logits[:, 13:16].softmax(1)
    obj = 1.0 - shape[:, 5:6]
    return shape[:, :5], color[:, :6], size[:, 1:2], obj


class DemoEncoder(nn.Module):
    """The bundle's image encoder: CLIP-preprocessed [B,3,224,224] -> [B, 501]."""

    def __init__(self, detector):
        super().__init__()
        self.detector = detector

    def forward(self, x):
        logits = self.detector(F.avg_pool2d(x, 2))
        shape, color, large, obj = probability_maps(logits)
        maps = torch.cat([shape, color, large, obj], 1)  # [B, 13, 14, 14]
        grid = F.adaptive_max_pool2d(maps, GRID).flatten(1)  # where is what: 13 * 36
        pairs = (shape.unsqueeze(2) * color.unsqueeze(1)).flatten(1, 2)  # [B, 30, 14, 14]
        present = pairs.amax((2, 3))  # which shape-colour pairs occur
        background = x.mean((2, 3))  # mean normalized colour
        return torch.cat([grid, present, background], 1)


def windows(x112, scenes, rng):
    """Training windows from the scenes: each object centred (jittered by up to 3 px), labelled
    (shape, colour, size); and as many windows centred off every object, labelled "none"."""
    pad = WINDOW
    xp = F.pad(x112, (pad, pad, pad, pad))
    crops, labels = [], []
    none = (len(SHAPES), len(COLORS), len(SIZES))
    for i, s in enumerate(scenes):
        scale = 112.0 / s["crop_size"]
        centers = [((o["cx"] - s["crop_x"]) * scale, (o["cy"] - s["crop_y"]) * scale) for o in s["objects"]]

        def crop(cx, cy):
            x0 = int(round(cx)) + pad - WINDOW // 2
            y0 = int(round(cy)) + pad - WINDOW // 2
            return xp[i, :, y0:y0 + WINDOW, x0:x0 + WINDOW]

        for o, (cx, cy) in zip(s["objects"], centers):
            jx, jy = rng.integers(-3, 4, size=2)
            crops.append(crop(cx + jx, cy + jy))
            labels.append((SHAPES.index(o["shape"]), COLORS.index(o["color"]), SIZES.index(o["size"])))
        made, tries = 0, 0
        while made < 2 * len(centers) and tries < 200:
            tries += 1
            cx, cy = rng.uniform(0, 112, size=2)
            # Off-centre: at least 7 px from every object centre (some still overlap objects).
            if all((cx - ox) ** 2 + (cy - oy) ** 2 > 49 for ox, oy in centers):
                crops.append(crop(cx, cy))
                labels.append(none)
                made += 1
    return torch.stack(crops), torch.tensor(labels)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--synth", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t_start = time.time()

    scenes = [json.loads(line) for line in open(os.path.join(args.synth, "scenes.jsonl"))]
    train = [s for s in scenes if s["split"] in ("train", "restval")]
    print(f"encoder pretraining: {len(train)} training images", flush=True)
    x224 = torch.stack([clip_preprocess(os.path.join(args.synth, "images", s["file_name"])) for s in train])
    x112 = F.avg_pool2d(x224, 2)
    del x224
    rng = np.random.default_rng(args.seed)
    crops, labels = windows(x112, train, rng)
    print(f"  {len(crops)} windows ({int((labels[:, 0] < len(SHAPES)).sum())} objects) "
          f"({time.time() - t_start:.0f} s)", flush=True)

    det = Detector()
    opt = torch.optim.Adam(det.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(args.seed)
    centre = WINDOW // 16  # the map location whose receptive field is centred in the window
    for epoch in range(args.epochs):
        perm = torch.randperm(len(crops), generator=g)
        total, correct, seen = 0.0, 0, 0
        for i in range(0, len(crops), 64):
            idx = perm[i:i + 64]
            out = det(crops[idx])[:, :, centre, centre]
            y = labels[idx]
            loss = (F.cross_entropy(out[:, 0:6], y[:, 0]) + F.cross_entropy(out[:, 6:13], y[:, 1])
                    + F.cross_entropy(out[:, 13:16], y[:, 2]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            ok = (out[:, 0:6].argmax(1) == y[:, 0]) & (out[:, 6:13].argmax(1) == y[:, 1]) & \
                (out[:, 13:16].argmax(1) == y[:, 2])
            correct += int(ok.sum())
            seen += len(idx)
        print(f"  epoch {epoch + 1}/{args.epochs}: loss {total / seen:.4f}, windows right {correct / seen:.3f} "
              f"({time.time() - t_start:.0f} s)", flush=True)
    enc = DemoEncoder(det).eval()

    os.makedirs(args.out, exist_ok=True)
    with torch.no_grad():
        dim = enc(torch.zeros(1, 3, 224, 224)).shape[1]
    traced = torch.jit.trace(enc, torch.zeros(1, 3, 224, 224))
    traced.save(os.path.join(args.out, "clip_image.pt"))
    shutil.copyfile(os.path.join(ROOT, "models", "gpt2", "tokenizer.json"), os.path.join(args.out, "tokenizer.json"))

    cfg = GPT2Config(vocab_size=50257, n_positions=64, n_embd=128, n_layer=3, n_head=4)
    model = ClipCaptionModel(cfg, 10, 10, dim, 8, "mlp")
    sd = {k: v.contiguous() for k, v in model.state_dict().items()
          if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "gpt.lm_head.weight"}
    save_file(sd, os.path.join(args.out, "model.safetensors"))
    manifest = {
        "format": "clipcap-bundle", "version": 1, "name": "demo-base",
        "mapper": {"mapping": "mlp", "prefix_dim": dim, "prefix_length": 10, "clip_length": 10, "num_layers": 8,
                   "normalize_prefix": False},
        "gpt2": {"vocab_size": 50257, "n_positions": 64, "n_embd": 128, "n_layer": 3, "n_head": 4,
                 "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "n_inner": None},
        "image": {"size": 224, "mean": MEAN.tolist(), "std": STD.tolist()},
        "files": {"encoder": "clip_image.pt", "weights": "model.safetensors", "tokenizer": "tokenizer.json"},
        "stop_tokens": ["<|endoftext|>"],
        "generation": {"strategy": "beam", "beam_size": 5, "max_tokens": 30},
        "provenance": {"source": "scripts/make_demo_base.py", "seed": args.seed, "encoder_epochs": args.epochs,
                       "encoder": "dense shape/colour/size detector pooled to a 6x6 grid",
                       "encoder_windows": len(crops), "synthetic_images": len(train)},
    }
    with open(os.path.join(args.out, "clipcap.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    print(f"wrote {args.out} in {time.time() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
