"""Backends that run the Transformer graph of a bundle variant: onnxruntime (CPU, CUDA), TensorRT
(`trt`), OpenVINO (`ov`, CPU).

Each backend takes the tokenizer's arrays by name and returns `last_hidden_state` as
float32 (batch, seq, hidden). `pick_device(variant)` says where a variant runs on this
machine and, when nowhere, why: `Bundle.load` uses it to pick a variant and to explain.

onnxruntime comes in builds that all install the same `onnxruntime` module (onnxruntime for
the CPU, onnxruntime-gpu for CUDA, ...): exactly one may be installed, and the runtime checks
that before its first use (`onnxruntime_install_problem`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import itertools
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .errors import BackendError
from .errors import first_line as _first_line

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'sbert-bundle[cpu]', or 'sbert-bundle[gpu]' on a machine with an NVIDIA GPU"


class InstallError(ImportError):
    """onnxruntime is missing, or two of its builds share one `onnxruntime` folder; says the fix."""


def onnxruntime_builds() -> tuple[list[tuple[str, str]], Path | None]:
    """([(distribution, version)], folder) of the installed builds that provide the `onnxruntime`
    module Python imports here (those whose files are in that very folder), and the folder.
    A build installed elsewhere on the path but shadowed by this one is not counted."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return [], None
    folder = Path(list(spec.submodule_search_locations)[0]).resolve()
    owners = set()
    for dist in importlib.metadata.distributions(path=[str(folder.parent)]):  # only that site folder: fast
        name = dist.metadata["Name"] or ""
        top = (dist.read_text("top_level.txt") or "").split()
        if "onnxruntime" in top or (not top and name.lower().replace("_", "-").startswith(("onnxruntime", "ort-"))
                                    and any(f.parts[:1] == ("onnxruntime",) for f in dist.files or [])):
            owners.add((name, dist.version))
    return sorted(owners), folder


def onnxruntime_install_problem() -> str:
    """"" when exactly one onnxruntime build provides the module, else one line: what is wrong and the fix."""
    builds, folder = onnxruntime_builds()
    if folder is None:
        return f"onnxruntime is not installed: {INSTALL_HINT}"
    if len(builds) < 2:
        return ""
    names = [n for n, _ in builds]
    listed = " and ".join(f"{n} {v}" for n, v in builds)
    accelerated = [(n, v) for n, v in builds if n.lower() != "onnxruntime"]
    keep_name, keep_version = accelerated[0] if accelerated else builds[0]
    cpu = dict(builds).get("onnxruntime")
    alternative = (f" (on a machine without an NVIDIA GPU: pip uninstall -y {' '.join(names)} && "
                   f"pip install onnxruntime=={cpu})"
                   if cpu and keep_name.lower() != "onnxruntime" else "")
    return (f"{listed} are both installed in {folder.parent} and share its onnxruntime/ folder: each overwrote "
            f"the other's files, so its providers (CUDA among them) may be missing or broken. Keep exactly one: "
            f"pip uninstall -y {' '.join(names)} && pip install {keep_name}=={keep_version}{alternative}")


_INSTALL_CHECKED = False


def _ort():
    global _INSTALL_CHECKED
    if not _INSTALL_CHECKED:
        problem = onnxruntime_install_problem()
        if problem:
            raise InstallError(problem)
        _INSTALL_CHECKED = True
    import onnxruntime

    return onnxruntime


# onnxruntime's own exception types derive from Exception, not from RuntimeError or OSError.
_ORT_ERRORS = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
               "InvalidProtobuf", "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail")


def ort_errors() -> tuple[type[BaseException], ...]:
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(getattr(state, name) for name in _ORT_ERRORS if hasattr(state, name))


def backend_error(path: Path, doing: str, error: BaseException) -> BackendError:
    return BackendError(f"{path}: onnxruntime could not {doing} it ({_first_line(error)})")


