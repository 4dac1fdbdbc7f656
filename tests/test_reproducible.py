"""Reproducible builds: the same inputs and locked environment give the same bytes.

Two builds of a tiny model by the real stage functions in two folders must give identical
bundles and archives; SOURCE_DATE_EPOCH changes the manifest's `created` and the archive
members' mtime and nothing else; the environment is the lock's; the rebuild check's
comparison of two dvc.lock files names the first stage that differs.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, build_bundle, fast_params
from stages import package, rebuild_check
from stages.common import StageError


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory, tiny_model, params):
    """The tiny model built twice (fp32, fused, fp16, int8) in two folders, each with its archive."""
    p = fast_params(params)
    builds = []
    for name in ("first", "second"):
        root = tmp_path_factory.mktemp(f"repro-{name}")
        bundle = build_bundle(tiny_model, root, p, fp16=True, int8=True)
        archive = root / "artifacts" / f"{name}.tar.gz"  # other names: the gzip header must not hold one
        package.archive(bundle, archive, p["package"]["compresslevel"])
        builds.append((root / "artifacts", archive))
    return builds


def test_two_builds_give_the_same_bytes(two_builds):
    (art_a, archive_a), (art_b, archive_b) = two_builds
    for stage in ("onnx", "fp16", "int8", "bundle"):
        files = tree_digests(art_a / stage)
        assert files, f"{stage} is empty"
        assert files == tree_digests(art_b / stage), f"artifacts/{stage} differs between two builds"
    assert "onnx/model_int8.onnx" in tree_digests(art_a / "bundle")
    assert digest(archive_a) == digest(archive_b)


def test_manifest_has_no_clock_time_and_records_the_lock(two_builds):
    manifest = json.loads((two_builds[0][0] / "bundle" / "manifest.json").read_text())
    assert manifest["created"] is None
    assert manifest["lock"] == {"file": package.LOCK_NAME, "sha256": digest(package.LOCK_FILE), "drift": {}}
    assert manifest["tools"]["torch"] == importlib.metadata.version("torch")
    assert re.fullmatch(r"3\.\d+", manifest["tools"]["python"])


def test_archive_ignores_file_times_owners_and_modes(tmp_path, two_builds):
    bundle = two_builds[0][0] / "bundle"
    copy_ = tmp_path / "bundle"
    shutil.copytree(bundle, copy_)
    for i, f in enumerate(sorted(copy_.rglob("*"))):
        f.chmod(0o700 if f.is_dir() else 0o600 + (i % 2) * 0o100)
        os.utime(f, (1_000_000 + i, 2_000_000 + i))
    package.archive(copy_, tmp_path / "again.tar.gz", 1)
    assert digest(tmp_path / "again.tar.gz") == digest(two_builds[0][1])
    raw = (tmp_path / "again.tar.gz").read_bytes()
    assert raw[3] & 0x08 == 0, "gzip header holds a file name"
    assert raw[4:8] == b"\0\0\0\0", "gzip header holds a time"
    with tarfile.open(tmp_path / "again.tar.gz") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names[0] == "bundle" and names == ["bundle"] + sorted(names[1:], key=lambda n: n.split("/"))
    assert {(m.uid, m.gid, m.uname, m.gname, m.mtime) for m in members} == {(0, 0, "", "", 0)}
    assert {m.mode for m in members if m.isdir()} == {0o755}
    assert {m.mode for m in members if m.isfile()} == {0o644}


def test_archive_refuses_a_symlink(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "link").symlink_to("/etc/passwd")
    with pytest.raises(StageError, match="link"):
        package.archive(tmp_path / "b", tmp_path / "x.tar.gz", 1)


def test_source_date_epoch_changes_only_created_and_member_times(tmp_path, two_builds, params, monkeypatch):
    art, archive = two_builds[0]
    p = copy.deepcopy(fast_params(params))
    p["package"]["variants"] = ["fp32", "fp32-fused", "fp16", "fp16-fused", "int8"]
    p["model"]["embedding_dimension"] = None  # a tiny model, not the default one
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    dated = tmp_path / "bundle"
    dated.mkdir()
    package.run(p, art, dated)
    package.archive(dated, tmp_path / "dated.tar.gz", 1)

    before, after = tree_digests(art / "bundle"), tree_digests(dated)
    assert {k for k in before if before[k] != after[k]} == {"manifest.json"}
    m0 = json.loads((art / "bundle" / "manifest.json").read_text())
    m1 = json.loads((dated / "manifest.json").read_text())
    assert m1["created"] == "2023-11-14T22:13:20+00:00"
    assert {k for k in m0 if m0[k] != m1[k]} == {"created"}

    with tarfile.open(archive) as t0, tarfile.open(tmp_path / "dated.tar.gz") as t1:
        a, b = t0.getmembers(), t1.getmembers()
        assert [m.name for m in a] == [m.name for m in b]
        assert {m.mtime for m in b} == {1700000000}
        for x, y in zip(a, b):
            if x.isfile() and x.name != "bundle/manifest.json":
                assert t0.extractfile(x).read() == t1.extractfile(y).read()
    assert (tmp_path / "dated.tar.gz").read_bytes()[4:8] == b"\0\0\0\0"

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(StageError, match="SOURCE_DATE_EPOCH"):
        package.created_time()


def lock_entries(text: str) -> dict[str, list[str]]:
    """{name==version: [hashes]} of a pip lock with --hash continuation lines."""
    entries, current = {}, None
    for line in text.splitlines():
        if re.match(r"^[A-Za-z0-9]", line):
            current = line.split()[0]
            entries[current] = []
        elif current and (h := re.search(r"--hash=sha256:([0-9a-f]{64})", line)):
            entries[current].append(h.group(1))
    return entries


def test_installed_environment_is_the_lock():
    text = package.LOCK_FILE.read_text()
    entries = lock_entries(text)
    assert len(entries) > 50 and all(entries.values()), "every locked package needs its hashes"
    pins = package.lock_pins(text)
    assert len(pins) == len(entries)
    assert package.lock_drift(pins) == {}, "installed versions differ from the lock: run `make install`"
    assert pins["torch"].endswith("+cpu"), "the lock must pin torch's CPU build"
    assert not [n for n in pins if n.startswith("nvidia-")], "a CUDA dependency is in the lock"
    for name in ("onnxruntime", "onnx", "transformers", "sentence-transformers", "dvc", "pytest"):
        assert name in pins


def test_lock_drift_names_other_and_missing_versions():
    torch_version = importlib.metadata.version("torch")
    pins = {"torch": torch_version, "onnx": "0.0.1", "surely-not-installed-pkg": "1.0"}
    assert package.lock_drift(pins) == {"onnx": importlib.metadata.version("onnx"), "surely-not-installed-pkg": None}
    assert package.lock_pins("Foo_Bar.baz==1.2 \\\n    --hash=sha256:ab\n# c==1\n") == {"foo-bar-baz": "1.2"}


def dvc_lock(**outs) -> dict:
    """A dvc.lock of the real DAG's shape with the given {stage: md5} for its outputs."""
    dag = {"fetch": ([], "artifacts/source"), "split": (["artifacts/source"], "artifacts/split"),
           "export_onnx": (["artifacts/split"], "artifacts/onnx"),
           "quantize": (["artifacts/onnx"], "artifacts/int8"),
           "package": (["artifacts/split", "artifacts/onnx", "artifacts/int8"], "artifacts/bundle"),
           "verify": (["artifacts/bundle"], "artifacts/verify/report.json"),
           "release": (["artifacts/bundle", "artifacts/verify/report.json"], "artifacts/release")}
    # written out of DAG order, as a hand-edited or future dvc.yaml might be
    order = ["release", "package", "verify", "quantize", "fetch", "export_onnx", "split"]
    return {"schema": "2.0", "stages": {
        s: {"cmd": f"python -m stages.{s}", "deps": [{"path": d, "md5": "x"} for d in dag[s][0]],
            "outs": [{"path": dag[s][1], "md5": outs.get(s, f"{s}-md5")}]} for s in order if s in dag}}


