"""Reference implementation of ClipCap (Mokady et al. 2021) in PyTorch + HF transformers.

Written from the ClipCap repository's description: the MLP and transformer prefix mappers,
`ClipCaptionModel` (GPT-2 fed a prefix of embeddings), and the two decoding functions of its
notebooks, `generate_beam` (beam search without KV cache, scores averaged by length) and
`generate2` (arg-max until the stop token). Used by the parity tests and by
scripts/convert_clipcap.py; never by the server.

CLI: python clipcap_reference.py --bundle DIR --embeddings FILE.safetensors --out OUT.json
captions the embeddings (tensor "clip", [N, D]) with beam search and greedy decoding.
"""
import argparse
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as nnf
from transformers import GPT2Config, GPT2LMHeadModel


class MLP(nn.Module):
    def __init__(self, sizes, bias=True, act=nn.Tanh):
        super().__init__()
        layers = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias))
            if i < len(sizes) - 2:
                layers.append(act())
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


class MlpTransformer(nn.Module):
    def __init__(self, in_dim, h_dim, out_d=None, act=nnf.relu):
        super().__init__()
        out_d = out_d if out_d is not None else in_dim
        self.fc1 = nn.Linear(in_dim, h_dim)
        self.act = act
        self.fc2 = nn.Linear(h_dim, out_d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class MultiHeadAttention(nn.Module):
    def __init__(self, dim_self, dim_ref, num_heads, bias=True):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim_self // num_heads
        self.scale = head_dim ** -0.5
        self.to_queries = nn.Linear(dim_self, dim_self, bias=bias)
        self.to_keys_values = nn.Linear(dim_ref, dim_self * 2, bias=bias)
        self.project = nn.Linear(dim_self, dim_self)

    def forward(self, x):
        b, n, c = x.shape
        q = self.to_queries(x).reshape(b, n, self.num_heads, c // self.num_heads)
        kv = self.to_keys_values(x).reshape(b, n, 2, self.num_heads, c // self.num_heads)
        k, v = kv[:, :, 0], kv[:, :, 1]
        att = torch.einsum("bnhd,bmhd->bnmh", q, k) * self.scale
        att = att.softmax(dim=2)
        out = torch.einsum("bnmh,bmhd->bnhd", att, v).reshape(b, n, c)
        return self.project(out)


class TransformerLayer(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=2.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, dim, num_heads, bias=False)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MlpTransformer(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, dim, num_heads, num_layers):
        super().__init__()
        self.layers = nn.ModuleList([TransformerLayer(dim, num_heads) for _ in range(num_layers)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class TransformerMapper(nn.Module):
    def __init__(self, dim_clip, dim_embedding, prefix_length, clip_length, num_layers=8):
        super().__init__()
        self.clip_length = clip_length
        self.transformer = Transformer(dim_embedding, 8, num_layers)
        self.linear = nn.Linear(dim_clip, clip_length * dim_embedding)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, dim_embedding))

    def forward(self, x):
        x = self.linear(x).view(x.shape[0], self.clip_length, -1)
        prefix = self.prefix_const.unsqueeze(0).expand(x.shape[0], *self.prefix_const.shape)
        return self.transformer(torch.cat((x, prefix), dim=1))[:, self.clip_length:]


class ClipCaptionModel(nn.Module):
    def __init__(self, gpt_config, prefix_length, clip_length=10, prefix_size=512, num_layers=8,
                 mapping="mlp"):
        super().__init__()
        self.prefix_length = prefix_length
        self.gpt = GPT2LMHeadModel(gpt_config)
        e = self.gpt.transformer.wte.weight.shape[1]
        self.gpt_embedding_size = e
        if mapping == "mlp":
            if prefix_length > 10:  # the original's memory-saving branch
                self.clip_project = nn.Linear(prefix_size, e * prefix_length)
            else:
                self.clip_project = MLP((prefix_size, (e * prefix_length) // 2, e * prefix_length))
        else:
            self.clip_project = TransformerMapper(prefix_size, e, prefix_length, clip_length, num_layers)

    def prefix(self, clip):
        return self.clip_project(clip).view(-1, self.prefix_length, self.gpt_embedding_size)


@torch.no_grad()
def generate_beam(model, stop_token_index, embed, beam_size=5, entry_length=67, temperature=1.0):
    """ClipCap's generate_beam: returns (token lists, averaged scores), best first."""
    model.eval()
    tokens = None
    scores = None
    seq_lengths = torch.ones(beam_size)
    is_stopped = torch.zeros(beam_size, dtype=torch.bool)
    generated = embed
    for _ in range(entry_length):
        logits = model.gpt(inputs_embeds=generated).logits
        logits = logits[:, -1, :] / (temperature if temperature > 0 else 1.0)
        logits = logits.softmax(-1).log()
        if scores is None:
            scores, next_tokens = logits.topk(beam_size, -1)
            generated = generated.expand(beam_size, *generated.shape[1:])
            next_tokens, scores = next_tokens.permute(1, 0), scores.squeeze(0)
            tokens = next_tokens
        else:
            logits[is_stopped] = -float("inf")
            logits[is_stopped, 0] = 0
            scores_sum = scores[:, None] + logits
            seq_lengths[~is_stopped] += 1
            scores_sum_average = scores_sum / seq_lengths[:, None]
            scores_sum_average, next_tokens = scores_sum_average.view(-1).topk(beam_size, -1)
            next_tokens_source = next_tokens // scores_sum.shape[1]
            seq_lengths = seq_lengths[next_tokens_source]
            next_tokens = next_tokens % scores_sum.shape[1]
            next_tokens = next_tokens.unsqueeze(1)
            tokens = tokens[next_tokens_source]
            tokens = torch.cat((tokens, next_tokens), dim=1)
            generated = generated[next_tokens_source]
            scores = scores_sum_average * seq_lengths
            is_stopped = is_stopped[next_tokens_source]
        next_token_embed = model.gpt.transformer.wte(next_tokens.squeeze()).view(generated.shape[0], 1, -1)
        generated = torch.cat((generated, next_token_embed), dim=1)
        is_stopped = is_stopped + next_tokens.eq(stop_token_index).squeeze()
        if is_stopped.all():
            break
    scores = scores / seq_lengths
    out = [t[: int(n)].tolist() for t, n in zip(tokens, seq_lengths)]
    order = scores.argsort(descending=True)
    return [out[i] for i in order], [float(scores[i]) for i in order]


@torch.no_grad()
def generate2(model, stop_token_index, embed, entry_length=67, top_p=0.8, temperature=1.0):
    """ClipCap's generate2 (one entry): arg-max decoding after a top-p filter."""
    model.eval()
    tokens = None
    generated = embed
    for _ in range(entry_length):
        logits = model.gpt(inputs_embeds=generated).logits
        logits = logits[:, -1, :] / (temperature if temperature > 0 else 1.0)
        sorted_logits, sorted_indices = torch.sort(logits, descending=True)
        cumulative_probs = torch.cumsum(nnf.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cumulative_probs > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = 0
        logits[:, sorted_indices[remove]] = -float("inf")
        next_token = torch.argmax(logits, -1).unsqueeze(0)
        next_token_embed = model.gpt.transformer.wte(next_token)
        tokens = next_token if tokens is None else torch.cat((tokens, next_token), dim=1)
        generated = torch.cat((generated, next_token_embed), dim=1)
        if stop_token_index == next_token.item():
            break
    return tokens.squeeze(0).tolist()


def load_bundle_model(bundle):
    """Builds ClipCaptionModel from one of our bundles (clipcap.json + model.safetensors)."""
    from safetensors.torch import load_file

    with open(os.path.join(bundle, "clipcap.json")) as f:
        man = json.load(f)
    g = man["gpt2"]
    cfg = GPT2Config(vocab_size=g["vocab_size"], n_positions=g["n_positions"], n_embd=g["n_embd"],
                     n_layer=g["n_layer"], n_head=g["n_head"], layer_norm_epsilon=g.get("layer_norm_epsilon", 1e-5),
                     activation_function=g.get("activation_function", "gelu_new"), attn_implementation="eager")
    m = man["mapper"]
    model = ClipCaptionModel(cfg, m["prefix_length"], m.get("clip_length", 10), m["prefix_dim"],
                             m.get("num_layers", 8), m["mapping"])
    sd = load_file(os.path.join(bundle, man["files"]["weights"]))
    sd["gpt.lm_head.weight"] = sd["gpt.transformer.wte.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    assert not missing and not unexpected, (missing, unexpected)
    return model.eval(), man


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--embeddings", required=True, help="safetensors with tensor 'clip' [N, D]")
    ap.add_argument("--out", required=True)
    ap.add_argument("--beam-size", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=67)
    ap.add_argument("--stop-id", type=int, required=True)
    ap.add_argument("--prompt-ids", default="",
                    help="comma-separated token ids fed after the prefix (a caption's given beginning)")
    args = ap.parse_args()
    from safetensors.torch import load_file

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, man = load_bundle_model(args.bundle)
    clip = load_file(args.embeddings)["clip"].float()
    if man["mapper"].get("normalize_prefix"):
        clip = clip / clip.norm(2, -1, keepdim=True)
    out = []
    with torch.no_grad():
        for i in range(clip.shape[0]):
            prefix = model.prefix(clip[i:i + 1])
            if args.prompt_ids:
                # The original decoders start from any embeddings: the prompt's follow the prefix.
                ids = torch.tensor([int(t) for t in args.prompt_ids.split(",")])
                prefix = torch.cat((prefix, model.gpt.transformer.wte(ids).unsqueeze(0)), dim=1)
            beams, scores = generate_beam(model, args.stop_id, prefix, args.beam_size, args.max_tokens)
            greedy = generate2(model, args.stop_id, prefix, args.max_tokens)
            out.append({"beam": beams, "beam_scores": scores, "greedy": greedy})
    with open(args.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
