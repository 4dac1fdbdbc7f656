"""TensorRT plans per GPU target: packaging, the manifest's schema, which plan the runtime picks, inspect.

No plan here is TensorRT output. The build records are written by hand (`handmade_record`) with
a few bytes in place of a plan, to test what package, the manifest check and the runtime do
with the records and files build_trt leaves: their tensorrt_version names no TensorRT, so every
runtime refuses to load them, and the tests check that no load is attempted. Building and
running a real plan needs TensorRT and a GPU: test_build_trt.py.
"""

import copy
import json
import shutil

import pytest

from conftest import TRT, fast_params, needs_trt
from sbert_bundle import Bundle, VariantError
from sbert_bundle import trt as trt_backend
from sbert_bundle.bundle import rank_variants, trt_targets
from sbert_bundle.cli import main
from sbert_bundle.manifest import MANIFEST_FILE, IntegrityError
from stages import package
from stages.common import StageError


NOT_A_PLAN = b"not a TensorRT plan: a few bytes standing in for one in a packaging test; never loaded"
L4 = {"gpu": "NVIDIA L4", "compute_capability": "8.9"}


def handmade_record(trt_dir, target: str, capability: str, reason: str | None = None) -> dict:
    """artifacts/trt/<target>/build.json as build_trt writes it, made by hand: built (a stand-in
    plan file) or, with a reason, skipped. Its tensorrt_version is no TensorRT version, and
    EXCLUDE_LEAN_RUNTIME asks for that exact version, so no TensorRT runtime accepts it."""
    folder = trt_dir / target
    folder.mkdir(parents=True)
    record = {"target": target, "compute_capability": capability, "skipped": reason is not None,
              "reason": reason, "plans": []}
    if reason is None:
        (folder / "handmade.plan").write_bytes(NOT_A_PLAN)
        record["plans"] = [{"name": f"handmade-{target}", "file": "handmade.plan", "precision": "fp16", "metadata": {
            "target": target, "tensorrt_version": "none: hand-made test record", "gpu": f"hand-made {target}",
            "compute_capability": capability, "flags": ["VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME"],
            "hardware_compatibility": "NONE", "profiles": {}, "profile_order": []}}]
    (folder / "build.json").write_text(json.dumps(record))
    return record


def package_with(tiny_bundle, root, params, records) -> tuple:
    """Run the real package stage on the tiny model's artifacts plus hand-made TensorRT records."""
    art = root / "artifacts"
    art.mkdir(parents=True)
    for name in ("source", "split", "onnx", "fp16"):
        (art / name).symlink_to(tiny_bundle.parent / name)
    for args in records:
        handmade_record(art / "trt", *args)
    p = copy.deepcopy(fast_params(params))
    p["package"]["variants"] = ["fp32", "fp32-fused", "fp16", "fp16-fused"]
    p["model"]["embedding_dimension"] = None
    bundle = root / "bundle"
    bundle.mkdir()
    return package.run(p, art, bundle), bundle


@pytest.fixture(scope="module")
def two_targets(tiny_bundle, tmp_path_factory, params):
    """A bundle with plans for h100 and l4; a10g skipped (build_trt never ran for it)."""
    return package_with(tiny_bundle, tmp_path_factory.mktemp("two-targets"), params,
                        [("h100", "9.0"), ("l4", "8.9")])


@pytest.fixture
def no_plan_loads(monkeypatch):
    """Fails the test if anything tries to load a (hand-made) plan."""
    attempts = []
    monkeypatch.setattr(trt_backend, "TrtBackend", lambda *a, **k: attempts.append(a) or 1 / 0)
    yield attempts
    assert attempts == [], "a hand-made plan must never be loaded"


def test_the_bundle_holds_one_plan_per_built_target_with_its_metadata(two_targets, no_plan_loads):
    manifest, bundle = two_targets
    plans = {n: v for n, v in manifest["variants"].items() if v["backend"] == "tensorrt"}
    assert sorted(plans) == ["trt-fp16-h100", "trt-fp16-l4"]
    h100 = plans["trt-fp16-h100"]
    assert (h100["file"], h100["target"], h100["compute_capability"]) == ("trt/h100/handmade.plan", "h100", "9.0")
    assert h100["tensorrt"]["target"] == "h100" and h100["devices"] == ["cuda"]
    assert (bundle / "trt" / "l4" / "handmade.plan").read_bytes() == NOT_A_PLAN
    build = manifest["tensorrt_build"]["targets"]
    assert build["h100"] == {"compute_capability": "9.0", "skipped": False, "reason": None,
                             "plans": ["trt-fp16-h100"]}
    assert build["a10g"]["skipped"] and build["a10g"]["compute_capability"] == "8.6"
    assert build["a10g"]["reason"].startswith("build_trt has not run for target a10g")
    assert Bundle.load(bundle).variant == "fp32-fused"  # no GPU here: the CPU graph, no plan opened