def test_rebuild_check_orders_stages_by_the_dag():
    order = rebuild_check.stage_order(dvc_lock())
    assert order.index("fetch") < order.index("split") < order.index("export_onnx") < order.index("quantize")
    assert order.index("quantize") < order.index("package") < order.index("verify") < order.index("release")


def test_rebuild_check_names_the_first_differing_stage():
    committed = dvc_lock()
    same = rebuild_check.compare(committed, committed)
    lines, first = rebuild_check.verdict(same, repro_ok=True)
    assert first is None and {o.status for o in same} == {"same"}
    assert {"verify", "release"} <= {o.stage for o in same}  # compared, and printed, like every other stage
    # verify's report and the release hold what was measured on the machine: they may differ
    lines, first = rebuild_check.verdict(rebuild_check.compare(committed, dvc_lock(verify="v", release="r")),
                                         repro_ok=True)
    assert first is None
    assert [line for line in lines if "measured here" in line][0].startswith("verify")
    assert any(line.startswith("release") and "measured here" in line for line in lines)

    outcomes = rebuild_check.compare(committed, dvc_lock(quantize="int8-other", package="bundle-other"))
    lines, first = rebuild_check.verdict(outcomes, repro_ok=True)
    assert first == "quantize"
    assert any(line.startswith("quantize") and "DIFFERS, though the rebuild passes verify's gates" in line
               for line in lines)
    lines, first = rebuild_check.verdict(outcomes, repro_ok=False)
    assert first == "quantize" and not any("passes verify's gates" in line for line in lines)
    # a build stage named per model (foreach cells) is still a build stage
    assert not rebuild_check.measured_here("package@minilm_l6") and rebuild_check.measured_here("verify@minilm_l6")

    partial = dvc_lock()
    for stage in ("package", "verify", "release"):
        del partial["stages"][stage]
    lines, first = rebuild_check.verdict(rebuild_check.compare(committed, partial), repro_ok=False)
    assert first == "package" and any("not rebuilt" in line for line in lines)


