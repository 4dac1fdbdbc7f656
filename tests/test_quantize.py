"""quantize.method: the weight-only (MatMulNBits) INT8 recipe and the method check."""

import copy
import json

import numpy as np
import onnx
import pytest

from conftest import build_bundle, fast_params
from sbert_bundle import Bundle
from stages import quantize
from stages.common import StageError


def test_weight_only_int8_is_matmulnbits_and_keeps_parity(tiny_model, params, tmp_path):
    p = fast_params(params)
    p["quantize"]["method"] = "weight_only"
    bundle = build_bundle(tiny_model, tmp_path, p, fp16=False, int8=True)

    graph = onnx.load(str(bundle / "onnx" / "model_int8.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert "MatMulNBits" in ops and "DynamicQuantizeMatMul" not in ops and "MatMulInteger" not in ops
    report = json.loads((tmp_path / "artifacts" / "int8" / "report.json").read_text())
    assert report["method"] == "weight_only" and report["matmul_nbits"] > 0
    assert report["weight_only"] == params["quantize"]["weight_only"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["variants"]["int8"]["quantization"]["method"] == "weight_only"

    sentences = ["a short one", "a somewhat longer sentence with more words in it", "x"]
    exact = Bundle.load(bundle, variant="fp32").encode(sentences)
    int8 = Bundle.load(bundle, variant="int8").encode(sentences)
    cos = (exact * int8).sum(1) / np.linalg.norm(exact, axis=1) / np.linalg.norm(int8, axis=1)
    assert cos.min() > 0.99


def test_unknown_method_is_one_line_naming_it(params, tmp_path):
    cfg = copy.deepcopy(params["quantize"])
    cfg["method"] = "static"
    (tmp_path / "model_fused.onnx").write_bytes(b"")
    with pytest.raises(StageError, match=r"quantize.method is 'static'; choose one of \['dynamic', 'weight_only'\]"):
        quantize.run(cfg, tmp_path, tmp_path, tmp_path)



@pytest.mark.parametrize("key, value", [("bits", 5), ("block_size", 7), ("accuracy_level", 9)])
def test_weight_only_setting_out_of_range_is_one_line_naming_it(params, tmp_path, key, value):
    cfg = copy.deepcopy(params["quantize"])
    cfg["method"] = "weight_only"
    cfg["weight_only"][key] = value
    out = tmp_path / "int8"
    out.mkdir()
    with pytest.raises(StageError, match=rf"quantize.weight_only.{key} is {value}; choose one of \["):
        quantize.weight_only(cfg, tmp_path / "model_fused.onnx", out / "model_int8.onnx")
    assert not any(out.iterdir())
