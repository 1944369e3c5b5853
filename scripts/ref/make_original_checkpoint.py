"""Makes a checkpoint in the exact format of ClipCap's train.py, for the converter's test.

Random weights, saved with `torch.save(model.state_dict())` as a GPU run with transformers 4.x
left them: storages tagged `cuda:0`, per-layer `attn.bias` / `attn.masked_bias` buffers, and
`gpt.lm_head.weight` sharing its storage with `wte`. Also writes a TorchScript encoder exposing
`encode_image` (like OpenAI's JIT archives), CLIP embeddings, and the captions ClipCap's own
`generate_beam` / `generate2` give for them with the original model.

  python make_original_checkpoint.py --out DIR [--mapping mlp|transformer] [--prefix-length 10]
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from clipcap_reference import ClipCaptionModel, generate2, generate_beam  # noqa: E402
from make_test_bundle import EncodeImage, TinyEncoder  # noqa: E402
from transformers import GPT2Config  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--mapping", default="mlp")
ap.add_argument("--prefix-length", type=int, default=10)
ap.add_argument("--seed", type=int, default=0)
args = ap.parse_args()
os.makedirs(args.out, exist_ok=True)
torch.manual_seed(args.seed)
cfg = GPT2Config(vocab_size=50257, n_positions=128, n_embd=64, n_layer=2, n_head=4, attn_implementation="eager")
model = ClipCaptionModel(cfg, args.prefix_length, 10, 32, 2, args.mapping).eval()
with torch.no_grad():
    model.gpt.transformer.wte.weight.normal_(0, 0.3)
sd = model.state_dict()
# What transformers 4.x kept in GPT-2 state dicts; lm_head shares wte's storage.
for i in range(cfg.n_layer):
    sd[f"gpt.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(128, 128, dtype=torch.uint8)).view(1, 1, 128, 128)
    sd[f"gpt.transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
sd["gpt.lm_head.weight"] = sd["gpt.transformer.wte.weight"]
assert sd["gpt.lm_head.weight"].data_ptr() == sd["gpt.transformer.wte.weight"].data_ptr()
real_tag = torch.serialization.location_tag
torch.serialization.location_tag = lambda storage: "cuda:0"
try:
    torch.save(sd, os.path.join(args.out, "original.pt"))
finally:
    torch.serialization.location_tag = real_tag

visual = TinyEncoder(32).eval()
torch.jit.script(EncodeImage(visual)).save(os.path.join(args.out, "clip.pt"))
clip = torch.randn(3, 32)
save_file({"clip": clip}, os.path.join(args.out, "embeddings.safetensors"))
expected = []
with torch.no_grad():
    for i in range(3):
        prefix = model.prefix(clip[i:i + 1])
        beams, _ = generate_beam(model, 13, prefix, 5, 40)
        expected.append({"beam": beams[0], "greedy": generate2(model, 13, prefix, 40)})
json.dump(expected, open(os.path.join(args.out, "expected.json"), "w"))
print("ok")