def test_rebuild_check_reads_the_report_of_a_release_archive(tmp_path, two_builds):
    art, bundle_archive = two_builds[0]
    report = tmp_path / "verify.json"
    report.write_text('{"failures": []}\n')
    release = tmp_path / "release.tar.gz"
    package.archive(art / "bundle", release, 1, extra={"verify.json": report})
    assert rebuild_check.release_report(release, "verify.json") == report.read_bytes()
    assert rebuild_check.release_report(bundle_archive, "verify.json") is None
    (tmp_path / "junk.tar.gz").write_bytes(gzip.compress(b"not a tar"))
    with pytest.raises(StageError, match="junk.tar.gz"):
        rebuild_check.release_report(tmp_path / "junk.tar.gz", "verify.json")


def test_split_does_not_depend_on_hf_hub_offline(tiny_model, tmp_path):
    """transformers' save_pretrained writes local_files_only from HF_HUB_OFFLINE into
    tokenizer_config.json; split drops such loader state, so the bytes follow the model only."""
    outputs = []
    for offline in ("0", "1"):
        out = tmp_path / f"split-{offline}"
        code = f"from pathlib import Path\nfrom stages import split\nsplit.run(Path({str(tiny_model)!r}), Path({str(out)!r}))\n"
        env = {**os.environ, "HF_HUB_OFFLINE": offline, "PYTHONPATH": str(REPO)}
        subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, cwd=REPO)
        outputs.append(tree_digests(out))
    assert outputs[0] == outputs[1]
    config = json.loads((tmp_path / "split-1" / "transformer" / "tokenizer_config.json").read_text())
    assert "local_files_only" not in config


# --- the same bytes on every x86-64 CPU type (docs/reproducibility.md) ----------------------------------

# Environment variables that make PyTorch's own kernels (ATen), MKL and oneDNN run as on a CPU with
# AVX2 and nothing newer, whatever this machine has.
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def test_export_under_avx2_only_torch_gives_the_same_bytes(two_builds, params, tmp_path):
    """export_onnx validates against PyTorch: its report may hold only what cannot follow the kernels."""
    art = two_builds[0][0]
    out = tmp_path / "onnx"
    out.mkdir()
    cfg = tmp_path / "export.json"
    cfg.write_text(json.dumps(fast_params(params)["export"]))
    code = ("import json, sys, torch\nfrom pathlib import Path\nfrom stages import export_onnx\n"
            "print(torch.backends.cpu.get_cpu_capability())\n"
            f"export_onnx.run(json.loads(Path({str(cfg)!r}).read_text()), Path({str(art / 'split')!r}), "
            f"Path({str(out)!r}))\n")
    env = {**os.environ, **AVX2_ONLY, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True, cwd=REPO)
    assert done.stdout.split()[0] == "AVX2"  # the restriction took effect
    assert tree_digests(out) == tree_digests(art / "onnx")


def perturbed_absmax(monkeypatch, relative: float) -> None:
    """quantize's calibration statistics moved by +-relative, each value its own sign (seeded)."""
    from stages import quantize

    exact = quantize.channel_absmax
    rng = np.random.default_rng(0)

    def noisy(*args):
        return {k: v * (1 + relative * rng.choice([-1.0, 1.0], size=v.shape)) for k, v in exact(*args).items()}

    monkeypatch.setattr(quantize, "channel_absmax", noisy)


def rerun_quantize(art: Path, params: dict, out: Path) -> str:
    from stages import quantize

    out.mkdir()
    quantize.run(fast_params(params)["quantize"], art / "onnx", art / "split", out)
    return digest(out / "model_int8.onnx")


def test_int8_bytes_survive_calibration_noise(two_builds, params, tmp_path, monkeypatch):
    """Two defences keep the int8 graph the same on every CPU: amax is computed in float64 (its
    differences between CPU types are far below float32 precision), and the smoothing factors lie on
    a grid of eight steps per octave, which a small change of amax does not move. This checks the second alone: amax
    moved by 1e-6, the size of float32 kernels' differences (onnxruntime's float32 amax is within
    5e-6 of the float64 one on MiniLM), leaves the bytes as they are. Continuous factors fail this."""
    art = two_builds[0][0]
    perturbed_absmax(monkeypatch, 1e-6)
    assert rerun_quantize(art, params, tmp_path / "int8") == digest(art / "int8" / "model_int8.onnx")


