"""The verify gate (stages.verify): parity and speed against sentence-transformers.

Tests use the shared tiny model and bundle; those that tamper with the bundle copy it first.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, as_params_file, fast_params
from sbert_bundle.manifest import MANIFEST_FILE, write_manifest
from stages import verify

CORPUS = ["", "   ", "hello world", "a cat sat on the mat", "the quick brown fox jumps over the lazy dog",
          "python code is fast and the model is slow " * 20,  # longer than max_seq_length: truncated
          "zz unknown wordz ☃ 😀 中文", "The Dog Is In The Park With A Ball"] + \
         [f"the {a} and the {b} are in the {c}" for a, b, c in
          zip("cat dog fox ball model query code data test example one two".split(),
              "mat park vector search document python fast slow red green blue world".split(),
              "park mat dog cat ball fox data code query test model search".split())]


@pytest.fixture(scope="module")
def model(tiny_model) -> Path:
    return tiny_model


@pytest.fixture(scope="module")
def bundle(tiny_bundle) -> Path:
    """The shared tiny bundle: tests that tamper with it work on a copy."""
    return tiny_bundle


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in CORPUS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def cfg(params) -> dict:
    return fast_params(params)["verify"]


@pytest.fixture(scope="module")
def perturbed(bundle, tmp_path_factory) -> Path:
    """A copy of the bundle whose fp32 graph has noise on the last layer's FFN output weight, re-sealed."""
    import onnx
    from onnx import numpy_helper

    root = tmp_path_factory.mktemp("perturbed") / "bundle"
    shutil.copytree(bundle, root)
    graph_path = root / "onnx" / "model.onnx"
    graph = onnx.load(graph_path)
    weights = [i for i in graph.graph.initializer if len(i.dims) == 2 and "embeddings" not in i.name]
    target = weights[-1]  # the last MatMul weight: layer 1's FFN output projection
    w = numpy_helper.to_array(target)
    noisy = w * 1.5 + np.random.default_rng(0).normal(0.0, 5 * w.std(), w.shape).astype(w.dtype)
    target.CopyFrom(numpy_helper.from_array(noisy, target.name))
    onnx.save(graph, graph_path)
    manifest = json.loads((root / MANIFEST_FILE).read_text())
    write_manifest(root, {k: v for k, v in manifest.items() if k != "files"})
    return root


@pytest.fixture(scope="module")
def good_report(cfg, bundle, model, corpus) -> dict:
    return verify.run(cfg, bundle, model, corpus)


def test_model_fixture_has_a_real_vocabulary(bundle):
    from sbert_bundle import Bundle

    ids = Bundle.load(bundle).tokenizer(["the cat sat", "dog park ball"])["input_ids"]
    assert (ids[:, 1:4] != 1).all()  # 1 is [UNK]


# --- the gate passes on a good bundle ------------------------------------------------------

def test_good_bundle_passes(good_report, bundle):
    report = good_report
    assert report["failures"] == []
    assert report["skipped"] == {}  # every variant of this bundle runs on a CPU
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    assert set(report["variants"]) == set(manifest["variants"])
    for name, m in report["variants"].items():
        assert m["passed"] is True, name
        assert m["min_cosine"] > 0.999, (name, m["min_cosine"])
        assert m["speedup"] > 0 and m["sentences_per_s"] > 0, name
        assert m["device"] == "cpu"
        assert 0 <= m["worst_index"] < len(CORPUS)
        assert {(b["batch_size"], b["seq_len"]) for b in m["latency"]} == {(1, 8), (4, 8)}
    assert report["corpus"]["sentences"] == len(CORPUS)
    assert report["bundle"]["created"] == manifest["created"]


