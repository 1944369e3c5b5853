"""Stand-in for OpenAI's `clip` package (tests only): `load` returns a model whose `visual`
is a tiny CLIP-shaped tower in fp16, as OpenAI's checkpoints store it."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tiny_vit import make  # noqa: E402


class _Model(torch.nn.Module):
    def __init__(self, name):
        super().__init__()
        self.visual = make(name).half()

    def encode_image(self, image):
        return self.visual(image)


def load(name, device="cpu", jit=False):
    assert not jit, "export_clip.py must rebuild the model (jit=False)"
    return _Model(name), None