def test_a_skipped_target_is_recorded_with_its_reason(tiny_bundle, tmp_path, params):
    why = "this GPU is sm_90 (NVIDIA H100 80GB HBM3); target l4 needs 8.9"
    manifest, bundle = package_with(tiny_bundle, tmp_path, params, [("h100", "9.0"), ("l4", "8.9", why)])
    assert manifest["tensorrt_build"]["targets"]["l4"] == {"compute_capability": "8.9", "skipped": True,
                                                           "reason": why, "plans": []}
    assert "trt-fp16-l4" not in manifest["variants"] and not (bundle / "trt" / "l4").exists()


def test_a_build_record_of_another_capability_is_refused(tiny_bundle, tmp_path, params):
    with pytest.raises(StageError, match=r"trt/l4/build.json is for target 'l4' \(compute capability '9.0'\); "
                                         r"trt.targets.l4 needs 8.9: run build_trt --target l4 again"):
        package_with(tiny_bundle, tmp_path, params, [("l4", "9.0")])


VARIANTS = {
    "trt-fp16-h100": {"backend": "tensorrt", "target": "h100", "compute_capability": "9.0", "tensorrt": {}},
    "trt-fp16-l4": {"backend": "tensorrt", "target": "l4", "compute_capability": "8.9", "tensorrt": {}},
    "fp16-fused": {"backend": "onnxruntime", "precision": "fp16"},
}


@pytest.mark.parametrize("capability, expected", [
    ("8.9", {"trt-fp16-h100": "built for sm_90 (h100), this GPU is sm_89", "trt-fp16-l4": ""}),
    ("9.0", {"trt-fp16-h100": "", "trt-fp16-l4": "built for sm_89 (l4), this GPU is sm_90"}),
    ("8.6", {"trt-fp16-h100": "built for sm_90 (h100), this GPU is sm_86",
             "trt-fp16-l4": "built for sm_89 (l4), this GPU is sm_86"}),
    (None, {"trt-fp16-h100": "no CUDA GPU", "trt-fp16-l4": "no CUDA GPU"}),
])
def test_only_the_plan_of_this_gpus_compute_capability_is_a_candidate(capability, expected):
    assert trt_backend.select_plans(VARIANTS, capability) == expected


def test_a_hardware_compatible_plan_of_another_target_runs_only_when_named():
    plan = {**VARIANTS["trt-fp16-h100"], "tensorrt": {"hardware_compatibility": "AMPERE_PLUS"}}
    assert trt_backend.target_choice(plan, "8.6", "NVIDIA A10G") == (
        True, "built for sm_90 (h100), this GPU is sm_86 (NVIDIA A10G); hardware-compatible, so used only when named")
    assert trt_backend.target_choice(plan, "7.5")[0] is False  # older than Ampere: not at all


def plan_variant(target: str, capability: str, **meta) -> dict:
    return {"backend": "tensorrt", "file": f"trt/{target}/p.plan", "precision": "fp16", "devices": ["cuda"],
            "target": target, "compute_capability": capability,
            "tensorrt": {"tensorrt_version": TRT.__version__ if TRT else "", "flags": ["VERSION_COMPATIBLE"],
                         "hardware_compatibility": "NONE", "gpu": f"NVIDIA {target.upper()}",
                         "compute_capability": capability, **meta}}


@needs_trt
def test_the_loader_ranks_the_plan_of_this_gpu_first_and_explains_the_others(monkeypatch):
    """Through rank_variants with the real TensorRT module; the GPU query answers an L4 (no plan loads)."""
    monkeypatch.setattr(trt_backend, "gpu_here", lambda device_id=0: L4)
    manifest = {"variants": {"trt-fp16-h100": plan_variant("h100", "9.0"), "trt-fp16-l4": plan_variant("l4", "8.9")}}
    assert rank_variants(manifest, None) == [
        ("trt-fp16-l4", "cuda", ""),
        ("trt-fp16-h100", None, "built for sm_90 (h100), this GPU is sm_89 (NVIDIA L4)")]
    ampere_plus = plan_variant("h100", "9.0", hardware_compatibility="AMPERE_PLUS")
    ranked = rank_variants({"variants": {"trt-fp16-h100": ampere_plus}}, None)
    assert ranked == [("trt-fp16-h100", "cuda", "built for sm_90 (h100), this GPU is sm_89 (NVIDIA L4); "
                                                "hardware-compatible, so used only when named")]


@needs_trt
def test_naming_a_plan_built_for_another_gpu_names_both_capabilities(two_targets, monkeypatch, no_plan_loads):
    monkeypatch.setattr(trt_backend, "gpu_here", lambda device_id=0: L4)
    with pytest.raises(VariantError, match=r"^variant 'trt-fp16-h100' cannot run here: built for sm_90 \(h100\), "
                                           r"this GPU is sm_89 \(NVIDIA L4\); variants in this bundle:\n"):
        Bundle.load(two_targets[1], variant="trt-fp16-h100")


