"""Backends that run the Transformer graph of a bundle variant.

Each backend takes the tokenizer's arrays by name and returns `last_hidden_state` as
float32 (batch, seq, hidden). `pick_device(variant)` says where a variant runs on this
machine and, when nowhere, why: `Bundle.load` uses it to pick a variant and to explain.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def _ort():
    import onnxruntime

    return onnxruntime


def ort_providers() -> list[str]:
    return _ort().get_available_providers()


def pick_device(variant: dict) -> tuple[str | None, str]:
    """(device, "") for the first of the variant's devices that works here, else (None, reason)."""
    backend = variant.get("backend")
    if backend == "onnxruntime":
        reasons = []
        for device in variant.get("devices", ["cpu"]):
            if device == "cpu":
                return "cpu", ""
            if device == "cuda" and "CUDAExecutionProvider" in ort_providers():
                return "cuda", ""
            reasons.append("onnxruntime has no CUDAExecutionProvider here (on a machine with an NVIDIA GPU: "
                           "pip install onnxruntime-gpu)" if device == "cuda" else f"unknown device {device!r}")
        return None, "; ".join(reasons)
    if backend == "tensorrt":
        from .trt import plan_compatibility

        return plan_compatibility(variant)
    return None, f"unknown backend {backend!r}"


class OrtBackend:
    """onnxruntime InferenceSession on CPU or CUDA. `run` is safe to call from several threads."""

    def __init__(self, path: Path, device: str = "cpu", threads: int | None = None):
        ort = _ort()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = self.session.get_outputs()[0].name
        unknown = set(self.input_names) - {"input_ids", "attention_mask", "token_type_ids"}
        if unknown:
            raise ValueError(f"{path} takes inputs {sorted(unknown)} that the tokenizer does not produce")

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        feed = {name: inputs[name] for name in self.input_names}
        out = self.session.run([self.output_name], feed)[0]
        return out.astype(np.float32, copy=False)


def open_backend(root: Path, variant: dict, device: str, threads: int | None = None):
    if variant["backend"] == "onnxruntime":
        return OrtBackend(root / variant["file"], device, threads)
    if variant["backend"] == "tensorrt":
        from .trt import TrtBackend

        return TrtBackend(root / variant["file"], variant)
    raise ValueError(f"unknown backend {variant['backend']!r}")
