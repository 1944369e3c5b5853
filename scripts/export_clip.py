"""Exports CLIP's image tower as a device-neutral fp32 TorchScript file for clipcap bundles.

For users with the internet (weights are downloaded by the `clip` or `open_clip` package):

  pip install git+https://github.com/openai/CLIP.git      # or: pip install open_clip_torch
  python scripts/export_clip.py --openai ViT-B/32 --out clip_image.pt
  python scripts/export_clip.py --openai /path/to/ViT-B-32.pt --out clip_image.pt   # a downloaded JIT archive
  python scripts/export_clip.py --open-clip ViT-B-32 --pretrained laion2b_s34b_b79k --out clip_image.pt

OpenAI's own JIT archives were traced on CUDA in fp16 with the device baked into constants
(`clip.load(jit=True)` patches them at load time), so they are not loaded as they are: the
model is rebuilt from their weights (`clip.load(jit=False)`), cast to fp32 on the CPU, and its
`visual` tower compiled with `torch.jit.script`, which keeps `x.dtype` and `x.device` as they
are at run time: the archive runs on any device in any dtype (the server casts it, --dtype).
A tower that cannot be scripted is traced instead, and a trace bakes every `.to(x.dtype)` and
`device=x.device` into constants: the script then refuses to write it when it found a baked
device (it would fail on CUDA), unless --allow-trace is given.
The script prints the embedding width and input size to put in the bundle (prefix_dim,
image.size); convert_clipcap.py reads them from the file itself.

`--quantize int8` writes the CPU's int8 variant instead (clip_int8.py: int8 linear layers and
attention projections, per-row activation scales, so an image's embedding does not depend on
its batch). Export both, put the int8 file in the bundle and name it in the manifest's
`files.encoder_int8`: `--dtype int8` then encodes with it. It prints the embeddings' cosine to
the f32 tower's on random probe images.

  python scripts/export_clip.py --openai ViT-B/32 --quantize int8 --out clip_image.int8.pt
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from clip_int8 import quantize_int8  # noqa: E402


class EncodeImage(torch.nn.Module):
    """`encode_image` as in OpenAI's archives, plus `forward` (the same)."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual

    @torch.jit.export
    def encode_image(self, x):
        return self.visual(x)

    def forward(self, x):
        return self.visual(x)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--openai", help="OpenAI CLIP model name (ViT-B/32, RN50x4, ...) or a downloaded .pt")
    src.add_argument("--open-clip", help="open_clip model name")
    ap.add_argument("--pretrained", help="open_clip pretrained tag")
    ap.add_argument("--out", required=True)
    ap.add_argument("--trace", action="store_true", help="trace even if the tower can be scripted (tests)")
    ap.add_argument("--allow-trace", action="store_true",
                    help="write a traced archive even if it baked a device (CPU-only, f32-only)")
    ap.add_argument("--quantize", choices=["int8"], help="write the CPU's int8 variant (see above)")
    args = ap.parse_args()

    if args.openai:
        import clip  # noqa: PLC0415 - optional dependency

        model, _ = clip.load(args.openai, device="cpu", jit=False)
        visual = model.visual
        size = visual.input_resolution
    else:
        import open_clip  # noqa: PLC0415 - optional dependency

        model, _, preprocess = open_clip.create_model_and_transforms(args.open_clip, pretrained=args.pretrained)
        visual = model.visual
        size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    visual = visual.float().eval().cpu()
    example = torch.zeros(1, 3, size, size)
    probe = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    cosine = None
    if args.quantize == "int8":
        with torch.no_grad():
            f32 = visual(probe)
        visual = quantize_int8(visual)
    with torch.no_grad():
        want = visual(probe)
        if args.quantize == "int8":
            cosine = float(torch.nn.functional.cosine_similarity(want, f32, dim=-1).min())
        method = "script"
        try:
            if args.trace:
                raise RuntimeError("--trace asked for")
            module = torch.jit.script(EncodeImage(visual))
            got = module.encode_image(probe)
            if not torch.allclose(got, want, atol=1e-5, rtol=1e-4):
                raise RuntimeError("the scripted tower computes something else")
        except Exception as e:  # noqa: BLE001 - any scripting failure means: trace instead
            print(f"export_clip: cannot script the tower ({str(e).splitlines()[0]}); tracing it", flush=True)
            method = "trace"
            module = torch.jit.script(EncodeImage(torch.jit.trace(visual, example, check_trace=False)))
        dim = module.encode_image(example).shape[-1]
    baked = baked_devices(module)
    # An int8 archive runs on the CPU only, so a baked CPU device does no harm there.
    if baked and not args.allow_trace and args.quantize is None:
        raise SystemExit(
            f"export_clip: the traced tower has {baked} baked device constant(s): it would fail on "
            "CUDA (and in f16/bf16). Make the tower scriptable, or pass --allow-trace for a CPU/f32-only archive.")
    module.save(args.out)
    # Loading back on the CPU proves no CUDA constant was baked in.
    check = torch.jit.load(args.out, map_location="cpu")
    with torch.no_grad():
        assert check.encode_image(example).shape[-1] == dim
    summary = {"out": args.out, "embedding_dim": int(dim), "image_size": int(size), "method": method,
               "baked_devices": baked}
    if cosine is not None:
        summary.update(quantize="int8", min_cosine_to_f32=round(cosine, 5))
    print(json.dumps(summary))


def baked_devices(module):
    """Device constants in the compiled graph (a trace's `device=x.device` becomes one)."""
    graph = str(module.encode_image.inlined_graph) if hasattr(module.encode_image, "inlined_graph") \
        else str(module.encode_image.graph)
    return sum(1 for line in graph.splitlines() if "Device = prim::Constant" in line)


if __name__ == "__main__":
    main()