def ort_providers() -> list[str]:
    return _ort().get_available_providers()


def pick_device(variant: dict, device_id: int = 0) -> tuple[str | None, str]:
    """(device, "") for the first of the variant's devices that works here, else (None, reason).
    device_id: the CUDA device a GPU variant would run on (TensorRT plans are checked against it)."""
    backend = variant.get("backend")
    if backend == "onnxruntime":
        devices = variant.get("devices", ["cpu"])
        for device in devices:
            if device == "cpu":
                return "cpu", ""
            if device == "cuda" and "CUDAExecutionProvider" in ort_providers():
                return "cuda", ""
        # only now the reasons: _no_cuda_provider reads the installed packages' metadata
        return None, "; ".join(_no_cuda_provider() if d == "cuda" else f"unknown device {d!r}" for d in devices)
    if backend == "tensorrt":
        from .trt import plan_compatibility

        return plan_compatibility(variant, device_id)
    if backend == "openvino":
        from .ov import place

        return place(variant)
    return None, f"unknown backend {backend!r}"


def _no_cuda_provider() -> str:
    builds, _ = onnxruntime_builds()
    build = ", ".join(f"{n} {v}" for n, v in builds) or "an unrecorded build"
    fix = ("pip uninstall -y onnxruntime && pip install onnxruntime-gpu" if [n for n, _ in builds] == ["onnxruntime"]
           else "pip install 'sbert-bundle[gpu]'")
    return f"onnxruntime has no CUDAExecutionProvider here ({build}; on a machine with an NVIDIA GPU: {fix})"


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


# onnxruntime's type strings (NodeArg.type) as numpy dtypes, for the buffers bound to a graph
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def graph_dtype(path: Path, arg) -> type:
    """The numpy dtype of a graph input or output (onnxruntime NodeArg)."""
    if arg.type not in _ORT_DTYPES:
        raise BackendError(f"{path}: {arg.name} is {arg.type}; the CUDA backend binds only "
                           f"{', '.join(sorted(_ORT_DTYPES))}")
    return _ORT_DTYPES[arg.type]


