"""Backends that run the Transformer graph of a bundle variant.

Each backend takes the tokenizer's arrays by name and returns `last_hidden_state` as
float32 (batch, seq, hidden). `pick_device(variant)` says where a variant runs on this
machine and, when nowhere, why: `Bundle.load` uses it to pick a variant and to explain.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def _ort():
    import onnxruntime

    return onnxruntime


class BackendError(RuntimeError):
    """onnxruntime could not load or run a variant's graph; one line naming the file."""


# onnxruntime's own exception types derive from Exception, not from RuntimeError or OSError.
_ORT_ERRORS = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
               "InvalidProtobuf", "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail")


def ort_errors() -> tuple[type[BaseException], ...]:
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(getattr(state, name) for name in _ORT_ERRORS if hasattr(state, name))


def backend_error(path: Path, doing: str, error: BaseException) -> BackendError:
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    return BackendError(f"{path}: onnxruntime could not {doing} it ({first[:300]})")


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
        self.path = Path(path)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except ort_errors() as e:
            raise backend_error(self.path, "load", e) from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = self.session.get_outputs()[0].name
        unknown = set(self.input_names) - {"input_ids", "attention_mask", "token_type_ids"}
        if unknown:
            raise ValueError(f"{path} takes inputs {sorted(unknown)} that the tokenizer does not produce")

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        feed = {name: inputs[name] for name in self.input_names}
        try:
            out = self.session.run([self.output_name], feed)[0]
        except ort_errors() as e:
            raise backend_error(self.path, "run", e) from None
        return out.astype(np.float32, copy=False)


def pick_bucket(buckets: list[tuple[int, int]], batch: int, length: int) -> tuple[int, int] | None:
    """Smallest [batch, length] bucket holding the batch, unless padding to it would more than
    double the work (then None: run without a CUDA graph)."""
    fits = [(b * n, (b, n)) for b, n in buckets if b >= batch and n >= length]
    if not fits or min(fits)[0] > 2 * batch * length:
        return None
    return min(fits)[1]


