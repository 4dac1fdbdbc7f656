"""The server's Prometheus metrics (prometheus-client), one set per app.

With `--workers N` the processes share prometheus-client's multiprocess directory
(PROMETHEUS_MULTIPROC_DIR, set by `sbert_bundle.serve.main`), so `/metrics` on any worker
reports the whole server.
"""

from __future__ import annotations

import os

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)

LATENCY = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)
SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKENS = (16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("sbert_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.request_seconds = Histogram("sbert_request_seconds", "Time from request to response, by route",
                                         ["route"], buckets=LATENCY, registry=r)
        self.tokenize_seconds = Histogram("sbert_tokenize_seconds", "Tokenization time per request",
                                          buckets=LATENCY, registry=r)
        self.queue_seconds = Histogram("sbert_queue_seconds", "Time an input waited before its batch ran",
                                       buckets=LATENCY, registry=r)
        self.inference_seconds = Histogram("sbert_inference_seconds", "Backend and head time per batch",
                                           buckets=LATENCY, registry=r)
        self.batch_inputs = Histogram("sbert_batch_inputs", "Inputs per batch", buckets=SIZES, registry=r)
        self.batch_padded_tokens = Histogram("sbert_batch_padded_tokens", "Padded tokens per batch",
                                             buckets=TOKENS, registry=r)
        self.padded_tokens = Counter("sbert_padded_tokens", "Tokens computed, padding included", registry=r)
        self.real_tokens = Counter("sbert_real_tokens", "Tokens of the inputs (1 - real/padded is the padding "
                                   "waste)", registry=r)
        mode = {"multiprocess_mode": "livesum"} if self.multiprocess else {}
        self.queue_tokens = Gauge("sbert_queue_tokens", "Tokens waiting or in the running batch", registry=r, **mode)
        self.queue_inputs = Gauge("sbert_queue_inputs", "Inputs waiting or in the running batch", registry=r, **mode)
        self.in_flight = Gauge("sbert_requests_in_flight", "HTTP requests being served (a /metrics request counts "
                               "itself)", registry=r, **mode)
        self.truncated = Counter("sbert_inputs_truncated", "Inputs cut to the model's max input tokens", registry=r)
        self.dropped = Counter("sbert_inputs_dropped", "Queued inputs dropped because their client went away",
                               registry=r)

    def exposition(self) -> bytes:
        if self.multiprocess:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
