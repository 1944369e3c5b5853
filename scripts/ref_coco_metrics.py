#!/usr/bin/env python
"""Reference COCO caption metrics from pycocoevalcap, for tests/eval_parity.rs.

Generates (deterministically, from --seed) a varied caption set: --images images with five
references each and one candidate each (empty, very long, repeated words, unicode,
punctuation-heavy, brackets, contractions, currency, numbers, abbreviations, URLs, ...), and
writes into --out:
  refs.json        COCO caption annotations {"images": [...], "annotations": [...]}
  cands.json       COCO results [{"image_id", "caption"}]
  ref_scores.json  pycocoevalcap's scores computed with its own PTBTokenizer:
                   overall Bleu_1..4, METEOR (with --meteor), ROUGE_L, CIDEr; per image
                   the same; the tokenized references/candidates; the raw stdout of the
                   CoreNLP jar for both tokenizer calls; and a separate tokenizer stress
                   corpus (--stress strings) with pycocoevalcap's tokenization and the
                   jar's raw stdout.
Images are keyed by str(image_id) and visited in sorted key order (as clipcap's BTreeMap).
"""
import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

SUBJECTS = ["a man", "a woman", "two men", "a young boy", "a little girl", "a group of people",
            "a dog", "a black cat", "an elephant", "two giraffes", "a zebra", "a brown horse",
            "a bird", "a red bus", "a train", "a plate of food", "a pizza", "a kitchen",
            "a bathroom", "a skateboarder", "a surfer", "a tennis player", "the batter",
            "people", "a clock tower", "a motorcycle", "a large jet", "three sheep"]
VERBS = ["sitting on", "standing next to", "riding", "holding", "walking down", "looking at",
         "eating", "playing with", "parked in front of", "flying over", "laying on",
         "is sitting on", "are standing in", "jumping over", "covered with", "cutting"]
OBJECTS = ["a bench", "the street", "a table", "a wave", "the beach", "a field of grass",
           "a frisbee", "a kite", "a snowy hill", "a wooden desk", "a white plate",
           "a city street", "the water", "a sandwich", "a laptop computer", "a red umbrella",
           "a tall building", "a dirt road", "an open refrigerator", "the sink", "a fence"]
TAILS = ["", "", "", " in the park", " at night", " on a sunny day", " near the water",
         " with a ball", " in the background", " next to each other", " in a room"]

SPECIALS = [
    "don't", "won't", "can't", "isn't", "I'm", "you're", "they'll", "we've", "he'd", "it's",
    "dog's", "dogs'", "o'clock", "y'all", "rock 'n' roll", "'90s", "cannot", "gonna", "wanna",
    "'tis", "c'mon", "ma'am", "O'Neil", "don\u2019t", "it\u2019s",
    "$5", "$5.99", "US$20", "\u00a35", "\u20ac3,50", "\u00a5100", "50\u00a2", "5%", "1,000",
    "3.14", "-5", "1/2", "3 1/2", "\u00bd", "12/25/2020", "10:30", "5:00pm", "555-1234",
    "(555) 555-1234", "1st", "2nd", "1990s", "24/7", "No. 5", "ca. 1900", "x\u00b2",
    "Mr.", "Dr.", "St.", "etc.", "vs.", "e.g.", "i.e.", "a.m.", "p.m.", "U.S.", "Inc.",
    "Jan.", "Ph.D.", "a.k.a.",
    "(", ")", "[", "]", "{", "}", "<", ">", "(big)", "[sic]", "{x}", "<b>", "</b>",
    "\"", "'", "``", "''", "\u201cquoted\u201d", "\u2018single\u2019", "\u00abguillemets\u00bb",
    ",", ".", "!", "?", ";", ":", "...", "\u2026", "--", "-", "\u2013", "\u2014", "?!", "!!!",
    "&", "&amp;", "AT&T", "Q&A", "#hashtag", "@user", "*", "/", "\\", "|", "~", "^", "=", "+",
    "well-known", "co-op", "e-mail", "x-ray", "t-shirt", "self-driving",
    "http://example.com/a.jpg", "www.google.com", "john.doe@example.com", "photo.jpg",
    ":)", ";-)", ":D", "^_^",
    "caf\u00e9", "na\u00efve", "\u00fcber", "Stra\u00dfe", "\u0130stanbul", "\u039f\u0394\u039f\u03a3",
    "\u65e5\u672c", "\u0645\u0631\u062d\u0628\u0627", "\u05e9\u05dc\u05d5\u05dd",
    "\u0928\u092e\u0938\u094d\u0924\u0947", "\U0001F600", "\U0001F436", "\u2764\ufe0f",
    "\u00a0", "\u3000", "\u200b", "co\u00adop", "\u00b0", "\u00d7", "\u2122", "\u00e9t\u00e9",
    "\u00c9COLE", "NaN", "C++", "c#",
]


