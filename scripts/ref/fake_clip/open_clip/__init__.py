"""Stand-in for the `open_clip` package (tests only): a tiny CLIP-shaped tower whose
`image_size` is a tuple, as open_clip's are."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tiny_vit import make  # noqa: E402


class _Model(torch.nn.Module):
    def __init__(self, name):
        super().__init__()
        self.visual = make(name)
        self.visual.image_size = (self.visual.input_resolution, self.visual.input_resolution)


def create_model_and_transforms(name, pretrained=None):
    return _Model(name + (pretrained or "")), None, None