class OrtCudaBackend:
    """onnxruntime CUDA with IO binding: inputs and outputs live in device buffers bound once.

    With `buckets` (a list of [batch, length]), each batch is padded up to the smallest bucket
    that holds it (padding is masked, so valid tokens are unchanged) and the bucket's run is
    captured once as a CUDA graph and replayed after (run option gpu_graph_id); a batch larger
    than every bucket runs without a graph. onnxruntime keeps CUDA graphs per thread, so every
    run happens on one worker thread: graphs are captured once, and calls from several threads
    take turns. If a capture fails, the session is rebuilt without graphs. fp32 graphs run
    without TF32 (onnxruntime's CUDA default), so that they match the fp32 reference.
    device="cpu" runs the same binding and bucketing on the CPU provider, without graphs: tests
    use it to check this path on machines without a GPU.
    """

    def __init__(self, path: Path, buckets: list[list[int]] | None = None, pad_id: int = 0, device: str = "cuda",
                 tf32: bool = True):
        ort = _ort()
        self.ort, self.path, self.pad_id, self.device, self.tf32 = ort, Path(path), pad_id, device, tf32
        self.buckets = sorted((int(b), int(n)) for b, n in buckets or [])
        if device != "cuda":
            self.session = ort.InferenceSession(str(path), self._options(), providers=["CPUExecutionProvider"])
        else:
            try:
                self.session = self._cuda_session(graphs=bool(self.buckets))
            except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
                if not self.buckets:
                    raise
                # CUDA graphs need every node on the CUDA provider; some graphs keep a few on the CPU
                self._without_graphs(f"the session could not be built with them ({e})")
            if "CUDAExecutionProvider" not in self.session.get_providers():
                raise RuntimeError(f"onnxruntime could not start its CUDA provider for {path}")
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = self.session.get_outputs()[0].name
        self.hidden = self.session.get_outputs()[0].shape[-1]
        if not isinstance(self.hidden, int):  # symbolic: output buffers cannot be preallocated
            self.buckets = []
        self.bound: dict[tuple[int, int], tuple] = {}  # bucket -> (binding, inputs, output, run options)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sbert-bundle-ort")

    def _options(self):
        options = self.ort.SessionOptions()
        options.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return options

    def _cuda_session(self, graphs: bool):
        if hasattr(self.ort, "preload_dlls"):  # onnxruntime >= 1.21: CUDA / cuDNN from the nvidia-* wheels,
            self.ort.preload_dlls()            # as `import torch` first would (a no-op where torch did)
        cuda = ("CUDAExecutionProvider", {"enable_cuda_graph": "1" if graphs else "0",
                                          "use_tf32": "1" if self.tf32 else "0"})
        return self.ort.InferenceSession(str(self.path), self._options(), providers=[cuda, "CPUExecutionProvider"])

    def _without_graphs(self, why: str) -> None:
        log.warning("%s: CUDA graphs off: %s", self.path, why)
        self.buckets, self.bound = [], {}
        self.session = self._cuda_session(graphs=False)

    def _bind(self, bucket: tuple[int, int]):
        ort = self.ort
        binding = self.session.io_binding()
        inputs = {name: ort.OrtValue.ortvalue_from_shape_and_type(list(bucket), np.int64, self.device, 0)
                  for name in self.input_names}
        output = ort.OrtValue.ortvalue_from_shape_and_type([*bucket, self.hidden], np.float32, self.device, 0)
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_ortvalue_output(self.output_name, output)
        run_options = ort.RunOptions()
        run_options.add_run_config_entry("gpu_graph_id", str(len(self.bound) + 1))
        self.bound[bucket] = (binding, inputs, output, run_options)
        return self.bound[bucket]

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.worker.submit(self._run, inputs).result()

    def _run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        batch, length = inputs["input_ids"].shape
        bucket = pick_bucket(self.buckets, batch, length)
        if bucket is not None:
            try:
                return self._run_bucket(bucket, inputs)
            except Exception as e:  # noqa: BLE001 - a graph capture broken by other CUDA work, for example
                if self.device != "cuda":
                    raise
                self._without_graphs(f"running bucket {list(bucket)} failed ({e})")
        binding = self.session.io_binding()  # no graph: bind this batch's own buffers
        for name in self.input_names:
            binding.bind_ortvalue_input(name, self.ort.OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(inputs[name], dtype=np.int64), self.device, 0))
        binding.bind_output(self.output_name, self.device)
        run_options = self.ort.RunOptions()
        run_options.add_run_config_entry("gpu_graph_id", "-1")
        self.session.run_with_iobinding(binding, run_options)
        return binding.copy_outputs_to_cpu()[0].astype(np.float32, copy=False)

    def _run_bucket(self, bucket: tuple[int, int], inputs: dict[str, np.ndarray]) -> np.ndarray:
        batch, length = inputs["input_ids"].shape
        binding, bound_inputs, output, run_options = self.bound.get(bucket) or self._bind(bucket)
        for name in self.input_names:  # masked padding: attention_mask is 0 there
            padded = np.full(bucket, self.pad_id if name == "input_ids" else 0, dtype=np.int64)
            padded[:batch, :length] = inputs[name]
            bound_inputs[name].update_inplace(padded)
        self.session.run_with_iobinding(binding, run_options)
        out = output.numpy()[:batch, :length]  # from CUDA: a fresh host copy
        return out.copy() if self.device == "cpu" else out  # a CPU buffer is reused by the next call


def open_backend(root: Path, variant: dict, device: str, threads: int | None = None,
                 cuda_graph_buckets: list[list[int]] | None = None, pad_id: int = 0):
    if variant["backend"] == "onnxruntime":
        if device == "cuda":
            return OrtCudaBackend(root / variant["file"], cuda_graph_buckets, pad_id,
                                  tf32=variant.get("precision") != "fp32")
        return OrtBackend(root / variant["file"], device, threads)
    if variant["backend"] == "tensorrt":
        from .trt import TrtBackend

        return TrtBackend(root / variant["file"], variant)
    raise ValueError(f"unknown backend {variant['backend']!r}")
