#!/usr/bin/env python3
"""Reference GPT-2 token ids from tiktoken, for tests/tokenizer_parity.rs.

Generates a deterministic, varied corpus (fixed seed; >= 2,000 strings: many scripts, emoji with
ZWJ sequences / skin tones / flags / variation selectors, combining marks, digits and long
numbers, whitespace runs with tabs, newlines, unicode spaces and trailing spaces, punctuation,
contractions, code, very long words, random code points, the empty string, and text containing
the literal `<|endoftext|>`) and encodes every string with a tiktoken Encoding built from the
same `whisper/assets/gpt2.tiktoken` ranks as models/gpt2/tokenizer.json, with GPT-2's pat_str
(tiktoken's r50k_pat_str) and special token `<|endoftext|>` = 50256.

Two id lists are written:
  ids          enc.encode(s, allowed_special="all"): a literal `<|endoftext|>` in the text becomes
               the special token 50256. This is what `tokenizers::Tokenizer::encode` does (added
               tokens are always split out of the input), so it is the behaviour the Rust side
               is held to.
  ordinary_ids enc.encode_ordinary(s): `<|endoftext|>` is plain text ("<", "|", "end", ...).
               The Rust test reproduces this by running the pre-tokenizer and BPE model directly,
               bypassing added-token extraction.
For strings without the literal the two lists are equal.

Output on stdout: JSON {"strings": [...], "ids": [[...]...], "ordinary_ids": [[...]...]}
(ASCII-escaped). Usage: ref_tokenizer.py [--tiktoken PATH]
"""

import argparse
import base64
import importlib.util
import json
import os
import random
import sys

import tiktoken

EOT = "<|endoftext|>"
EOT_ID = 50256
# GPT-2's split pattern as tiktoken defines it (tiktoken_ext/openai_public.py, r50k_pat_str).
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
SEED = 20240607
MIN_STRINGS = 2000


def tiktoken_path():
    spec = importlib.util.find_spec("whisper")  # locate without importing (no torch/numba needed)
    if spec is None or not spec.submodule_search_locations:
        sys.exit("ref_tokenizer: package openai-whisper not found; run scripts/venv.sh")
    return os.path.join(list(spec.submodule_search_locations)[0], "assets", "gpt2.tiktoken")


def encoding(path):
    try:
        from tiktoken_ext import openai_public

        tiktoken_pat = getattr(openai_public, "r50k_pat_str", None)
    except ImportError:
        tiktoken_pat = None
    if tiktoken_pat is not None and tiktoken_pat != PAT_STR:
        sys.exit("ref_tokenizer: tiktoken's r50k_pat_str changed; review PAT_STR")
    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
    return tiktoken.Encoding(
        name="gpt2-whisper-assets",
        pat_str=PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={EOT: EOT_ID},
        explicit_n_vocab=len(ranks) + 1,
    )


# ---------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------

