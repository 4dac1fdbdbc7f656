"""What downstream users of the sbert_bundle runtime rely on.

Integrity refusal, archives, the encode contract, thread safety, variant choice (with and
without a sealed verify report), no torch at run time, and the `sbert-bundle` CLI.
Every test that changes files works on a copy of the shared `tiny_bundle`.
"""

import concurrent.futures
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, SENTENCES, WORDS, fast_params
from sbert_bundle import Bundle, IntegrityError, VariantError
from sbert_bundle.backends import ort_providers
from sbert_bundle.cli import main
from sbert_bundle.manifest import MANIFEST_FILE, write_manifest

HAS_CUDA_EP = "CUDAExecutionProvider" in ort_providers()
cpu_only = pytest.mark.skipif(HAS_CUDA_EP, reason="onnxruntime here has CUDAExecutionProvider")


def copy_bundle(src: Path, tmp_path: Path, name: str = "bundle") -> Path:
    dest = tmp_path / name
    shutil.copytree(src, dest)
    return dest


def reseal(root: Path, edit=None) -> dict:
    """Rewrite manifest.json for the files now under root, keeping every field but `files`."""
    manifest = json.loads((root / MANIFEST_FILE).read_text())
    fields = {k: v for k, v in manifest.items() if k != "files"}
    if edit:
        edit(fields)
    return write_manifest(root, fields)


@pytest.fixture(scope="module")
def loaded(tiny_bundle) -> Bundle:
    """The default variant of the tiny bundle, shared by the read-only encode tests."""
    return Bundle.load(tiny_bundle)


# --- integrity -----------------------------------------------------------------------------

def _flip_byte(root):
    path = root / "onnx" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return "onnx/model.onnx", "sha256 differs"


def _truncate(root):
    path = root / "tokenizer.json"
    path.write_bytes(path.read_bytes()[:100])
    return "tokenizer.json", "size 100 bytes"


def _delete(root):
    (root / "head.json").unlink()
    return "head.json", "missing"


def _extra(root):
    (root / "onnx" / "model_extra.onnx").write_bytes(b"not in the manifest")
    return "onnx/model_extra.onnx", "not listed"


def _no_manifest(root):
    (root / MANIFEST_FILE).unlink()
    return MANIFEST_FILE, "not found"


def _manifest_not_json(root):
    (root / MANIFEST_FILE).write_text('{"schema_version": 1, "files": ')
    return MANIFEST_FILE, "not valid JSON"


def _manifest_schema(root):
    manifest = json.loads((root / MANIFEST_FILE).read_text())
    manifest["schema_version"] = 2
    (root / MANIFEST_FILE).write_text(json.dumps(manifest))
    return MANIFEST_FILE, "schema_version 2"


TAMPER = {"byte flipped": _flip_byte, "truncated": _truncate, "listed file deleted": _delete,
          "unlisted file added": _extra, "manifest missing": _no_manifest,
          "manifest not JSON": _manifest_not_json, "wrong schema_version": _manifest_schema}


@pytest.mark.parametrize("case", list(TAMPER))
def test_tampered_bundle_is_refused(case, tiny_bundle, tmp_path):
    root = copy_bundle(tiny_bundle, tmp_path)
    name, why = TAMPER[case](root)
    with pytest.raises(IntegrityError) as e:
        Bundle.load(root)
    assert name in str(e.value) and why in str(e.value), str(e.value)


@pytest.mark.parametrize("case", ["byte flipped", "unlisted file added"])
def test_tampered_archive_is_refused(case, tiny_bundle, tmp_path):
    from stages.package import archive

    root = copy_bundle(tiny_bundle, tmp_path)
    name, _ = TAMPER[case](root)
    archive(root, tmp_path / "bundle.tar.gz", 1)
    with pytest.raises(IntegrityError, match=name):
        Bundle.load(tmp_path / "bundle.tar.gz")


def test_unknown_path_is_a_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        Bundle.load(tmp_path / "nowhere")


# --- archives ------------------------------------------------------------------------------

def test_archive_gives_the_same_embeddings_as_the_folder(tiny_bundle, tmp_path, loaded):
    from stages.package import archive

    dest = tmp_path / "bundle.tar.gz"
    archive(tiny_bundle, dest, 1)
    from_archive = Bundle.load(dest)
    assert from_archive.variant == loaded.variant
    assert from_archive.report is None  # a plain archive has no verify report
    np.testing.assert_allclose(from_archive.encode(SENTENCES), loaded.encode(SENTENCES), atol=1e-6)


