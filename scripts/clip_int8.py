"""int8 weights for a CLIP image tower on the CPU, before it is scripted or traced.

`quantize_int8(visual)` returns a copy in which every `nn.Linear`, and the input and output
projections of every `nn.MultiheadAttention` (OpenAI's and open_clip's towers use it), become
`RowScaledInt8Linear`: weights int8 per output channel (scale = max |w| / 127, symmetric),
activations f32, multiplied by PyTorch's `quantized::linear_dynamic` (fbgemm). Convolutions,
LayerNorm, softmax and the residual arithmetic stay f32.

PyTorch's own dynamic quantization takes one activation range per call, so an image's
embedding would depend on the images batched with it. Here each row (a token of one image) is
divided by its own largest magnitude and two guard rows (+1, -1) pin the range the op sees to
[-1, 1], as clipcap's GPT-2 int8 path does (`src/model/int8.rs`): an image's embedding is the
same alone or in any batch.

Used by `export_clip.py --quantize int8` and `make_test_bundle.py --int8-encoder`.
"""
import copy
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class RowScaledInt8Linear(nn.Module):
    """`x @ w.T + b` with `w` int8 per output channel and each row of `x` scaled on its own."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        super().__init__()
        w = weight.detach().float().contiguous()
        scales = (w.abs().amax(1).clamp_min(1e-12) / 127.0).double()
        qw = torch.quantize_per_channel(w, scales, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(qw, None)
        self.in_features = w.shape[1]
        self.out_features = w.shape[0]
        b = torch.zeros(w.shape[0]) if bias is None else bias.detach().float()
        self.register_buffer("bias", b.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        rows = x2.shape[0]
        # max |x| per row as max(max x, -min x): two plain reductions run 4x faster than abs()
        # then amax, and 9x faster than an inf-norm; then one pass writes the scaled rows.
        scale = torch.maximum(x2.amax(1, keepdim=True), x2.amin(1, keepdim=True).neg()).clamp_min(1e-30)
        buf = torch.empty(rows + 2, self.in_features, dtype=x2.dtype, device=x2.device)
        torch.div(x2, scale, out=buf[:rows])
        buf[rows].fill_(1.0)
        buf[rows + 1].fill_(-1.0)
        y = torch.ops.quantized.linear_dynamic(buf, self.packed, True)
        y = torch.addcmul(self.bias, y[:rows], scale)
        return y.reshape(shape[:-1] + (self.out_features,)).to(x.dtype)


class Int8SelfAttention(nn.Module):
    """`nn.MultiheadAttention` for self-attention (query = key = value) with int8 projections.

    Called as the towers call it: `attn(x, x, x, need_weights=False, attn_mask=mask)[0]`.
    """

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not mha._qkv_same_embed_dim:
            raise ValueError("int8 attention needs one in_proj_weight (query, key and value the same width)")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("int8 attention: bias_k/bias_v and add_zero_attn are not supported")
        self.qkv = RowScaledInt8Linear(mha.in_proj_weight, mha.in_proj_bias)
        self.out = RowScaledInt8Linear(mha.out_proj.weight, mha.out_proj.bias)
        self.heads = mha.num_heads
        self.batch_first = mha.batch_first

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if key_padding_mask is not None:
            raise RuntimeError("int8 attention: key_padding_mask is not supported")
        x = query if self.batch_first else query.transpose(0, 1)
        b, t, e = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4)
        mask = attn_mask
        if mask is not None and mask.dtype == torch.bool:
            mask = mask.logical_not()  # nn.MultiheadAttention: True = not allowed; SDPA: True = allowed
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask, is_causal=is_causal)
        o = self.out(o.transpose(1, 2).reshape(b, t, e))
        if not self.batch_first:
            o = o.transpose(0, 1)
        return o, None


class SiLU(nn.Module):
    """QuickGELU `x * sigmoid(1.702 x)` once 1.702 is folded into the layers around it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x)


def quantize_int8(visual: nn.Module) -> nn.Module:
    """A copy of `visual` with int8 linear layers and attention projections (see the module notes)."""
    q = copy.deepcopy(visual).float().eval()
    _fold_quick_gelu(q)
    _swap(q)
    return q


def _fold_quick_gelu(module: nn.Module):
    """Linear -> QuickGELU -> Linear (CLIP's MLP) becomes Linear*1.702 -> SiLU -> Linear/1.702.

    QuickGELU(x) = silu(1.702 x) / 1.702: the two scalings fold exactly into the weights
    around it (an int8 weight's per-channel scale absorbs them), and SiLU is one pass over the
    MLP's widest activations where QuickGELU's mul, sigmoid and mul are three.
    """
    for child in module.children():
        _fold_quick_gelu(child)
    if not isinstance(module, nn.Sequential):
        return
    layers = list(module)
    for i in range(len(layers) - 2):
        fc, act, proj = layers[i:i + 3]
        if isinstance(fc, nn.Linear) and type(act).__name__ == "QuickGELU" and isinstance(proj, nn.Linear):
            with torch.no_grad():
                fc.weight.mul_(1.702)
                if fc.bias is not None:
                    fc.bias.mul_(1.702)
                proj.weight.div_(1.702)
            module[i + 1] = SiLU()


def _swap(module: nn.Module):
    for name, child in module.named_children():
        if isinstance(child, nn.MultiheadAttention):
            setattr(module, name, Int8SelfAttention(child))
        elif isinstance(child, nn.Linear):
            setattr(module, name, RowScaledInt8Linear(child.weight, child.bias))
        else:
            _swap(child)


def linear_weight_bytes(visual: nn.Module) -> Tuple[int, int]:
    """(f32 bytes, int8 bytes) of the weights `quantize_int8` converts."""
    # Attention's out_proj is an nn.Linear, so it is counted with the linear layers.
    n = sum(m.weight.numel() for m in visual.modules() if isinstance(m, nn.Linear))
    n += sum(m.in_proj_weight.numel() for m in visual.modules() if isinstance(m, nn.MultiheadAttention))
    return 4 * n, n
