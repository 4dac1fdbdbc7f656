"""`sbert-bundle serve`: a real server process on a loopback port, real clients (the official
`openai` client and httpx), on the tiny random BERT bundle (`tiny_bundle`).

Every embedding served is compared with `Bundle.encode` of the same inputs in this process;
the real default model against sentence-transformers is `test_default_model.py`'s
`test_served_default_model_matches_sentence_transformers`.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from conftest import SENTENCES
from serving import Server
from sbert_bundle import Bundle

openai = pytest.importorskip("openai", reason="the test extra's openai client is not installed")

MODEL = "tiny-bert"  # --served-model-name below; the manifest's own name works too


@pytest.fixture(scope="module")
def loaded(tiny_bundle) -> Bundle:
    return Bundle.load(tiny_bundle, threads=1)


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    srv = Server(tiny_bundle, tmp_path_factory.mktemp("serve") / "server.log", "--max-inputs", "64",
                 "--max-body-bytes", "65536")
    yield srv
    assert srv.stop() == 0, srv.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def assert_same(served, expected) -> None:
    served, expected = np.asarray(served, dtype=np.float32), np.asarray(expected, dtype=np.float32)
    assert served.shape == expected.shape
    assert cosines(served, expected).min() >= 0.99999
    np.testing.assert_allclose(served, expected, atol=1e-5)


# --- the OpenAI contract, through the official client -------------------------------------

@pytest.mark.parametrize("encoding_format", ["base64", "float"])  # base64 is the SDK's default
def test_openai_client_batched_matches_bundle_encode(client, loaded, encoding_format):
    kwargs = {} if encoding_format == "base64" else {"encoding_format": "float"}
    response = client.embeddings.create(model=MODEL, input=SENTENCES, **kwargs)
    assert [d.index for d in response.data] == list(range(len(SENTENCES)))
    assert_same([d.embedding for d in response.data], loaded.encode(SENTENCES))
    tokens = sum(len(e.ids) for e in loaded.tokenizer.encode(SENTENCES))
    assert response.usage.prompt_tokens == response.usage.total_tokens == tokens


def test_openai_client_single_string(client, loaded):
    response = client.embeddings.create(model=MODEL, input="a cat sat on the mat")
    assert len(response.data) == 1
    assert_same([response.data[0].embedding], loaded.encode(["a cat sat on the mat"]))


def test_base64_is_little_endian_float32(server, loaded):
    r = httpx.post(server.url + "/v1/embeddings", json={"model": MODEL, "input": ["hello world"],
                                                        "encoding_format": "base64"})
    row = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    assert_same([row], loaded.encode(["hello world"]))


def test_dimensions_cut_and_renormalise(client, loaded):
    response = client.embeddings.create(model=MODEL, input=SENTENCES[:3], dimensions=8, encoding_format="float")
    full = loaded.encode(SENTENCES[:3])[:, :8]
    expected = full / np.linalg.norm(full, axis=1, keepdims=True)
    assert_same([d.embedding for d in response.data], expected)
    assert np.allclose(np.linalg.norm([d.embedding for d in response.data], axis=1), 1, atol=1e-6)


def test_token_id_inputs_are_the_models_whole_input(client, loaded):
    ids = [e.ids for e in loaded.tokenizer.encode(SENTENCES[:2])]  # with [CLS] ... [SEP]
    response = client.embeddings.create(model=MODEL, input=ids, encoding_format="float")
    assert_same([d.embedding for d in response.data], loaded.encode(SENTENCES[:2]))
    single = client.embeddings.create(model=MODEL, input=ids[0], encoding_format="float")
    assert_same([single.data[0].embedding], loaded.encode(SENTENCES[:1]))


def test_models_lists_the_served_names(client, loaded):
    names = [m.id for m in client.models.list().data]
    assert names == [loaded.manifest["name"], loaded.manifest["source"]["id"], MODEL]


def test_unknown_model_is_404_with_the_served_names(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="text-embedding-3-small", input="x")
    assert e.value.code == "model_not_found" and MODEL in e.value.message


# --- TEI's routes, /info, truncation ----------------------------------------------------------

def test_tei_embed_and_tokenize(server, loaded):
    r = httpx.post(server.url + "/embed", json={"inputs": SENTENCES})
    assert r.status_code == 200
    assert_same(r.json(), loaded.encode(SENTENCES))
    r = httpx.post(server.url + "/tokenize", json={"inputs": ["hello world"]})
    assert [t["id"] for t in r.json()[0]] == loaded.tokenizer.encode(["hello world"])[0].ids
    assert [t["special"] for t in r.json()[0]] == [True, False, False, True]


def test_truncated_inputs_are_named_and_can_be_refused(server, loaded):
    long = "python code is fast " * 40  # past the tiny model's 64 tokens
    r = httpx.post(server.url + "/v1/embeddings", json={"model": MODEL, "input": ["short one", long, long]})
    assert r.status_code == 200 and r.headers["x-truncated-inputs"] == "1,2"
    assert_same([d["embedding"] for d in r.json()["data"]], loaded.encode(["short one", long, long]))
    assert "x-truncated-inputs" not in httpx.post(server.url + "/embed", json={"inputs": "short"}).headers
    r = httpx.post(server.url + "/v1/embeddings", json={"model": MODEL, "input": ["short", long], "truncate": False})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "input[1]" and "truncate is false" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/embed", json={"inputs": [long], "truncate": False})
    assert r.status_code == 422 and "inputs[0]" in r.json()["error"]


def test_info_says_what_is_served_and_the_limits(server, loaded):
    info = httpx.get(server.url + "/info").json()
    assert info["variant"] == loaded.variant and info["device"] == "cpu"
    assert info["embedding_dimension"] == loaded.embedding_dimension
    assert info["max_input_length"] == loaded.head.max_seq_length
    assert info["limits"]["max_inputs"] == 64 and info["limits"]["max_body_bytes"] == 65536
    assert info["limits"]["api_keys"] == 0  # a count, never the keys
    assert info["verify"] is None and info["verified"] is False  # a bare bundle: no sealed report
    maps = open(f"/proc/{server.proc.pid}/maps").read()  # the serving process never loaded torch
    assert "libtorch" not in maps and "onnxruntime" in maps


def test_metrics_count_requests_batches_and_truncation(server):
    httpx.post(server.url + "/embed", json={"inputs": ["x " * 200]})
    text = httpx.get(server.url + "/metrics").text
    for name in ('sbert_requests_total{route="/embed",status="200"}', "sbert_queue_seconds_bucket",
                 "sbert_tokenize_seconds_bucket", "sbert_inference_seconds_bucket", "sbert_batch_inputs_bucket",
                 "sbert_padded_tokens_total", "sbert_real_tokens_total", "sbert_queue_tokens",
                 "sbert_inputs_truncated_total"):
        assert name in text, name
    truncated = [line for line in text.splitlines() if line.startswith("sbert_inputs_truncated_total")]
    assert float(truncated[0].split()[-1]) >= 1


# --- prompts: as in Bundle.encode, on every route -------------------------------------------

@pytest.fixture(scope="module")
def prompt_server(tmp_path_factory, params):
    """A default prompt left out of pooling (include_prompt false): the prompt's length decides
    the pooling mask, so inputs of different prompts must not share a batch's mask."""
    from conftest import build_bundle, fast_params, make_zoo_model

    root = tmp_path_factory.mktemp("prompted")
    model = make_zoo_model(root / "model", family="xlm-roberta", pooling=("cls", "mean"), include_prompt=False,
                           prompts={"query": "Represent the query for retrieval: ", "passage": ""},
                           default_prompt_name="query")
    bundle = build_bundle(model, root / "build", fast_params(params), fp16=False)
    srv = Server(bundle, root / "server.log")
    yield srv, Bundle.load(bundle, threads=1)
    assert srv.stop() == 0


