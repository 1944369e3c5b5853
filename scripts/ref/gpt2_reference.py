"""Reference outputs of Hugging Face transformers' GPT2LMHeadModel for tests/gpt2_parity.rs.

Writes into OUT: config.json + model.safetensors (a tiny random GPT-2, HF layout without
`lm_head`), clipcap_style.safetensors (the same weights as ClipCap's train.py saves them:
`gpt.transformer.*`, per-layer attn.bias/masked_bias buffers and a tied `gpt.lm_head.weight`),
and io.safetensors with inputs and HF's logits.
"""
import argparse
import os

import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--seed", type=int, default=0)
args = ap.parse_args()
os.makedirs(args.out, exist_ok=True)
torch.manual_seed(args.seed)

cfg = GPT2Config(vocab_size=211, n_positions=40, n_embd=48, n_layer=3, n_head=4,
                 activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                 attn_implementation="eager")
model = GPT2LMHeadModel(cfg).eval()
# Non-trivial layer norms and biases so every parameter matters.
with torch.no_grad():
    for name, p in model.named_parameters():
        if name.endswith("bias") or "ln_" in name:
            p.add_(torch.randn_like(p) * 0.1)
model.save_pretrained(args.out, safe_serialization=True)

sd = {f"gpt.{k}": v.clone().contiguous() for k, v in model.state_dict().items()}
sd["gpt.lm_head.weight"] = model.transformer.wte.weight.detach().clone()
for i in range(cfg.n_layer):
    sd[f"gpt.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(40, 40, dtype=torch.bool)).view(1, 1, 40, 40)
    sd[f"gpt.transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
save_file(sd, os.path.join(args.out, "clipcap_style.safetensors"))

B, T, E = 2, 9, cfg.n_embd
embeds = torch.randn(B, T, E) * 0.5
ids = torch.randint(0, cfg.vocab_size, (B, T))
lengths = [9, 5, 1]
mask = torch.zeros(3, T, dtype=torch.long)
for r, n in enumerate(lengths):
    mask[r, T - n:] = 1
padded = torch.randn(3, T, E) * 0.5
position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
with torch.no_grad():
    out = {
        "embeds": embeds,
        "ids": ids,
        "logits_embeds": model(inputs_embeds=embeds).logits,
        "logits_ids": model(input_ids=ids).logits,
        "padded_embeds": padded,
        "padded_mask": mask,
        "logits_padded": model(inputs_embeds=padded, attention_mask=mask, position_ids=position_ids).logits,
    }
save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(args.out, "io.safetensors"))
print("ok")
