#!/usr/bin/env python3
"""Hostile-client fault runs against `clipcap serve`, for before/after tables (issue #12).

    python scripts/fault_run.py --bin target/debug/clipcap --model tiny=DIR [--bin OTHER ...]

Each binary is started with the same tight configuration and put through the same faults:
slow uploads holding connections, idle connections, a 128 KiB header, a connection flood,
and a burst of captions (resident memory before, at the peak and after going idle). Prints a
markdown table with one column per binary, and the CPU. Standard library only.
"""
import argparse
import json
import os
import platform
import resource
import socket
import subprocess
import threading
import time
import urllib.request

PNG = None


def png_bytes():
    # A 64x48 RGB PNG, made without PIL.
    import struct
    import zlib

    w, h = 64, 48
    rows = []
    for y in range(h):
        row = bytearray([0])
        for x in range(w):
            row += bytes(((x * 4) % 256, (y * 5) % 256, ((x + y) * 3) % 256))
        rows.append(bytes(row))
    raw = b"".join(rows)

    def chunk(kind, data):
        c = struct.pack(">I", len(data)) + kind + data
        return c + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def rss_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    def __init__(self, binary, model, env, nofile=None):
        self.log = open(f"/tmp/fault_run_{os.getpid()}_{abs(hash(binary))}.log", "w")
        e = dict(os.environ)
        e.update(env)
        self.p = subprocess.Popen(
            [binary, "serve", "--bind", "127.0.0.1:0", "--device", "cpu", "--model", model],
            stdout=subprocess.PIPE, stderr=self.log, env=e, text=True,
            preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)))
            if nofile else None)
        for line in self.p.stdout:
            if line.startswith("clipcap listening on "):
                self.url = line.split()[-1].strip()
                break
        threading.Thread(target=lambda: [None for _ in self.p.stdout], daemon=True).start()
        host, port = self.url.removeprefix("http://").split(":")
        self.addr = (host, int(port))
        t0 = time.time()
        while time.time() - t0 < 120:
            try:
                if urllib.request.urlopen(self.url + "/ready", timeout=5).status == 200:
                    return
            except Exception:
                time.sleep(0.1)
        raise SystemExit("server not ready")

    def stop(self):
        self.p.kill()
        self.p.wait()


def caption(s, timeout=60):
    """One /caption over a fresh connection: (status, seconds)."""
    t0 = time.time()
    req = urllib.request.Request(s.url + "/caption?max_tokens=8", data=PNG,
                                 headers={"content-type": "image/png"})
    try:
        r = urllib.request.urlopen(req, timeout=timeout)
        return r.status, time.time() - t0
    except urllib.error.HTTPError as e:
        return e.code, time.time() - t0
    except Exception:
        return "error", time.time() - t0