# --- encode --------------------------------------------------------------------------------

def test_encode_empty_list(loaded):
    emb = loaded.encode([])
    assert emb.shape == (0, loaded.embedding_dimension) and emb.dtype == np.float32


def test_encode_empty_and_whitespace_strings(loaded):
    emb = loaded.encode(["", "   ", "\t\n", "a"])
    assert emb.shape == (4, loaded.embedding_dimension) and emb.dtype == np.float32
    assert np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)  # the model normalizes


def test_encode_rejects_a_non_string_item(loaded):
    with pytest.raises(TypeError, match=r"sentences\[1\]"):
        loaded.encode(["a", 3])
    with pytest.raises(TypeError, match=r"sentences\[0\]"):
        loaded.encode([None])


def test_encode_rejects_batch_size_zero(loaded):
    with pytest.raises(ValueError, match="batch_size"):
        loaded.encode(["a"], batch_size=0)


def test_encode_single_string(loaded):
    s = "the quick brown fox"
    one = loaded.encode(s)
    assert one.shape == (loaded.embedding_dimension,) and one.dtype == np.float32
    np.testing.assert_array_equal(one, loaded.encode([s])[0])


def test_encode_keeps_input_order(loaded):
    # Word counts differ pairwise, so every sentence has its own embedding (even with a tiny vocabulary)
    # and the longest-first batching inside encode really reorders them.
    sentences = [" ".join(WORDS[i:i + n]) for i, n in enumerate(range(1, 25))] + [""]
    rng = np.random.default_rng(0)
    shuffled = [sentences[i] for i in rng.permutation(len(sentences))]
    one_by_one = np.stack([loaded.encode([s])[0] for s in shuffled])
    sims = one_by_one @ one_by_one.T
    np.fill_diagonal(sims, 0)
    assert sims.max() < 1 - 1e-4, "precondition: the sentences must have distinct embeddings"
    np.testing.assert_allclose(loaded.encode(shuffled, batch_size=4), one_by_one, atol=1e-5)


def test_batch_size_does_not_change_embeddings(loaded):
    sentences = SENTENCES * 3
    np.testing.assert_allclose(loaded.encode(sentences, batch_size=1), loaded.encode(sentences, batch_size=32),
                               atol=1e-5)


def test_encode_accepts_any_sequence(loaded):
    s = tuple(SENTENCES[:3])
    np.testing.assert_array_equal(loaded.encode(s), loaded.encode(list(s)))


# --- thread safety -------------------------------------------------------------------------

def test_concurrent_encode_matches_serial(tiny_bundle):
    bundle = Bundle.load(tiny_bundle)
    sentences = [SENTENCES[i % len(SENTENCES)] + " " + " ".join(WORDS[: i % 17]) for i in range(40)]
    serial = bundle.encode(sentences, batch_size=8)
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(bundle.encode, sentences, 8) for _ in range(4)]
        results = [f.result() for f in futures]
    for r in results:
        np.testing.assert_allclose(r, serial, atol=1e-6)


# --- variant choice ------------------------------------------------------------------------

def test_unknown_variant_lists_the_variants(tiny_bundle):
    with pytest.raises(VariantError) as e:
        Bundle.load(tiny_bundle, variant="fp64-turbo")
    msg = str(e.value)
    assert "'fp64-turbo'" in msg
    manifest = json.loads((tiny_bundle / MANIFEST_FILE).read_text())
    for name in manifest["variants"]:
        assert f"  {name}: " in msg, msg


@cpu_only
def test_default_variant_on_cpu_is_fp32_fused(loaded):
    assert (loaded.variant, loaded.device) == ("fp32-fused", "cpu")


@pytest.mark.parametrize("variant", ["fp32", "fp32-fused", "fp16", "fp16-fused"])
def test_every_variant_loads_by_name(tiny_bundle, variant, loaded):
    b = Bundle.load(tiny_bundle, variant=variant)
    assert b.variant == variant
    cos = (b.encode(SENTENCES) * loaded.encode(SENTENCES)).sum(1)
    assert cos.min() > 0.999


