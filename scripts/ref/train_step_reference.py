"""One training step of ClipCap in PyTorch, for tests/train_parity.rs.

Reads a bundle (initial weights) and a batch (tokens, mask, clip) written by the test, computes
the caption loss (optionally under bf16 autocast; token cross-entropy after the prefix, padding masked out; eval mode, i.e. no
dropout, as our trainer) and takes one torch.optim.AdamW step. Writes the loss, the updated
weights, and the learning-rate factors of transformers' get_linear_schedule_with_warmup.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as nnf
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from clipcap_reference import load_bundle_model  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--bundle", required=True)
ap.add_argument("--batch", required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--only-prefix", action="store_true")
ap.add_argument("--amp", choices=["none", "bf16"], default="none",
                help="bf16: the forward pass under torch.autocast('cpu', torch.bfloat16)")
args = ap.parse_args()
torch.set_num_threads(2)
model, man = load_bundle_model(args.bundle)
model.eval()
b = load_file(args.batch)
tokens, mask, clip = b["tokens"].long(), b["mask"].float(), b["clip"].float()
params = [p for n, p in model.named_parameters() if not (args.only_prefix and n.startswith("gpt."))]
if args.only_prefix:
    for n, p in model.gpt.named_parameters():
        p.requires_grad_(False)
opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)
L = man["mapper"]["prefix_length"]
with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp == "bf16"):
    prefix = model.prefix(clip)
    x = torch.cat((prefix, model.gpt.transformer.wte(tokens).to(prefix.dtype)), dim=1)
    logits = model.gpt(inputs_embeds=x).logits[:, L - 1:-1].float()
nll = nnf.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.flatten(), reduction="none")
loss = (nll * mask.flatten()).sum() / mask.sum()
opt.zero_grad()
loss.backward()
opt.step()
sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()
      if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "gpt.lm_head.weight"}
save_file(sd, os.path.join(args.out, "after.safetensors"))

from transformers import get_linear_schedule_with_warmup  # noqa: E402

o2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
sched = get_linear_schedule_with_warmup(o2, num_warmup_steps=5, num_training_steps=20)
factors = []
for _ in range(22):
    factors.append(o2.param_groups[0]["lr"])
    o2.step()
    sched.step()
json.dump({"loss": loss.item(), "lr_factors": factors}, open(os.path.join(args.out, "result.json"), "w"))
print("ok")
