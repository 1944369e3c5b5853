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
    with torch.no_grad():
        t0 = time.perf_counter()
        for i in range(args.images):
            generate_beam(model, stop, model.prefix(clip[i:i + 1]), 5, args.max_tokens)
        res["original_s_per_image"] = (time.perf_counter() - t0) / args.images

        t0 = time.perf_counter()
        for i in range(args.images):
            prefix = model.prefix(clip[i:i + 1])
            model.gpt.generate(inputs_embeds=prefix, attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long),
                               num_beams=5, max_new_tokens=args.max_tokens, eos_token_id=stop, pad_token_id=0,
                               do_sample=False, early_stopping=False)
        res["hf_generate_s_per_image"] = (time.perf_counter() - t0) / args.images

    def ours(images, batch):
        out = subprocess.run([args.clipcap, "bench-decode", "--model", bundle, "--embeddings", emb,
                              "--images", str(images), "--batch", str(batch), "--beam", "5",
                              "--max-tokens", str(args.max_tokens), "--threads", str(args.threads)],
                             check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    one = ours(args.images, 1)
    res["clipcap_s_per_image"] = one["seconds"] / one["images"]
    single16 = ours(args.batch_images, 1)
    batch16 = ours(args.batch_images, args.batch_images)
    res["clipcap_batch1_images_per_s"] = single16["images_per_s"]
    res["clipcap_batch16_images_per_s"] = batch16["images_per_s"]
    res["speedup_vs_original"] = res["original_s_per_image"] / res["clipcap_s_per_image"]
    res["speedup_vs_hf_generate"] = res["hf_generate_s_per_image"] / res["clipcap_s_per_image"]
    res["batch16_vs_batch1"] = batch16["images_per_s"] / single16["images_per_s"]
    print(json.dumps(res, indent=2))
    print(f"\nbeam 5, GPT-2 small shapes, {args.threads} threads, {args.max_tokens} max tokens:")
    print(f"  original (no KV cache): {res['original_s_per_image']:.3f} s/image")
    print(f"  HF generate(num_beams=5): {res['hf_generate_s_per_image']:.3f} s/image")
    print(f"  clipcap, one image at a time: {res['clipcap_s_per_image']:.3f} s/image "
          f"({res['speedup_vs_original']:.1f}x original, {res['speedup_vs_hf_generate']:.1f}x HF)")
    print(f"  clipcap, {args.batch_images} images batched: {res['clipcap_batch16_images_per_s']:.2f} images/s "
          f"vs {res['clipcap_batch1_images_per_s']:.2f} one at a time ({res['batch16_vs_batch1']:.1f}x)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