@cpu_only
def test_cuda_only_variant_cannot_be_loaded_here(tiny_bundle, tmp_path):
    root = copy_bundle(tiny_bundle, tmp_path)
    reseal(root, lambda f: f["variants"]["fp32"].update(devices=["cuda"]))
    with pytest.raises(VariantError) as e:
        Bundle.load(root, variant="fp32")
    msg = str(e.value)
    assert "'fp32' cannot run here" in msg and "CUDAExecutionProvider" in msg, msg
    # the others still load, and the default choice is unaffected
    b = Bundle.load(root)
    assert b.variant == "fp32-fused"
    row = next(v for v in b.describe()["variants"] if v["name"] == "fp32")
    assert row["runs_here"] is False and "CUDAExecutionProvider" in row["why_not"]


@cpu_only
def test_no_runnable_variant_is_a_variant_error(tiny_bundle, tmp_path):
    root = copy_bundle(tiny_bundle, tmp_path)

    def cuda_only(f):
        for v in f["variants"].values():
            v["devices"] = ["cuda"]

    reseal(root, cuda_only)
    with pytest.raises(VariantError, match="no variant") as e:
        Bundle.load(root)
    assert "CUDAExecutionProvider" in str(e.value)


@cpu_only
def test_best_variant_that_fails_to_open_gives_way_to_the_next(tiny_bundle, tmp_path, caplog):
    root = copy_bundle(tiny_bundle, tmp_path)
    (root / "onnx" / "model_fused.onnx").write_bytes(b"not an onnx graph")  # what a broken plan would do
    b = Bundle.load(root, verify_integrity=False)
    assert b.variant == "fp32"
    assert "variant fp32-fused on cpu failed to open" in caplog.text
    for name in ("fp32", "int8"):
        (root / "onnx" / f"model{'_int8' if name == 'int8' else ''}.onnx").write_bytes(b"broken")
    (root / "onnx" / "model_fp16_fused.onnx").write_bytes(b"broken")
    (root / "onnx" / "model_fp16.onnx").write_bytes(b"broken")
    with pytest.raises(VariantError, match="no variant") as e:
        Bundle.load(root, verify_integrity=False)
    assert "fp32-fused: not usable: failed to open" in str(e.value)


# --- a sealed release: verify.json decides ---------------------------------------------------

CORPUS = ["", "   ", "one"] + [" ".join(WORDS[i:i + n]) for i, n in enumerate(range(2, 20))] + \
         ["python code is fast and the model is slow " * 10]


@pytest.fixture(scope="module")
def verify_report(tiny_model, tiny_bundle, params, tmp_path_factory) -> Path:
    """report.json from the real verify stage on the tiny bundle."""
    from stages import verify

    out = tmp_path_factory.mktemp("verify")
    corpus = out / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(s) + "\n" for s in CORPUS))
    report = verify.run(fast_params(params)["verify"], tiny_bundle, tiny_model, corpus)
    assert not report["failures"], report["failures"]
    verify.write_outputs(report, out / "verify")
    return out / "verify" / "report.json"


def release(tiny_bundle, report: Path, out: Path) -> Path:
    from stages import release as release_stage

    out.mkdir(parents=True, exist_ok=True)
    return release_stage.run({"name": "tiny", "version": "1.0.0"}, 1, tiny_bundle, report, out)


def doctored(report: Path, tmp_path: Path, edit) -> Path:
    data = json.loads(report.read_text())
    edit(data["variants"])
    path = tmp_path / "report.json"
    path.write_text(json.dumps(data))
    return path


@cpu_only
def test_release_picks_the_preferred_variant_that_passed(tiny_bundle, verify_report, tmp_path):
    report = json.loads(verify_report.read_text())
    assert all(v["passed"] and v["device"] == "cpu" for v in report["variants"].values())
    b = Bundle.load(release(tiny_bundle, verify_report, tmp_path))
    assert b.variant == "fp32-fused" and b.device == "cpu"
    assert b.report == report
    assert b.describe()["verify"] == report


@cpu_only
def test_release_uses_only_variants_its_report_checked(tiny_bundle, verify_report, tmp_path):
    def edit(variants):
        del variants["fp32-fused"]  # e.g. verify.variants listed only fp32

    b = Bundle.load(release(tiny_bundle, doctored(verify_report, tmp_path, edit), tmp_path / "rel"))
    assert b.variant == "fp32"
    row = next(v for v in b.describe()["variants"] if v["name"] == "fp32-fused")
    assert row["why_not"] == "not checked by the verify report"


