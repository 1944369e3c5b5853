"""Builds the base of the default bundle (models/demo) reproducibly, without downloads.

CLIP itself cannot be downloaded here, so the demo's image encoder is a small CNN trained
(fixed seed) on the synthetic set's training split to predict which words and word pairs its
captions use — a miniature of CLIP's image-text objective. Its 512-d embedding plays CLIP's
role. The bundle also gets a small random GPT-2 (real GPT-2 vocabulary) and a random mapper;
`clipcap train` then trains mapper + GPT-2 on the synthetic captions (scripts/build-demo.sh).

  python scripts/make_demo_base.py --synth DIR --out DIR [--epochs 8] [--seed 0]
"""
import argparse
import collections
import json
import os
import re
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageOps

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "ref"))
from clipcap_reference import ClipCaptionModel  # noqa: E402
from transformers import GPT2Config  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def clip_preprocess(path, size=224):
    """CLIP's transform: EXIF orientation, RGB, shorter side to 224 (bicubic), center crop."""
    img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    w, h = img.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    img = img.resize((nw, nh), Image.BICUBIC)
    top = int(round((nh - size) / 2.0))
    left = int(round((nw - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    x = (np.asarray(img, dtype=np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


class DemoEncoder(nn.Module):
    """A small CNN with a coarse spatial grid (positions matter in the captions) -> 512-d."""

    def __init__(self, dim=512):
        super().__init__()
        c = [3, 32, 64, 96, 128]
        layers = []
        for i in range(4):
            layers += [nn.Conv2d(c[i], c[i + 1], 5 if i == 0 else 3, stride=2, padding=2 if i == 0 else 1),
                       nn.BatchNorm2d(c[i + 1]), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.proj = nn.Linear(128 * 16, dim)

    def forward(self, x):
        return self.proj(self.pool(self.features(x)).flatten(1))


def words(caption):
    return re.findall(r"[a-z]+", caption.lower())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--synth", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.set_num_threads(args.threads)
    t_start = time.time()

    split = json.load(open(os.path.join(args.synth, "dataset_coco.json")))
    train = [im for im in split["images"] if im["split"] in ("train", "restval")]
    caps = {im["imgid"]: [s["raw"] for s in im["sentences"]] for im in train}
    # Targets: unigrams and adjacent word pairs of the image's captions (pairs bind colour to shape).
    counts = collections.Counter()
    per_image = {}
    for im in train:
        feats = set()
        for c in caps[im["imgid"]]:
            w = words(c)
            feats.update(w)
            feats.update(f"{a} {b}" for a, b in zip(w, w[1:]))
        per_image[im["imgid"]] = feats
        counts.update(feats)
    vocab = sorted(f for f, n in counts.items() if n >= 3)
    index = {f: i for i, f in enumerate(vocab)}
    print(f"encoder pretraining: {len(train)} images, {len(vocab)} word/pair targets", flush=True)
    x = torch.stack([clip_preprocess(os.path.join(args.synth, im["filepath"], im["filename"])) for im in train])
    y = torch.zeros(len(train), len(vocab))
    for i, im in enumerate(train):
        for f in per_image[im["imgid"]]:
            if f in index:
                y[i, index[f]] = 1.0

    enc = DemoEncoder()
    head = nn.Linear(512, len(vocab))
    opt = torch.optim.Adam(list(enc.parameters()) + list(head.parameters()), lr=2e-3)
    loss_fn = nn.BCEWithLogitsLoss()
    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        enc.train()
        perm = torch.randperm(len(train), generator=g)
        total = 0.0
        for i in range(0, len(train), 64):
            idx = perm[i:i + 64]
            loss = loss_fn(head(enc(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        print(f"  epoch {epoch + 1}/{args.epochs}: loss {total / len(train):.4f} ({time.time() - t_start:.0f} s)", flush=True)
    enc.eval()

    os.makedirs(args.out, exist_ok=True)
    traced = torch.jit.trace(enc, torch.zeros(1, 3, 224, 224))
    traced.save(os.path.join(args.out, "clip_image.pt"))
    shutil.copyfile(os.path.join(ROOT, "models", "gpt2", "tokenizer.json"), os.path.join(args.out, "tokenizer.json"))

    cfg = GPT2Config(vocab_size=50257, n_positions=64, n_embd=128, n_layer=3, n_head=4)
    model = ClipCaptionModel(cfg, 10, 10, 512, 8, "mlp")
    sd = {k: v.contiguous() for k, v in model.state_dict().items()
          if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "gpt.lm_head.weight"}
    save_file(sd, os.path.join(args.out, "model.safetensors"))
    manifest = {
        "format": "clipcap-bundle", "version": 1, "name": "demo-base",
        "mapper": {"mapping": "mlp", "prefix_dim": 512, "prefix_length": 10, "clip_length": 10, "num_layers": 8,
                   "normalize_prefix": False},
        "gpt2": {"vocab_size": 50257, "n_positions": 64, "n_embd": 128, "n_layer": 3, "n_head": 4,
                 "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "n_inner": None},
        "image": {"size": 224, "mean": MEAN.tolist(), "std": STD.tolist()},
        "files": {"encoder": "clip_image.pt", "weights": "model.safetensors", "tokenizer": "tokenizer.json"},
        "stop_tokens": ["<|endoftext|>"],
        "generation": {"strategy": "beam", "beam_size": 5, "max_tokens": 30},
        "provenance": {"source": "scripts/make_demo_base.py", "seed": args.seed, "encoder_epochs": args.epochs,
                       "encoder_targets": len(vocab), "synthetic_images": len(train)},
    }
    with open(os.path.join(args.out, "clipcap.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    print(f"wrote {args.out} in {time.time() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
