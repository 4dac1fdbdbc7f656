"""OpenVINO variants: the convert_openvino stage, the runtime backend, the choice rules.

A tiny random model goes through the real stages (export_onnx -> convert_openvino -> package);
the bundle's ov-* variants are then loaded as a consumer would and compared with
sentence-transformers and with the onnxruntime variants.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, SENTENCES, build_bundle, fast_params, make_st_model, st_encode

pytest.importorskip("openvino", reason="openvino is not installed (make install installs it from the lock)")

from sbert_bundle import Bundle, IntegrityError  # noqa: E402
from sbert_bundle import cpu as cpu_rules  # noqa: E402
from sbert_bundle import ov  # noqa: E402
from sbert_bundle.backends import BackendError  # noqa: E402
from sbert_bundle.bundle import VariantError, rank_variants  # noqa: E402
from sbert_bundle.cli import main  # noqa: E402
from sbert_bundle.manifest import MANIFEST_FILE  # noqa: E402
from test_runtime import copy_bundle, reseal  # noqa: E402

HAS_BF16 = "BF16" in ov.cpu_capabilities()
INTEL_AMX = {"vendor": "GenuineIntel", "model": "Xeon (AMX)",
             "flags": ["amx_bf16", "amx_int8", "avx2", "avx512_bf16", "avx512_vnni", "avx512f"]}
AMD_AVX512 = {"vendor": "AuthenticAMD", "model": "EPYC (Zen 4)",
              "flags": ["avx2", "avx512_bf16", "avx512_vnni", "avx512f"]}
AVX2_ONLY = {"vendor": "GenuineIntel", "model": "Core (AVX2)", "flags": ["avx2"]}


@pytest.fixture(scope="module")
def dense_model(tmp_path_factory) -> Path:
    """CLS pooling and a Dense layer: the head runs outside the graph for every backend alike."""
    return make_st_model(tmp_path_factory.mktemp("ov-model") / "model", pooling=("cls",),
                         dense=[(16, "torch.nn.modules.activation.Tanh", True)])


@pytest.fixture(scope="module")
def ov_bundle(tmp_path_factory, dense_model, params) -> Path:
    p = fast_params(params)
    p["package"]["variant_runtime"] = {"ov-bf16": {"cpu_max_batch_tokens": 2048}}
    return build_bundle(dense_model, tmp_path_factory.mktemp("ov-build"), p, fp16=False, openvino=True)


# --- build ---------------------------------------------------------------------------------

def test_package_records_the_ir_variants(ov_bundle):
    manifest = json.loads((ov_bundle / MANIFEST_FILE).read_text())
    fp32, bf16 = manifest["variants"]["ov-fp32"], manifest["variants"]["ov-bf16"]
    for v in (fp32, bf16):
        assert (v["file"], v["weights"], v["backend"], v["devices"]) == (
            "openvino/model.xml", "openvino/model.bin", "openvino", ["cpu"])
        assert v["weights"] in manifest["files"] and v["file"] in manifest["files"]
    assert (fp32["precision"], fp32["inference_precision"]) == ("fp32", "f32")
    assert (bf16["precision"], bf16["inference_precision"], bf16["cpu_max_batch_tokens"]) == ("bf16", "bf16", 2048)
    assert "cpu_max_batch_tokens" not in fp32
    assert manifest["openvino_build"]["skipped"] is False and manifest["openvino_build"]["openvino"]
    assert manifest["tools"]["openvino"]


def test_ir_bytes_are_the_same_from_two_fresh_processes(ov_bundle, tmp_path):
    """The conversion is pure graph work: the same ONNX file gives the same IR bytes."""
    src = ov_bundle.parent / "onnx" / "model.onnx"
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                        "from stages.convert_openvino import convert; convert(Path(sys.argv[1]), Path(sys.argv[2]))",
                        str(src), str(tmp_path / run)], cwd=REPO, check=True)
    for name in ("model.xml", "model.bin"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
        assert (tmp_path / "a" / name).read_bytes() == (ov_bundle / "openvino" / name).read_bytes(), name


def test_stage_report_is_the_same_on_every_cpu(ov_bundle):
    """Thresholds, never measured figures: which checks ran follows the CPU, the report does not."""
    report = json.loads((ov_bundle.parent / "openvino" / "report.json").read_text())
    assert set(report) == {"skipped", "reason", "openvino", "source", "files", "min_sentence_cosine"}
    assert report["min_sentence_cosine"] == {"f32": 0.99999, "bf16": 0.9999}


def test_an_ir_openvino_cannot_compile_is_one_line_naming_file_and_precision(ov_bundle, params, tmp_path,
                                                                            monkeypatch):
    """As with bf16 listed by the CPU plugin while ONEDNN_MAX_CPU_ISA caps oneDNN below it."""
    import openvino

    from stages import convert_openvino
    from stages.common import StageError

    def refuse(self, *args, **kwargs):
        raise RuntimeError("Exception from src/inference/src/cpp/core.cpp:132:\nCheck failed at "
                           "src/plugins/intel_cpu/src/node.cpp:345:\nSupported primitive descriptors list is empty")

    monkeypatch.setattr(openvino.Core, "compile_model", refuse)
    art = ov_bundle.parent
    with pytest.raises(StageError) as caught:
        convert_openvino.run(fast_params(params)["openvino"], art / "onnx", art / "split", tmp_path)
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path / "model.xml") in message and " at f32 " in message
    assert message.endswith("Supported primitive descriptors list is empty")


@pytest.mark.parametrize("why", ["disabled", "not installed"])
def test_without_openvino_the_stage_records_why_and_the_bundle_has_no_ov_variant(
        why, tiny_model, tmp_path, params, monkeypatch, capsys):
    from stages import convert_openvino, package

    p = fast_params(params)
    if why == "disabled":
        p["openvino"]["enabled"] = False
    else:
        import importlib.metadata

        real = importlib.metadata.version

        def version(name):
            if name == "openvino":
                raise importlib.metadata.PackageNotFoundError(name)
            return real(name)
        monkeypatch.setattr(convert_openvino.importlib.metadata, "version", version)
    bundle = build_bundle(tiny_model, tmp_path, p, fp16=False)
    art = bundle.parent
    shutil.rmtree(art / "bundle")
    (art / "bundle").mkdir()
    (art / "openvino").mkdir()
    assert convert_openvino.run(p["openvino"], art / "onnx", art / "split", art / "openvino") == {}  # nothing measured
    report = json.loads((art / "openvino" / "report.json").read_text())
    assert report["skipped"] is True and not (art / "openvino" / "model.xml").exists()
    assert ("enabled is false" if why == "disabled" else "openvino is not installed") in report["reason"]
    p["package"]["variants"] = ["fp32", "fp32-fused", "ov-fp32", "ov-bf16"]
    p["model"]["embedding_dimension"] = None
    manifest = package.run(p, art, art / "bundle")
    assert sorted(manifest["variants"]) == ["fp32", "fp32-fused"]
    assert manifest["openvino_build"] == {"skipped": True, "reason": report["reason"], "openvino": None}
    main(["inspect", str(art / "bundle")])
    assert f"OpenVINO variants: none, convert_openvino skipped: {report['reason']}" in capsys.readouterr().out


# --- runtime -------------------------------------------------------------------------------

def test_ov_fp32_matches_sentence_transformers(ov_bundle, dense_model):
    b = Bundle.load(ov_bundle, variant="ov-fp32")
    assert (b.variant, b.device, type(b.backend).__name__) == ("ov-fp32", "cpu", "OvBackend")
    emb = b.encode(SENTENCES)
    ref = st_encode(dense_model, SENTENCES)
    assert emb.shape == ref.shape == (len(SENTENCES), 16)
    cos = (emb * ref).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.99999, cos.min()
    ort = Bundle.load(ov_bundle, variant="fp32").encode(SENTENCES)
    assert np.abs(emb - ort).max() < 1e-4


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no native bf16 (OpenVINO's CPU plugin lists no BF16)")
def test_ov_bf16_runs_where_the_cpu_has_bf16(ov_bundle):
    b = Bundle.load(ov_bundle, variant="ov-bf16")
    assert b.max_batch_tokens == 2048  # the variant's own cap, not the bundle's 512
    ref = Bundle.load(ov_bundle, variant="fp32").encode(SENTENCES)
    emb, exact = b.encode(SENTENCES), Bundle.load(ov_bundle, variant="ov-fp32").encode(SENTENCES)
    cos = (emb * ref).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.9999
    # bf16 really ran: further from fp32 than OpenVINO's own f32 (measured here: 5e-5 against 7e-8)
    assert np.abs(emb - ref).max() > 1e-5 > 1e-6 > np.abs(exact - ref).max()
    assert b.backend.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "bf16"


def test_ov_fp32_runs_in_f32_even_on_a_bf16_cpu(ov_bundle):
    """OpenVINO's default on a bf16 CPU is bf16: the exact variant must ask for f32."""
    b = Bundle.load(ov_bundle, variant="ov-fp32")
    assert b.backend.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"