FIXED = [
    "",
    " ",
    "  ",
    "\t",
    "\n",
    "\n\n",
    "\r\n",
    " \n ",
    "hello",
    " hello",
    "hello ",
    "hello   ",
    "hello\n",
    "hello \n",
    "hello\t\t",
    "  leading and trailing  ",
    "a  b   c    d",
    "a\tb\t\tc",
    "line one\nline two\n\nline four\r\nend",
    "A man riding a wave on top of a surfboard.",
    "Two dogs are playing with a frisbee in the park.",
    "it's don't you're I'm we'll they've he'd",
    "IT'S DON'T YOU'RE I'M WE'LL THEY'VE HE'D",
    "It'S dOn'T yOu'Re",
    "'s 't 're 've 'm 'll 'd",
    "'S 'T 'RE 'VE 'M 'LL 'D",
    "''s '''t 's's",
    "rock'n'roll o'clock y'all ma'am",
    "it’s don’t (curly apostrophes)",
    "'",
    "''",
    "' s",
    "x's",
    "9's 3'd",
    "123",
    "1234567890",
    "3.14159265358979",
    "1,000,000.00",
    "-42 +17 1e-9 0x1F 0b1010",
    "12345678901234567890123456789012345678901234567890",
    "٣٤٥ ۱۲۳ १२३ ১২৩ ๑๒๓",
    "Ⅻ ½ ² ³ ¹ ① ⑩",
    "x² + y² = z²",
    "!!! ??? ... --- ___ *** ###",
    "@user #hashtag $100 50% a&b a|b ~tilde `tick` ^caret",
    "(parens) [brackets] {braces} <angles>",
    "«guillemets» „quotes“ “smart” ‘single’",
    "—em-dash– –en-dash ‐hyphen … ellipsis",
    "¡Hola! ¿Qué tal?",
    "naïve café résumé façade coöperate",
    "Ünïcödé",
    "e\u0301 a\u0300 o\u0308 n\u0303",
    "\u0301",
    " \u0301",
    "Z̷̢̛̪a̸̧͎l̶̰̈g̵̣̈́o̷̦͝",
    "日本語のテキストです。",
    "中文文本，包含标点符号。",
    "한국어 텍스트입니다.",
    "Русский текст с пунктуацией.",
    "Ελληνικό κείμενο.",
    "עברית טקסט",
    "نص عربي مع علامات الترقيم.",
    "हिन्दी पाठ",
    "தமிழ் உரை",
    "ภาษาไทย",
    "ქართული",
    "Հայերեն",
    "አማርኛ",
    "ᠮᠣᠩᠭᠣᠯ",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕄𝕒𝕥𝕙",
    "𓀀𓀁𓀂",
    "👍",
    "👍🏽",
    "👍🏻👍🏼👍🏽👍🏾👍🏿",
    "👨‍👩‍👧‍👦",
    "👩🏽‍💻",
    "🏳️‍🌈",
    "🏴‍☠️",
    "❤️",
    "❤",
    "🇺🇸🇯🇵🇩🇪",
    "1️⃣ #️⃣",
    "a👍b",
    " 👍 ",
    "😀😃😄😁😆😅😂🤣",
    "\u00a0",
    "a\u00a0b",
    "a\u2003b",
    "a\u3000b",
    "a\u200bb",
    "a\u2028b",
    "a\u2029b",
    "a\u0085b",
    "a\u180eb",
    "a\ufeffb",
    "\u00a0\u00a0trailing nbsp\u00a0",
    "\u3000\u3000",
    "\x00",
    "a\x00b",
    "\x7f\x1b[31mred\x1b[0m",
    "\x0b\x0c",
    "\ufffd",
    "\uffff\ufffe",
    "\U0010ffff",
    "\U000e0001\U000e0041",
    EOT,
    "hello" + EOT,
    EOT + "hello",
    "a " + EOT + " b",
    " " + EOT + " ",
    EOT + EOT,
    EOT + "\n" + EOT + "\n",
    "<|endoftext",
    "endoftext|>",
    "<|ENDOFTEXT|>",
    "<|endoftext|",
    "<<|endoftext|>>",
    "<|startoftext|>",
    "def f(x):\n    return x ** 2\n",
    "fn main() {\n    println!(\"Hello, world!\");\n}\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "const x = {a: 1, 'b': [2, 3], \"c\": null};",
    "<div class=\"caption\">A cat &amp; a dog</div>",
    "SELECT * FROM images WHERE id = 42;",
    "$ cargo test --release -- --nocapture 2>&1 | tee log.txt",
    "https://example.com/path?query=1&x=y#frag",
    "user.name+tag@example.co.uk",
    "C:\\Users\\name\\file.txt",
    "/usr/local/bin/python3.11",
    '{"key": "value", "n": [1, 2.5, -3e10]}',
    "    indented\n\tand tabbed\n",
    "a" * 1000,
    "ab" * 500,
    "Supercalifragilisticexpialidocious" * 20,
    "Pneumonoultramicroscopicsilicovolcanoconiosis",
    "9" * 500,
    " " * 300,
    "\n" * 100,
    " \t\n" * 50,
    "." * 200,
    "x" + " " * 100 + "y",
    "x" + " " * 100,
    "😀" * 100,
]

WORDS = (
    "a an the man woman child dog cat bird horse car bus train plane boat street table kitchen "
    "sitting standing riding holding eating playing walking flying running looking next to on "
    "in of with near under over large small red blue green white black two three several group "
    "people skateboard surfboard frisbee pizza giraffe elephant zebra umbrella laptop phone"
).split()

SCRIPT_RANGES = [
    (0x0041, 0x005A), (0x0061, 0x007A), (0x00C0, 0x00FF), (0x0100, 0x017F), (0x0370, 0x03FF),
    (0x0400, 0x04FF), (0x0530, 0x058F), (0x0590, 0x05FF), (0x0600, 0x06FF), (0x0900, 0x097F),
    (0x0980, 0x09FF), (0x0B80, 0x0BFF), (0x0E00, 0x0E7F), (0x10A0, 0x10FF), (0x1100, 0x11FF),
    (0x1200, 0x137F), (0x3040, 0x309F), (0x30A0, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3),
    (0x1D400, 0x1D7FF), (0x20000, 0x2A6DF),
]
COMBINING = [chr(c) for c in range(0x0300, 0x0370)] + ["\u0951", "\u093f", "\u0e31", "\u20dd", "\ufe0f"]
DIGITS = list("0123456789") + ["٣", "۵", "७", "৩", "๓", "５", "½", "²", "Ⅳ", "①"]
SPACES = [" ", " ", " ", "\t", "\n", "\r", "\r\n", "\x0b", "\x0c", "\u00a0", "\u1680", "\u2000",
          "\u2002", "\u2003", "\u2009", "\u200a", "\u2028", "\u2029", "\u202f", "\u205f", "\u3000",
          "\u0085", "\u200b", "\u180e", "\ufeff"]
PUNCT = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + ["…", "—", "–", "«", "»", "“", "”", "‘", "’",
                                                     "¿", "¡", "。", "、", "，", "！", "·", "•", "§", "©", "€", "£", "¥"]
EMOJI_BASE = ["👍", "👋", "🙌", "👩", "👨", "🧑", "🏃", "💪", "🤝", "👶"]
SKIN = ["\U0001F3FB", "\U0001F3FC", "\U0001F3FD", "\U0001F3FE", "\U0001F3FF"]
EMOJI = ["😀", "🎉", "🚀", "🌍", "🐱", "🍕", "⚽", "☀️", "✨", "🔥", "❤️", "🏳️‍🌈", "👨‍👩‍👧", "👩‍🔬", "🇫🇷",
         "🧑🏿‍🤝‍🧑🏻", "👁️‍🗨️", "#️⃣"]
CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'RE", "'Ll", "n't", "’s", "'"]
CODE_TOKENS = ["def", "fn", "let", "mut", "return", "if", "else", "for", "while", "(", ")", "{", "}",
               "[", "]", ";", ":", "::", "->", "=>", "==", "!=", "+=", "&&", "||", "<", ">", "//",
               "#", "\"", "'", "x", "y_1", "self", "None", "0", "42", "3.14", "\n", "    ", "\t"]


def rand_char(rng, pool):
    if pool == "ascii":
        return chr(rng.randint(0x20, 0x7E))
    if pool == "script":
        lo, hi = rng.choice(SCRIPT_RANGES)
        return chr(rng.randint(lo, hi))
    if pool == "combining":
        return rng.choice(COMBINING)
    if pool == "digit":
        return rng.choice(DIGITS)
    if pool == "space":
        return rng.choice(SPACES)
    if pool == "punct":
        return rng.choice(PUNCT)
    if pool == "emoji":
        if rng.random() < 0.3:
            return rng.choice(EMOJI_BASE) + rng.choice(SKIN)
        return rng.choice(EMOJI)
    if pool == "control":
        return chr(rng.choice([rng.randint(0, 0x1F), 0x7F, rng.randint(0x80, 0x9F)]))
    # any code point except surrogates (Rust strings cannot hold them)
    while True:
        c = rng.choice([rng.randint(0, 0xFFFF), rng.randint(0x10000, 0x10FFFF), rng.randint(0, 0x2FFFF)])
        if not 0xD800 <= c <= 0xDFFF:
            return chr(c)


POOLS = ["ascii", "script", "combining", "digit", "space", "punct", "emoji", "control", "any"]


def random_mix(rng):
    weights = [rng.random() for _ in POOLS]
    n = rng.choice([rng.randint(1, 8), rng.randint(1, 40), rng.randint(40, 200)])
    return "".join(rand_char(rng, rng.choices(POOLS, weights)[0]) for _ in range(n))


def sentence(rng):
    words = []
    for _ in range(rng.randint(1, 18)):
        w = rng.choice(WORDS)
        r = rng.random()
        if r < 0.1:
            w = w.capitalize()
        elif r < 0.13:
            w = w.upper()
        if rng.random() < 0.15:
            w += rng.choice(CONTRACTIONS)
        if rng.random() < 0.08:
            w = "".join(rand_char(rng, "script") for _ in range(rng.randint(1, 8)))
        if rng.random() < 0.08:
            w += rand_char(rng, "combining")
        if rng.random() < 0.08:
            w = str(rng.randint(0, 10 ** rng.randint(1, 25)))
        if rng.random() < 0.06:
            w += rand_char(rng, "emoji")
        if rng.random() < 0.1:
            w += rand_char(rng, "punct")
        words.append(w)
    out = ""
    for i, w in enumerate(words):
        if i:
            r = rng.random()
            out += " " if r < 0.8 else "".join(rand_char(rng, "space") for _ in range(rng.randint(1, 4)))
        out += w
    if rng.random() < 0.5:
        out += rng.choice([".", "!", "?", "...", " .", ""])
    if rng.random() < 0.15:
        out += "".join(rand_char(rng, "space") for _ in range(rng.randint(1, 5)))
    if rng.random() < 0.1:
        out = "".join(rand_char(rng, "space") for _ in range(rng.randint(1, 3))) + out
    if rng.random() < 0.03:
        out = out[: len(out) // 2] + EOT + out[len(out) // 2 :]
    return out


def code_snippet(rng):
    return "".join(rng.choice(CODE_TOKENS) + (" " if rng.random() < 0.5 else "") for _ in range(rng.randint(3, 40)))


def long_word(rng):
    kind = rng.randrange(4)
    n = rng.randint(50, 800)
    if kind == 0:
        return "".join(chr(rng.randint(0x61, 0x7A)) for _ in range(n))
    if kind == 1:
        return "".join(rand_char(rng, "script") for _ in range(n))
    if kind == 2:
        return "".join(rand_char(rng, "digit") for _ in range(n))
    return "".join(rand_char(rng, "space") for _ in range(n // 4)) + "x"


def whitespace_case(rng):
    core = rng.choice(WORDS) + "".join(rand_char(rng, "space") for _ in range(rng.randint(1, 6))) + rng.choice(WORDS)
    return (
        "".join(rand_char(rng, "space") for _ in range(rng.randint(0, 4)))
        + core
        + "".join(rand_char(rng, "space") for _ in range(rng.randint(0, 6)))
    )


def corpus():
    rng = random.Random(SEED)
    out = list(FIXED)
    makers = [
        (sentence, 900),
        (random_mix, 700),
        (code_snippet, 150),
        (long_word, 60),
        (whitespace_case, 250),
    ]
    for make, count in makers:
        out.extend(make(rng) for _ in range(count))
    for s in out:
        assert not any(0xD800 <= ord(c) <= 0xDFFF for c in s)
    assert len(out) >= MIN_STRINGS
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiktoken", help="path of gpt2.tiktoken (default: from the installed openai-whisper)")
    args = ap.parse_args()
    enc = encoding(args.tiktoken or tiktoken_path())
    strings = corpus()
    ids = [enc.encode(s, allowed_special="all") for s in strings]
    ordinary = [enc.encode_ordinary(s) for s in strings]
    for s, a, b in zip(strings, ids, ordinary):
        assert enc.decode_bytes(a) == s.encode("utf-8") and enc.decode_bytes(b) == s.encode("utf-8")
        assert (a == b) == (EOT not in s)
    json.dump({"strings": strings, "ids": ids, "ordinary_ids": ordinary}, sys.stdout, separators=(",", ":"))
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