def caption(r):
    s = "%s %s %s%s" % (r.choice(SUBJECTS), r.choice(VERBS), r.choice(OBJECTS),
                        r.choice(TAILS))
    if r.random() < 0.5:
        s = s[0].upper() + s[1:]
    if r.random() < 0.6:
        s += r.choice([".", ".", " .", "!", "", "..."])
    return s


def sprinkle(r, s, k):
    words = s.split(" ")
    for _ in range(k):
        words.insert(r.randint(0, len(words)), r.choice(SPECIALS))
    return " ".join(words)


def make_refs(r):
    refs = []
    for _ in range(5):
        c = caption(r)
        if r.random() < 0.35:
            c = sprinkle(r, c, r.randint(1, 3))
        if r.random() < 0.05:
            c = c.upper()
        refs.append(c)
    return refs


def make_cand(r, i, refs):
    kind = i % 20
    if kind == 0:
        return ""
    if kind == 1:
        return r.choice(["   ", "...", "!?", "-- --", "\"\"", "( )"]) if i % 40 == 1 else ""
    if kind == 2:  # very long
        return " ".join(caption(r) for _ in range(r.randint(6, 12)))
    if kind == 3:  # repeated words
        w = r.choice(["a", "dog", "the", "man"])
        return " ".join([w] * r.randint(3, 30)) + " " + caption(r)
    if kind == 4:  # unicode heavy
        return sprinkle(r, caption(r), 4) + " \u00e9\u00e8 \u4e2d\u6587 \U0001F600"
    if kind == 5:  # punctuation heavy
        return "".join(r.choice(["", " "]) + w for w in
                       sprinkle(r, caption(r), 6).split(" ")) + "?!..."
    if kind == 6:  # brackets
        return "(%s) [%s] {%s}" % (caption(r), r.choice(SUBJECTS), r.choice(OBJECTS))
    if kind == 7:  # contractions
        return "%s isn't %s, it's %s and they're gonna %s" % (
            r.choice(SUBJECTS), r.choice(OBJECTS), r.choice(OBJECTS), r.choice(VERBS))
    if kind == 8:  # currency and numbers
        return "%s costing $%d.%02d, \u00a3%d or \u20ac%d,%d; 1,000 items, 3.5%% off, 2 1/2 hours" % (
            caption(r), r.randint(1, 99), r.randint(0, 99), r.randint(1, 9), r.randint(1, 9),
            r.randint(0, 99))
    if kind == 9:  # copy of a reference
        return r.choice(refs)
    if kind == 10:  # lightly edited reference
        words = r.choice(refs).split()
        if len(words) > 2:
            del words[r.randrange(len(words))]
        return " ".join(words)
    if kind == 11:  # newline inside the caption (pycocoevalcap replaces it by a space)
        return caption(r) + "\n" + caption(r)
    if kind == 12:
        return sprinkle(r, r.choice(refs), r.randint(2, 5))
    if kind == 13:
        return caption(r).upper()
    return caption(r) if r.random() < 0.5 else sprinkle(r, caption(r), r.randint(1, 3))


def stress_string(r):
    parts = []
    for _ in range(r.choice([1, 2, 3, 5, 8, 12, 20])):
        if r.random() < 0.45:
            parts.append(r.choice(SPECIALS))
        else:
            parts.append(r.choice(caption(r).split(" ")))
        parts.append(r.choice([" "] * 12 + ["", "  ", "\t", "\u00a0"]))
    s = "".join(parts)
    if r.random() < 0.2:
        s = s.upper() if r.random() < 0.5 else s.title()
    return s