def test_ov_bf16_is_refused_on_a_cpu_without_bf16(ov_bundle, monkeypatch):
    monkeypatch.setattr(ov, "cpu_capabilities", lambda: ("FP32", "INT8", "BIN", "EXPORT_IMPORT"))
    with pytest.raises(VariantError) as e:
        Bundle.load(ov_bundle, variant="ov-bf16")
    assert "'ov-bf16' cannot run here: this CPU has no native bf16" in str(e.value)
    assert Bundle.load(ov_bundle, variant="ov-fp32").variant == "ov-fp32"


def test_without_openvino_the_ov_variants_say_how_to_install_it(ov_bundle, monkeypatch):
    monkeypatch.setattr(ov, "installed", lambda: False)
    with pytest.raises(VariantError) as e:
        Bundle.load(ov_bundle, variant="ov-fp32")
    assert "openvino is not installed (pip install 'sbert-bundle[cpu,openvino]')" in str(e.value)
    monkeypatch.setattr(cpu_rules, "cpu_info", lambda: AMD_AVX512)
    assert Bundle.load(ov_bundle).variant == "fp32-fused"  # the next exact variant


def test_concurrent_encode_matches_serial(ov_bundle):
    b = Bundle.load(ov_bundle, variant="ov-fp32", threads=1)
    texts = [f"{s} {i}" for i, s in enumerate(SENTENCES * 4)]
    serial = b.encode(texts, batch_size=3)
    results, errors = {}, []

    def work(k):
        try:
            results[k] = b.encode(texts, batch_size=3)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 6
    for emb in results.values():
        np.testing.assert_array_equal(emb, serial)


