"""TensorRT backend: run a plan built by `stages.build_trt` (optional: TensorRT + cuda-python).

A plan only runs on the GPU model and TensorRT version it was built for, unless it was built
hardware-compatible (Ampere or newer, or the same compute capability) or version-compatible
(that TensorRT version or any later one); `plan_compatibility` checks that before loading.
Runtimes, on a GPU machine:
  pip install tensorrt-cu13 cuda-python           full TensorRT (NVIDIA's index serves its libraries)
  pip install tensorrt-lean-cu13==V cuda-python   the lean runtime, from PyPI: runs version-compatible
                                                  plans (trt.version_compatible: true) built by V
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {getattr(err, 'name', err)} ({int(err)})")
    return rest[0] if len(rest) == 1 else rest


def gpu_here() -> dict:
    cudart = _cudart()
    if _check(cudart.cudaGetDeviceCount()) < 1:
        raise RuntimeError("no CUDA device")
    props = _check(cudart.cudaGetDeviceProperties(0))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {"gpu": name.strip("\x00 "), "compute_capability": f"{props.major}.{props.minor}"}


def load_tensorrt(meta: dict):
    """(module, "") for the TensorRT runtime that can load this plan, else (None, reason)."""
    try:
        import tensorrt as trt

        return trt, ""
    except ImportError:
        pass
    try:
        import tensorrt_lean as trt
    except ImportError:
        return None, ("TensorRT is not installed here (on a GPU machine: pip install tensorrt-cu13 cuda-python, "
                      "or tensorrt-lean-cu13 for version-compatible plans)")
    if "VERSION_COMPATIBLE" not in meta.get("flags", []):
        return None, ("only the TensorRT lean runtime is installed, and it runs version-compatible plans only; "
                      "this plan is not (pip install tensorrt-cu13, or rebuild with trt.version_compatible: true)")
    return trt, ""


def plan_compatibility(variant: dict) -> tuple[str | None, str]:
    """("cuda", "") when the plan can run here, else (None, reason)."""
    meta = variant.get("tensorrt", {})
    trt, why = load_tensorrt(meta)
    if trt is None:
        return None, why
    try:
        here = gpu_here()
    except ImportError:
        return None, "cuda-python is not installed here (pip install cuda-python): the TensorRT backend needs it"
    except Exception as e:  # noqa: BLE001 - no driver or no device
        return None, f"no usable CUDA GPU ({type(e).__name__}: {e})"
    problem = version_problem(str(meta.get("tensorrt_version", "?")), trt.__version__, meta.get("flags", []),
                              lean=trt.__name__.startswith("tensorrt_lean"))
    if problem:
        return None, problem
    level = meta.get("hardware_compatibility", "NONE")
    if level == "AMPERE_PLUS":
        if _version(here["compute_capability"]) < (8, 0):
            return None, f"plan needs an Ampere or newer GPU, this is {here['gpu']} (sm {here['compute_capability']})"
    elif level == "SAME_COMPUTE_CAPABILITY":
        if here["compute_capability"] != meta.get("compute_capability"):
            return None, (f"plan built for compute capability {meta.get('compute_capability')}, "
                          f"this GPU is {here['gpu']} (sm {here['compute_capability']})")
    elif (here["gpu"], here["compute_capability"]) != (meta.get("gpu"), meta.get("compute_capability")):
        return None, (f"plan built for {meta.get('gpu')} (sm {meta.get('compute_capability')}), "
                      f"this GPU is {here['gpu']} (sm {here['compute_capability']})")
    return "cuda", ""


def version_problem(built: str, running: str, flags: list[str], lean: bool = False) -> str:
    """Why a plan built by TensorRT `built` cannot be deserialized by `running` ("" when it can).

    A version-compatible plan embeds the lean runtime it was built with and so runs on that
    version or any later one (TensorRT 10 plans on 11 too). Without that embedded runtime
    (EXCLUDE_LEAN_RUNTIME), and under the lean runtime itself, only the same version works."""
    if "VERSION_COMPATIBLE" in flags and "EXCLUDE_LEAN_RUNTIME" not in flags and not lean:
        if _version(running) < _version(built):
            return f"plan built with TensorRT {built} (version-compatible: that version or later), this is {running}"
        return ""
    if _version(running) != _version(built):
        why = (" (the lean runtime runs only plans built by its own version)" if lean else
               " (built without its lean runtime)" if "EXCLUDE_LEAN_RUNTIME" in flags else "")
        return f"plan built with TensorRT {built}, this is {running}{why}"
    return ""


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in str(text).split(".") if p.isdigit())


class TrtBackend:
    """Deserialize a plan, pick the optimization profile by input shape, run on device buffers."""

    def __init__(self, path: Path, variant: dict):
        flags = variant.get("tensorrt", {}).get("flags", [])
        trt, why = load_tensorrt(variant.get("tensorrt", {}))
        if trt is None:
            raise RuntimeError(why)
        self.trt = trt
        self.cudart = _cudart()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        if "VERSION_COMPATIBLE" in flags and "EXCLUDE_LEAN_RUNTIME" not in flags:
            runtime.engine_host_code_allowed = True  # the plan embeds the lean runtime it was built with
        self.engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {path}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        # per profile, the (min, max) shape of every input: read once, checked on every call
        self.ranges = [[(lo, hi) for lo, _, hi in (self.engine.get_tensor_profile_shape(n, idx)
                                                    for n in self.input_names)]
                       for idx in range(self.engine.num_optimization_profiles)]
        self.stream = _check(self.cudart.cudaStreamCreate())
        self.profile = -1
        self.lock = threading.Lock()  # one execution context: calls take turns
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)

    def _pick_profile(self, shape: tuple[int, int]) -> int | None:
        """The first profile whose min..max holds `shape` for every input (profiles may differ per input)."""
        for idx, inputs in enumerate(self.ranges):
            if all(all(a <= s <= b for a, s, b in zip(lo, shape, hi)) for lo, hi in inputs):
                return idx
        return None

    def close(self) -> None:
        """Free the device buffers and the stream (also on garbage collection)."""
        for ptr, _ in self.buffers.values():
            self.cudart.cudaFree(ptr)
        self.buffers = {}
        if getattr(self, "stream", None) is not None:
            self.cudart.cudaStreamDestroy(self.stream)
            self.stream = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - half-built backend, or cuda-python already unloaded at exit
            pass

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _check(self.cudart.cudaFree(ptr))
            ptr = _check(self.cudart.cudaMalloc(nbytes))
            self.buffers[name] = (ptr, nbytes)
        return ptr

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        batch = inputs["input_ids"].shape[0]
        if self._pick_profile(inputs["input_ids"].shape) is None and batch > 1:  # too many rows: halves
            half = batch // 2
            return np.concatenate([self({k: v[:half] for k, v in inputs.items()}),
                                   self({k: v[half:] for k, v in inputs.items()})])
        return self._run(inputs)

    def _run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        cudart = self.cudart
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        shape = inputs["input_ids"].shape
        with self.lock:
            profile = self._pick_profile(shape)
            if profile is None:
                raise ValueError(f"input shape {shape} fits none of the plan's optimization profiles")
            if profile != self.profile:
                if not self.context.set_optimization_profile_async(profile, self.stream):
                    raise RuntimeError(f"TensorRT refused optimization profile {profile}")
                self.profile = profile
            for name in self.input_names:
                arr = np.ascontiguousarray(inputs[name].astype(self.trt.nptype(self.engine.get_tensor_dtype(name))))
                ptr = self._buffer(name, arr.nbytes)
                _check(cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, self.stream))
                if not self.context.set_input_shape(name, arr.shape):
                    raise RuntimeError(f"TensorRT refused shape {arr.shape} for input {name} (profile {profile})")
                self.context.set_tensor_address(name, ptr)
            out_shape = tuple(self.context.get_tensor_shape(self.output_name))
            out = np.empty(out_shape, dtype=self.trt.nptype(self.engine.get_tensor_dtype(self.output_name)))
            out_ptr = self._buffer(self.output_name, out.nbytes)
            self.context.set_tensor_address(self.output_name, out_ptr)
            if not self.context.execute_async_v3(self.stream):
                raise RuntimeError("TensorRT execution failed")
            _check(cudart.cudaMemcpyAsync(out.ctypes.data, out_ptr, out.nbytes, d2h, self.stream))
            _check(cudart.cudaStreamSynchronize(self.stream))
        return out.astype(np.float32, copy=False)
