"""A corpus job: read, encode and write in chunks, with progress, resume and worker processes.

Memory is bounded by the chunks in flight (at most 2 per worker, plus the one being read), not
by the corpus. After each chunk the output's data is flushed to disk and a small progress record
(OUT.progress.json) is replaced atomically: what was committed, where the input continues, and
a fingerprint of everything that decides the output's bytes (bundle, variant, input, settings).
`--resume` after a kill (SIGKILL included) checks the fingerprint, cuts the output back to the
last commit and goes on from there; chunk k always holds the same input rows, so the finished
output is byte for byte the one an uninterrupted run writes, whatever the number of workers.

Workers (`--workers N`) are processes with their own bundle and N-th of the cores; chunks go out
in input order and are written in input order.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from ..bundle import Bundle
from ..manifest import MANIFEST_FILE, cpu_count, sha256_file
from .sinks import StdoutSink, open_sink
from .sources import ON_INVALID, InputError, Source, describe_invalid, fingerprint, input_format

log = logging.getLogger("sbert_bundle.corpus")
RECORD_VERSION = 1
# --workers auto: one process on every core. On 2 cores (Xeon, 2026-12-08; tests/benchmarks/corpus_bench.py,
# 20,000 sentences) 1 process x 2 threads gave 278 sentences/s and 2 x 1 gave 250, at 384 against 935 MiB.
AUTO_WORKERS = 1


class ResumeError(ValueError):
    """--resume cannot continue: no record, or the record is for another bundle, input or setting."""


@dataclass
class Settings:
    input: str
    output: str | None
    input_format: str | None = None
    column: str | None = None          # --field (JSON lines) or --column (CSV, Parquet)
    keep: list[str] = field(default_factory=list)
    dtype: str = "float32"
    on_invalid: str = "error"
    chunk_rows: int = 8192
    batch_size: int = 32
    prompt: str | None = None
    prompt_name: str | None = None
    variant: str | None = None
    threads: int | None = None
    workers: int | str = 1
    resume: bool = False
    quiet: bool = False
    device_id: int = 0


def auto_workers() -> int:
    return AUTO_WORKERS


def record_path(output: str) -> Path:
    return Path(output).with_name(Path(output).name + ".progress.json")


def skipped_path(output: str) -> Path:
    return Path(output).with_name(Path(output).name + ".skipped.jsonl")


def _write_record(path: Path, record: dict) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_values(chunk, on_invalid: str, column: str | None, where: str, line_numbers: bool):
    """(texts to encode, their input rows, [(row, reason)] skipped). Refuses (InputError) by default."""
    texts, rows, skipped = [], [], []
    for i, value in enumerate(chunk.values):
        row = chunk.first_row + i
        if isinstance(value, str):
            texts.append(value)
            rows.append(row)
            continue
        reason = describe_invalid(value, column)
        if on_invalid == "error":
            at = f"line {row + 1}" if line_numbers else f"row {row}"
            raise InputError(f"{where} {at}: {reason} (--on-invalid skip or empty to go on)")
        skipped.append((row, reason))
        if on_invalid == "empty":
            texts.append("")
            rows.append(row)
    return texts, rows, skipped


# --- workers ----------------------------------------------------------------------------------

_WORKER_BUNDLE = None


def _start_worker(bundle_path: str, variant: str, threads: int, device_id: int) -> None:
    global _WORKER_BUNDLE
    _WORKER_BUNDLE = Bundle.load(bundle_path, variant=variant, threads=threads, device_id=device_id,
                                 verify_integrity=False)  # the parent checked it


def _worker_encode(texts: list[str], batch_size: int, prompt, prompt_name) -> np.ndarray:
    return _WORKER_BUNDLE.encode(texts, batch_size=batch_size, prompt=prompt, prompt_name=prompt_name)


class _InProcess:
    """The same interface as the pool's futures, computed at once."""

    def __init__(self, bundle: Bundle):
        self.bundle = bundle

    def submit(self, texts, batch_size, prompt, prompt_name):
        return _Done(self.bundle.encode(texts, batch_size=batch_size, prompt=prompt, prompt_name=prompt_name))

    def shutdown(self, cancel_futures=False):
        pass


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class _Pool:
    def __init__(self, workers: int, bundle_path: str, variant: str, threads: int, device_id: int):
        self.executor = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                                            initializer=_start_worker,
                                            initargs=(bundle_path, variant, threads, device_id))

    def submit(self, texts, batch_size, prompt, prompt_name):
        return self.executor.submit(_worker_encode, texts, batch_size, prompt, prompt_name)

    def shutdown(self, cancel_futures=False):
        self.executor.shutdown(wait=True, cancel_futures=cancel_futures)


# --- progress ---------------------------------------------------------------------------------

