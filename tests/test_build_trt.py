"""build_trt: profile checks, the recorded skip, and (where TensorRT and a GPU exist) a real plan."""

import json

import numpy as np
import pytest

from conftest import SENTENCES
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
def test_skip_is_recorded_with_its_reason(tmp_path, params):
    cfg = {**params["trt"], "timing_cache": str(tmp_path / "cache.bin")}
    record = build_trt.run(cfg, tmp_path / "model.onnx", tmp_path)
    assert record == {"skipped": True, "reason": WHY_NOT, "plans": []}
    assert json.loads((tmp_path / "build.json").read_text()) == record
    assert "TensorRT" in WHY_NOT or "GPU" in WHY_NOT
    assert (tmp_path / "cache.bin").exists()  # the persisted timing cache exists for the next build


@pytest.mark.tensorrt
@pytest.mark.skipif(TRT is None, reason=f"needs TensorRT and a CUDA GPU: {WHY_NOT}")
def test_plan_builds_runs_and_matches_onnxruntime(tiny_bundle, tmp_path, params):
    from sbert_bundle import Bundle
    from sbert_bundle.trt import TrtBackend

    cfg = {**params["trt"], "timing_cache": str(tmp_path / "cache.bin"),
           "profiles": {"small": {"min": [1, 1], "opt": [4, 16], "max": [16, 64], "per_input": {}}}}
    record = build_trt.run(cfg, tiny_bundle / "onnx" / "model_fp16.onnx", tmp_path)  # fp16: strongly typed
    plan = record["plans"][0]
    assert plan["metadata"]["tensorrt_version"] == TRT.__version__
    assert plan["metadata"]["source_graph"] == "model_fp16.onnx" and plan["metadata"]["strongly_typed"]
    assert (tmp_path / "cache.bin").stat().st_size > 0
    ort = Bundle.load(tiny_bundle, variant="fp32")
    features = ort.tokenizer(SENTENCES[:4])
    trt_out = TrtBackend(tmp_path / plan["file"], {"tensorrt": plan["metadata"]})(features)
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
    cfg = {**params["trt"], "timing_cache": str(tmp_path / "cache.bin"), **change}
    with pytest.raises(StageError, match=message):
        build_trt.run(cfg, tmp_path / "model.onnx", tmp_path)
    assert not (tmp_path / "build.json").exists()
