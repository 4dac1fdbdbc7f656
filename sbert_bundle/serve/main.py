"""`sbert-bundle serve`: load (or pull) a bundle and run the app on uvicorn, one or several
processes, with a drain on SIGTERM.

On SIGTERM (or Ctrl-C) a process stops taking work at once (`/ready` and new requests answer
503), lets the requests in flight finish for up to --drain-timeout seconds, then exits 0. A
second signal stops it without waiting. With --workers N the parent binds the port, starts N
processes that each load the bundle with cores/N threads and accept on the same socket, passes
signals on and exits when they have.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import uvicorn

from ..bundle import Bundle
from ..manifest import cpu_count, sha256_file
from .app import Settings, create_app

log = logging.getLogger("sbert_bundle.serve")


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but the first SIGTERM/SIGINT drains before uvicorn's own shutdown."""

    def __init__(self, config: uvicorn.Config, service, drain_timeout_s: float):
        super().__init__(config)
        self.service, self.drain_timeout_s = service, drain_timeout_s

    def handle_exit(self, sig, frame) -> None:
        if self.service.draining:  # a second signal: stop now, cutting off what is still in flight
            log.warning("signal %d again: stopping without waiting (%d requests in flight)", sig,
                        self.service.in_flight)
            self.force_exit = True
            self.should_exit = True
            return
        log.warning("signal %d: draining (%d requests in flight, up to %.0f s)", sig, self.service.in_flight,
                    self.drain_timeout_s)
        self.service.drain()
        threading.Thread(target=self._drain, name="sbert-bundle-drain", daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.drain_timeout_s
        while self.service.in_flight > 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.service.in_flight:
            log.warning("drain timeout: %d requests still in flight are cut off", self.service.in_flight)
        self.config.timeout_graceful_shutdown = 1
        self.should_exit = True


def settings_from(args) -> Settings:
    keys = list(args.api_key or [])
    if os.environ.get("SBERT_BUNDLE_API_KEYS"):
        keys += [k.strip() for k in os.environ["SBERT_BUNDLE_API_KEYS"].split(",") if k.strip()]
    if args.api_key_file:
        keys += [line.strip() for line in Path(args.api_key_file).read_text().splitlines() if line.strip()]
    for name, value in (("--max-inputs", args.max_inputs), ("--max-body-bytes", args.max_body_bytes),
                        ("--max-queue-tokens", args.max_queue_tokens), ("--max-batch-size", args.max_batch_size)):
        if value < 1:
            raise ValueError(f"{name} {value}: expected 1 or more")
    if args.max_batch_tokens is not None and args.max_batch_tokens < 1:
        raise ValueError(f"--max-batch-tokens {args.max_batch_tokens}: expected 1 or more")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: expected 0 to 65535")
    if args.drain_timeout < 0:
        raise ValueError(f"--drain-timeout {args.drain_timeout}: expected 0 or more seconds")
    return Settings(api_keys=tuple(keys), public_metrics=args.public_metrics, max_inputs=args.max_inputs,
                    max_input_tokens=args.max_input_tokens, max_body_bytes=args.max_body_bytes,
                    max_queue_tokens=args.max_queue_tokens,
                    max_batch_tokens=-1 if args.max_batch_tokens is None else args.max_batch_tokens,
                    max_batch_size=args.max_batch_size, truncate=not args.no_truncate,
                    drain_timeout_s=args.drain_timeout, served_model_names=tuple(args.served_model_name or ()))


def serve_process(source: str, args, settings: Settings, threads: int | None, sock: socket.socket | None) -> int:
    """Load the bundle and serve until drained; uvicorn binds host:port unless given sock."""
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(levelname)s %(name)s %(message)s")
    bundle = Bundle.load(source, variant=args.variant, threads=threads, device_id=args.device_id)
    archive = sha256_file(Path(source)) if Path(source).is_file() else None
    app = create_app(bundle, settings, archive_sha256=archive)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, lifespan="on",
                            access_log=args.access_log, timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)))
    server = DrainingServer(config, app.state.service, settings.drain_timeout_s)
    server.run(sockets=[sock] if sock is not None else None)
    return 0 if server.started else 1


def _worker(source, args, settings, threads, sock) -> None:
    raise SystemExit(serve_process(source, args, settings, threads, sock))


def run(args) -> int:
    settings = settings_from(args)
    source, cleanup = args.bundle, None
    if args.pull:
        from ..registry import pull

        repo, ref = args.pull
        if args.bundle:
            raise ValueError("give a BUNDLE or --pull REPO REF, not both")
        cleanup = tempfile.mkdtemp(prefix="sbert-bundle-serve-")
        published, out = pull(repo, ref, Path(cleanup) / "release")
        log.warning("pulled %s %s (archive sha256 %s)", published.name, published.version, published.sha256)
        source = str(out)
    elif not args.bundle:
        raise ValueError("give a BUNDLE (folder, archive or release) or --pull REPO NAME@vX.Y.Z")
    try:
        if args.workers == 1:
            return serve_process(source, args, settings, args.threads, None)
        return _run_workers(source, args, settings)
    finally:
        if cleanup:
            shutil.rmtree(cleanup, ignore_errors=True)


def _run_workers(source: str, args, settings: Settings) -> int:
    if args.workers < 1:
        raise ValueError(f"--workers {args.workers}: expected 1 or more")
    threads = args.threads or max(1, cpu_count() // args.workers)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.set_inheritable(True)
    metrics_dir = tempfile.mkdtemp(prefix="sbert-bundle-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # one /metrics for all workers
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(source, args, settings, threads, sock), name=f"worker-{i}")
             for i in range(args.workers)]
    for p in procs:
        p.start()

    def forward(sig, frame):  # Ctrl-C reaches the workers through the terminal's process group
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, sig)

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
                signal.SIGINT: signal.signal(signal.SIGINT, lambda sig, frame: None)}
    try:
        for p in procs:
            p.join()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    codes = [p.exitcode for p in procs]
    return 0 if all(c == 0 for c in codes) else 1