@cpu_only
def test_release_result_counts_only_on_the_device_it_was_measured_on(tiny_bundle, verify_report, tmp_path):
    def edit(variants):
        variants["fp32-fused"].update(device="cuda")  # measured elsewhere: says nothing here

    b = Bundle.load(release(tiny_bundle, doctored(verify_report, tmp_path, edit), tmp_path / "rel"))
    assert b.variant == "fp32"
    row = next(v for v in b.describe()["variants"] if v["name"] == "fp32-fused")
    assert row["runs_here"] is False and row["why_not"] == "verify measured it on cuda, not on cpu"
    # asking for it by name still works: the report guides the default, it does not forbid
    assert Bundle.load(release(tiny_bundle, doctored(verify_report, tmp_path, edit), tmp_path / "rel2"),
                       variant="fp32-fused").variant == "fp32-fused"


@cpu_only
def test_lossy_variants_are_never_the_default(tiny_bundle, verify_report, tmp_path):
    def edit(variants):
        for name in ("fp32", "fp32-fused"):
            del variants[name]  # only the lossy fp16 variants were checked

    archive = release(tiny_bundle, doctored(verify_report, tmp_path, edit), tmp_path / "rel")
    with pytest.raises(VariantError, match="fp16 on cpu differs from the reference: used only when named"):
        Bundle.load(archive)
    assert Bundle.load(archive, variant="fp16").variant == "fp16"


def test_release_refuses_a_report_for_another_bundle(tiny_bundle, verify_report, tmp_path):
    from stages.common import StageError

    data = json.loads(verify_report.read_text())
    data["bundle"]["manifest_sha256"] = "0" * 64
    (tmp_path / "report.json").write_text(json.dumps(data))
    with pytest.raises(StageError, match="made for another bundle.*run verify again"):
        release(tiny_bundle, tmp_path / "report.json", tmp_path / "rel")


# --- no torch at run time ------------------------------------------------------------------