def raw(s, data, timeout=10):
    """Sends `data`, reads the first response: (status, is_json)."""
    try:
        c = socket.create_connection(s.addr, timeout=timeout)
    except OSError as e:
        return f"no answer ({type(e).__name__})", False
    try:
        c.sendall(data)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = c.recv(65536)
            if not chunk:
                break
            buf += chunk
        if not buf:
            return "closed", False
        head, _, body = buf.partition(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        while len(body) < length:
            chunk = c.recv(65536)
            if not chunk:
                break
            body += chunk
        try:
            json.loads(body)
            return status, True
        except ValueError:
            return status, False
    except OSError as e:
        return type(e).__name__, False
    finally:
        c.close()


def statuses(results):
    counts = {}
    for r in results:
        counts[r] = counts.get(r, 0) + 1
    return ", ".join(f"{k}×{v}" for k, v in sorted(counts.items(), key=str))


def slow_uploads(s, n=32, seconds=6):
    """n clients upload one byte a second; meanwhile 10 normal captions."""
    stop = threading.Event()
    socks = []
    for _ in range(n):
        c = socket.create_connection(s.addr)
        c.sendall(b"POST /caption HTTP/1.1\r\nhost: x\r\ncontent-type: image/png\r\n"
                  b"content-length: %d\r\n\r\n" % len(PNG))
        socks.append(c)

    def drip():
        i = 0
        while not stop.is_set() and i < len(PNG):
            for c in socks:
                try:
                    c.send(PNG[i:i + 1])
                except OSError:
                    pass
            i += 1
            stop.wait(1.0)

    t = threading.Thread(target=drip, daemon=True)
    t.start()
    time.sleep(1.0)
    results = [caption(s)[0] for _ in range(10)]
    stop.set()
    t.join()
    for c in socks:
        c.close()
    return statuses(results)


def idle_connections(s, n=200, wait=3.0):
    """n connections that send nothing: how many are still open after `wait` s."""
    socks = [socket.create_connection(s.addr) for _ in range(n)]
    time.sleep(wait)
    open_ = 0
    for c in socks:
        c.setblocking(False)
        try:
            data = c.recv(1)
            if data:
                open_ += 1  # it answered something; count as open
        except BlockingIOError:
            open_ += 1
        except OSError:
            pass
        c.close()
    return f"{open_}/{n} open after {wait:.0f} s"


def flood(s, n=600):
    """n connections at once, then /health over one more: its status and time."""
    socks = []
    for _ in range(n):
        try:
            socks.append(socket.create_connection(s.addr, timeout=5))
        except OSError:
            break
    t0 = time.time()
    st, js = raw(s, b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n", timeout=10)
    dt = time.time() - t0
    for c in socks:
        c.close()
    # How long until a fresh /health answers 200 again.
    t1 = time.time()
    while raw(s, b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n", timeout=2)[0] != 200 and time.time() - t1 < 30:
        pass
    return f"{st}{' JSON' if js else ''} in {dt * 1e3:.0f} ms; 200 again {1e3 * (time.time() - t1):.0f} ms after", None


def burst_rss(s, n=200, concurrency=16):
    before = rss_mib(s.p.pid)
    peak = [before]
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib(s.p.pid))
            time.sleep(0.05)

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    results = []
    lock = threading.Lock()
    left = [n]

    def worker():
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            st, _ = caption(s)
            with lock:
                results.append(st)

    ts = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    done.set()
    time.sleep(2.0)
    after = rss_mib(s.p.pid)
    return statuses(results), f"{before:.0f} → {peak[0]:.0f} → {after:.0f} MiB"


def main():
    global PNG
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", action="append", required=True)
    ap.add_argument("--model", required=True)
    a = ap.parse_args()
    PNG = png_bytes()
    env = {
        "CLIPCAP_MAX_INFLIGHT_REQUESTS": "16",
        "CLIPCAP_HEADER_TIMEOUT_MS": "2000",
        "CLIPCAP_MAX_CONNECTIONS": "256",
    }
    print(f"cpu: {cpu_model()}, {os.cpu_count()} threads; config: {env}")
    rows = {}
    for b in a.bin:
        col = {}
        s = Server(b, a.model, env)
        try:
            col["32 slow uploads (1 B/s): 10 normal /caption"] = slow_uploads(s)
            col["200 idle connections"] = idle_connections(s)
            st, js = raw(s, b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 131072 + b"\r\n\r\n")
            col["one 128 KiB header"] = f"{st}{' JSON' if js else ' (not JSON)'}"
            st, js = raw(s, b"GET /health?" + b"q" * 10000 + b" HTTP/1.1\r\nhost: x\r\n\r\n")
            col["10 kB request target"] = f"{st}{' JSON' if js else ' (not JSON)'}"
            col["600-connection flood: /health"] = flood(s)[0]
            codes, rss = burst_rss(s)
            col["200 captions at concurrency 16"] = codes
            col["RSS: start → peak → 2 s idle"] = rss
        finally:
            s.stop()
        # The same flood on a server limited to 128 open files.
        s = Server(b, a.model, {k: v for k, v in env.items() if k != "CLIPCAP_MAX_CONNECTIONS"},
                   nofile=128)
        try:
            col["300-connection flood, ulimit -n 128: /health"] = flood(s, 300)[0]
        finally:
            s.stop()
        rows[b] = col
    keys = list(next(iter(rows.values())).keys())
    print("| fault | " + " | ".join(rows) + " |")
    print("|---|" + "---|" * len(rows))
    for k in keys:
        print(f"| {k} | " + " | ".join(rows[b][k] for b in rows) + " |")


if __name__ == "__main__":
    main()
