"""A stand-in for OpenAI's `clip` package (no weights can be downloaded here) for the tests of
scripts/export_clip.py: `clip.load` returns a model whose `visual` is a random tower with CLIP's
ViT structure (make_test_bundle.py's, at test size)."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
from make_test_bundle import ViTB32  # noqa: E402


class _Model:
    pass


def load(name, device="cpu", jit=False):
    torch.manual_seed(0)
    model = _Model()
    model.visual = ViTB32(32, width=64, layers=2, heads=4)
    model.visual.input_resolution = 224
    return model, None
