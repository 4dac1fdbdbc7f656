"""build_trt: profile checks, GPU targets, the recorded skip, and (where TensorRT and a GPU exist) a real plan."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, SENTENCES
from stages import build_trt
from stages.common import StageError

TRT, WHY_NOT = build_trt.availability()
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


def test_profile_applies_to_every_input_unless_overridden():
    spec = {"min": [1, 1], "opt": [4, 16], "max": [8, 64], "per_input": {"token_type_ids": {
        "min": [1, 1], "opt": [4, 16], "max": [8, 32]}}}
    shapes = build_trt.profile_shapes(spec, INPUTS, "latency")
    assert shapes["input_ids"]["max"] == (8, 64) and shapes["token_type_ids"]["max"] == (8, 32)


def test_profile_naming_an_unknown_input_lists_the_real_ones():
    spec = {"min": [1, 1], "opt": [1, 1], "max": [1, 1], "per_input": {"segment_ids": {}}}
    with pytest.raises(StageError, match=r"segment_ids.*'input_ids', 'attention_mask', 'token_type_ids'"):
        build_trt.profile_shapes(spec, INPUTS, "latency")


def test_profile_min_opt_max_must_be_ordered():
    with pytest.raises(StageError, match="min <= opt <= max"):
        build_trt.profile_shapes({"min": [1, 32], "opt": [1, 16], "max": [1, 64]}, INPUTS, "bad")


def test_default_profiles_are_valid(params):
    for name, spec in params["trt"]["profiles"].items():
        build_trt.profile_shapes(spec, INPUTS, name)


@pytest.mark.skipif(TRT is not None, reason="TensorRT and a GPU are present: the build test runs instead")
def test_each_target_records_its_skip_with_the_reason(tmp_path, params):
    cfg = {**params["trt"], "timing_cache": str(tmp_path / "caches")}
    records = build_trt.run(cfg, tmp_path / "model.onnx", tmp_path / "trt")
    assert list(records) == ["h100", "l4", "a10g"]
    for name, capability in [("h100", "9.0"), ("l4", "8.9"), ("a10g", "8.6")]:
        assert records[name] == {"target": name, "compute_capability": capability, "skipped": True,
                                 "reason": WHY_NOT, "plans": []}
        assert json.loads((tmp_path / "trt" / name / "build.json").read_text()) == records[name]
        assert (tmp_path / "caches" / f"{name}.cache").exists()  # each target's timing cache, for its next build
    assert "TensorRT" in WHY_NOT or "GPU" in WHY_NOT


def test_one_target_is_built_alone(tmp_path, params):
    cfg = {**params["trt"], "timing_cache": str(tmp_path / "caches")}
    records = build_trt.run(cfg, tmp_path / "model.onnx", tmp_path / "trt", only="l4")
    assert list(records) == ["l4"] and records["l4"]["compute_capability"] == "8.9"
    assert sorted(p.name for p in (tmp_path / "trt").iterdir()) == ["l4"]


def test_unknown_target_is_one_line_naming_the_known_ones(tmp_path, params):
    cfg = {**params["trt"], "timing_cache": str(tmp_path / "caches")}
    with pytest.raises(StageError, match=r"^--target 'v100' is not in trt.targets; known: h100, l4, a10g$"):
        build_trt.run(cfg, tmp_path / "model.onnx", tmp_path / "trt", only="v100")
    assert not (tmp_path / "trt").exists()
    done = subprocess.run([sys.executable, "-m", "stages.build_trt", "--target", "v100"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr == "error: --target 'v100' is not in trt.targets; known: h100, l4, a10g\n"


def test_a_gpu_of_another_compute_capability_skips_the_target_naming_both():
    l4 = {"gpu": "NVIDIA L4", "compute_capability": "8.9"}
    assert build_trt.target_skip("h100", {"compute_capability": "9.0"}, l4) == \
        "this GPU is sm_89 (NVIDIA L4); target h100 needs 9.0"
    assert build_trt.target_skip("l4", {"compute_capability": "8.9"}, l4) == ""


def test_a_target_without_profiles_uses_the_shared_ones(params):
    own = {"only": {"min": [1, 1], "opt": [1, 64], "max": [4, 512], "per_input": {}}}
    cfg = {**params["trt"], "targets": {"h100": {"compute_capability": "9.0", "resource": "gpu_h100", "profiles": None},
                                        "l4": {"compute_capability": "8.9", "resource": "gpu_l4", "profiles": own}}}
    found = build_trt.targets(cfg)
    assert found["h100"]["profiles"] == params["trt"]["profiles"] and found["l4"]["profiles"] == own


@pytest.mark.parametrize("targets, message", [
    ({"H100!": {"compute_capability": "9.0", "resource": "gpu_h100"}}, r"trt.targets has 'H100!': a target name is"),
    ({"../up": {"compute_capability": "9.0", "resource": "gpu_h100"}}, r"trt.targets has '../up'"),
    ({"h100": {"compute_capability": 9.0, "resource": "gpu_h100"}}, r"compute_capability is 9.0; expected a quoted"),
    ({"h100": {"compute_capability": "9", "resource": "gpu_h100"}}, r"compute_capability is '9'; expected a quoted"),
    ({"h100": {"compute_capability": "9.0"}}, r"trt.targets.h100.resource is None"),
    ({"h100": {"compute_capability": "9.0", "resource": "gpu_h100", "gpu": "H100"}}, r"has \['gpu'\]; known"),
    ({}, "trt.targets must name at least one GPU target"),
])
def test_bad_targets_are_refused_before_anything_is_built(targets, message, params, tmp_path):
    cfg = {**params["trt"], "timing_cache": str(tmp_path / "caches"), "targets": targets}
    with pytest.raises(StageError, match=message):
        build_trt.run(cfg, tmp_path / "model.onnx", tmp_path / "trt")
    assert not (tmp_path / "trt").exists()


@pytest.mark.tensorrt
@pytest.mark.skipif(TRT is None, reason=f"needs TensorRT and a CUDA GPU: {WHY_NOT}")
def test_plan_builds_runs_and_matches_onnxruntime(tiny_bundle, tmp_path, params):
    from sbert_bundle import Bundle
    from sbert_bundle.trt import TrtBackend

    here = build_trt.gpu_info()
    cfg = {**params["trt"], "timing_cache": str(tmp_path / "caches"),
           "targets": {"here": {"compute_capability": here["compute_capability"], "resource": "gpu_here",
                                "profiles": None}},
           "profiles": {"small": {"min": [1, 1], "opt": [4, 16], "max": [16, 64], "per_input": {}}}}
    record = build_trt.run(cfg, tiny_bundle / "onnx" / "model_fp16.onnx", tmp_path)["here"]  # fp16: strongly typed
    plan = record["plans"][0]
    assert not record["skipped"] and plan["metadata"]["target"] == "here"
    assert plan["metadata"]["compute_capability"] == here["compute_capability"]
    assert plan["metadata"]["tensorrt_version"] == TRT.__version__
    assert plan["metadata"]["source_graph"] == "model_fp16.onnx" and plan["metadata"]["strongly_typed"]
    assert (tmp_path / "caches" / "here.cache").stat().st_size > 0
    ort = Bundle.load(tiny_bundle, variant="fp32")
    features = ort.tokenizer(SENTENCES[:4])
    trt_out = TrtBackend(tmp_path / "here" / plan["file"], {"tensorrt": plan["metadata"]})(features)
    ref = ort.backend(features)
    mask = features["attention_mask"].astype(bool)
    a, b = trt_out[mask], ref[mask]
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    assert cos.min() > 0.999


def test_profiles_must_reach_max_seq_length(params):
    short = {"only": {"min": [1, 1], "opt": [1, 16], "max": [8, 128]}}
    with pytest.raises(StageError, match="up to 128 tokens, but the model's max_seq_length is 256"):
        build_trt.check_coverage(short, 256)
    build_trt.check_coverage(params["trt"]["profiles"], 384)  # the defaults cover all-mpnet-base-v2


def test_settings_follow_the_config(params):
    cfg = {**params["trt"], "precision": "fp32", "hardware_compatibility": "same_compute_capability",
           "version_compatible": True, "exclude_lean_runtime": True}
    assert build_trt.settings(cfg) == {"precision": "fp32", "hardware_compatibility": "SAME_COMPUTE_CAPABILITY",
                                       "flags": ["VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME"], "tf32": False}
    assert build_trt.settings(params["trt"])["tf32"]  # fp16 plans may use TF32 where the graph keeps fp32


@pytest.mark.parametrize("change, message", [
    ({"precision": "int8"}, r"trt.precision is 'int8'; choose one of \['fp16', 'fp32'\]"),
    ({"hardware_compatibility": "hopper"}, r"trt.hardware_compatibility is 'hopper'; choose one of"),
    ({"exclude_lean_runtime": True}, r"exclude_lean_runtime needs trt.version_compatible: true"),
])
def test_bad_settings_are_refused_before_anything_is_built(change, message, params, tmp_path):
    cfg = {**params["trt"], "timing_cache": str(tmp_path / "caches"), **change}
    with pytest.raises(StageError, match=message):
        build_trt.run(cfg, tmp_path / "model.onnx", tmp_path / "trt")
    assert not (tmp_path / "trt").exists()
