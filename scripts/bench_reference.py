"""Decoding speed: clipcap vs ClipCap's original algorithm vs HF generate, same weights.

All three start from the same CLIP embeddings and the same random real-size bundle (GPT-2
small shapes, made by make_test_bundle.py --size small), with the same number of threads:
  - original: ClipCap's generate_beam (beam 5, no KV cache), one image at a time
  - hf:       transformers GPT2LMHeadModel.generate(inputs_embeds=prefix, num_beams=5)
  - clipcap:  `clipcap bench-decode` beam 5, one image at a time, and 16 images batched

  python scripts/bench_reference.py --clipcap target/debug/clipcap [--bundle DIR] [--images 4]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "ref"))
from clipcap_reference import generate_beam, load_bundle_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clipcap", required=True, help="path to the clipcap binary")
    ap.add_argument("--bundle", help="bundle dir (default: a fresh random GPT-2-small bundle)")
    ap.add_argument("--images", type=int, default=4, help="images for the one-at-a-time timings")
    ap.add_argument("--batch-images", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=67)
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--dtypes", default="f32,int8", help="clipcap dtypes to time, comma-separated")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="clipcap-bench-")
    bundle = args.bundle
    if not bundle:
        bundle = os.path.join(tmp, "bundle")
        subprocess.run([sys.executable, os.path.join(HERE, "make_test_bundle.py"), "--out", bundle,
                        "--size", "small", "--seed", "0"], check=True, stdout=subprocess.DEVNULL)
    model, man = load_bundle_model(bundle)
    dim = man["mapper"]["prefix_dim"]
    torch.manual_seed(0)
    n = max(args.images, args.batch_images)
    clip = torch.randn(n, dim)
    emb = os.path.join(tmp, "clip.safetensors")
    save_file({"clip": clip.contiguous()}, emb)
    stop = 13

    res = {"threads": args.threads, "images": args.images, "max_tokens": args.max_tokens}

    dtypes = args.dtypes.split(",")
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"host: {cpu}, {args.threads} threads; clipcap dtypes {dtypes}", flush=True)
    res["cpu"] = cpu

    def ours(embeddings, images, batch, dtype="f32"):
        out = subprocess.run([args.clipcap, "bench-decode", "--model", bundle, "--embeddings", embeddings,
                              "--images", str(images), "--batch", str(batch), "--beam-size", "5",
                              "--max-tokens", str(args.max_tokens), "--threads", str(args.threads),
                              "--dtype", dtype],
                             check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    # This machine's speed drifts (shared host), so the three are interleaved image by image:
    # each round times the original, HF and clipcap on the same image back to back, and the
    # speed-ups are taken per round; the note reports their median and range.
    rounds = []
    with torch.no_grad():
        for i in range(args.images):
            prefix = model.prefix(clip[i:i + 1])
            t0 = time.perf_counter()
            generate_beam(model, stop, prefix, 5, args.max_tokens)
            original = time.perf_counter() - t0
            t0 = time.perf_counter()
            model.gpt.generate(inputs_embeds=prefix, attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long),
                               num_beams=5, max_new_tokens=args.max_tokens, eos_token_id=stop, pad_token_id=0,
                               do_sample=False, early_stopping=False)
            hf = time.perf_counter() - t0
            one = os.path.join(tmp, f"clip{i}.safetensors")
            save_file({"clip": clip[i:i + 1].contiguous()}, one)
            rnd = {"original_s": original, "hf_generate_s": hf}
            for d in dtypes:
                got = ours(one, 1, 1, d)
                key = "clipcap_s" if d == "f32" else f"clipcap_{d}_s"
                rnd[key] = got["seconds"]
                rnd[key[:-2] + "_weight_gbps"] = got.get("weight_gb_per_s")
            rounds.append(rnd)
            line = ", ".join(f"{k} {v:.2f}" for k, v in rnd.items() if k.endswith("_s") and v is not None)
            print(f"image {i}: {line}", flush=True)
    res["rounds"] = rounds
    for key in [k for k in rounds[0] if k.endswith("_s")]:
        res[key[:-2] + "_s_per_image"] = statistics.median(r[key] for r in rounds)
    for d in dtypes:
        if d == "f32":
            continue
        key = f"clipcap_{d}_s"
        ratios = {
            "vs_original": [r["original_s"] / r[key] for r in rounds],
            "vs_hf_generate": [r["hf_generate_s"] / r[key] for r in rounds],
            "vs_f32": [r["clipcap_s"] / r[key] for r in rounds] if "f32" in dtypes else [],
        }
        for name, v in ratios.items():
            if v:
                res[f"{d}_speedup_{name}"] = statistics.median(v)
                res[f"{d}_speedup_{name}_range"] = [min(v), max(v)]
    vs_orig = [r["original_s"] / r["clipcap_s"] for r in rounds]
    vs_hf = [r["hf_generate_s"] / r["clipcap_s"] for r in rounds]
    res["speedup_vs_original"] = statistics.median(vs_orig)
    res["speedup_vs_hf_generate"] = statistics.median(vs_hf)

    single16 = ours(emb, args.batch_images, 1)
    batch16 = ours(emb, args.batch_images, args.batch_images)
    res["clipcap_batch1_images_per_s"] = single16["images_per_s"]
    res["clipcap_batch16_images_per_s"] = batch16["images_per_s"]
    res["batch16_vs_batch1"] = batch16["images_per_s"] / single16["images_per_s"]
    for d in dtypes:
        if d != "f32":
            b = ours(emb, args.batch_images, args.batch_images, d)
            res[f"clipcap_{d}_batch16_images_per_s"] = b["images_per_s"]
            res[f"{d}_batch16_vs_f32"] = b["images_per_s"] / batch16["images_per_s"]
    print(json.dumps(res, indent=2))
    print(f"\nbeam 5, GPT-2 small shapes, {args.threads} threads, {args.max_tokens} max tokens, "
          f"{args.images} images interleaved (medians):")
    print(f"  original (no KV cache): {res['original_s_per_image']:.3f} s/image")
    print(f"  HF generate(num_beams=5): {res['hf_generate_s_per_image']:.3f} s/image")
    print(f"  clipcap, one image at a time: {res['clipcap_s_per_image']:.3f} s/image "
          f"({res['speedup_vs_original']:.1f}x original [per image {min(vs_orig):.1f}-{max(vs_orig):.1f}], "
          f"{res['speedup_vs_hf_generate']:.1f}x HF [{min(vs_hf):.1f}-{max(vs_hf):.1f}])")
    print(f"  clipcap, {args.batch_images} images batched: {res['clipcap_batch16_images_per_s']:.2f} images/s "
          f"vs {res['clipcap_batch1_images_per_s']:.2f} one at a time ({res['batch16_vs_batch1']:.1f}x)")
    for d in dtypes:
        if d != "f32" and f"{d}_speedup_vs_original" in res:
            lo, hi = res[f"{d}_speedup_vs_original_range"]
            print(f"  clipcap {d}, one image at a time: {res[f'clipcap_{d}_s_per_image']:.3f} s/image "
                  f"({res[f'{d}_speedup_vs_original']:.1f}x original [{lo:.1f}-{hi:.1f}], "
                  f"{res[f'{d}_speedup_vs_hf_generate']:.1f}x HF, {res.get(f'{d}_speedup_vs_f32', float('nan')):.1f}x f32); "
                  f"{args.batch_images} batched: {res[f'clipcap_{d}_batch16_images_per_s']:.2f} images/s "
                  f"({res[f'{d}_batch16_vs_f32']:.1f}x f32)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