def jar_stdout(text):
    """The raw stdout of the CoreNLP tokenizer exactly as PTBTokenizer.tokenize runs it."""
    jar_dir = os.path.dirname(os.path.abspath(ptbtokenizer.__file__))
    tmp = tempfile.NamedTemporaryFile(delete=False, dir=jar_dir)
    tmp.write(text.encode())
    tmp.close()
    try:
        cmd = ["java", "-cp", ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR,
               "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase",
               os.path.basename(tmp.name)]
        out = subprocess.run(cmd, cwd=jar_dir, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, check=True).stdout
    finally:
        os.remove(tmp.name)
    return out.decode()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--images", type=int, default=240)
    ap.add_argument("--stress", type=int, default=3000)
    ap.add_argument("--meteor", action="store_true")
    a = ap.parse_args()
    r = random.Random(a.seed)
    os.makedirs(a.out, exist_ok=True)

    images, anns, results = [], [], []
    ann_id = 1
    for i in range(a.images):
        # mostly COCO-style integer ids, some string ids
        image_id = "img_%03d" % i if i % 17 == 5 else i * 1000 + r.randint(0, 999)
        refs = make_refs(r)
        images.append({"id": image_id, "file_name": "%s.jpg" % image_id})
        for c in refs:
            anns.append({"image_id": image_id, "id": ann_id, "caption": c})
            ann_id += 1
        results.append({"image_id": image_id, "caption": make_cand(r, i, refs)})
    # references of an image without a candidate: must be ignored
    images.append({"id": 99, "file_name": "99.jpg"})
    anns.append({"image_id": 99, "id": ann_id, "caption": "an unevaluated image"})

    with open(os.path.join(a.out, "refs.json"), "w") as f:
        json.dump({"images": images, "annotations": anns}, f, ensure_ascii=False)
    with open(os.path.join(a.out, "cands.json"), "w") as f:
        json.dump(results, f, ensure_ascii=False)

    keys = sorted(str(x["image_id"]) for x in results)
    by_img = {}
    for x in anns:
        by_img.setdefault(str(x["image_id"]), []).append({"caption": x["caption"]})
    res_raw = {str(x["image_id"]): [{"caption": x["caption"]}] for x in results}
    gts = {k: by_img[k] for k in keys}
    res = {k: res_raw[k] for k in keys}

    tok = PTBTokenizer()
    with contextlib.redirect_stdout(sys.stderr):
        gts_t = tok.tokenize(gts)
        res_t = tok.tokenize(res)
        overall, per = {}, {k: {} for k in keys}
        scorers = [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]),
                   (Rouge(), "ROUGE_L"), (Cider(), "CIDEr")]
        if a.meteor:
            from pycocoevalcap.meteor.meteor import Meteor
            scorers.insert(1, (Meteor(), "METEOR"))
        for scorer, method in scorers:
            score, scores = scorer.compute_score(gts_t, res_t)
            if isinstance(method, list):
                for sc, scs, m in zip(score, scores, method):
                    overall[m] = float(sc)
                    for k, v in zip(gts_t.keys(), scs):
                        per[k][m] = float(v)
            else:
                overall[method] = float(score)
                for k, v in zip(gts_t.keys(), scores):
                    per[k][method] = float(v)
    if not a.meteor:
        overall["METEOR"] = None

    def joined(caps):
        return "\n".join(c["caption"].replace("\n", " ") for c in caps)

    stress = [stress_string(r) for _ in range(a.stress)]
    stress += ["line\rbreak inside", "tab\there", "last one etc.", "U.S. The end", "I. He"]
    stress_t = tok.tokenize({str(i): [{"caption": s}] for i, s in enumerate(stress)})
    out = {
        "seed": a.seed,
        "pycocoevalcap": os.path.dirname(os.path.dirname(os.path.abspath(ptbtokenizer.__file__))),
        "n_images": len(keys),
        "overall": overall,
        "per_image": per,
        "tokenized": {"gts": gts_t, "res": {k: v[0] for k, v in res_t.items()}},
        "jar_stdout": {
            "gts": jar_stdout(joined([c for k in keys for c in gts[k]])),
            "res": jar_stdout(joined([res[k][0] for k in keys])),
        },
        "stress": {
            "captions": stress,
            "tokenized": [stress_t.get(str(i), [None])[0] for i in range(len(stress))],
            "jar_stdout": jar_stdout(joined([{"caption": s} for s in stress])),
        },
    }
    with open(os.path.join(a.out, "ref_scores.json"), "w") as f:
        json.dump(out, f, ensure_ascii=False)
    print(json.dumps(overall))


if __name__ == "__main__":
    main()
