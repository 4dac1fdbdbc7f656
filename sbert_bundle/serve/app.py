"""The ASGI app: OpenAI- and TEI-compatible embedding routes over one loaded `Bundle`.

    app = create_app(Bundle.load("bundle/"), Settings(api_keys=("secret",)))

Any ASGI host runs it (uvicorn through `sbert-bundle serve`, Ray Serve, gunicorn's uvicorn
worker). Routes:

    POST /v1/embeddings  OpenAI's request and response (float or base64, dimensions, usage)
    GET  /v1/models      the served model
    POST /embed          TEI's (inputs, normalize, truncate, prompt_name, dimensions)
    POST /tokenize       TEI's: the tokens the model sees
    GET  /info           bundle, variant, device, limits, the verify gates it passed
    GET  /health         liveness (the model thread runs)    open
    GET  /ready          loaded, checked and warmed up        open
    GET  /metrics        Prometheus                           behind the key unless public_metrics

Every embedding is `Bundle.embed` of a batch the scheduler chose, so it equals `Bundle.encode`
of the same input. Inputs that truncation cut are listed in the `X-Truncated-Inputs` header
(indices, comma-separated); `"truncate": false` in a request refuses them instead.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..bundle import TextError, _published
from ..head import Normalize
from ..tokenization import Tokens
from .metrics import Metrics
from .protocol import ApiError, EmbedRequest, parse_openai, parse_tei
from .scheduler import Job, QueueFull, Scheduler, Stopped

log = logging.getLogger(__name__)

OPEN_PATHS = ("/health", "/ready")
INLINE_TOKENIZE_CHARS = 4096  # smaller requests are tokenized on the event loop (a thread hop costs more)


@dataclass(frozen=True)
class Settings:
    """What `sbert-bundle serve` exposes as flags (see its --help)."""

    api_keys: tuple[str, ...] = ()
    public_metrics: bool = False
    max_inputs: int = 2048                 # inputs per request (OpenAI's limit)
    max_input_tokens: int | None = None    # tokens per input after truncation; None: the model's max_seq_length
    max_body_bytes: int = 2 * 1024 * 1024  # request body (TEI's payload limit)
    max_queue_tokens: int = 262_144        # tokens queued or running; past it, 429
    max_batch_tokens: int | None = -1      # padded tokens per batch; -1: the bundle's default here
    max_batch_size: int = 256              # inputs per batch
    truncate: bool = True                  # a request's default for `truncate` (as sentence-transformers)
    retry_after_s: int = 1
    drain_timeout_s: float = 30.0
    served_model_names: tuple[str, ...] = ()  # accepted as `model`, besides the bundle's name and source id
    warmup: bool = True


@dataclass(frozen=True)
class Limits:
    """What the request parser needs to know (protocol.py)."""

    max_inputs: int
    max_input_tokens: int
    vocab_size: int
    dimension: int
    truncate: bool
    prompts: frozenset
    model_names: tuple[str, ...] = field(default=())


class ClientGone(Exception):
    """The client closed the connection before its embeddings were ready."""


def _json(data, status: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY), status, headers,
                    media_type="application/json")


class Service:
    """The state behind the routes: bundle, scheduler, metrics, readiness and drain."""

    def __init__(self, bundle, settings: Settings, published: dict | None = None, archive_sha256: str | None = None):
        self.bundle, self.settings = bundle, settings
        head = bundle.head
        max_tokens = settings.max_input_tokens or head.max_seq_length
        if not 1 <= max_tokens <= head.max_seq_length:
            raise ValueError(f"max_input_tokens {max_tokens}: expected 1 to the model's max_seq_length "
                             f"{head.max_seq_length}")
        names = [bundle.manifest.get("name"), (bundle.manifest.get("source") or {}).get("id"),
                 *settings.served_model_names]
        self.model_names = tuple(dict.fromkeys(n for n in names if isinstance(n, str) and n))
        self.limits = Limits(settings.max_inputs, max_tokens, bundle.tokenizer.tokenizer.get_vocab_size(),
                             bundle.embedding_dimension, settings.truncate, frozenset(head.prompts),
                             self.model_names)
        self.normalized = bool(head.modules) and isinstance(head.modules[-1], Normalize)
        batch_tokens = bundle.max_batch_tokens if settings.max_batch_tokens == -1 else settings.max_batch_tokens
        self.metrics = Metrics()
        self.scheduler = Scheduler(bundle, batch_tokens, settings.max_batch_size, settings.max_queue_tokens,
                                   self.metrics)
        self.max_batch_tokens = batch_tokens
        self.published = published if published is not None else _published(bundle.release)
        self.archive_sha256 = archive_sha256 or (self.published or {}).get("archive_sha256")
        self.ready = False
        self.draining = False
        self.in_flight = 0

    # ---- lifecycle -------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        self.scheduler.start()
        if self.settings.warmup:
            await asyncio.to_thread(self._warm_up)
        self.ready = True
        log.info("ready: %s variant %s on %s", self.model_names[0], self.bundle.variant, self.bundle.device)
        try:
            yield
        finally:
            self.ready = False
            await asyncio.to_thread(self.scheduler.stop, 10)

    def _warm_up(self) -> None:
        """One short and one full-length batch, so the first requests do not pay for allocation."""
        short = self.bundle.tokenizer.encode(["warm up"])
        longest = [Tokens([0] * self.limits.max_input_tokens)]
        for batch in (short, longest):
            self.bundle.embed(batch)

    def drain(self) -> None:
        """Refuse new work (503, /ready 503); what is in flight goes on."""
        self.draining = True
        self.ready = False

    # ---- helpers -----------------------------------------------------------------------------
    def authorized(self, request: Request) -> bool:
        keys = self.settings.api_keys
        if not keys:
            return True
        given = request.headers.get("authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else ""
        ok = False
        for key in keys:  # every key compared, in constant time: no early exit to time
            ok |= hmac.compare_digest(token.encode(), key.encode())
        return ok

    async def body(self, request: Request):
        limit = self.settings.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise ApiError(413, f"the request body has {int(length)} bytes; at most {limit}", code="payload_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the request body passes {limit} bytes", code="payload_too_large")
            chunks.append(chunk)
        data = b"".join(chunks)
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as e:
            try:  # orjson refuses a lone surrogate ("\ud800"), which is valid JSON: the field check names it
                return json.loads(data)
            except (ValueError, RecursionError):
                raise ApiError(400, f"the request body is not valid JSON: {str(e)[:200]}",
                               code="invalid_json") from None

    def tokenize(self, req: EmbedRequest, field_name: str, status: int):
        if req.ids is not None:
            return [Tokens(ids) for ids in req.ids], 0, []
        try:
            encodings, prompt_length = self.bundle.tokenize(req.texts, prompt_name=req.prompt_name)
        except TextError as e:  # a lone surrogate: Bundle.tokenize's check, named as this route's field
            raise ApiError(status, f"'{field_name}[{e.index}]' {e.problem}", f"{field_name}[{e.index}]") from None
        truncated = [i for i, e in enumerate(encodings) if e.overflowing]
        limit = self.limits.max_input_tokens
        for i, e in enumerate(encodings):
            if len(e.ids) > limit:
                raise ApiError(status, f"'{field_name}[{i}]' has {len(e.ids)} tokens; at most {limit} per input",
                               f"{field_name}[{i}]", "context_length_exceeded")
        if truncated and not req.truncate:
            raise ApiError(status, f"'{field_name}[{truncated[0]}]' is longer than the model's "
                                   f"{self.bundle.head.max_seq_length} tokens and truncate is false "
                                   f"({len(truncated)} such input{'s' if len(truncated) > 1 else ''})",
                           f"{field_name}[{truncated[0]}]", "context_length_exceeded")
        return encodings, prompt_length, truncated

    async def embed(self, request: Request, req: EmbedRequest, field_name: str, status: int):
        """(embeddings, tokens, truncated indices) for a parsed request; ClientGone if the client left."""
        start = time.perf_counter()
        if req.texts is not None and sum(map(len, req.texts)) > INLINE_TOKENIZE_CHARS:
            encodings, prompt_length, truncated = await asyncio.to_thread(self.tokenize, req, field_name, status)
        else:
            encodings, prompt_length, truncated = self.tokenize(req, field_name, status)
        self.metrics.tokenize_seconds.observe(time.perf_counter() - start)
        job = Job(encodings, prompt_length, self.bundle.embedding_dimension, asyncio.get_running_loop())
        try:
            self.scheduler.submit(job)
        except QueueFull as e:
            raise ApiError(429, f"server busy: {e}; retry after {self.settings.retry_after_s} s",
                           code="queue_full", kind="rate_limit_error",
                           headers={"Retry-After": str(self.settings.retry_after_s)}) from None
        except Stopped:
            raise ApiError(503, "the server is shutting down", code="shutting_down", kind="server_error",
                           headers={"Connection": "close"}) from None
        if truncated:
            self.metrics.truncated.inc(len(truncated))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait((job.future, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not job.future.done():
            self.scheduler.cancel(job)
            job.future.cancel()
            raise ClientGone
        emb = job.future.result()
        if req.dimensions is not None and req.dimensions < emb.shape[1]:
            emb = _renormalize(emb[:, :req.dimensions])
        elif req.normalize and not self.normalized:
            emb = _renormalize(emb)
        return emb, job.tokens, truncated

    def info(self) -> dict:
        b, s = self.bundle, self.settings
        report = b.report or {}
        gates = (report.get("variants") or {}).get(b.variant)
        return {
            "model_id": self.model_names[0], "model_names": list(self.model_names),
            "version": b.manifest.get("version"), "source": b.manifest.get("source"),
            "archive_sha256": self.archive_sha256,
            "registry": ({k: self.published.get(k) for k in ("repository", "name", "version", "commit")}
                         if self.published else None),
            "variant": b.variant, "device": b.device, "precision": b.manifest["variants"][b.variant].get("precision"),
            "embedding_dimension": b.embedding_dimension, "max_input_length": self.limits.max_input_tokens,
            "prompts": sorted(b.head.prompts), "default_prompt_name": b.head.default_prompt_name,
            "limits": {**asdict(s), "api_keys": len(s.api_keys), "max_input_tokens": self.limits.max_input_tokens,
                       "max_batch_tokens": self.max_batch_tokens},
            "verify": ({"variant": b.variant, **gates} if gates else None),
            "verified": gates is not None and gates.get("passed") is True,
        }


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body is already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _renormalize(emb: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return np.ascontiguousarray(emb / np.maximum(norms, 1e-12), dtype=np.float32)


def _truncation_headers(truncated: list[int]) -> dict:
    return {"X-Truncated-Inputs": ",".join(map(str, truncated))} if truncated else {}


def _openai_error(e: ApiError) -> Response:
    return _json({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}, e.status,
                 e.headers)


def _tei_error(e: ApiError) -> Response:
    kinds = {413: "Validation", 422: "Validation", 400: "Validation", 429: "Overloaded", 401: "Unauthorized",
             503: "Unhealthy"}
    return _json({"error": e.message, "error_type": kinds.get(e.status, "Backend")}, e.status, e.headers)


def create_app(bundle, settings: Settings | None = None, published: dict | None = None,
               archive_sha256: str | None = None):
    """The ASGI app serving `bundle` (a loaded `sbert_bundle.Bundle`). /info shows published (what
    `sbert-bundle pull` recorded: registry, version, archive sha256; read from a pulled release
    folder when not given) and archive_sha256 (of the archive the bundle was loaded from)."""
    service = Service(bundle, settings or Settings(), published, archive_sha256)
    metrics = service.metrics

    def route(path: str, methods: list[str], error, open_: bool = False):
        def wrap(handler):
            async def endpoint(request: Request) -> Response:
                start = time.perf_counter()
                try:
                    if not open_ and not service.authorized(request):
                        raise ApiError(401, "missing or wrong API key (Authorization: Bearer <key>)",
                                       code="invalid_api_key", kind="authentication_error",
                                       headers={"WWW-Authenticate": "Bearer"})
                    response = await handler(request)
                except ApiError as e:
                    response = error(e)
                except ClientGone:  # nobody reads it; 499 (nginx's "client closed request") for the metrics
                    response = Response(status_code=499)
                except Exception:  # noqa: BLE001 - one request's failure is its own 500, logged without texts
                    log.exception("%s failed", path)
                    response = error(ApiError(500, "internal error: the server's log has the details",
                                              code="internal_error", kind="server_error"))
                metrics.requests.labels(path, str(response.status_code)).inc()
                metrics.request_seconds.labels(path).observe(time.perf_counter() - start)
                return response
            return Route(path, endpoint, methods=methods)
        return wrap

    @route("/v1/embeddings", ["POST"], _openai_error)
    async def openai_embeddings(request):
        req = parse_openai(await service.body(request), service.limits)
        emb, tokens, truncated = await service.embed(request, req, "input", 400)
        if req.encoding_format == "base64":
            rows = [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in emb]
        else:
            rows = list(emb)
        data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)]
        return _json({"object": "list", "data": data, "model": service.model_names[0],
                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}, headers=_truncation_headers(truncated))

    @route("/v1/models", ["GET"], _openai_error)
    async def models(request):
        return _json({"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                                  "owned_by": "sbert-bundle"} for name in service.model_names]})

    @route("/embed", ["POST"], _tei_error)
    async def tei_embed(request):
        req = parse_tei(await service.body(request), service.limits)
        emb, _, truncated = await service.embed(request, req, "inputs", 422)
        return _json(emb, headers=_truncation_headers(truncated))

    @route("/tokenize", ["POST"], _tei_error)
    async def tei_tokenize(request):
        body = await service.body(request)
        if not isinstance(body, dict) or "inputs" not in body:
            raise ApiError(422, "'inputs' is required", "inputs")
        req = parse_tei({"inputs": body["inputs"], "prompt_name": body.get("prompt_name")}, service.limits)
        if req.texts is None:
            raise ApiError(422, "'inputs' must be text to tokenize", "inputs")
        add_special = body.get("add_special_tokens", True)
        if not isinstance(add_special, bool):
            raise ApiError(422, "'add_special_tokens' must be true or false", "add_special_tokens")
        encodings, _, _ = service.tokenize(req, "inputs", 422)  # the same checks and tokens as /embed
        if not add_special:
            prompt = bundle.head.resolve_prompt(None, req.prompt_name) or ""
            encodings = bundle.tokenizer.tokenizer.encode_batch([prompt + t for t in req.texts],
                                                               add_special_tokens=False)
        return _json([[{"id": i, "text": tok, "special": bool(sp), "start": a, "stop": b}
                       for i, tok, sp, (a, b) in zip(e.ids, e.tokens, e.special_tokens_mask, e.offsets)]
                      for e in encodings])

    @route("/info", ["GET"], _tei_error)
    async def info(request):
        return _json(service.info())

    @route("/health", ["GET"], _tei_error, open_=True)
    async def health(request):
        alive = service.scheduler.alive
        return _json({"status": "ok" if alive else "model thread stopped"}, 200 if alive else 503)

    @route("/ready", ["GET"], _tei_error, open_=True)
    async def ready(request):
        state = "ready" if service.ready else ("draining" if service.draining else "loading")
        return _json({"status": state}, 200 if service.ready else 503)

    async def metrics_endpoint(request):
        if not service.settings.public_metrics and not service.authorized(request):
            return _openai_error(ApiError(401, "missing or wrong API key (Authorization: Bearer <key>)",
                                          code="invalid_api_key", kind="authentication_error",
                                          headers={"WWW-Authenticate": "Bearer"}))
        return Response(metrics.exposition(), media_type=metrics.content_type)

    routes = [openai_embeddings, models, tei_embed, tei_tokenize, info, health, ready,
              Route("/metrics", metrics_endpoint, methods=["GET"])]
    return Gate(Starlette(routes=routes, lifespan=service.lifespan), service)


class Gate:
    """ASGI wrapper: counts requests in flight (for the drain) and answers 503 while draining."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service
        self.state = app.state
        self.state.service = service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        service = self.service
        if service.draining and scope["path"] not in OPEN_PATHS:
            response = _openai_error(ApiError(503, "the server is shutting down", code="shutting_down",
                                              kind="server_error", headers={"Connection": "close", "Retry-After": "1"}))
            return await response(scope, receive, send)
        service.in_flight += 1
        service.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            service.in_flight -= 1
            service.metrics.in_flight.dec()