class Progress:
    """A tqdm bar on a terminal (rows, rows/s, ETA when the total is known), else a log line every
    `every` seconds; nothing with quiet."""

    def __init__(self, total: int | None, done: int, quiet: bool, stream=None, every: float = 10.0):
        self.stream = stream or sys.stderr
        self.total, self.done, self.quiet, self.every = total, done, quiet, every
        self.start, self.start_done, self.last = time.monotonic(), done, time.monotonic()
        self.bar = None
        if not quiet and self.stream.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, initial=done, unit="rows", unit_scale=True, file=self.stream,
                                desc="encode", dynamic_ncols=True)

    def update(self, rows: int) -> None:
        self.done += rows
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.update(rows)
            return
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = (self.done - self.start_done) / elapsed
        text = f"encode: {self.done} rows"
        if self.total:
            text += f" of {self.total} ({100 * self.done / self.total:.0f}%)"
        text += f", {rate:.0f} rows/s"
        if self.total and rate > 0:
            text += f", ETA {_duration((self.total - self.done) / rate)}"
        return text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


# --- the job ----------------------------------------------------------------------------------

def run(bundle_path: str, s: Settings, stdout=None) -> dict:
    """Encode s.input into s.output (None: JSON lines on stdout). Returns a summary."""
    if s.on_invalid not in ON_INVALID:
        raise ValueError(f"--on-invalid {s.on_invalid!r}: expected one of {', '.join(ON_INVALID)}")
    if s.dtype not in ("float32", "float16"):
        raise ValueError(f"--dtype {s.dtype!r}: expected float32 or float16")
    if s.batch_size < 1:
        raise ValueError(f"--batch-size {s.batch_size}: expected 1 or more")
    try:
        workers = auto_workers() if s.workers == "auto" else int(s.workers)
    except ValueError:
        workers = 0
    if workers < 1:
        raise ValueError(f"--workers {s.workers}: expected auto or a number of processes, 1 or more")
    if s.output in (None, "-") and s.resume:
        raise ValueError("--resume needs an output file (-o): standard output cannot be resumed")
    if s.input == "-" and s.resume:
        raise ValueError("--resume needs an input file (-i): standard input cannot be read again")
    if s.output not in (None, "-") and s.input != "-" and Path(s.output).resolve() == Path(s.input).resolve():
        raise ValueError(f"-o {s.output} is the input file")
    fmt = input_format(s.input, s.input_format)
    source = Source(s.input, fmt, s.column, s.keep, s.chunk_rows)
    threads = s.threads or max(1, cpu_count() // workers)
    bundle = Bundle.load(bundle_path, variant=s.variant, threads=threads if workers == 1 else 1,
                         device_id=s.device_id)
    sink = open_sink(s.output, bundle.embedding_dimension, s.dtype, s.keep, stdout or sys.stdout)
    resumable = not isinstance(sink, StdoutSink)
    print_ = (lambda text: None) if s.quiet else (lambda text: print(text, file=sys.stderr))
    record = record_path(s.output) if resumable else None
    identity = {
        "bundle_manifest_sha256": sha256_file(bundle.root / MANIFEST_FILE), "variant": bundle.variant,
        "device": bundle.device, "input": fingerprint(s.input), "input_format": fmt, "column": s.column,
        "keep": s.keep, "output": str(Path(s.output).resolve()) if resumable else None, "dtype": s.dtype,
        "on_invalid": s.on_invalid, "chunk_rows": s.chunk_rows, "batch_size": s.batch_size,
        "max_batch_tokens": bundle.max_batch_tokens, "prompt": s.prompt, "prompt_name": s.prompt_name}
    state = _resume_state(record, identity, s, sink) if resumable else None
    skipped_file = skipped_path(s.output) if resumable else None
    skipped_partial = skipped_file.with_name(skipped_file.name + ".partial") if skipped_file else None
    done_rows = state["rows_in"] if state else 0
    rows_out = state["rows_out"] if state else 0
    n_skipped = state["skipped"] if state else 0
    if state:
        print_(f"resuming {s.output} at input row {done_rows} ({rows_out} embeddings committed)")
    pool = _InProcess(bundle) if workers == 1 else _Pool(workers, str(bundle_path), bundle.variant, threads,
                                                         s.device_id)
    progress = Progress(source.total_rows(), done_rows, s.quiet)
    pending: collections.deque = collections.deque()
    finished = False
    skipped_out = None

    def commit_one():
        nonlocal done_rows, rows_out, n_skipped
        chunk, rows, skipped, future = pending.popleft()
        emb = future.result()
        sink.write(np.asarray(rows, dtype=np.int64), emb, {k: [chunk.keep[k][r - chunk.first_row] for r in rows]
                                                           for k in s.keep})
        sink_state = sink.commit()
        if skipped_out is not None and skipped:
            skipped_out.writelines((json.dumps({"row": r, "reason": why}) + "\n").encode() for r, why in skipped)
            skipped_out.flush()
            os.fsync(skipped_out.fileno())
        done_rows = chunk.first_row + len(chunk.values)
        rows_out += len(rows)
        n_skipped += len(skipped)
        if resumable:
            _write_record(record, {"version": RECORD_VERSION, "fingerprint": identity, "rows_in": done_rows,
                                   "rows_out": rows_out, "skipped": n_skipped, "input_offset": chunk.end_offset,
                                   "sink": sink_state,
                                   "skipped_bytes": skipped_out.tell() if skipped_out is not None else 0})
        progress.update(len(chunk.values))

    try:
        if skipped_partial is not None and s.on_invalid != "error":
            skipped_out = open(skipped_partial, "r+b" if state else "wb")
            if state:
                skipped_out.truncate(state["skipped_bytes"])
                skipped_out.seek(state["skipped_bytes"])
        sink.open(state["sink"] if state else None)
        line_numbers = fmt in ("text", "jsonl")
        for chunk in source.chunks(done_rows, (state["input_offset"] or 0) if state else 0):
            texts, rows, skipped = check_values(chunk, s.on_invalid, s.column, source.where, line_numbers)
            pending.append((chunk, rows, skipped, pool.submit(texts, s.batch_size, s.prompt, s.prompt_name)))
            while len(pending) > 2 * workers - 1:
                commit_one()
        while pending:
            commit_one()
        sink.finish(rows_out)
        if skipped_out is not None:
            skipped_out.close()
            os.replace(skipped_partial, skipped_file)
        if record is not None:
            record.unlink(missing_ok=True)
        finished = True
    except (KeyboardInterrupt, SystemExit):
        if resumable:
            print_(f"interrupted: {done_rows} input rows committed; run again with --resume to go on")
        raise
    except BaseException:
        if resumable:  # refused input or a failure: no half-written output is left, nothing to resume
            sink.discard()
            if skipped_out is not None:
                try:
                    skipped_out.close()
                except OSError:
                    pass
            if skipped_partial is not None:
                skipped_partial.unlink(missing_ok=True)
            record.unlink(missing_ok=True)
        raise
    finally:
        progress.close()
        pool.shutdown(cancel_futures=not finished)
    summary = {"rows_in": done_rows, "rows_out": rows_out, "skipped": n_skipped, "variant": bundle.variant,
               "device": bundle.device, "workers": workers, "threads": threads, "output": s.output}
    if resumable:
        extra = f"; {n_skipped} invalid rows {'skipped' if s.on_invalid == 'skip' else 'embedded as empty'}, " \
                f"listed in {skipped_file}" if n_skipped else ""
        print_(f"wrote {rows_out} x {bundle.embedding_dimension} {s.dtype} embeddings to {s.output} "
               f"(variant {bundle.variant} on {bundle.device}, {workers} worker(s) x {threads} thread(s)){extra}")
    return summary


def _resume_state(record: Path, fp: dict, s: Settings, sink) -> dict | None:
    if not s.resume:
        if record.exists():
            raise ResumeError(f"{record} is left by an interrupted run: add --resume to go on from it, or delete it "
                              f"and {', '.join(str(p) for p in sink.leftovers())} to start over")
        return None
    if not record.exists():
        raise ResumeError(f"--resume: {record} not found (nothing to resume for {s.output}); run without --resume")
    try:
        state = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ResumeError(f"--resume: {record} cannot be read ({e})") from None
    if not isinstance(state, dict) or state.get("version") != RECORD_VERSION:
        raise ResumeError(f"--resume: {record} is not a progress record of this version")
    old = state.get("fingerprint", {})
    changed = [k for k in fp if old.get(k) != fp[k]]
    if changed:
        details = "; ".join(_change(k, old.get(k), fp[k]) for k in changed)
        raise ResumeError(f"--resume refused: {details} since the interrupted run (rerun without --resume after "
                          f"deleting {record})")
    return state


def _change(key: str, before, after) -> str:
    if key == "input" and isinstance(before, dict) and isinstance(after, dict):
        moved = [k for k in after if before.get(k) != after.get(k)]
        return "the input changed (" + ", ".join(f"{k}: {before.get(k)} -> {after.get(k)}" for k in moved) + ")"
    names = {"bundle_manifest_sha256": "the bundle changed (manifest sha256)"}
    short = lambda v: (str(v)[:16] + "…") if isinstance(v, str) and len(str(v)) > 16 else v  # noqa: E731
    return f"{names.get(key, key)}: {short(before)!r} -> {short(after)!r}"
