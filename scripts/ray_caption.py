#!/usr/bin/env python3
"""Captions a dataset with Ray Data, fanning its blocks out to `clipcap batch` processes.

    python scripts/ray_caption.py --model DIR --input IN --output OUT.jsonl [--workers N]
        [--clipcap target/debug/clipcap] [--block-lines 64] [--address auto] [-- BATCH ARGS]

IN is what `clipcap batch` reads: a folder of images (custom_id = the path relative to it), a
JSON-lines file of {"custom_id"?, "image"} or of OpenAI batch requests. Each Ray actor keeps
one `clipcap batch --input - --output -` process (the model loads once per actor) and pipes
its blocks through it; the output is OpenAI's batch output format, the lines `clipcap batch`
writes, appended to OUT. A rerun skips the custom_ids OUT already has (lines without one
are redone). Arguments after `--` go to every `clipcap batch` (decode options, --device).

Without --address, Ray starts a local runtime with --workers CPUs; with --address auto (or
ray://...), it joins a cluster and each actor asks for --cpus-per-worker and --gpus-per-worker.
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import threading

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def input_lines(path: pathlib.Path):
    """(lines, folder relative paths are read from), as `clipcap batch` would read them."""
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        lines = [
            json.dumps({"custom_id": p.relative_to(path).as_posix(), "image": str(p.resolve())})
            for p in files
        ]
        return lines, path.resolve()
    text = path.read_text()
    return [l for l in text.splitlines() if l.strip()], path.resolve().parent


def line_id(line: str):
    """The custom_id `clipcap batch` gives a line, or None (redone on a rerun)."""
    try:
        v = json.loads(line)
    except ValueError:
        return None
    if not isinstance(v, dict):
        return None
    cid = v.get("custom_id")
    if isinstance(cid, str):
        return cid
    image = v.get("image")
    if cid is None and isinstance(image, str) and not {"method", "url", "body"} & v.keys():
        return image
    return None


def done_ids(out: pathlib.Path):
    ids = set()
    if out.exists():
        for line in out.read_text().splitlines():
            try:
                cid = json.loads(line).get("custom_id")
            except ValueError:
                continue
            if isinstance(cid, str):
                ids.add(cid)
    return ids


class Captioner:
    """A Ray actor with one long-lived `clipcap batch` process: a block's lines go in on
    stdin (from a thread, so that a full stdout pipe never stalls both sides) and as many
    output lines come back on stdout."""

    def __init__(self, clipcap, model, cwd, extra):
        self.proc = subprocess.Popen(
            [clipcap, "batch", "--model", model, "--input", "-", "--output", "-", "--quiet", *extra],
            cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )

    def __call__(self, block):
        lines = [str(l) for l in block["line"]]

        def feed():
            for l in lines:
                self.proc.stdin.write(l + "\n")
            self.proc.stdin.flush()

        writer = threading.Thread(target=feed)
        writer.start()
        out = []
        for _ in lines:
            answer = self.proc.stdout.readline()
            if not answer:
                writer.join()
                raise RuntimeError(f"clipcap batch ended early (exit {self.proc.wait()})")
            out.append(answer.rstrip("\n"))
        writer.join()
        return {"output": out}

    def __del__(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except Exception:
            pass


def main():
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--clipcap", default=os.environ.get("CLIPCAP_BIN", "target/debug/clipcap"))
    ap.add_argument("--block-lines", type=int, default=64)
    ap.add_argument("--address", default=None, help="a Ray cluster to join (default: a local runtime)")
    ap.add_argument("--cpus-per-worker", type=float, default=1)
    ap.add_argument("--gpus-per-worker", type=float, default=0)
    a = ap.parse_args(argv)

    out = pathlib.Path(a.output)
    lines, base = input_lines(pathlib.Path(a.input))
    done = done_ids(out)
    todo = [l for l in lines if line_id(l) is None or line_id(l) not in done]
    print(f"ray_caption: {len(lines)} lines, {len(lines) - len(todo)} already in {out}", file=sys.stderr)
    if not todo:
        return

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # A local runtime needs no token (Ray 2.60 otherwise writes one to ~/.ray and warns).
    if not a.address:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    import logging
    import ray

    if a.address:
        ray.init(address=a.address, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=a.workers, include_dashboard=False, logging_level=logging.WARNING,
                 object_store_memory=256 * 1024 ** 2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    clipcap = str(pathlib.Path(a.clipcap).resolve())
    model = str(pathlib.Path(a.model).resolve())
    ds = ray.data.from_items([{"line": l} for l in todo])
    captioned = ds.map_batches(
        Captioner,
        fn_constructor_args=(clipcap, model, str(base), extra),
        batch_size=a.block_lines,
        compute=ray.data.ActorPoolStrategy(size=a.workers),
        num_cpus=a.cpus_per_worker,
        num_gpus=a.gpus_per_worker,
    )
    written = 0
    with out.open("a") as f:
        # Whole lines as they arrive, synced at the end (a killed run is resumed by id).
        for row in captioned.iter_rows():
            f.write(row["output"] + "\n")
            written += 1
        f.flush()
        os.fsync(f.fileno())
    ray.shutdown()
    print(f"ray_caption: wrote {written} lines to {out}", file=sys.stderr)
    if written != len(todo):
        sys.exit(f"ray_caption: {len(todo)} lines sent, {written} answered")


if __name__ == "__main__":
    main()