def test_write_outputs(good_report, tmp_path):
    report = json.loads(json.dumps(good_report, default=str))  # a copy: write_outputs pops _plots
    report["_plots"] = good_report["_plots"]
    out = tmp_path / "verify"
    verify.write_outputs(report, out)

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["variants"]) == set(good_report["variants"])
    for m in metrics["variants"].values():
        assert set(m) == {"min_cosine", "mean_cosine", "top10_agreement", "spearman", "passed"}
        assert m["min_cosine"] > 0.999

    full = json.loads((out / "report.json").read_text())
    assert "_plots" not in full and full["failures"] == []
    assert set(full["variants"]) == set(good_report["variants"])
    # no timing in what dvc.lock tracks and release seals: the same bundle gives the same bytes
    text = (out / "report.json").read_text()
    assert "sentences_per_s" not in text and "latency" not in text and "speedup" not in text and "p50" not in text
    speed = json.loads((out / "speed.json").read_text())
    assert speed["reference_sentences_per_s"] > 0
    for name, m in speed["variants"].items():
        assert m["sentences_per_s"] > 0 and m["speedup"] > 0 and m["latency"], name

    latency = sorted(p.name for p in (out / "plots" / "latency").glob("*.csv"))
    assert latency == sorted(f"{n}_len8.csv" for n in good_report["variants"])
    for p in (out / "plots" / "latency").glob("*.csv"):
        lines = p.read_text().splitlines()
        assert lines[0] == "batch_size,p50_ms,p95_ms,pytorch_p50_ms"
        assert [row.split(",")[0] for row in lines[1:]] == ["1", "4"]
    cosine = sorted(p.name for p in (out / "plots" / "cosine").glob("*.csv"))
    assert cosine == sorted(f"{n}.csv" for n in good_report["variants"])
    for p in (out / "plots" / "cosine").glob("*.csv"):
        lines = p.read_text().splitlines()
        assert lines[0] == "rank,cosine"
        assert len(lines) == 1 + len(CORPUS)
        values = [float(row.split(",")[1]) for row in lines[1:]]
        assert values == sorted(values)  # ascending: the worst sentence first


def test_table(good_report):
    text = verify.table(good_report)
    header = text.splitlines()[0]
    assert "min cos" in header and "vs torch" in header
    for name in good_report["variants"]:
        assert name in text


def test_bucket_inputs_small_vocabulary():
    feats = verify.bucket_inputs(2, 8, vocab_size=500)
    assert feats["input_ids"].max() < 500


def test_bucket_inputs_shape():
    feats = verify.bucket_inputs(3, 7, vocab_size=30522)
    assert {k: v.shape for k, v in feats.items()} == {k: (3, 7) for k in ("input_ids", "attention_mask",
                                                                          "token_type_ids")}
    assert feats["attention_mask"].all() and not feats["token_type_ids"].any()
    assert feats["input_ids"].max() < 30522


# --- the gate fails on a perturbed graph ---------------------------------------------------

def test_perturbed_graph_fails_the_gate(cfg, perturbed, model, corpus):
    report = verify.run(cfg, perturbed, model, corpus)
    threshold = cfg["gates"]["fp32"]["min_cosine"]
    assert report["variants"]["fp32"]["passed"] is False
    assert report["variants"]["fp32"]["min_cosine"] < threshold
    # only the graph that was changed fails
    assert all(m["passed"] for n, m in report["variants"].items() if n != "fp32"), report["failures"]
    mine = [f for f in report["failures"] if f.startswith("fp32: min_cosine")]
    assert len(mine) == 1, report["failures"]
    assert str(threshold) in mine[0] and "worst sentence" in mine[0]
    worst = report["variants"]["fp32"]["worst_index"]
    assert f"#{worst}" in mine[0] and repr(CORPUS[worst][:120]) in mine[0]


def test_gate_names_each_failed_figure():
    metrics = {"min_cosine": 0.5, "top10_agreement": 0.5, "spearman": 0.5, "worst_index": 3,
               "worst_sentence": "s", "device": "cpu", "speedup": 0.5}
    gates = {"min_cosine": 0.9, "min_top10_agreement": 0.9, "min_spearman": 0.9}
    failures = verify.check_gates("int8", metrics, gates, min_speedup=1.0)
    assert len(failures) == 4 and all(f.startswith("int8: ") for f in failures)
    assert any("top10_agreement" in f for f in failures) and any("spearman" in f for f in failures)
    assert any("speedup 0.50x < min_speedup 1.0x" in f for f in failures)
    ok = dict(metrics, min_cosine=0.95, top10_agreement=0.95, spearman=0.95, speedup=2.0)
    assert verify.check_gates("int8", ok, gates, min_speedup=1.0) == []
    # speed gates apply to CPU variants only
    assert verify.check_gates("trt", dict(ok, device="cuda", speedup=0.1), gates, min_speedup=1.0) == []


# --- the command line ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def params_file(params, corpus, tmp_path_factory) -> Path:
    p = fast_params(params)
    p["verify"]["corpus"] = str(corpus)
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text(yaml.safe_dump(as_params_file(p)))
    return path


