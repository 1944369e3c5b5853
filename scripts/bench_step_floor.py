"""The f32 floor of one beam-search decode step of GPT-2 small on this CPU, in plain PyTorch.

The same ops our Decoder runs per step (12 pre-norm blocks over a preallocated KV cache, fused
addmm linears, SDPA, the tied lm_head, log-softmax + top-k, the beam gather of the cache), with
nothing else around them, for ROWS rows (images x beams), 2 threads. It also tries the linear
weights stored [out, in] instead of Conv1D's [in, out]. If this loop is as slow per step as
`clipcap bench-decode`, the time is in libtorch's kernels, not in our code around them.

  python scripts/bench_step_floor.py [ROWS]      (default 5: one image, 5 beams)
"""
import sys
import time

import torch
import torch.nn.functional as F

E, H, D, L, V = 768, 12, 64, 12, 50257
CAP = 80  # cache columns: 10 prefix + 67 tokens, rounded up


def linear_weights(n_in, n_out):
    w = torch.randn(n_in, n_out) * 0.02
    b = torch.zeros(n_out)
    return {"in_out": (w, b), "out_in": (w.t().contiguous(), b.view(-1, 1))}


def main():
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    torch.set_num_threads(2)
    torch.manual_seed(0)
    ones, zeros = torch.ones(E), torch.zeros(E)
    blocks = [{"qkv": linear_weights(E, 3 * E), "proj": linear_weights(E, E),
               "fc": linear_weights(E, 4 * E), "out": linear_weights(4 * E, E)} for _ in range(L)]
    wte = torch.randn(V, E) * 0.02

    def linear(block, name, x, layout):
        w, b = block[name][layout]
        if layout == "out_in":
            return torch.addmm(b, w, x.t()).t()
        return torch.addmm(b, x, w)

    def run(layout):
        keys = [torch.zeros(rows, H, CAP, D) for _ in range(L)]
        values = [torch.zeros(rows, H, CAP, D) for _ in range(L)]

        def step(pos):
            x = torch.randn(rows, E)
            for i, blk in enumerate(blocks):
                h = F.layer_norm(x, (E,), ones, zeros)
                qkv = linear(blk, "qkv", h, layout).reshape(rows, 1, 3 * E)
                q, k, v = [p.view(rows, 1, H, D).transpose(1, 2) for p in qkv.split(E, 2)]
                keys[i][:, :, pos:pos + 1].copy_(k)
                values[i][:, :, pos:pos + 1].copy_(v)
                a = F.scaled_dot_product_attention(q, keys[i][:, :, :pos + 1], values[i][:, :, :pos + 1])
                x = x + linear(blk, "proj", a.transpose(1, 2).reshape(rows, E), layout)
                m = linear(blk, "fc", F.layer_norm(x, (E,), ones, zeros), layout)
                x = x + linear(blk, "out", F.gelu(m, approximate="tanh"), layout)
            logits = (wte @ x.t()).t() if layout == "out_in" else F.linear(x, wte)
            logits.log_softmax(-1).view(-1).topk(rows)
            order = torch.arange(rows)
            for i in range(L):
                keys[i] = keys[i].index_select(0, order)
                values[i] = values[i].index_select(0, order)

        with torch.no_grad():
            for pos in range(5):
                step(pos)
            t0 = time.perf_counter()
            for pos in range(5, 77):
                step(pos)
            return (time.perf_counter() - t0) / 72 * 1000

    for _ in range(2):
        print(f"rows {rows}: weights [in,out] {run('in_out'):.1f} ms/step, "
              f"[out,in] {run('out_in'):.1f} ms/step", flush=True)


if __name__ == "__main__":
    main()
