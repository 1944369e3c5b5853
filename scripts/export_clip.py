"""Exports CLIP's image tower as a device-neutral fp32 TorchScript file for clipcap bundles.

For users with the internet (weights are downloaded by the `clip` or `open_clip` package):

  pip install git+https://github.com/openai/CLIP.git      # or: pip install open_clip_torch
  python scripts/export_clip.py --openai ViT-B/32 --out clip_image.pt
  python scripts/export_clip.py --openai /path/to/ViT-B-32.pt --out clip_image.pt   # a downloaded JIT archive
  python scripts/export_clip.py --open-clip ViT-B-32 --pretrained laion2b_s34b_b79k --out clip_image.pt

OpenAI's own JIT archives were traced on CUDA in fp16 with the device baked into constants
(`clip.load(jit=True)` patches them at load time), so they are not loaded as they are: the
model is rebuilt from their weights (`clip.load(jit=False)`), cast to fp32 on the CPU, and its
`visual` tower traced again. The server casts it to f16/bf16 on a GPU when asked (--dtype).
The script prints the embedding width and input size to put in the bundle (prefix_dim,
image.size); convert_clipcap.py reads them from the file itself.
"""
import argparse
import json

import torch


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
    with torch.no_grad():
        traced_visual = torch.jit.trace(visual, example)
        module = torch.jit.script(EncodeImage(traced_visual))
        dim = module.encode_image(example).shape[-1]
    module.save(args.out)
    # Loading back on the CPU proves no CUDA constant was baked in.
    check = torch.jit.load(args.out, map_location="cpu")
    with torch.no_grad():
        assert check.encode_image(example).shape[-1] == dim
    print(json.dumps({"out": args.out, "embedding_dim": int(dim), "image_size": int(size)}))


if __name__ == "__main__":
    main()
