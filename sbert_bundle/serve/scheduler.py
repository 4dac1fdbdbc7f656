"""One queue for the inputs of every request, batched by a padded-token budget.

Requests are tokenized by the app, then submitted as a `Job`. One thread runs the model: it
takes everything waiting (a round), sorts it by token length across requests, cuts batches
with the bundle's own planner (`plan_batches`: at most `max_batch_size` inputs and
`max_batch_tokens` padded tokens) and runs each through `Bundle.embed`. A row does not depend
on what else is in its batch, so a served embedding is what `Bundle.encode` gives. Each round
holds only what waited when it began, so a long request cannot starve later short ones for
longer than one round. A job whose client went away is skipped, not computed.

Admission is by tokens: `submit` refuses a job when the tokens queued (waiting or running)
plus its own would pass `max_queue_tokens` (the app answers 429 with Retry-After).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict

import numpy as np

from ..bundle import plan_batches

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds too many tokens to take this job now."""


class Stopped(Exception):
    """The scheduler is stopping: no new work."""


class Job:
    """The inputs of one request: their encodings, the embeddings as they arrive, a future."""

    __slots__ = ("encodings", "prompt_length", "tokens", "out", "remaining", "future", "loop", "cancelled",
                 "enqueued")

    def __init__(self, encodings: list, prompt_length: int, dimension: int, loop: asyncio.AbstractEventLoop):
        self.encodings = encodings
        self.prompt_length = prompt_length
        self.tokens = sum(len(e.ids) for e in encodings)
        self.out = np.empty((len(encodings), dimension), dtype=np.float32)
        self.remaining = len(encodings)
        self.loop = loop
        self.future: asyncio.Future = loop.create_future()
        self.cancelled = False
        self.enqueued = 0.0


def _resolve(future: asyncio.Future, value=None, error: BaseException | None = None) -> None:
    if future.done():  # the request was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class Scheduler:
    def __init__(self, bundle, max_batch_tokens: int | None, max_batch_size: int, max_queue_tokens: int, metrics):
        self.bundle = bundle
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.max_queue_tokens = max_queue_tokens
        self.metrics = metrics
        self.queued_tokens = 0
        self.queued_inputs = 0
        self._waiting: list[tuple[Job, int]] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="sbert-bundle-batcher", daemon=True)

    @property
    def alive(self) -> bool:
        """Whether the model thread runs (what /health reports)."""
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue every input of job, or raise QueueFull (nothing queued) / Stopped."""
        with self._cond:
            if self._stopping:
                raise Stopped("the server is shutting down")
            if self.queued_tokens + job.tokens > self.max_queue_tokens:
                raise QueueFull(f"the queue holds {self.queued_tokens} tokens; {job.tokens} more would pass its "
                                f"bound of {self.max_queue_tokens}")
            job.enqueued = time.perf_counter()
            self._waiting.extend((job, i) for i in range(len(job.encodings)))
            self._account(job.tokens, len(job.encodings))
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client went away: its inputs still queued are dropped when their turn comes."""
        job.cancelled = True

    def _account(self, tokens: int, inputs: int) -> None:  # under self._cond
        self.queued_tokens += tokens
        self.queued_inputs += inputs
        self.metrics.queue_tokens.set(self.queued_tokens)
        self.metrics.queue_inputs.set(self.queued_inputs)

    def _release(self, items: list[tuple[Job, int]]) -> None:
        with self._cond:
            self._account(-sum(len(j.encodings[i].ids) for j, i in items), -len(items))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if not self._waiting:
                    return
                round_, self._waiting = self._waiting, []
            groups: dict[int, list[tuple[Job, int]]] = defaultdict(list)
            for item in round_:  # a batch shares one prompt length (it decides the pooling mask)
                groups[item[0].prompt_length].append(item)
            for prompt_length, items in groups.items():
                lengths = [len(j.encodings[i].ids) for j, i in items]
                for idx in plan_batches(lengths, self.max_batch_size, self.max_batch_tokens):
                    self._run_batch([items[k] for k in idx], prompt_length)

    def _run_batch(self, items: list[tuple[Job, int]], prompt_length: int) -> None:
        dropped = [it for it in items if it[0].cancelled]
        if dropped:
            self.metrics.dropped.inc(len(dropped))
            self._release(dropped)
            items = [it for it in items if not it[0].cancelled]
        if not items:
            return
        start = time.perf_counter()
        for job, _ in items:
            self.metrics.queue_seconds.observe(start - job.enqueued)
        encodings = [j.encodings[i] for j, i in items]
        try:
            emb = self.bundle.embed(encodings, prompt_length)
        except Exception as e:  # noqa: BLE001 - fail these jobs, keep serving the others
            log.error("a batch of %d inputs failed: %s", len(items), e)
            for job in {id(j): j for j, _ in items}.values():
                job.cancelled = True
                job.loop.call_soon_threadsafe(_resolve, job.future, None, e)
            self._release(items)
            return
        m = self.metrics
        m.inference_seconds.observe(time.perf_counter() - start)
        width = max(len(e.ids) for e in encodings)
        m.batch_inputs.observe(len(items))
        m.batch_padded_tokens.observe(width * len(items))
        m.padded_tokens.inc(width * len(items))
        m.real_tokens.inc(sum(len(e.ids) for e in encodings))
        for row, (job, i) in zip(emb, items):
            job.out[i] = row
            job.remaining -= 1
            if job.remaining == 0:
                job.loop.call_soon_threadsafe(_resolve, job.future, job.out)
        self._release(items)