@needs_trt
def test_inspect_says_which_plan_would_run_here_and_why_the_others_do_not(two_targets, monkeypatch, capsys,
                                                                        no_plan_loads):
    monkeypatch.setattr(trt_backend, "gpu_here", lambda device_id=0: L4)
    assert main(["inspect", str(two_targets[1])]) == 0
    out = capsys.readouterr().out
    lines = out[out.index("TensorRT plans (one per GPU target):"):].splitlines()[1:4]
    assert lines[0].split()[:3] == ["h100", "sm_90", "trt-fp16-h100"]
    assert lines[0].endswith("not here: built for sm_90 (h100), this GPU is sm_89 (NVIDIA L4)")
    assert lines[1].split()[:3] == ["l4", "sm_89", "trt-fp16-l4"]  # the target's plan; this record is no TensorRT's
    assert "not here: plan built with TensorRT none: hand-made test record" in lines[1]
    assert lines[2].split()[:4] == ["a10g", "sm_86", "-", "not"]
    assert "not built: build_trt has not run for target a10g" in lines[2]


def test_inspect_without_a_gpu_names_the_reason_for_every_plan(two_targets, capsys, no_plan_loads):
    assert main(["inspect", str(two_targets[1])]) == 0
    out = capsys.readouterr().out
    lines = out[out.index("TensorRT plans (one per GPU target):"):].splitlines()[1:4]
    assert [line.split()[0] for line in lines] == ["h100", "l4", "a10g"]
    reasons = [line.split("not here: ", 1)[1] for line in lines[:2]]
    assert reasons[0] == reasons[1] and ("TensorRT" in reasons[0] or "CUDA" in reasons[0]), reasons


def test_a_plan_that_would_run_here_says_so():
    manifest = {"tensorrt_build": {"targets": {
        "h100": {"compute_capability": "9.0", "skipped": False, "reason": None, "plans": ["trt-fp16-h100"]},
        "l4": {"compute_capability": "8.9", "skipped": True, "reason": "no CUDA GPU visible", "plans": []}}}}
    ranked = [("trt-fp16-h100", "cuda", ""), ("fp32", "cpu", "")]
    assert trt_targets(manifest, ranked) == [
        {"target": "h100", "compute_capability": "9.0", "plan": "trt-fp16-h100", "would_run_here": True,
         "why_not": None},
        {"target": "l4", "compute_capability": "8.9", "plan": None, "would_run_here": False,
         "why_not": "not built: no CUDA GPU visible"}]


def _many_plans(m):
    for i in range(40):
        m["variants"][f"trt-fp16-t{i}"] = {**m["variants"]["trt-fp16-h100"], "target": f"t{i}"}


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["variants"]["trt-fp16-h100"].update(target="../h100"),
     r"variants\['trt-fp16-h100'\].target: '../h100'; expected a GPU target name"),
    (lambda m: m["variants"]["trt-fp16-h100"].update(target="h100\n"), r"target: 'h100\\n'; expected"),
    (lambda m: m["variants"]["trt-fp16-h100"].pop("target"), r"\.target: None; expected a GPU target name"),
    (lambda m: m["variants"]["trt-fp16-h100"].update(compute_capability=9.0),
     r"\.compute_capability: 9.0; expected MAJOR.MINOR"),
    (lambda m: m["variants"]["trt-fp16-h100"].update(compute_capability="8.9"),
     r"built on a GPU of compute capability '9.0', but its target needs '8.9'"),
    (lambda m: m["variants"]["trt-fp16-h100"].update(tensorrt=["x"]), r"\.tensorrt: expected an object"),
    (_many_plans, r"variants: 42 TensorRT plans; at most 32"),
    (lambda m: m["tensorrt_build"].update(targets={f"t{i}": {} for i in range(10_000)}),
     r"tensorrt_build.targets: 10000 targets; at most 32"),
    (lambda m: m["tensorrt_build"]["targets"].update({"a b": {}}), r"tensorrt_build.targets\['a b'\]: not a GPU"),
    (lambda m: m["tensorrt_build"]["targets"]["l4"].update(reason="x" * 5000),
     r"targets\['l4'\].reason: expected null or a string of at most 1000"),
    (lambda m: m["tensorrt_build"]["targets"]["l4"].update(plans=["p"] * 1000),
     r"targets\['l4'\].plans: expected a list of at most 32"),
    (lambda m: m["tensorrt_build"].update(targets=[]), r"tensorrt_build.targets: expected an object"),
], ids=["target-path", "target-newline", "target-missing", "capability-float", "capability-contradicts",
        "metadata-list", "too-many-plans", "too-many-targets", "target-name", "long-reason", "long-plan-list",
        "targets-list"])
def test_a_manifest_with_bad_plan_fields_is_refused_in_one_error(two_targets, tmp_path, edit, message, capsys):
    root = tmp_path / "bundle"
    shutil.copytree(two_targets[1], root)
    manifest = json.loads((root / MANIFEST_FILE).read_text())
    edit(manifest)
    (root / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match=message) as e:
        Bundle.load(root)
    assert len(str(e.value).splitlines()) <= 25
    assert main(["inspect", str(root)]) == 1
    assert capsys.readouterr().err.startswith("sbert-bundle: error: ")