def test_a_broken_ir_is_one_line_naming_the_file(ov_bundle, tmp_path):
    root = copy_bundle(ov_bundle, tmp_path)
    (root / "openvino" / "model.bin").write_bytes(b"\0" * 100)  # weights cut short
    reseal(root)
    with pytest.raises(BackendError) as e:
        Bundle.load(root, variant="ov-fp32")
    msg = str(e.value)
    assert msg.startswith(f"{root / 'openvino' / 'model.xml'}: OpenVINO could not load it (")
    assert "\n" not in msg and "Exception from src/" not in msg, msg


@pytest.mark.parametrize("edit, problem", [
    (lambda v: v.pop("weights"), "variants['ov-fp32'].weights: None is not a file listed in the manifest"),
    (lambda v: v.update(weights="../outside.bin"), "variants['ov-fp32'].weights: '../outside.bin' is not a file"),
    (lambda v: v.update(inference_precision="f64"), "variants['ov-fp32'].inference_precision: 'f64'; known"),
    (lambda v: v.update(cpu_max_batch_tokens=-1), "variants['ov-fp32'].cpu_max_batch_tokens: -1; expected"),
])
def test_a_hostile_openvino_entry_is_refused_before_openvino_reads_anything(edit, problem, ov_bundle, tmp_path):
    root = copy_bundle(ov_bundle, tmp_path)
    manifest = json.loads((root / MANIFEST_FILE).read_text())
    edit(manifest["variants"]["ov-fp32"])
    (root / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError) as e:
        Bundle.load(root)
    assert problem in str(e.value)


# --- the choice ----------------------------------------------------------------------------

@pytest.mark.parametrize("info, first", [(INTEL_AMX, "fp32-fused"), (AMD_AVX512, "ov-fp32"), (AVX2_ONLY, "fp32-fused"),
                                         ({"vendor": "", "model": "arm64", "flags": []}, "fp32-fused")])