def test_runtime_never_imports_torch(tiny_bundle, tmp_path):
    code = ("import sys, sbert_bundle; b = sbert_bundle.Bundle.load(sys.argv[1]); b.encode(['x']); "
            "bad = [m for m in ('torch', 'sentence_transformers', 'transformers', 'stages') if m in sys.modules]; "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code, str(tiny_bundle)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# --- the command line ----------------------------------------------------------------------

@pytest.fixture
def sentences_file(tmp_path) -> Path:
    path = tmp_path / "in.txt"
    path.write_text("".join(s + "\n" for s in SENTENCES), encoding="utf-8")
    return path


def test_cli_encode_to_npy(tiny_bundle, sentences_file, tmp_path, capsys, loaded):
    out = tmp_path / "out.npy"
    assert main(["encode", str(tiny_bundle), "-i", str(sentences_file), "-o", str(out)]) == 0
    emb = np.load(out)
    assert emb.dtype == np.float32 and emb.shape == (len(SENTENCES), loaded.embedding_dimension)
    np.testing.assert_allclose(emb, loaded.encode(SENTENCES), atol=1e-6)
    assert f"wrote {len(SENTENCES)} x {loaded.embedding_dimension}" in capsys.readouterr().err


def test_cli_encode_to_json_lines(tiny_bundle, sentences_file, tmp_path, loaded):
    out = tmp_path / "out.jsonl"
    assert main(["encode", str(tiny_bundle), "-i", str(sentences_file), "-o", str(out), "--batch-size", "3"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(SENTENCES)
    assert all(len(r) == loaded.embedding_dimension and all(isinstance(x, float) for x in r) for r in rows)
    np.testing.assert_allclose(np.array(rows, dtype=np.float32), loaded.encode(SENTENCES), atol=1e-6)


def test_cli_encode_to_stdout(tiny_bundle, sentences_file, capsys, loaded):
    assert main(["encode", str(tiny_bundle), "-i", str(sentences_file), "--variant", "fp32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(SENTENCES)
    assert len(json.loads(lines[0])) == loaded.embedding_dimension


def test_cli_inspect(tiny_bundle, capsys):
    assert main(["inspect", str(tiny_bundle)]) == 0
    out = capsys.readouterr().out
    manifest = json.loads((tiny_bundle / MANIFEST_FILE).read_text())
    assert manifest["name"] in out and manifest["version"] in out
    assert "selected here" in out
    for name in manifest["variants"]:
        assert f"  {name} " in out, name


def test_cli_inspect_json(tiny_bundle, capsys, loaded):
    assert main(["inspect", str(tiny_bundle), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    manifest = json.loads((tiny_bundle / MANIFEST_FILE).read_text())
    assert info["name"] == manifest["name"] and info["embedding_dimension"] == loaded.embedding_dimension
    assert info["selected"] == {"variant": loaded.variant, "device": loaded.device}
    assert {v["name"] for v in info["variants"]} == set(manifest["variants"])
    assert info["verify"] is None


@cpu_only
def test_cli_inspect_release_shows_the_report(tiny_bundle, verify_report, tmp_path, capsys):
    archive = release(tiny_bundle, verify_report, tmp_path)
    assert main(["inspect", str(archive)]) == 0
    out = capsys.readouterr().out
    assert "verify report (sealed release)" in out and "passed" in out


@pytest.mark.parametrize("command", ["encode", "inspect"])
def test_cli_tampered_bundle_fails_cleanly(command, tiny_bundle, sentences_file, tmp_path, capsys):
    root = copy_bundle(tiny_bundle, tmp_path)
    _flip_byte(root)
    argv = [command, str(root)] + (["-i", str(sentences_file), "-o", str(tmp_path / "o.npy")]
                                   if command == "encode" else [])
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "error:" in captured.err and "onnx/model.onnx" in captured.err
    assert not (tmp_path / "o.npy").exists()


def test_cli_unknown_variant_fails_cleanly(tiny_bundle, capsys):
    assert main(["inspect", str(tiny_bundle), "--variant", "nope"]) == 1
    assert "error:" in capsys.readouterr().err


def test_cli_entry_point_runs_as_a_program(tiny_bundle, sentences_file, tmp_path):
    """`python -m sbert_bundle.cli` (what the sbert-bundle script calls) exits 1 on a bad bundle."""
    result = subprocess.run([sys.executable, "-m", "sbert_bundle.cli", "inspect", str(tmp_path / "missing")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "error:" in result.stderr


# --- paths and archives that try to reach outside the bundle -------------------------------

def test_variant_file_outside_the_bundle_is_refused(tiny_bundle, tmp_path):
    root = copy_bundle(tiny_bundle, tmp_path)
    shutil.copy(root / "onnx" / "model.onnx", tmp_path / "outside.onnx")
    manifest = json.loads((root / MANIFEST_FILE).read_text())
    manifest["variants"]["fp32"]["file"] = "../outside.onnx"
    (root / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match=r"\.\./outside\.onnx. is not a file listed in the manifest"):
        Bundle.load(root, variant="fp32")


def test_symlinked_file_is_refused(tiny_bundle, tmp_path):
    root = copy_bundle(tiny_bundle, tmp_path)
    target = root / "tokenizer_config.json"
    moved = tmp_path / "elsewhere.json"
    shutil.move(target, moved)
    target.symlink_to(moved)
    with pytest.raises(IntegrityError, match="tokenizer_config.json: a symbolic link"):
        Bundle.load(root)


def test_report_is_read_only_from_inside_the_archive(tiny_bundle, tmp_path, monkeypatch):
    import tarfile

    archive = tmp_path / "flat.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:  # manifest at the archive's top level
        for p in sorted(tiny_bundle.rglob("*")):
            tar.add(p, arcname=p.relative_to(tiny_bundle).as_posix(), recursive=False)
    planted = tmp_path / "tmpdir"
    planted.mkdir()
    (planted / "verify.json").write_text("{not json")
    monkeypatch.setenv("TMPDIR", str(planted))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    bundle = Bundle.load(archive)
    assert bundle.report is None and bundle.variant == "fp32-fused"


def test_cli_truncated_archive_fails_cleanly(tiny_bundle, tmp_path, capsys):
    from stages.package import archive

    full = tmp_path / "b.tar.gz"
    archive(tiny_bundle, full, 1)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert main(["inspect", str(cut)]) == 1
    assert "error:" in capsys.readouterr().err


def test_verify_stage_on_a_tampered_bundle_is_one_error_line(tiny_bundle, tiny_model, tmp_path):
    root = copy_bundle(tiny_bundle, tmp_path)
    (root / "tokenizer_config.json").write_text("{}")
    result = subprocess.run([sys.executable, "-m", "stages.verify", "--bundle", str(root), "--reference",
                             str(tiny_model), "--out", str(tmp_path / "v"), "--params", str(REPO / "params.yaml")],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "error: bundle" in result.stderr and "tokenizer_config.json" in result.stderr
