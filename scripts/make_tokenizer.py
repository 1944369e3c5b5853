#!/usr/bin/env python3
"""Builds GPT-2's byte-level BPE `tokenizer.json` (Hugging Face `tokenizers` format).

Source: `whisper/assets/gpt2.tiktoken` from the PyPI package `openai-whisper` (installed
--no-deps into the project venv by scripts/venv.sh). That file lists the 50256 GPT-2 tokens as
`<base64 bytes> <rank>` lines; the rank is the token id. `<|endoftext|>` (id 50256) is added as
a special token.

tiktoken files carry no merge list, so the merges are recovered from the ranks: for every
multi-byte token, in rank order, run BPE over its bytes using only tokens of lower rank; that
ends in exactly two tokens, whose pair is the merge producing it (merge priority = token rank).
The script then checks that the recovered merge list is consistent (unique pairs, parts of
lower rank) and that, for every token, merge-list BPE (what `tokenizers` runs) and rank BPE
(what tiktoken runs) give the same result on the token's own bytes, namely the token itself.

Bytes are written in GPT-2's byte-to-unicode alphabet. The JSON is fully deterministic (fixed
key order, vocab in id order, merges in priority order, 2-space indent with one vocab entry or
merge per line, UTF-8, trailing newline), so reruns are byte-identical; the sha256 of the output
is printed.

Usage: make_tokenizer.py [--tiktoken PATH] [--out models/gpt2/tokenizer.json]
Only the Python standard library is needed (the package is located without importing it).
"""

import argparse
import base64
import hashlib
import importlib.util
import json
import os
import sys

EOT = "<|endoftext|>"
EOT_ID = 50256
N_TOKENS = 50256


def default_tiktoken_path():
    spec = importlib.util.find_spec("whisper")  # does not import (and so needs no torch/numba)
    if spec is None or not spec.submodule_search_locations:
        sys.exit("make_tokenizer: package openai-whisper not found; run scripts/venv.sh or pass --tiktoken")
    return os.path.join(list(spec.submodule_search_locations)[0], "assets", "gpt2.tiktoken")


def load_ranks(path):
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            tok_b64, rank = line.split()
            tok = base64.b64decode(tok_b64, validate=True)
            rank = int(rank)
            if tok in ranks:
                sys.exit(f"make_tokenizer: duplicate token on line {lineno}")
            ranks[tok] = rank
    if sorted(ranks.values()) != list(range(N_TOKENS)):
        sys.exit(f"make_tokenizer: expected ranks 0..{N_TOKENS - 1}, each once")
    singles = {t for t in ranks if len(t) == 1}
    if len(singles) != 256:
        sys.exit("make_tokenizer: the 256 single-byte tokens are not all present")
    return ranks


def bytes_to_unicode():
    """GPT-2's reversible byte -> printable unicode character map (openai/gpt-2 encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def rank_bpe(ranks, token, max_rank=None):
    """tiktoken's algorithm: repeatedly merge the leftmost adjacent pair whose concatenation has
    the lowest rank (only ranks < max_rank when given)."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best_i, best_r = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (best_r is None or r < best_r):
                best_i, best_r = i, r
        if best_r is None or (max_rank is not None and best_r >= max_rank):
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def merge_bpe(merge_rank, token):
    """`tokenizers`' algorithm: repeatedly apply the listed merge of lowest priority (leftmost on
    ties); pairs that are not in the merge list never merge."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best_i, best_r = None, None
        for i in range(len(parts) - 1):
            r = merge_rank.get((parts[i], parts[i + 1]))
            if r is not None and (best_r is None or r < best_r):
                best_i, best_r = i, r
        if best_r is None:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def recover_merges(ranks):
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    merges = []  # (left, right) in priority order
    merge_rank = {}
    for tok, rank in by_rank:
        if len(tok) == 1:
            continue
        parts = rank_bpe(ranks, tok, max_rank=rank)
        if len(parts) != 2:
            sys.exit(f"make_tokenizer: token {tok!r} (rank {rank}) splits into {len(parts)} parts, not 2")
        left, right = parts
        if not (ranks[left] < rank and ranks[right] < rank):
            sys.exit(f"make_tokenizer: merge parts of {tok!r} do not have lower ranks")
        pair = (left, right)
        if pair in merge_rank:
            sys.exit(f"make_tokenizer: pair {pair!r} recovered twice")
        merge_rank[pair] = len(merges)
        merges.append(pair)
    return merges, merge_rank


def verify(ranks, merge_rank):
    for tok, rank in ranks.items():
        by_merges = merge_bpe(merge_rank, tok)
        if by_merges != [tok]:
            sys.exit(f"make_tokenizer: token {tok!r} (rank {rank}) does not round-trip via merges: {by_merges!r}")
        by_ranks = rank_bpe(ranks, tok)
        if by_ranks != [tok]:
            sys.exit(f"make_tokenizer: token {tok!r} (rank {rank}) does not round-trip via ranks: {by_ranks!r}")


def build(ranks, merges):
    b2u = bytes_to_unicode()

    def u(tok):
        return "".join(b2u[b] for b in tok)

    vocab = {}
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[u(tok)] = rank
    if len(vocab) != N_TOKENS:
        sys.exit("make_tokenizer: byte-to-unicode mapping collided")
    vocab[EOT] = EOT_ID
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": EOT_ID,
                "content": EOT,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        ],
        "normalizer": None,
        "pre_tokenizer": dict(byte_level),
        # offsets only; trim_offsets=false as in GPT-2's published tokenizer.json
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True},
        "decoder": dict(byte_level),
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [[u(a), u(b)] for a, b in merges],
        },
    }


def to_json(value, indent=0):
    """Deterministic pretty JSON: 2-space indent, objects in insertion order, one entry per line,
    lists of scalars (the merge pairs) inline, non-ASCII written as UTF-8."""
    pad, inner = "  " * indent, "  " * (indent + 1)
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f"{inner}{json.dumps(k, ensure_ascii=False)}: {to_json(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, list):
        if all(not isinstance(v, (dict, list)) for v in value):
            return "[" + ", ".join(json.dumps(v, ensure_ascii=False) for v in value) + "]"
        return "[\n" + ",\n".join(inner + to_json(v, indent + 1) for v in value) + "\n" + pad + "]"
    return json.dumps(value, ensure_ascii=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiktoken", help="path of gpt2.tiktoken (default: from the installed openai-whisper)")
    ap.add_argument("--out", default=os.path.join("models", "gpt2", "tokenizer.json"))
    args = ap.parse_args()

    ranks = load_ranks(args.tiktoken or default_tiktoken_path())
    merges, merge_rank = recover_merges(ranks)
    if len(merges) != N_TOKENS - 256:
        sys.exit(f"make_tokenizer: {len(merges)} merges, expected {N_TOKENS - 256}")
    verify(ranks, merge_rank)

    text = to_json(build(ranks, merges)) + "\n"
    data = text.encode("utf-8")
    out_dir = os.path.dirname(args.out)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, args.out)
    print(f"{hashlib.sha256(data).hexdigest()}  {args.out}")
    print(f"make_tokenizer: {len(ranks) + 1} tokens, {len(merges)} merges, {len(data)} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
