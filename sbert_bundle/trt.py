"""TensorRT backend: run a plan built by `stages.build_trt` (optional: TensorRT + cuda-python).

A plan only runs on the GPU model and TensorRT version it was built for, unless it was built
hardware-compatible (Ampere or newer, or the same compute capability) or version-compatible
(that TensorRT version or any later one); `plan_compatibility` checks that before loading.
A bundle holds one plan per GPU target (`target`, `compute_capability` in its manifest entry):
`target_choice` says, from the GPU's compute capability alone, which plan is the one for it.
Runtimes, on a GPU machine:
  pip install tensorrt-cu13 cuda-python           full TensorRT (NVIDIA's index serves its libraries)
  pip install tensorrt-lean-cu13==V cuda-python   the lean runtime, from PyPI: runs version-compatible
                                                  plans (trt.version_compatible: true) built by V
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import numpy as np


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


def _check(result, doing: str = ""):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {getattr(err, 'name', err)} ({int(err)})" + (f" in {doing}" if doing else ""))
    return rest[0] if len(rest) == 1 else rest


def gpu_here(device_id: int = 0) -> dict:
    """Name and compute capability of CUDA device `device_id` (as CUDA numbers them here)."""
    cudart = _cudart()
    count = _check(cudart.cudaGetDeviceCount())
    if count < 1:
        raise RuntimeError("no CUDA device")
    if not 0 <= device_id < count:
        raise RuntimeError(f"no CUDA device {device_id}: this machine has {count} (0 to {count - 1})")
    props = _check(cudart.cudaGetDeviceProperties(device_id))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {"gpu": name.strip("\x00 "), "compute_capability": f"{props.major}.{props.minor}"}


def sm(capability) -> str:
    """"9.0" -> "sm_90", as CUDA names architectures."""
    return "sm_" + str(capability).replace(".", "")


def target_choice(variant: dict, capability: str | None, gpu: str = "") -> tuple[bool, str]:
    """Whether a TensorRT plan is the one for a GPU of compute capability `capability` (None: no
    CUDA GPU here). Pure: the caller asks the GPU (`gpu_here`); gpu names it in the reason.

    (True, "")     its target has this compute capability: a candidate for variant=None
    (True, note)   built for another one, hardware-compatible (Ampere or newer) and this GPU is too:
                   runs, but only when named (the target's own plan is the one tuned for this GPU)
    (False, why)   not for this GPU"""
    built = variant.get("compute_capability") or variant.get("tensorrt", {}).get("compute_capability")
    if capability is None:
        return False, "no CUDA GPU"
    if built == capability:
        return True, ""
    here = f"this GPU is {sm(capability)}" + (f" ({gpu})" if gpu else "")
    why = f"built for {sm(built)} ({variant.get('target', 'no target')}), {here}"
    if variant.get("tensorrt", {}).get("hardware_compatibility") == "AMPERE_PLUS" and _version(capability) >= (8, 0):
        return True, f"{why}; hardware-compatible, so used only when named"
    return False, why


def select_plans(variants: dict[str, dict], capability: str | None) -> dict[str, str]:
    """{TensorRT plan: "" when it is a candidate for variant=None on a GPU of this compute
    capability, else why not}, for every plan of a manifest's variants. Pure."""
    return {name: target_choice(v, capability)[1] for name, v in variants.items() if v.get("backend") == "tensorrt"}


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


def plan_compatibility(variant: dict, device_id: int = 0) -> tuple[str | None, str]:
    """("cuda", "") when the plan can run here on CUDA device `device_id` and is the plan for its
    compute capability; ("cuda", note) when it runs only if named; else (None, reason)."""
    meta = variant.get("tensorrt", {})
    trt, why = load_tensorrt(meta)
    if trt is None:
        return None, why
    try:
        here = gpu_here(device_id)
    except ImportError:
        return None, "cuda-python is not installed here (pip install cuda-python): the TensorRT backend needs it"
    except Exception as e:  # noqa: BLE001 - no driver or no device
        return None, f"no usable CUDA GPU ({type(e).__name__}: {e})"
    fits, note = target_choice(variant, here["compute_capability"], here["gpu"])
    if not fits:
        return None, note
    problem = version_problem(str(meta.get("tensorrt_version", "?")), trt.__version__, meta.get("flags", []),
                              lean=trt.__name__.startswith("tensorrt_lean"))
    if problem:
        return None, problem
    if note:
        return "cuda", note
    # the compute capability is the target's (target_choice); a plain plan also needs that very GPU model
    level = meta.get("hardware_compatibility", "NONE")
    if level not in ("AMPERE_PLUS", "SAME_COMPUTE_CAPABILITY") and here["gpu"] != meta.get("gpu"):
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


def pick_profile(profiles: list[list[tuple]], shape: tuple[int, ...]) -> int | None:
    """The optimization profile to run `shape` with: of those whose min..max holds it for every
    input, the one whose opt shape is closest above it (TensorRT tuned its kernels for opt: an
    8x128 batch belongs on the 8x128 profile, not on a 1x16 one that merely allows it); if no opt
    shape holds it, the largest one. profiles: per profile, per input, (min, opt, max). None if
    none fits."""
    best = None
    for idx, inputs in enumerate(profiles):
        if not all(all(lo <= s <= hi for lo, s, hi in zip(mn, shape, mx)) for mn, _, mx in inputs):
            continue
        covers = all(all(s <= o for s, o in zip(shape, opt)) for _, opt, _ in inputs)
        volume = max(int(np.prod(opt)) for _, opt, _ in inputs)
        key = (0, volume) if covers else (1, -volume)
        if best is None or key < best[0]:
            best = (key, idx)
    return None if best is None else best[1]


def host_array(ptr: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A numpy array of `shape` and `dtype` over host memory at `ptr` (a pinned buffer): no copy."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_byte * nbytes).from_address(ptr), dtype=dtype).reshape(shape)


class TrtBackend:
    """Deserialize a plan, pick the optimization profile by input shape, run on device buffers.

    The TensorRT runtime and its logger live as long as the backend (an engine must not outlive
    the runtime that deserialized it). Copies between host and GPU go through pinned host buffers
    (cudaMallocHost), grown as needed and freed by `close` with the device buffers and stream.
    device_id: the CUDA device the plan runs on (set for every call, whichever thread makes it).
    """

    def __init__(self, path: Path, variant: dict, device_id: int = 0):
        flags = variant.get("tensorrt", {}).get("flags", [])
        trt, why = load_tensorrt(variant.get("tensorrt", {}))
        if trt is None:
            raise RuntimeError(why)
        self.trt, self.path, self.device_id = trt, Path(path), device_id
        self.cudart = _cudart()
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self.host: dict[str, tuple[int, int]] = {}     # name -> (pinned host pointer, bytes)
        self.stream = self.context = self.engine = None
        _check(self.cudart.cudaSetDevice(device_id), f"cudaSetDevice({device_id})")
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        if "VERSION_COMPATIBLE" in flags and "EXCLUDE_LEAN_RUNTIME" not in flags:
            self.runtime.engine_host_code_allowed = True  # the plan embeds the lean runtime it was built with
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {path}")
        self.context = self.engine.create_execution_context()
        if self.context is None:  # its activation memory did not fit: usually the largest profile
            raise RuntimeError(f"TensorRT could not create an execution context for {path} on GPU {device_id}: it "
                               f"needs {self.engine.device_memory_size_v2 / 2**20:.0f} MiB of free GPU memory "
                               "(free some, or build with smaller profiles: conf/trt profiles)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        # per profile, per input, its (min, opt, max) shapes: read once, used on every call
        self.profiles = [[tuple(tuple(int(d) for d in dims) for dims in self.engine.get_tensor_profile_shape(n, idx))
                          for n in self.input_names]
                         for idx in range(self.engine.num_optimization_profiles)]
        self.stream = _check(self.cudart.cudaStreamCreate())
        self.profile = -1
        self.lock = threading.Lock()  # one execution context: calls take turns

    def _pick_profile(self, shape: tuple[int, int]) -> int | None:
        return pick_profile(self.profiles, shape)

    def close(self) -> None:
        """Free the execution context and engine, then the device and pinned buffers and the stream
        (also on garbage collection). The backend cannot run after."""
        cudart = self.cudart
        if getattr(self, "stream", None) is not None:
            cudart.cudaStreamSynchronize(self.stream)
        self.context = self.engine = None  # before the runtime, and before the memory they point at
        for ptr, _ in self.buffers.values():
            cudart.cudaFree(ptr)
        for ptr, _ in self.host.values():
            cudart.cudaFreeHost(ptr)
        self.buffers, self.host = {}, {}
        if getattr(self, "stream", None) is not None:
            cudart.cudaStreamDestroy(self.stream)
            self.stream = None
        self.runtime = None

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
            ptr = _check(self.cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes}) for {name}")
            self.buffers[name] = (ptr, nbytes)
        return ptr

    def _pinned(self, name: str, nbytes: int) -> int:
        """A page-locked host buffer of at least nbytes for tensor `name` (copies from it are async and fast)."""
        ptr, size = self.host.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _check(self.cudart.cudaFreeHost(ptr))
            size = max(nbytes, 4096)
            ptr = _check(self.cudart.cudaMallocHost(size), f"cudaMallocHost({size}) for {name}")
            self.host[name] = (ptr, size)
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
            if self.context is None:
                raise RuntimeError(f"{self.path}: the TensorRT backend was closed")
            _check(cudart.cudaSetDevice(self.device_id), f"cudaSetDevice({self.device_id})")  # per thread
            profile = self._pick_profile(shape)
            if profile is None:
                raise ValueError(f"input shape {shape} fits none of the plan's optimization profiles")
            if profile != self.profile:
                if not self.context.set_optimization_profile_async(profile, self.stream):
                    raise RuntimeError(f"TensorRT refused optimization profile {profile}")
                self.profile = profile
            for name in self.input_names:
                arr = inputs[name]
                nbytes = arr.size * self.dtypes[name].itemsize
                host = self._pinned(name, nbytes)
                np.copyto(host_array(host, arr.shape, self.dtypes[name]), arr, casting="unsafe")  # int64 -> int32
                ptr = self._buffer(name, nbytes)
                _check(cudart.cudaMemcpyAsync(ptr, host, nbytes, h2d, self.stream))
                if not self.context.set_input_shape(name, arr.shape):
                    raise RuntimeError(f"TensorRT refused shape {arr.shape} for input {name} (profile {profile})")
                self.context.set_tensor_address(name, ptr)
            out_shape = tuple(self.context.get_tensor_shape(self.output_name))
            out_dtype = self.dtypes[self.output_name]
            nbytes = int(np.prod(out_shape)) * out_dtype.itemsize
            out_ptr = self._buffer(self.output_name, nbytes)
            self.context.set_tensor_address(self.output_name, out_ptr)
            if not self.context.execute_async_v3(self.stream):
                raise RuntimeError("TensorRT execution failed")
            host = self._pinned(self.output_name, nbytes)
            _check(cudart.cudaMemcpyAsync(host, out_ptr, nbytes, d2h, self.stream))
            _check(cudart.cudaStreamSynchronize(self.stream))
            # a copy: the pinned buffer is reused by the next call
            return np.array(host_array(host, out_shape, out_dtype), dtype=np.float32)