def run_cli(bundle: Path, model: Path, out: Path, params_file: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.verify", "--bundle", str(bundle), "--reference", str(model),
                           "--out", str(out), "--params", str(params_file)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_cli_fails_on_the_perturbed_bundle(perturbed, model, params_file, tmp_path):
    result = run_cli(perturbed, model, tmp_path / "out", params_file)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "gate(s) failed" in result.stderr and "fp32: min_cosine" in result.stderr, result.stderr[-3000:]
    assert "FAIL" in result.stdout  # the table is still printed
    # the outputs are written even on failure, for DVC plots and the post-mortem
    assert json.loads((tmp_path / "out" / "report.json").read_text())["failures"]


def test_cli_passes_on_a_good_bundle(bundle, model, params_file, tmp_path):
    result = run_cli(bundle, model, tmp_path / "out", params_file)
    assert result.returncode == 0, result.stderr[-3000:]
    header = result.stdout.splitlines()[0]
    assert "min cos" in header and "vs torch" in header
    assert "all gates passed" in result.stdout
    assert (tmp_path / "out" / "metrics.json").is_file()


def test_cli_missing_bundle(model, params_file, tmp_path):
    result = run_cli(tmp_path / "nowhere", model, tmp_path / "out", params_file)
    assert result.returncode == 1 and "error: bundle" in result.stderr


# --- corpus --------------------------------------------------------------------------------

def test_load_corpus(corpus, tmp_path):
    assert verify.load_corpus(corpus) == CORPUS
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"a"\n42\n')
    with pytest.raises(verify.StageError, match=r"bad.jsonl:2 is int"):
        verify.load_corpus(bad)
    bad.write_text('"a"\nnot json\n')
    with pytest.raises(verify.StageError, match=r"bad.jsonl:2 is not a JSON string"):
        verify.load_corpus(bad)
    bad.write_text('"a"\n"b"\n')
    with pytest.raises(verify.StageError, match="at least 11"):
        verify.load_corpus(bad)


# --- metric helpers ------------------------------------------------------------------------

def test_top_k_agreement_of_identical_embeddings_is_one():
    x = np.random.default_rng(0).normal(size=(40, 16)).astype(np.float32)
    assert verify.top_k_agreement(x, x) == 1.0


def test_top_k_agreement_counts_ties_as_agreement():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(8, 16))
    x = np.concatenate([base, base, base[:4]])  # every row has one or two exact duplicates: ties
    assert verify.top_k_agreement(x, x) == 1.0
    # a variant that breaks the reference's ties differently still agrees
    assert verify.top_k_agreement(x, x + rng.normal(scale=1e-9, size=x.shape)) == 1.0
    shuffled_dupes = x.copy()
    shuffled_dupes[[0, 8]] = shuffled_dupes[[8, 0]]
    assert verify.top_k_agreement(x, shuffled_dupes) == 1.0


def test_top_k_agreement_of_unrelated_embeddings_is_low():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(60, 16)), rng.normal(size=(60, 16))
    assert verify.top_k_agreement(x, y) < 0.5


def test_top_k_agreement_ignores_scale():
    x = np.random.default_rng(3).normal(size=(30, 8))
    assert verify.top_k_agreement(x, x * np.arange(1, 31)[:, None]) == 1.0


def test_spearman_of_identical_embeddings_is_one():
    x = np.random.default_rng(4).normal(size=(30, 16))
    assert verify.spearman_of_similarities(x, x) == pytest.approx(1.0, abs=1e-12)


def test_spearman_of_unrelated_embeddings_is_well_below_one():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(40, 16)), rng.normal(size=(40, 16))
    assert verify.spearman_of_similarities(x, y) < 0.5


def test_parity_reports_the_worst_sentence():
    rng = np.random.default_rng(6)
    ref = rng.normal(size=(12, 8))
    emb = ref.copy()
    emb[7] += rng.normal(size=8)
    sentences = [f"s{i}" for i in range(12)]
    metrics, cos = verify.parity(ref, emb, sentences)
    assert metrics["worst_index"] == 7 and metrics["worst_sentence"] == "s7"
    assert metrics["min_cosine"] == pytest.approx(cos[7]) and cos[7] < 1
    assert np.allclose(np.delete(cos, 7), 1.0)
