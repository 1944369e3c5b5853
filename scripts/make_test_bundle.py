"""Builds a small random model bundle for tests and benchmarks (no downloads).

The bundle has the real GPT-2 tokenizer (models/gpt2/tokenizer.json), a random TorchScript
image encoder, and random mapper + GPT-2 weights in ClipCap's names. Shapes are chosen by
--size: `tiny` (fast tests) or `small` (GPT-2 small: 12 layers, 768 wide, 50257 tokens).

  python scripts/make_test_bundle.py --out DIR [--size tiny|small] [--mapping mlp|transformer]
      [--prefix-length 10] [--clip-length 10] [--num-layers 8] [--normalize-prefix]
      [--encoder tiny|vit-tiny|vit-b32] [--int8-encoder] [--seed 0] [--stop .]
"""
import argparse
import json
import os
import shutil

import torch
import torch.nn as nn
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
import sys  # noqa: E402

sys.path.insert(0, os.path.join(HERE, "ref"))
from clipcap_reference import ClipCaptionModel  # noqa: E402
from transformers import GPT2Config  # noqa: E402

from clip_int8 import quantize_int8  # noqa: E402


class TinyEncoder(nn.Module):
    """A small conv net standing in for CLIP's image tower: [B,3,S,S] -> [B,D]."""

    def __init__(self, dim):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 8, stride=8)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.proj = nn.Linear(32 * 4 * 4, dim)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return self.proj(x)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """CLIP's transformer block: pre-LayerNorm attention and a QuickGELU MLP, tokens first."""

    def __init__(self, width, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), QuickGELU(), nn.Linear(4 * width, width))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class ViTB32(nn.Module):
    """CLIP's ViT-B/32 image tower in shape and structure (patch 32, width 768, 12 layers,
    512-d output; `nn.MultiheadAttention` as in OpenAI's code), random weights."""

    def __init__(self, dim=512, width=768, layers=12, heads=12, size=224):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 32, stride=32, bias=False)
        n = (size // 32) ** 2
        self.class_embedding = nn.Parameter(torch.randn(width) * 0.02)
        self.positional_embedding = nn.Parameter(torch.randn(n + 1, width) * 0.01)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, dim) * width ** -0.5)

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
        x = self.transformer(x.transpose(0, 1)).transpose(0, 1)
        return self.ln_post(x[:, 0]) @ self.proj


class EncodeImage(nn.Module):
    """Exposes `encode_image` like OpenAI's JIT archives (and a forward that fails)."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual

    @torch.jit.export
    def encode_image(self, x):
        return self.visual(x)

    def forward(self, text: torch.Tensor):
        raise RuntimeError("this archive's forward takes (image, text); use encode_image")


def save_encoder(visual, path, encode_image):
    if encode_image:
        scripted = torch.jit.script(EncodeImage(visual))
    else:
        # The trace checker compares graphs by their mangled module names, which differ between
        # two traces of the same tower; the numerics are what the tests check.
        with torch.no_grad():
            scripted = torch.jit.trace(visual, torch.zeros(1, 3, 224, 224), check_trace=False)
    scripted.save(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", choices=["tiny", "small"], default="tiny")
    ap.add_argument("--mapping", choices=["mlp", "transformer"], default="mlp")
    ap.add_argument("--prefix-length", type=int, default=10)
    ap.add_argument("--clip-length", type=int, default=10)
    ap.add_argument("--num-layers", type=int, default=8)
    ap.add_argument("--normalize-prefix", action="store_true")
    ap.add_argument("--encoder", choices=["tiny", "vit-tiny", "vit-b32"], default="tiny",
                    help="vit-tiny: CLIP's ViT structure at width 64, 2 layers (fast tests of int8 attention)")
    ap.add_argument("--encode-image", action="store_true", help="expose encode_image, not forward")
    ap.add_argument("--int8-encoder", action="store_true",
                    help="also write clip_image.int8.pt (clip_int8.py), named by files.encoder_int8")
    ap.add_argument("--clip-dim", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop", default=".")
    ap.add_argument("--wte-std", type=float, default=None,
                    help="std of the token embedding (peaked logits make decoding less tie-prone)")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)

    if args.size == "tiny":
        cfg = GPT2Config(vocab_size=50257, n_positions=128, n_embd=64, n_layer=2, n_head=4)
        wte_std = args.wte_std or 0.3
    else:
        cfg = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
        wte_std = args.wte_std or 0.1
    clip_dim = args.clip_dim or (512 if args.encoder == "vit-b32" or args.size == "small" else 32)

    with torch.no_grad():
        model = ClipCaptionModel(cfg, args.prefix_length, args.clip_length, clip_dim, args.num_layers,
                                 args.mapping)
        model.gpt.transformer.wte.weight.normal_(0, wte_std)
        # Random layer norms and biases so every parameter matters in the parity tests.
        for name, p in model.gpt.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.05)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()
          if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "gpt.lm_head.weight"}
    save_file(sd, os.path.join(args.out, "model.safetensors"))

    if args.encoder == "tiny":
        visual = TinyEncoder(clip_dim)
    elif args.encoder == "vit-tiny":
        visual = ViTB32(clip_dim, width=64, layers=2, heads=4)
    else:
        visual = ViTB32(clip_dim)
    visual.eval()
    save_encoder(visual, os.path.join(args.out, "clip_image.pt"), args.encode_image)
    files = {"encoder": "clip_image.pt", "weights": "model.safetensors", "tokenizer": "tokenizer.json"}
    if args.int8_encoder:
        save_encoder(quantize_int8(visual), os.path.join(args.out, "clip_image.int8.pt"), args.encode_image)
        files["encoder_int8"] = "clip_image.int8.pt"
    shutil.copyfile(os.path.join(ROOT, "models", "gpt2", "tokenizer.json"),
                    os.path.join(args.out, "tokenizer.json"))
    manifest = {
        "format": "clipcap-bundle",
        "version": 1,
        "name": f"random-{args.size}-{args.mapping}",
        "mapper": {"mapping": args.mapping, "prefix_dim": clip_dim, "prefix_length": args.prefix_length,
                   "clip_length": args.clip_length, "num_layers": args.num_layers,
                   "normalize_prefix": args.normalize_prefix},
        "gpt2": {"vocab_size": cfg.vocab_size, "n_positions": cfg.n_positions, "n_embd": cfg.n_embd,
                 "n_layer": cfg.n_layer, "n_head": cfg.n_head, "layer_norm_epsilon": cfg.layer_norm_epsilon,
                 "activation_function": cfg.activation_function, "n_inner": None},
        "image": {"size": 224, "mean": [0.48145466, 0.4578275, 0.40821073],
                  "std": [0.26862954, 0.26130258, 0.27577711]},
        "files": files,
        "stop_tokens": [args.stop],
        "generation": {},
        "provenance": {"source": "scripts/make_test_bundle.py (random weights)", "seed": args.seed},
    }
    with open(os.path.join(args.out, "clipcap.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    print(args.out)


if __name__ == "__main__":
    main()