def test_the_default_exact_variant_follows_the_cpu_kind(info, first, ov_bundle, monkeypatch):
    monkeypatch.setattr(cpu_rules, "cpu_info", lambda: info)
    b = Bundle.load(ov_bundle)
    assert b.variant == first
    ranked = [n for n, d, r in rank_variants(b.manifest, None) if d and not r]
    assert ranked[:3] == list(cpu_rules.exact_order(info)[0]) and "ov-bf16" not in ranked
    described = b.describe()["cpu"]
    assert described["exact_order"][0] == first and described["why"] == cpu_rules.exact_order(info)[1]


def test_inspect_says_which_cpu_rule_chose(ov_bundle, monkeypatch, capsys):
    monkeypatch.setattr(cpu_rules, "cpu_info", lambda: AMD_AVX512)
    main(["inspect", str(ov_bundle)])
    out = capsys.readouterr().out
    assert "selected here: ov-fp32 on cpu" in out
    assert "CPU: EPYC (Zen 4) (AuthenticAMD; avx2 avx512_bf16 avx512_vnni avx512f); AMD CPU with AVX-512: " \
           "OpenVINO f32 first" in out
    assert "ov-bf16        openvino     bf16" in out


def test_a_sealed_report_without_ov_fp32_keeps_it_out_of_the_default(ov_bundle, monkeypatch):
    """A release verified where OpenVINO was absent: ov-fp32 is not picked unchecked, even where its rule
    would put it first."""
    monkeypatch.setattr(cpu_rules, "cpu_info", lambda: AMD_AVX512)
    manifest = json.loads((ov_bundle / MANIFEST_FILE).read_text())
    report = {"variants": {"fp32-fused": {"passed": True, "device": "cpu", "min_cosine": 1.0}}}
    ranked = rank_variants(manifest, report)
    assert ranked[0][0] == "fp32-fused" and not ranked[0][2]
    assert dict((n, r) for n, _, r in ranked)["ov-fp32"] == "not checked by the verify report"


def test_cpu_info_reads_the_first_processor(tmp_path):
    text = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14\n"
            "flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 sha_ni\n\n"
            "processor\t: 1\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu\n")
    (tmp_path / "cpuinfo").write_text(text)
    info = cpu_rules.cpu_info.__wrapped__(tmp_path / "cpuinfo")
    assert info == {"vendor": "AuthenticAMD", "model": "AMD EPYC 9R14",
                    "flags": ["avx2", "avx512_bf16", "avx512_vnni", "avx512f"]}
    assert cpu_rules.exact_order(info)[0][0] == "ov-fp32"
    missing = cpu_rules.cpu_info.__wrapped__(tmp_path / "none")
    assert missing["flags"] == [] and cpu_rules.exact_order(missing)[0][0] == "fp32-fused"


# --- verify --------------------------------------------------------------------------------

def test_verify_gates_the_ov_variants_by_their_precision(ov_bundle, dense_model, params, tmp_path):
    """ov-fp32 against the fp32 gates; ov-bf16 against the bf16 gates where it runs, else skipped with
    the reason. A bf16 gate stricter than what bf16 gives fails, naming the variant."""
    from stages import verify
    from test_verify import CORPUS

    cfg = fast_params(params)["verify"]
    for gate in cfg["gates"].values():  # a random CLS model's similarities are near ties: rank figures are noise
        gate.update(min_top10_agreement=None, min_spearman=None)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in CORPUS), encoding="utf-8")
    report = verify.run(cfg, ov_bundle, dense_model, corpus)
    assert report["failures"] == [], report["failures"]
    assert report["variants"]["ov-fp32"]["passed"] and report["variants"]["ov-fp32"]["min_cosine"] > 0.99999
    if not HAS_BF16:
        assert "no native bf16" in report["skipped"]["ov-bf16"]
        return
    bf16 = report["variants"]["ov-bf16"]
    assert bf16["passed"] and bf16["min_cosine"] > 0.9999
    cfg["gates"]["bf16"] = {**cfg["gates"]["bf16"], "min_cosine": 1.01}  # no variant can pass it
    strict = verify.run(cfg, ov_bundle, dense_model, corpus)
    assert not strict["variants"]["ov-bf16"]["passed"] and strict["variants"]["ov-fp32"]["passed"]
    assert [f for f in strict["failures"] if f.startswith("ov-bf16: min_cosine")]
