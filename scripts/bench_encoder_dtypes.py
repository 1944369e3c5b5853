"""Images/s of a TorchScript image encoder cast to f32, bf16 and f16, interleaved: the cost of
the f32 fallback that a trace with baked casts gets, against the half types a scripted export
runs in. On the CPU here; pass --device cuda on a GPU.
  python scripts/bench_encoder_dtypes.py ENCODER.pt [--batch 16] [--rounds 3] [--threads 2]"""
import argparse
import time

import torch

ap = argparse.ArgumentParser()
ap.add_argument("encoder")
ap.add_argument("--batch", type=int, default=16)
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--size", type=int, default=224)
ap.add_argument("--device", default="cpu")
args = ap.parse_args()
torch.set_num_threads(args.threads)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(f"CPU: {cpu}, {torch.get_num_threads()} threads; device {args.device}; batch {args.batch}")
kinds = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
models = {k: torch.jit.load(args.encoder, map_location=args.device).eval().to(dt) for k, dt in kinds.items()}


def run(k):
    m, xin = models[k], x.to(args.device, kinds[k])
    out = m.encode_image(xin) if hasattr(m, "encode_image") else m(xin)
    return out.float().cpu()


rates = {k: [] for k in kinds}
with torch.no_grad():
    for k in kinds:
        run(k)  # warm-up
    for _ in range(args.rounds):
        for k in kinds:
            t = time.perf_counter()
            run(k)
            rates[k].append(args.batch / (time.perf_counter() - t))
print("| dtype | images/s per round | best, / f32's best |\n|---|---|---:|")
for k, v in rates.items():
    print(f"| {k} | {' '.join(f'{r:.1f}' for r in v)} | {max(v) / max(rates['f32']):.2f}x |")