def test_prompts_on_every_route_match_bundle_encode(prompt_server):
    srv, loaded = prompt_server
    texts = SENTENCES[:6]
    cases = [("/v1/embeddings", {"model": MODEL, "input": texts, "encoding_format": "float"}, None),
             ("/v1/embeddings", {"model": MODEL, "input": texts, "encoding_format": "float",
                                 "prompt_name": "passage"}, "passage"),
             ("/embed", {"inputs": texts, "prompt_name": "query"}, "query"),
             ("/embed", {"inputs": texts, "prompt_name": "passage"}, "passage")] * 4

    def post(case):
        path, body, _ = case
        r = httpx.post(srv.url + path, json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json() if path == "/embed" else [d["embedding"] for d in r.json()["data"]]

    with concurrent.futures.ThreadPoolExecutor(16) as ex:  # concurrent: one queue, several prompt lengths
        results = list(ex.map(post, cases))
    for (_, _, name), served in zip(cases, results):
        assert_same(served, loaded.encode(texts, prompt_name=name))
    assert not np.allclose(loaded.encode(texts, prompt_name="query"), loaded.encode(texts, prompt_name="passage"))
    tokens = httpx.post(srv.url + "/tokenize", json={"inputs": ["hello"], "prompt_name": "query"}).json()[0]
    text = "".join(t["text"] for t in tokens if not t["special"]).replace("\u2581", " ").strip()
    assert text == "Represent the query for retrieval: hello"


# --- concurrency: one queue, no cross-talk ---------------------------------------------------

def test_concurrent_clients_get_their_own_embeddings_in_order(server, loaded):
    rng = np.random.default_rng(0)
    pool = SENTENCES + [f"{w} " * int(n) for w, n in zip(("dog", "fox", "data", "blue"), (3, 17, 33, 90))]
    expected = dict(zip(pool, loaded.encode(pool)))
    requests = [[pool[i] for i in rng.integers(0, len(pool), rng.integers(1, 9))] for _ in range(32 * 20)]

    def client_run(k: int) -> list[str]:
        problems = []
        with httpx.Client(base_url=server.url, timeout=60) as c:
            for texts in requests[k * 20:(k + 1) * 20]:
                r = c.post("/v1/embeddings", json={"model": MODEL, "input": texts, "encoding_format": "float"})
                if r.status_code != 200:
                    problems.append(f"{r.status_code} {r.text[:200]}")
                    continue
                got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
                want = np.array([expected[t] for t in texts])
                if got.shape != want.shape or cosines(got, want).min() < 0.99999:
                    problems.append(f"wrong embeddings for {texts!r:.80}")
        return problems

    with concurrent.futures.ThreadPoolExecutor(32) as ex:
        problems = [p for ps in ex.map(client_run, range(32)) for p in ps]
    assert not problems, problems[:5]
    batches = [line for line in httpx.get(server.url + "/metrics").text.splitlines()
               if line.startswith("sbert_batch_inputs_count")]
    assert batches  # batched: fewer batches than requests is likely but not asserted (timing)


# --- bad requests: each a 4xx naming the field, and the server answers the next one ----------

BAD = [
    ("/v1/embeddings", b'{"model": "tiny-bert", "input": ', 400, "not valid JSON"),
    ("/v1/embeddings", b'[1, 2]', 400, "JSON object"),
    ("/v1/embeddings", {"model": MODEL}, 400, "'input' is required"),
    ("/v1/embeddings", {"input": "x"}, 400, "'model' is required"),
    ("/v1/embeddings", {"model": MODEL, "input": 5}, 400, "'input' must be"),
    ("/v1/embeddings", {"model": MODEL, "input": []}, 400, "'input' is empty"),
    ("/v1/embeddings", {"model": MODEL, "input": ["ok", 3]}, 400, "'input[1]'"),
    ("/v1/embeddings", {"model": MODEL, "input": ["x"] * 65}, 400, "at most 64"),
    ("/v1/embeddings", {"model": MODEL, "input": [[2, 10, 99999999]]}, 400, "'input[0][2]'"),
    ("/v1/embeddings", {"model": MODEL, "input": [[2, -1]]}, 400, "'input[0][1]'"),
    ("/v1/embeddings", {"model": MODEL, "input": [[2, 3], []]}, 400, "'input[1]'"),
    ("/v1/embeddings", {"model": MODEL, "input": [[2, 3.5]]}, 400, "'input[0][1]'"),
    ("/v1/embeddings", {"model": MODEL, "input": [list(range(5, 70))]}, 400, "at most 64"),
    ("/v1/embeddings", b'{"model": "tiny-bert", "input": ["ok", "\\ud800"]}', 400, "'input[1]' is not valid Unicode"),
    ("/v1/embeddings", {"model": MODEL, "input": "x", "dimensions": 0}, 400, "'dimensions'"),
    ("/v1/embeddings", {"model": MODEL, "input": "x", "dimensions": 10_000}, 400, "'dimensions'"),
    ("/v1/embeddings", {"model": MODEL, "input": "x", "dimensions": "8"}, 400, "'dimensions'"),
    ("/v1/embeddings", {"model": MODEL, "input": "x", "encoding_format": "int8"}, 400, "'encoding_format'"),
    ("/v1/embeddings", {"model": MODEL, "input": "x", "prompt_name": "nope"}, 400, "'prompt_name'"),
    ("/v1/embeddings", {"model": MODEL, "input": "x", "truncate": "no"}, 400, "'truncate'"),
    ("/v1/embeddings", {"model": MODEL, "input": "x" * 70_000}, 413, "bytes"),
    ("/embed", {"input": "x"}, 422, "'inputs' is required"),
    ("/embed", {"inputs": "x", "normalize": 1}, 422, "'normalize'"),
    ("/embed", {"inputs": [None]}, 422, "'inputs[0]' is null"),
    ("/embed", {"inputs": ["a", None]}, 422, "'inputs[1]' is null"),
    ("/tokenize", {"inputs": [[1, 2]]}, 422, "text"),
]


@pytest.mark.parametrize("path,body,status,message", BAD, ids=[f"{i}-{b[3][:20]}" for i, b in enumerate(BAD)])
def test_bad_request_is_a_4xx_naming_the_field(server, loaded, path, body, status, message):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    text = error["message"] if isinstance(error, dict) else error
    assert message in text and "\n" not in text, text
    ok = httpx.post(server.url + "/embed", json={"inputs": ["hello world"]})
    assert ok.status_code == 200
    assert_same(ok.json(), loaded.encode(["hello world"]))


def test_chunked_body_past_the_limit_is_413(server):
    def chunks():
        for _ in range(100):
            yield b" " * 1024
    r = httpx.post(server.url + "/embed", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


# --- admission: a bounded queue answers 429 at once ------------------------------------------

def test_overload_gives_429_with_retry_after_and_no_5xx(tiny_bundle, tmp_path, loaded):
    texts = ["python code is fast and the model is slow " * 3] * 16
    tokens = len(loaded.tokenizer.encode(texts[:1])[0].ids)
    srv = Server(tiny_bundle, tmp_path / "server.log", "--max-queue-tokens", str(12 * tokens),
                 "--max-batch-tokens", "256")
    try:
        r = httpx.post(srv.url + "/embed", json={"inputs": texts})  # 16 inputs: more than the queue ever holds
        assert r.status_code == 429 and r.headers["retry-after"] == "1"  # alone it could never fit
        body = {"model": MODEL, "input": texts[:4], "encoding_format": "float"}

        async def burst(n: int) -> list[int]:
            async with httpx.AsyncClient(base_url=srv.url, timeout=60,
                                         limits=httpx.Limits(max_connections=64)) as c:
                rs = await asyncio.gather(*(c.post("/v1/embeddings", json=body) for _ in range(n)))
            for r in rs:
                assert r.status_code in (200, 429), r.text
                if r.status_code == 429:
                    assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error"
                else:
                    assert_same([d["embedding"] for d in r.json()["data"]], loaded.encode(texts[:4]))
            return [r.status_code for r in rs]

        codes = asyncio.run(burst(64))
        assert 429 in codes and 200 in codes, codes
        rss = srv.rss_kib()
        for _ in range(5):
            asyncio.run(burst(64))
        assert srv.rss_kib() - rss < 20 * 1024  # KiB: flat after the first burst allocated its buffers
        assert httpx.get(srv.url + "/health").status_code == 200
        metrics = httpx.get(srv.url + "/metrics").text
        assert 'sbert_requests_total{route="/v1/embeddings",status="429"}' in metrics
        assert [line for line in metrics.splitlines() if line.startswith("sbert_queue_tokens ")] == \
               ["sbert_queue_tokens 0.0"]  # every admitted token left the queue
    finally:
        assert srv.stop() == 0


# --- API keys --------------------------------------------------------------------------------

def test_api_keys_from_flag_env_and_file(tiny_bundle, tmp_path):
    (tmp_path / "keys").write_text("from-file\n\n")
    srv = Server(tiny_bundle, tmp_path / "server.log", "--api-key", "from-flag", "--api-key-file",
                 str(tmp_path / "keys"), env={"SBERT_BUNDLE_API_KEYS": "from-env, other"})
    try:
        body = {"model": MODEL, "input": "x"}
        r = httpx.post(srv.url + "/v1/embeddings", json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
        assert httpx.post(srv.url + "/v1/embeddings", json=body,
                          headers={"Authorization": "Bearer wrong"}).status_code == 401
        for key in ("from-flag", "from-env", "other", "from-file"):
            assert httpx.post(srv.url + "/v1/embeddings", json=body,
                              headers={"Authorization": f"Bearer {key}"}).status_code == 200, key
        ok = openai.OpenAI(base_url=srv.url + "/v1", api_key="from-flag", max_retries=0)
        assert len(ok.embeddings.create(model=MODEL, input=["a", "b"]).data) == 2
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0).models.list()
        for path in ("/health", "/ready"):
            assert httpx.get(srv.url + path).status_code == 200
        for path in ("/metrics", "/info", "/v1/models"):
            assert httpx.get(srv.url + path).status_code == 401, path
        assert httpx.post(srv.url + "/embed", json={"inputs": "x"}).status_code == 401
        assert "from-flag" not in httpx.get(srv.url + "/info", headers={"Authorization": "Bearer other"}).text
    finally:
        assert srv.stop() == 0
    log = (tmp_path / "server.log").read_text()
    assert "from-flag" not in log and "from-file" not in log


def test_public_metrics_and_texts_never_logged(tiny_bundle, tmp_path):
    srv = Server(tiny_bundle, tmp_path / "server.log", "--api-key", "k", "--public-metrics", "--access-log")
    try:
        assert httpx.get(srv.url + "/metrics").status_code == 200
        r = httpx.post(srv.url + "/embed", json={"inputs": ["secret-text-7f3a"]}, headers={"Authorization": "Bearer k"})
        assert r.status_code == 200
        r = httpx.post(srv.url + "/embed", json={"inputs": ["secret-text-7f3a", 5]},
                       headers={"Authorization": "Bearer k"})
        assert r.status_code == 422
    finally:
        assert srv.stop() == 0
    log = (tmp_path / "server.log").read_text()
    assert "POST /embed" in log and "secret-text-7f3a" not in log


# --- lifecycle: drain on SIGTERM --------------------------------------------------------------

def metric(url: str, name: str) -> float:
    """One unlabelled sample of the server's /metrics."""
    lines = httpx.get(url + "/metrics").text.splitlines()
    return float(next(line for line in lines if line.startswith(name + " ")).split()[-1])


def in_flight_count(url: str) -> float:
    """The server's in-flight gauge, less the /metrics request that reads it."""
    return metric(url, "sbert_requests_in_flight") - 1


def test_sigterm_drains_in_flight_requests_refuses_new_ones_and_exits_0(tiny_bundle, tmp_path, loaded):
    srv = Server(tiny_bundle, tmp_path / "server.log", "--drain-timeout", "20")
    texts = SENTENCES * 20
    release = threading.Event()
    results: dict[str, object] = {}

    def slow_body():  # a client still uploading when the signal comes: its request is in flight
        body = json.dumps({"inputs": texts}).encode()
        yield body[:10]
        release.wait(30)
        yield body[10:]

    def post(name: str, **kwargs) -> None:
        try:
            results[name] = httpx.post(srv.url + "/embed", timeout=60, **kwargs)
        except httpx.HTTPError as e:
            results[name] = e

    slow = threading.Thread(target=post, args=("slow",), kwargs={"content": slow_body()})
    slow.start()
    deadline = time.monotonic() + 10
    while in_flight_count(srv.url) < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    start = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    refused = httpx.post(srv.url + "/embed", json={"inputs": ["new"]})
    ready = httpx.get(srv.url + "/ready")
    health = httpx.get(srv.url + "/health")
    assert srv.proc.poll() is None  # still draining
    release.set()
    slow.join(30)
    srv.proc.wait(30)
    elapsed = time.monotonic() - start
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    assert ready.status_code == 503 and ready.json()["status"] == "draining" and health.status_code == 200
    assert srv.proc.returncode == 0, srv.log.read_text()[-2000:]
    assert elapsed < 20
    r = results["slow"]
    assert isinstance(r, httpx.Response) and r.status_code == 200, r
    assert_same(r.json(), loaded.encode(texts))


class StuckUpload:
    """A client that sends the start of a body and no more: its request stays in flight until
    `release()` (or the server gives up on it)."""

    def __init__(self, srv: Server):
        self.stuck = threading.Event()

        def never_ending_body():
            yield b'{"inputs": '
            self.stuck.wait(60)

        self.client = threading.Thread(target=_swallow, args=(srv.url, never_ending_body()))
        self.client.start()
        deadline = time.monotonic() + 10
        while in_flight_count(srv.url) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)

    def release(self) -> None:
        self.stuck.set()
        self.client.join(30)


def _swallow(url: str, content) -> None:
    try:
        httpx.post(url + "/embed", content=content, timeout=70)
    except httpx.HTTPError:
        pass


def test_drain_timeout_cuts_off_what_is_still_in_flight(tiny_bundle, tmp_path):
    srv = Server(tiny_bundle, tmp_path / "server.log", "--drain-timeout", "1")
    upload = StuckUpload(srv)
    start = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    srv.proc.wait(20)
    upload.release()
    assert srv.proc.returncode == 0 and time.monotonic() - start < 6
    assert "drain timeout: 1 requests still in flight" in srv.log.read_text()


def test_a_second_sigterm_stops_without_waiting(tiny_bundle, tmp_path):
    srv = Server(tiny_bundle, tmp_path / "server.log", "--drain-timeout", "60")
    upload = StuckUpload(srv)
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert srv.proc.poll() is None  # draining: it would wait up to 60 s
    start = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    srv.proc.wait(20)
    upload.release()
    assert time.monotonic() - start < 5 and srv.proc.returncode == 0, srv.log.read_text()[-2000:]
    assert "stopping without waiting (1 requests in flight)" in srv.log.read_text()


# --- the scheduler: a client that left has its queued inputs dropped --------------------------

def test_scheduler_drops_the_inputs_of_a_cancelled_job(loaded):
    from sbert_bundle.serve.metrics import Metrics
    from sbert_bundle.serve.scheduler import Job, Scheduler

    metrics = Metrics()
    scheduler = Scheduler(loaded, None, 256, 10_000, metrics)

    async def go():
        loop = asyncio.get_running_loop()
        encodings = loaded.tokenizer.encode(SENTENCES)
        kept, gone = (Job(encodings, 0, loaded.embedding_dimension, loop) for _ in range(2))
        scheduler.submit(kept)
        scheduler.submit(gone)  # queued before the model thread starts: both wait
        assert scheduler.queued_inputs == 2 * len(SENTENCES)
        scheduler.cancel(gone)
        scheduler.start()
        out = await asyncio.wait_for(kept.future, 30)
        scheduler.stop(10)
        return out, gone

    out, gone = asyncio.run(go())
    assert_same(out, loaded.encode(SENTENCES))
    assert metrics.dropped._value.get() == len(SENTENCES) and not gone.future.done()
    assert scheduler.queued_inputs == 0 and scheduler.queued_tokens == 0


def test_a_client_that_disconnects_has_its_queued_inputs_dropped(tiny_bundle, tmp_path, loaded):
    import socket

    srv = Server(tiny_bundle, tmp_path / "server.log", "--max-batch-tokens", "64", "--max-queue-tokens", "1000000")
    try:
        busy = ["python code is fast and the model is slow " * 6] * 2048  # one input per batch: 2 x 2048 batches
        first = [threading.Thread(target=lambda: httpx.post(srv.url + "/embed", json={"inputs": busy}, timeout=300))
                 for _ in range(2)]
        for t in first:
            t.start()
        deadline = time.monotonic() + 60  # a request is queued right after its tokenization is counted
        while metric(srv.url, "sbert_tokenize_seconds_count") < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        body = json.dumps({"inputs": ["left before its turn"] * 7}).encode()
        with socket.create_connection(("127.0.0.1", srv.port)) as s:  # queued behind 2048 or more batches
            s.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            while metric(srv.url, "sbert_tokenize_seconds_count") < 3 and time.monotonic() < deadline:
                time.sleep(0.005)
        assert metric(srv.url, "sbert_queue_inputs") > 7  # it hung up while the first ones still ran
        for t in first:
            t.join(300)
        assert metric(srv.url, "sbert_inputs_dropped_total") == 7
    finally:
        assert srv.stop() == 0


# --- the command line and the package boundary ------------------------------------------------

def test_serve_help_names_the_routes_and_limits():
    out = subprocess.run([sys.executable, "-m", "sbert_bundle.cli", "serve", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for word in ("/v1/embeddings", "/embed", "--max-queue-tokens", "--api-key", "--drain-timeout", "--pull",
                 "--workers", "127.0.0.1"):
        assert word in out, word


def test_serve_without_a_bundle_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sbert_bundle.cli", "serve", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "nope" in r.stderr, r.stderr


@pytest.mark.parametrize("flags,message", [(["--port", "70000"], "--port 70000: expected 0 to 65535"),
                                           (["--max-inputs", "0"], "--max-inputs 0: expected 1 or more"),
                                           (["--api-key-file", "/nonexistent/keys"], "/nonexistent/keys")])
def test_a_bad_flag_is_one_line_naming_it(tiny_bundle, flags, message):
    r = subprocess.run([sys.executable, "-m", "sbert_bundle.cli", "serve", str(tiny_bundle), *flags],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def test_the_runtime_never_imports_the_server(tiny_bundle):
    code = ("import sys, sbert_bundle, sbert_bundle.cli; sbert_bundle.Bundle.load(sys.argv[1]).encode(['x']); "
            "bad = [m for m in ('sbert_bundle.serve', 'starlette', 'uvicorn', 'prometheus_client') "
            "if m in sys.modules]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code, str(tiny_bundle)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_two_workers_serve_one_port(tiny_bundle, tmp_path, loaded):
    srv = Server(tiny_bundle, tmp_path / "server.log", "--workers", "2")
    try:
        for _ in range(6):  # the kernel spreads connections over both processes' accept
            r = httpx.post(srv.url + "/embed", json={"inputs": SENTENCES[:3]})
            assert_same(r.json(), loaded.encode(SENTENCES[:3]))
        metrics = httpx.get(srv.url + "/metrics").text
        total = sum(float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith('sbert_requests_total{route="/embed",status="200"}'))
        assert total == 6  # one /metrics for both processes
    finally:
        assert srv.stop() == 0
