"""HTTP serving against the servers a team would pick instead (issue 19's benchmark).

    tests/benchmarks/serve_peers_setup.sh          # once: wrk, .venv-serve-peers, .venv-infinity
    .venv/bin/python tests/benchmarks/serve_bench.py --json benchmarks/results/serve-minilm-DATE.json

Servers, each started here on 127.0.0.1 with the same model (the default bundle and the model
folder it was built from), all on this machine's cores:

    ours       sbert-bundle serve artifacts/minilm_l6/bundle (one process, onnxruntime threads = cores)
    ours-w2    the same with --workers 2 (a process per core, one thread each)
    st         tests/benchmarks/peer_st_server.py: FastAPI + SentenceTransformer.encode (the hand-rolled server)
    infinity   infinity-emb 0.0.78 `v2 --engine torch` on the model folder

Load: wrk (C, one thread, epoll; a Lua script rotates request bodies built from the evaluation
corpus), requests of 1 and of 32 sentences at 1, 8 and 64 connections, each cell the same number
of responses for every server (--scale), the servers in turn and the rounds alternating, so that drift on a
noisy machine hits every server alike. After each run the next waits until the server it
loaded is idle again (a server may go on computing the requests wrk left in flight). Per cell: sentences/s, p50/p99 latency (wrk's), non-2xx
responses. Before timing, every server embeds the whole corpus once and its min cosine to
sentence-transformers is printed (a fast wrong server is not a result). The in-process baseline
is `Bundle.encode([sentence])` of the same sentences, p50, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "all-MiniLM-L6-v2"
SIZES = (1, 32)
CONCURRENCY = (1, 8, 64)

# wrk's script: rotate the request bodies; after `target` responses print WRKDONE (the runner takes the
# time and stops wrk with SIGINT), so every server does the same work and the requests cut off at
# the end are the same share of it. wrk then prints one JSON line of counts and percentiles.
LUA = r"""
local bodies = {}
local n = 0
local target = 0
init = function(args)
  target = tonumber(args[2]) or 0
  local f = assert(io.open(args[1], "r"))
  for line in f:lines() do n = n + 1; bodies[n] = line end
  f:close()
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end
local i = 0
local responses = 0
response = function(status, headers, body)
  responses = responses + 1
  if responses == target then
    io.write("WRKDONE\n"); io.flush()
    wrk.thread:stop()
  end
