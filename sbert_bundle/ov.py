"""OpenVINO on the CPU: the bundle's OpenVINO IR (openvino/model.xml + model.bin) under the same
tokenizer, batching and head as every other variant, so its parity rules are the same.

Optional: `pip install 'sbert-bundle[cpu,openvino]'`. Nothing imports openvino until a bundle with
an OpenVINO variant is placed or opened. A variant's `inference_precision` is OpenVINO's
INFERENCE_PRECISION_HINT: "f32" (exact; OpenVINO's default on bf16 CPUs is bf16, so it is always
set) or "bf16" (lossy; placed only where the CPU plugin lists native BF16, since elsewhere OpenVINO
would quietly run f32 under that name).
"""

from __future__ import annotations

import functools
import importlib.util
import queue
import re
from pathlib import Path

import numpy as np

from .errors import BackendError, first_line

INSTALL_HINT = "pip install 'sbert-bundle[cpu,openvino]'"
INFERENCE_PRECISIONS = ("f32", "bf16")
INPUTS = {"input_ids", "attention_mask", "token_type_ids"}
_SOURCE_LOCATION = re.compile(r"(Exception from )?src/[\w/.+-]+:\d+:\s*")


def installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


@functools.lru_cache(maxsize=1)
def cpu_capabilities() -> tuple[str, ...]:
    """OpenVINO's CPU plugin OPTIMIZATION_CAPABILITIES here (FP32, BF16, INT8, ...)."""
    import openvino

    return tuple(openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def place(variant: dict) -> tuple[str | None, str]:
    """("cpu", "") when this OpenVINO variant runs here, else (None, why)."""
    if variant.get("devices", ["cpu"]) != ["cpu"]:
        return None, f"OpenVINO variants run on the CPU only, not {variant.get('devices')!r}"
    if not installed():
        return None, f"openvino is not installed ({INSTALL_HINT})"
    precision = variant.get("inference_precision")
    if precision not in INFERENCE_PRECISIONS:
        return None, f"unknown OpenVINO inference precision {precision!r}"
    if precision == "bf16":
        caps = cpu_capabilities()
        if "BF16" not in caps:
            return None, (f"this CPU has no native bf16 (OpenVINO's CPU plugin offers {', '.join(caps)}); "
                          "bf16 would run as f32 here")
    return "cpu", ""


class OvBackend:
    """A compiled OpenVINO model. `run` is safe from several threads: each call takes an idle infer
    request (one is made per concurrent caller, then reused)."""

    def __init__(self, xml: Path, weights: Path, inference_precision: str, threads: int | None = None):
        import openvino

        self.path = Path(xml)
        config = {"INFERENCE_PRECISION_HINT": inference_precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            core = openvino.Core()
            self.compiled = core.compile_model(core.read_model(str(xml), str(weights)), "CPU", config)
        except RuntimeError as e:  # OpenVINO's exceptions are RuntimeErrors
            raise BackendError(f"{xml}: OpenVINO could not load it ({openvino_message(e)})") from None
        self.input_names = [port.get_any_name() for port in self.compiled.inputs]
        unknown = set(self.input_names) - INPUTS
        if unknown:
            raise ValueError(f"{xml} takes inputs {sorted(unknown)} that the tokenizer does not produce")
        self.idle: queue.SimpleQueue = queue.SimpleQueue()

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        try:
            request = self.idle.get_nowait()
        except queue.Empty:
            request = self.compiled.create_infer_request()
        try:  # share_outputs=False (the default): the result is a copy, not the request's buffer
            out = request.infer({name: inputs[name] for name in self.input_names})[0]
        except RuntimeError as e:
            raise BackendError(f"{self.path}: OpenVINO could not run it ({openvino_message(e)})") from None
        finally:
            self.idle.put(request)
        return out.astype(np.float32, copy=False)


def openvino_message(error: BaseException) -> str:
    """OpenVINO's messages start with lines of source locations: keep the first that says something."""
    text = _SOURCE_LOCATION.sub("", str(error))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else first_line(error))[:300]
