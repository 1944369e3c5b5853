"""A tiny vision transformer shaped like CLIP's image tower (patch conv, class token, positional
embedding, pre/post LayerNorm, transformer, projection), with seeded random weights.

Used only by the stand-in `clip` and `open_clip` packages next to it, so that tests can run
scripts/export_clip.py here, where the real packages cannot download weights.
"""
import torch
import torch.nn as nn


class TinyVisionTransformer(nn.Module):
    def __init__(self, resolution=32, patch=8, width=32, layers=2, heads=4, output_dim=48):
        super().__init__()
        self.input_resolution = resolution
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((resolution // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x):
        x = self.conv1(x.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)
        # As OpenAI's VisionTransformer writes it: a trace bakes this zeros' dtype and device.
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype,
                                                             device=x.device)
        x = torch.cat([cls, x], 1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


def make(name, seed=0):
    torch.manual_seed(seed + sum(name.encode()))
    return TinyVisionTransformer().eval()