end
request = function()
  i = i % n + 1
  return wrk.format(nil, nil, nil, bodies[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests": %d, "duration_us": %d, "status_errors": %d, ' ..
    '"socket_errors": %d, "p50_us": %d, "p99_us": %d}\n', summary.requests, summary.duration, e.status,
    e.connect + e.read + e.write + e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


def cpu_line() -> str:
    text = Path("/proc/cpuinfo").read_text()
    name = re.search(r"model name\s*:\s*(.*)", text).group(1).strip()
    flags = set(re.search(r"flags\s*:\s*(.*)", text).group(1).split())
    have = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    return f"{name}, {os.cpu_count()} cores, flags: {' '.join(have)}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commands(name: str, bundle: Path, model: Path, port: int) -> tuple[list[str], str, str]:
    """(command, embeddings path, model field) of a server."""
    cores = str(os.cpu_count())
    if name == "ours":
        return ([str(REPO / ".venv/bin/python"), "-m", "sbert_bundle.cli", "serve", str(bundle), "--port", str(port),
                 "--threads", cores, "--log-level", "warning"], "/v1/embeddings", MODEL_NAME)
    if name == "ours-w2":
        return ([str(REPO / ".venv/bin/python"), "-m", "sbert_bundle.cli", "serve", str(bundle), "--port", str(port),
                 "--workers", "2", "--threads", "1", "--log-level", "warning"], "/v1/embeddings", MODEL_NAME)
    if name == "st":
        return ([str(REPO / ".venv-serve-peers/bin/python"), str(REPO / "tests/benchmarks/peer_st_server.py"),
                 str(model), "--port", str(port), "--name", MODEL_NAME], "/v1/embeddings", MODEL_NAME)
    if name == "infinity":
        return ([str(REPO / ".venv-infinity/bin/infinity_emb"), "v2", "--model-id", str(model), "--engine", "torch",
                 "--device", "cpu", "--port", str(port), "--host", "127.0.0.1"], "/embeddings", str(model))
    raise SystemExit(f"unknown server {name!r}; known: ours, ours-w2, st, infinity")


class Peer:
    def __init__(self, name: str, bundle: Path, model: Path, logs: Path):
        self.name, self.port = name, free_port()
        cmd, self.path, self.model = commands(name, bundle, model, self.port)
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "DO_NOT_TRACK": "1",
               "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
        self.log = logs / f"{name}.log"
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("wb"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                r = httpx.post(self.url + self.path, json={"model": self.model, "input": ["warm up"]}, timeout=30)
                if r.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready in {timeout} s: {self.log.read_text()[-2000:]}")

    def embed(self, texts: list[str]) -> np.ndarray:
        r = httpx.post(self.url + self.path, json={"model": self.model, "input": texts, "encoding_format": "float"},
                       timeout=300)
        r.raise_for_status()
        return np.array([d["embedding"] for d in sorted(r.json()["data"], key=lambda d: d["index"])],
                        dtype=np.float32)

    def cpu_seconds(self) -> float:
        import psutil

        total = 0.0
        try:
            root = psutil.Process(self.proc.pid)
            for proc in [root] + root.children(recursive=True):
                t = proc.cpu_times()
                total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
        return total

    def wait_idle(self, timeout: float = 600) -> float:
        """Wait until the server uses under 5 % of a core, and return how long that took. A server
        that keeps computing requests whose clients left (wrk stops with requests in flight)
        would otherwise take the cores from the next server's measurement."""
        start = last = time.monotonic()
        used = self.cpu_seconds()
        while time.monotonic() - start < timeout:
            time.sleep(0.5)
            now, cpu = time.monotonic(), self.cpu_seconds()
            if (cpu - used) / (now - last) < 0.05:
                return now - start
            last, used = now, cpu
        raise RuntimeError(f"{self.name} still busy {timeout} s after its load stopped")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def requests_per_cell(size: int, connections: int, scale: float) -> int:
    """Responses a cell waits for: at least 3 per connection, and enough sentences to time well."""
    return max(3 * connections, round(scale * (300 if size == 1 else 40) * (2 if connections > 1 else 1)))


def run_wrk(peer: Peer, bodies: Path, script: Path, connections: int, requests: int) -> dict:
    """wrk until `requests` responses; their time is taken here (wrk's own duration is its -d)."""
    cmd = ["wrk", "-t1", f"-c{connections}", "-d900s", "--timeout", "300s", "-s", str(script),
           peer.url + peer.path, "--", str(bodies), str(requests)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    elapsed = None
    for line in proc.stdout:
        if line.startswith("WRKDONE") and elapsed is None:
            elapsed = time.perf_counter() - start
            proc.send_signal(signal.SIGINT)
        if line.startswith("WRKJSON "):
            result = json.loads(line[len("WRKJSON "):])
    if proc.wait() != 0 or elapsed is None:
        raise RuntimeError(f"wrk against {peer.name} failed (exit {proc.returncode}, done: {elapsed is not None})")
    result["requests"] = min(result["requests"], requests)  # a response or two may land after the stop
    result["duration_us"] = round(elapsed * 1e6)
    return result


def in_process_p50(bundle: Path, sentences: list[str], threads: int) -> float:
    sys.path.insert(0, str(REPO))
    from sbert_bundle import Bundle

    b = Bundle.load(bundle, threads=threads)
    for s in sentences[:20]:
        b.encode([s])
    times = []
    for s in sentences:
        t = time.perf_counter()
        b.encode([s])
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def reference(model: Path, sentences: list[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model), device="cpu").encode(sentences, batch_size=32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=REPO / "artifacts/minilm_l6/bundle")
    parser.add_argument("--model", type=Path, default=REPO / "artifacts/minilm_l6/source/model")
    parser.add_argument("--servers", default="ours,ours-w2,st,infinity", help="comma-separated: ours, ours-w2, st, infinity")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the requests per cell (1: 300 of one "
                        "sentence, 40 of 32 at concurrency 1; twice that, and 3 per connection at least, above)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)))
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    corpus = [json.loads(line) for line in (REPO / "stages/data/eval_corpus.jsonl").read_text().splitlines()]
    names = args.servers.split(",")
    sizes = [int(x) for x in args.sizes.split(",")]
    conc = [int(x) for x in args.concurrency.split(",")]
    print(f"CPU: {cpu_line()}")
    ref = reference(args.model, corpus)
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    (work / "bench.lua").write_text(LUA)
    peers = [Peer(n, args.bundle, args.model, work) for n in names]
    results: dict = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_line(), "platform": platform.platform(),
                     "command": " ".join(["tests/benchmarks/serve_bench.py"] + sys.argv[1:]), "scale": args.scale,
                     "rounds": args.rounds, "servers": {}, "cells": []}
    try:
        for p in peers:
            p.wait_ready()
            emb = p.embed(corpus)
            cos = (emb * ref).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))
            results["servers"][p.name] = {"min_cosine_vs_sentence_transformers": round(float(cos.min()), 6)}
            print(f"{p.name:9s} ready; min cosine to sentence-transformers on {len(corpus)} sentences: {cos.min():.6f}")
        for p in peers:
            p.wait_idle()
        bodies = {}
        for p in peers:
            for size in sizes:
                path = work / f"{p.name}-{size}.jsonl"
                with path.open("w") as f:
                    for k in range(0, len(corpus), size):
                        chunk = (corpus[k:k + size] + corpus)[:size]
                        f.write(json.dumps({"model": p.model, "input": chunk, "encoding_format": "float"}) + "\n")
                bodies[p.name, size] = path
        threads = os.cpu_count()
        baseline = [in_process_p50(args.bundle, corpus, threads)]
        cells = {}
        for r in range(args.rounds):
            for size in sizes:
                for c in conc:
                    order = peers if r % 2 == 0 else peers[::-1]
                    for p in order:
                        w = run_wrk(p, bodies[p.name, size], work / "bench.lua", c, requests_per_cell(size, c, args.scale))
                        w["idle_after_s"] = round(p.wait_idle(), 1)
                        cells.setdefault((size, c, p.name), []).append(w)
                        print(f"round {r + 1} size {size:2d} conc {c:2d} {p.name:9s} "
                              f"{w['requests'] * size / (w['duration_us'] / 1e6):8.1f} sent/s  "
                              f"p50 {w['p50_us'] / 1000:7.1f} ms  p99 {w['p99_us'] / 1000:7.1f} ms  "
                              f"errors {w['status_errors'] + w['socket_errors']}  "
                              f"busy {w['idle_after_s']:.1f} s after the load stopped", flush=True)
        baseline.append(in_process_p50(args.bundle, corpus, threads))
    finally:
        for p in peers:
            p.stop()
    results["in_process_p50_ms"] = round(float(np.mean(baseline)) * 1000, 3)
    table = summarize(cells, sizes, conc, names, results)
    print()
    print(f"CPU: {cpu_line()}; {args.rounds} rounds, the same requests per cell for every server; "
          f"in-process Bundle.encode of one sentence: p50 {results['in_process_p50_ms']:.2f} ms")
    print(table)
    check_targets(results, names)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def summarize(cells: dict, sizes, conc, names, results) -> str:
    """Sum the rounds of each cell: sentences/s over the summed time; latency percentiles as the
    mean of the rounds' (wrk gives no histogram to merge)."""
    rows = ["| size | conc | server | sentences/s | p50 ms | p99 ms | non-2xx / socket errors | vs st | vs infinity |",
            "|---|---|---|---|---|---|---|---|---|"]
    for size in sizes:
        for c in conc:
            rates = {}
            for n in names:
                ws = cells[size, c, n]
                rate = sum(w["requests"] for w in ws) * size / (sum(w["duration_us"] for w in ws) / 1e6)
                cell = {"size": size, "concurrency": c, "server": n, "sentences_per_s": round(rate, 1),
                        "p50_ms": round(float(np.mean([w["p50_us"] for w in ws])) / 1000, 2),
                        "p99_ms": round(float(np.mean([w["p99_us"] for w in ws])) / 1000, 2),
                        "errors": sum(w["status_errors"] + w["socket_errors"] for w in ws),
                        "busy_after_load_s": max(w["idle_after_s"] for w in ws)}
                rates[n] = cell
                results["cells"].append(cell)
            for n, cell in rates.items():
                ratio = {p: (f"{cell['sentences_per_s'] / rates[p]['sentences_per_s']:.2f}x"
                             if p in rates and p != n and rates[p]["sentences_per_s"] > 0 else "")
                         for p in ("st", "infinity")}
                rows.append(f"| {size} | {c} | {n} | {cell['sentences_per_s']:.1f} | {cell['p50_ms']:.2f} | "
                            f"{cell['p99_ms']:.2f} | {cell['errors']} | {ratio['st']} | {ratio['infinity']} |")
    return "\n".join(rows)


def check_targets(results: dict, names) -> None:
    cell = {(c["size"], c["concurrency"], c["server"]): c for c in results["cells"]}
    ours = [n for n in names if n.startswith("ours")]
    targets = []
    for size in (1, 32):
        for peer, want in (("st", 3.0), ("infinity", 2.0)):
            if peer not in names or (size, 64, peer) not in cell:
                continue
            best = max(ours, key=lambda n: cell[size, 64, n]["sentences_per_s"])
            ratio = cell[size, 64, best]["sentences_per_s"] / cell[size, 64, peer]["sentences_per_s"]
            targets.append((f"conc 64, size {size}: {best} >= {want:g}x {peer} sentences/s", ratio >= want,
                            f"{ratio:.2f}x"))
            p99 = cell[size, 64, best]["p99_ms"], cell[size, 64, peer]["p99_ms"]
            targets.append((f"conc 64, size {size}: {best} p99 <= {peer}'s", p99[0] <= p99[1],
                            f"{p99[0]:.1f} vs {p99[1]:.1f} ms"))
    if (1, 1, "ours") in cell:
        p50 = cell[1, 1, "ours"]["p50_ms"]
        targets.append(("conc 1, size 1: ours p50 <= 1.5x in-process Bundle.encode",
                        p50 <= 1.5 * results["in_process_p50_ms"],
                        f"{p50:.2f} ms vs {results['in_process_p50_ms']:.2f} ms "
                        f"({p50 / results['in_process_p50_ms']:.2f}x)"))
    results["targets"] = [{"target": t, "met": ok, "measured": m} for t, ok, m in targets]
    print()
    for t, ok, m in targets:
        print(f"{'MET   ' if ok else 'MISSED'} {t}: {m}")


if __name__ == "__main__":
    sys.exit(main())