def test_float64_calibration_matches_onnxruntime_on_the_fused_graph(two_builds, params):
    """The twin of each fused tensor in the plain graph is the same activation: its float64 amax is
    onnxruntime's float32 amax of the fused tensor, to float32 precision (so not the same bytes)."""
    import onnx

    from stages import quantize
    from stages.common import cpu_session

    art = two_builds[0][0]
    fused = onnx.load(str(art / "onnx" / "model_fused.onnx"))
    plain = onnx.load(str(art / "onnx" / "model.onnx"))
    _, ffn = quantize.find_targets(fused.graph)
    watched = sorted({n.input[0] for n in quantize.layernorm_fed(fused.graph, ["MatMul"])} | {t[2].input[0] for t in ffn})
    assert watched
    batches, _ = quantize.calibration_batches(art / "split", REPO / params["quantize"]["calibration_corpus"])
    wide = quantize.channel_absmax(plain, fused, watched, batches)

    probe = onnx.ModelProto()
    probe.CopyFrom(fused)
    for name in watched:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = cpu_session(probe.SerializeToString())
    inputs = [i.name for i in session.get_inputs()]
    narrow = {}
    for batch in batches:
        for name, value in zip(watched, session.run(watched, {k: batch[k] for k in inputs})):
            narrow[name] = np.maximum(narrow.get(name, 0.0), np.abs(value).reshape(-1, value.shape[-1]).max(axis=0))
    for name in watched:
        assert wide[name].dtype == np.float64
        np.testing.assert_allclose(narrow[name], wide[name], rtol=1e-4, err_msg=name)
    assert any(not np.array_equal(narrow[n], wide[n].astype(np.float32)) for n in watched)


def test_smoothing_factors_lie_on_the_grid_with_geometric_mean_near_one():
    from stages.quantize import STEPS_PER_OCTAVE, smoothing_factors

    rng = np.random.default_rng(1)
    x, w = rng.uniform(0.01, 30, 64), rng.normal(size=(64, 16)).astype(np.float32)
    s = smoothing_factors(x, w, 0.75)
    assert s.dtype == np.float32
    steps = np.log2(s.astype(np.float64)) * STEPS_PER_OCTAVE
    assert np.allclose(steps, np.round(steps), atol=1e-4) and abs(steps.mean()) <= STEPS_PER_OCTAVE / 2
    exact = 0.75 * np.log2(x) - 0.25 * np.log2(np.abs(w).max(axis=1))
    assert np.abs(np.log2(s) - (exact - exact.mean())).max() <= 0.5 / STEPS_PER_OCTAVE + 1e-6
    assert len(set(s.tolist())) > STEPS_PER_OCTAVE  # not collapsed onto a few values


def test_hashed_reports_hold_no_measured_figures(two_builds):
    """Measured figures (max |diff|, cosines) go to artifacts/measured/<model>/, not into outputs."""
    art = two_builds[0][0]
    measured = {"max_abs_diff", "min_cosine_vs_fp32", "mean_cosine_vs_fp32", "min_token_cosine", "min_sentence_cosine"}

    def keys(value):
        if isinstance(value, dict):
            return set(value) | {k for v in value.values() for k in keys(v)}
        return {k for v in value for k in keys(v)} if isinstance(value, list) else set()

    for report in ("onnx/report.json", "fp16/report.json", "int8/report.json", "bundle/manifest.json"):
        found = keys(json.loads((art / report).read_text())) & measured
        assert not found, f"{report} holds measured figures {sorted(found)}"


@pytest.mark.skipif(shutil.which("qemu-x86_64") is None,
                    reason="qemu-user is not installed (apt-get install qemu-user): no emulated CPU to run under")
def test_emulated_cpu_python_sees_no_avx512(tmp_path):
    """rebuild-check --emulate-cpu: the `python` it puts first on PATH runs under an AVX2-only CPU."""
    folder = rebuild_check.emulated_python("Haswell-noTSX", tmp_path)
    code = "import numpy; f = numpy._core._multiarray_umath.__cpu_features__; print(f['AVX2'], f['AVX512F'])"
    done = subprocess.run([str(folder / "python"), "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", "False"]
    with pytest.raises(StageError, match="--emulate-cpu NoSuchCPU: qemu-x86_64 refused it"):
        rebuild_check.emulated_python("NoSuchCPU", tmp_path / "other")
