"""Converts an original ClipCap checkpoint into a clipcap bundle (run once, offline).

  python scripts/convert_clipcap.py --checkpoint coco_weights.pt --clip clip_image.pt --out models/coco \
      [--mapping mlp|transformer] [--prefix-length 10] [--clip-length 10] [--num-layers 8] \
      [--normalize-prefix] [--n-head 12] [--stop .] [--name coco]

The checkpoint is a `torch.save`d state dict from ClipCap's train.py (`ClipCaptionModel` or
`ClipCaptionPrefix`, MLP or transformer mapper): `gpt.*` and `clip_project.*` keys. Such files
were saved on a GPU with transformers 4.x, so this script
  - loads with map_location="cpu" (storages are tagged cuda:0),
  - drops the per-layer `attn.bias` / `attn.masked_bias` causal-mask buffers,
  - checks that `gpt.lm_head.weight` is the tied copy of `wte` (it shares its storage) and drops it.
Shapes (prefix length, CLIP width, mapper depth, GPT-2 size) are read from the tensors; flags
given must agree with them. `--clip` is the TorchScript image tower (scripts/export_clip.py).
"""
import argparse
import hashlib
import json
import os
import re
import shutil
import sys

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 20, 1600: 25}


def fail(msg):
    sys.exit(f"convert_clipcap: {msg}")


def load_state_dict(path):
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if hasattr(obj, "state_dict") and not isinstance(obj, dict):
        obj = obj.state_dict()
    if not isinstance(obj, dict):
        fail(f"{path} is not a state dict")
    # DataParallel checkpoints prefix every key with "module.".
    return {re.sub(r"^module\.", "", k): v for k, v in obj.items()}


def infer(sd, args):
    wte = sd.get("gpt.transformer.wte.weight")
    if wte is None:
        fail("no gpt.transformer.wte.weight: not a ClipCap checkpoint")
    vocab, width = wte.shape
    n_positions = sd["gpt.transformer.wpe.weight"].shape[0]
    layers = sorted({int(m.group(1)) for k in sd for m in [re.match(r"gpt\.transformer\.h\.(\d+)\.", k)] if m})
    n_layer = len(layers)
    n_head = args.n_head or HEADS_BY_WIDTH.get(width)
    if not n_head:
        fail(f"cannot infer n_head for width {width}; pass --n-head")
    cp = {k[len("clip_project."):]: v for k, v in sd.items() if k.startswith("clip_project.")}
    if not cp:
        fail("no clip_project.* tensors")
    if "prefix_const" in cp:
        mapping = "transformer"
        prefix_length = cp["prefix_const"].shape[0]
        prefix_dim = cp["linear.weight"].shape[1]
        clip_length = cp["linear.weight"].shape[0] // width
        num_layers = len({k.split(".")[2] for k in cp if k.startswith("transformer.layers.")})
    else:
        mapping = "mlp"
        first = cp.get("model.0.weight", cp.get("weight"))
        last = cp.get("model.2.weight", cp.get("weight"))
        if first is None:
            fail("unknown clip_project layout")
        prefix_dim = first.shape[1]
        prefix_length = last.shape[0] // width
        clip_length, num_layers = args.clip_length or 10, args.num_layers or 8
    for flag, got in [("mapping", mapping), ("prefix_length", prefix_length), ("clip_length", clip_length),
                      ("num_layers", num_layers)]:
        want = getattr(args, flag)
        if want is not None and want != got:
            fail(f"--{flag.replace('_', '-')} {want} disagrees with the checkpoint ({got})")
    gpt2 = {"vocab_size": vocab, "n_positions": n_positions, "n_embd": width, "n_layer": n_layer,
            "n_head": n_head, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "n_inner": None}
    mapper = {"mapping": mapping, "prefix_dim": prefix_dim, "prefix_length": prefix_length,
              "clip_length": clip_length, "num_layers": num_layers, "normalize_prefix": bool(args.normalize_prefix)}
    return gpt2, mapper


def clean(sd):
    out = {}
    for k, v in sd.items():
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        if k == "gpt.lm_head.weight":
            if not torch.equal(v, sd["gpt.transformer.wte.weight"]):
                fail("gpt.lm_head.weight differs from wte: untied heads are not supported")
            continue
        if not (k.startswith("gpt.transformer.") or k.startswith("clip_project.")):
            fail(f"unexpected tensor {k}")
        # clone: tied/shared storages cannot be written to safetensors as they are.
        out[k] = v.detach().to(torch.float32).clone().contiguous()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--clip", required=True, help="TorchScript image encoder (scripts/export_clip.py)")
    ap.add_argument("--clip-int8", help="its int8 variant for --dtype int8 on the CPU "
                    "(scripts/export_clip.py --quantize int8), named by files.encoder_int8")
    ap.add_argument("--out", required=True)
    ap.add_argument("--mapping", choices=["mlp", "transformer"])
    ap.add_argument("--prefix-length", type=int)
    ap.add_argument("--clip-length", type=int)
    ap.add_argument("--num-layers", type=int)
    ap.add_argument("--normalize-prefix", action="store_true")
    ap.add_argument("--n-head", type=int)
    ap.add_argument("--stop", default=".", help="stop token ('.' for the released weights)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--name")
    args = ap.parse_args()

    sd = load_state_dict(args.checkpoint)
    gpt2, mapper = infer(sd, args)
    tensors = clean(sd)
    encoder = torch.jit.load(args.clip, map_location="cpu")
    with torch.no_grad():
        probe = torch.zeros(1, 3, args.image_size, args.image_size)
        try:
            dim = encoder.encode_image(probe).shape[-1]
        except Exception:  # noqa: BLE001 - an archive without encode_image
            dim = encoder(probe).shape[-1]
    if dim != mapper["prefix_dim"]:
        fail(f"the encoder outputs {dim} values but the mapper expects {mapper['prefix_dim']}")

    os.makedirs(args.out, exist_ok=True)
    save_file(tensors, os.path.join(args.out, "model.safetensors"))
    shutil.copyfile(args.clip, os.path.join(args.out, "clip_image.pt"))
    files = {"encoder": "clip_image.pt", "weights": "model.safetensors", "tokenizer": "tokenizer.json"}
    if args.clip_int8:
        shutil.copyfile(args.clip_int8, os.path.join(args.out, "clip_image.int8.pt"))
        files["encoder_int8"] = "clip_image.int8.pt"
    shutil.copyfile(os.path.join(ROOT, "models", "gpt2", "tokenizer.json"), os.path.join(args.out, "tokenizer.json"))
    with open(args.checkpoint, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    manifest = {
        "format": "clipcap-bundle", "version": 1,
        "name": args.name or os.path.basename(os.path.normpath(args.out)),
        "mapper": mapper, "gpt2": gpt2,
        "image": {"size": args.image_size, "mean": [0.48145466, 0.4578275, 0.40821073],
                  "std": [0.26862954, 0.26130258, 0.27577711]},
        "files": files,
        "stop_tokens": [args.stop],
        "generation": {"strategy": "beam", "beam_size": 5, "max_tokens": 67},
        "provenance": {"source": "scripts/convert_clipcap.py", "checkpoint": os.path.basename(args.checkpoint),
                       "checkpoint_sha256": digest},
    }
    with open(os.path.join(args.out, "clipcap.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    print(json.dumps({"out": args.out, "mapper": mapper, "gpt2": gpt2}))


if __name__ == "__main__":
    main()