class OrtCudaBackend:
    """onnxruntime CUDA with IO binding: inputs and outputs live in device buffers bound once.

    With `buckets` (a list of [batch, length]), each batch is padded up to the smallest bucket
    that holds it (padding is masked, so valid tokens are unchanged) and the bucket's run is
    captured once as a CUDA graph and replayed after (run option gpu_graph_id: onnxruntime's
    first run with a new id does its warm-up run and the capture, so a bucket whose first run
    succeeded is captured); a batch larger than every bucket runs without a graph.

    Graph state is observable: `captured` (buckets whose graph was captured), `failed` (bucket ->
    why it runs without a graph), `graph_status()` (every bucket's state). A bucket whose run fails
    while the same batch runs without a graph is disabled alone, with one warning naming it; a
    batch that fails both ways is the input's fault and disables nothing (its error is raised).
    If the session cannot be built with graphs at all (some nodes on the CPU), every bucket is
    marked failed with that reason and the session runs without graphs.

    The buffers take the graph's dtypes (an fp16 output binds an fp16 buffer; results are
    float32). onnxruntime keeps CUDA graphs per thread, so every run happens on one worker
    thread: graphs are captured once, and calls from several threads take turns. fp32 graphs run
    without TF32 (tf32=False), so that they match the fp32 reference. device_id: the CUDA device.
    device="cpu" runs the same binding and bucketing on the CPU provider, without graphs: tests
    use it to check this path on machines without a GPU.
    """

    def __init__(self, path: Path, buckets: list[list[int]] | None = None, pad_id: int = 0, device: str = "cuda",
                 tf32: bool = True, device_id: int = 0):
        ort = _ort()
        self.ort, self.path, self.pad_id, self.device, self.tf32 = ort, Path(path), pad_id, device, tf32
        self.device_id = device_id
        self.buckets = sorted((int(b), int(n)) for b, n in buckets or [])
        self.captured: set[tuple[int, int]] = set()
        self.failed: dict[tuple[int, int], str] = {}
        self.graphs = device == "cuda" and bool(self.buckets)  # the session was built with CUDA graphs on
        if device != "cuda":
            self.session = self._session(["CPUExecutionProvider"])
        else:
            try:
                self.session = self._cuda_session(graphs=self.graphs)
            except BackendError as e:
                if not self.graphs:
                    raise
                # CUDA graphs need every node on the CUDA provider; some graphs keep a few on the CPU
                self.graphs = False
                self._fail(self.buckets, f"the session could not be built with CUDA graphs ({e})")
                self.session = self._cuda_session(graphs=False)
            if "CUDAExecutionProvider" not in self.session.get_providers():
                raise BackendError(f"{path}: onnxruntime could not start its CUDA provider on device {device_id} "
                                   f"(it runs {self.session.get_providers()})")
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.input_dtypes = {i.name: graph_dtype(self.path, i) for i in self.session.get_inputs()}
        output = self.session.get_outputs()[0]
        self.output_name, self.output_dtype, self.hidden = output.name, graph_dtype(self.path, output), output.shape[-1]
        if not isinstance(self.hidden, int):  # symbolic: output buffers cannot be preallocated
            self._fail(self.buckets, f"the graph's output {self.output_name} has a symbolic last dimension")
        self.bound: dict[tuple[int, int], tuple] = {}  # bucket -> (binding, inputs, output, run options)
        self.graph_ids = itertools.count(1)  # a fresh gpu_graph_id for every binding of this session
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sbert-bundle-ort")

    def _session(self, providers):
        options = self.ort.SessionOptions()
        options.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            return self.ort.InferenceSession(str(self.path), options, providers=providers)
        except ort_errors() as e:
            raise backend_error(self.path, "load", e) from None

    def _cuda_session(self, graphs: bool):
        if hasattr(self.ort, "preload_dlls"):  # onnxruntime >= 1.21: CUDA / cuDNN from the nvidia-* wheels,
            self.ort.preload_dlls()            # as `import torch` first would (a no-op where torch did)
        cuda = ("CUDAExecutionProvider", {"device_id": str(self.device_id),
                                          "enable_cuda_graph": "1" if graphs else "0",
                                          "use_tf32": "1" if self.tf32 else "0"})
        return self._session([cuda, "CPUExecutionProvider"])

    def _fail(self, buckets, why: str) -> None:
        new = [b for b in buckets if b not in self.failed]
        for bucket in new:
            self.failed[bucket] = why
        if new:
            log.warning("%s: %s without a CUDA graph: %s", self.path,
                        f"bucket {'x'.join(map(str, new[0]))} runs" if len(new) == 1 else
                        f"buckets {', '.join('x'.join(map(str, b)) for b in new)} run", why)

    def graph_status(self) -> dict[str, str]:
        """Every bucket ("BxN") and its state: captured, failed: why, bound (CPU provider: no
        graphs) or not run yet."""
        def state(bucket):
            if bucket in self.failed:
                return f"failed: {self.failed[bucket]}"
            if bucket in self.captured:
                return "captured"
            return "bound (no CUDA graphs on the CPU)" if bucket in self.bound else "not run yet"

        return {"x".join(map(str, b)): state(b) for b in self.buckets}

    def _bind(self, bucket: tuple[int, int]):
        ort = self.ort
        binding = self.session.io_binding()
        inputs = {name: ort.OrtValue.ortvalue_from_shape_and_type(list(bucket), self.input_dtypes[name], self.device,
                                                                  self.device_id)
                  for name in self.input_names}
        output = ort.OrtValue.ortvalue_from_shape_and_type([*bucket, self.hidden], self.output_dtype, self.device,
                                                           self.device_id)
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_ortvalue_output(self.output_name, output)
        run_options = ort.RunOptions()
        run_options.add_run_config_entry("gpu_graph_id", str(next(self.graph_ids)))
        self.bound[bucket] = (binding, inputs, output, run_options)
        return self.bound[bucket]

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.worker.submit(self._run, inputs).result()

    def _run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        batch, length = inputs["input_ids"].shape
        bucket = pick_bucket([b for b in self.buckets if b not in self.failed], batch, length)
        if bucket is None:
            return self._run_unbound(inputs)
        try:
            out = self._run_bucket(bucket, inputs)
        except Exception as e:  # noqa: BLE001 - onnxruntime's own types; a capture out of memory, for example
            why = f"its run failed ({_first_line(e)})"
        else:
            if self.graphs:
                self.captured.add(bucket)
            return out
        self.bound.pop(bucket, None)
        try:
            out = self._run_unbound(inputs)
        except BackendError:
            if self.device != "cuda":
                raise  # the batch fails without the bucket too: the input's fault, no bucket disabled
            self._rebuild()  # a failed capture can leave the session unusable: start a fresh one
            out = self._run_unbound(inputs)  # raises when the batch itself is at fault
        self._fail([bucket], why)
        return out

    def _rebuild(self) -> None:
        log.warning("%s: rebuilding the onnxruntime CUDA session after a failed run", self.path)
        self.session = self._cuda_session(graphs=self.graphs)
        self.bound, self.captured, self.graph_ids = {}, set(), itertools.count(1)

    def _run_unbound(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """No graph: bind this batch's own buffers."""
        ort = self.ort
        binding = self.session.io_binding()
        for name in self.input_names:
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(inputs[name], dtype=self.input_dtypes[name]), self.device, self.device_id))
        binding.bind_output(self.output_name, self.device, self.device_id)
        run_options = ort.RunOptions()
        run_options.add_run_config_entry("gpu_graph_id", "-1")
        try:
            self.session.run_with_iobinding(binding, run_options)
        except (RuntimeError, *ort_errors()) as e:  # run_with_iobinding raises RuntimeError
            raise backend_error(self.path, "run", e) from None
        return binding.copy_outputs_to_cpu()[0].astype(np.float32, copy=False)

    def _run_bucket(self, bucket: tuple[int, int], inputs: dict[str, np.ndarray]) -> np.ndarray:
        batch, length = inputs["input_ids"].shape
        binding, bound_inputs, output, run_options = self.bound.get(bucket) or self._bind(bucket)
        for name in self.input_names:  # masked padding: attention_mask is 0 there
            padded = np.full(bucket, self.pad_id if name == "input_ids" else 0, dtype=self.input_dtypes[name])
            padded[:batch, :length] = inputs[name]
            bound_inputs[name].update_inplace(padded)
        self.session.run_with_iobinding(binding, run_options)
        out = output.numpy()[:batch, :length]  # from CUDA: a fresh host copy; on the CPU the bound buffer,
        return out.astype(np.float32, copy=self.device != "cuda")  # which the next call overwrites


def open_backend(root: Path, variant: dict, device: str, threads: int | None = None,
                 cuda_graph_buckets: list[list[int]] | None = None, pad_id: int = 0, device_id: int = 0):
    if variant["backend"] == "onnxruntime":
        if device == "cuda":
            return OrtCudaBackend(root / variant["file"], cuda_graph_buckets, pad_id,
                                  tf32=variant.get("precision") != "fp32", device_id=device_id)
        return OrtBackend(root / variant["file"], device, threads)
    if variant["backend"] == "tensorrt":
        from .trt import TrtBackend

        return TrtBackend(root / variant["file"], variant, device_id)
    if variant["backend"] == "openvino":
        from .ov import OvBackend

        return OvBackend(root / variant["file"], root / variant["weights"], variant["inference_precision"], threads)
    raise ValueError(f"unknown backend {variant['backend']!r}")
