"""sbert_bundle.trt against the real TensorRT runtime API and cuda-python, without a GPU.

Where TensorRT (`tensorrt`, or the lean runtime `tensorrt_lean` that PyPI serves as
tensorrt-lean-cu13) and cuda-python are installed, every name the TensorRT backend calls must
exist in them: an API that TensorRT renamed or removed (TensorRT 11 dropped several) fails here
instead of on the first GPU machine. Building and running a plan needs a GPU: test_build_trt.py.
"""

import ast
import importlib
from pathlib import Path

import pytest

from sbert_bundle import trt as trt_backend


def _module(*names):
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


TRT = _module("tensorrt", "tensorrt_lean")
try:
    CUDART = trt_backend._cudart()
except ImportError:
    CUDART = None
needs_trt = pytest.mark.skipif(TRT is None, reason="neither tensorrt nor tensorrt_lean is installed "
                               "(pip install tensorrt-lean-cu13 gives the lean runtime from PyPI)")
needs_cudart = pytest.mark.skipif(CUDART is None, reason="cuda-python is not installed (pip install cuda-python)")


def attribute_chains(path: Path) -> set[tuple[str, ...]]:
    """Every dotted access a.b.c in the file, as ('a', 'b', 'c'), with `self.` dropped."""
    chains = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Attribute):
            continue
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name):
            parts.append(node.id)
            chain = tuple(reversed(parts))
            chains.add(chain[1:] if chain[0] == "self" else chain)
    return chains


def resolve(root, names):
    obj = root
    for name in names:
        obj = getattr(obj, name)
    return obj


@needs_trt
def test_every_tensorrt_name_the_backend_uses_exists():
    roots = {"trt": TRT, "runtime": TRT.Runtime, "engine": TRT.ICudaEngine, "context": TRT.IExecutionContext}
    used = [c for c in attribute_chains(Path(trt_backend.__file__)) if c[0] in roots and len(c) > 1]
    assert {c[0] for c in used} == set(roots), used  # the scan sees the backend's calls at all
    missing = []
    for chain in used:
        try:
            resolve(roots[chain[0]], chain[1:])
        except AttributeError:
            missing.append(".".join(chain))
    assert not missing, f"not in TensorRT {TRT.__version__} ({TRT.__name__}): {missing}"


@needs_cudart
def test_every_cuda_runtime_name_the_backend_uses_exists():
    used = [c for c in attribute_chains(Path(trt_backend.__file__)) if c[0] == "cudart" and len(c) > 1]
    assert len(used) >= 6, used
    missing = [".".join(c) for c in used if not hasattr(resolve(CUDART, c[1:-1]), c[-1])]
    assert not missing, f"not in cuda-python's runtime bindings: {missing}"


@needs_trt
@needs_cudart
def test_without_a_gpu_a_plan_is_refused_with_the_reason():
    try:
        trt_backend.gpu_here()
        pytest.skip("a CUDA GPU is present here: test_build_trt.py runs a real plan instead")
    except RuntimeError:
        pass
    meta = {"tensorrt_version": TRT.__version__, "flags": ["VERSION_COMPATIBLE"], "gpu": "NVIDIA H100 80GB HBM3",
            "compute_capability": "9.0", "hardware_compatibility": "NONE"}
    device, why = trt_backend.plan_compatibility({"backend": "tensorrt", "tensorrt": meta})
    assert device is None and why.startswith("no usable CUDA GPU (RuntimeError: CUDA error cuda")


@pytest.mark.skipif(_module("tensorrt") is not None or _module("tensorrt_lean") is None,
                    reason="needs the lean runtime without full TensorRT")
def test_lean_runtime_refuses_a_plan_that_is_not_version_compatible():
    meta = {"tensorrt_version": TRT.__version__, "flags": [], "hardware_compatibility": "NONE"}
    device, why = trt_backend.plan_compatibility({"backend": "tensorrt", "tensorrt": meta})
    assert device is None and "runs version-compatible plans only" in why


H100 = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


@needs_trt
@pytest.mark.parametrize("built, here, ok, reason", [
    ({"hardware_compatibility": "NONE", **H100}, H100, True, ""),
    ({"hardware_compatibility": "NONE", **H100}, {"gpu": "NVIDIA H200", "compute_capability": "9.0"}, False,
     "plan built for NVIDIA H100 80GB HBM3 (sm 9.0), this GPU is NVIDIA H200 (sm 9.0)"),
    ({"hardware_compatibility": "SAME_COMPUTE_CAPABILITY", **H100}, {"gpu": "NVIDIA H200", "compute_capability": "9.0"},
     True, ""),
    ({"hardware_compatibility": "SAME_COMPUTE_CAPABILITY", **H100}, {"gpu": "NVIDIA A100", "compute_capability": "8.0"},
     False, "plan built for compute capability 9.0, this GPU is NVIDIA A100 (sm 8.0)"),
    ({"hardware_compatibility": "AMPERE_PLUS", **H100}, {"gpu": "NVIDIA A100", "compute_capability": "8.0"}, True, ""),
    ({"hardware_compatibility": "AMPERE_PLUS", **H100}, {"gpu": "Tesla T4", "compute_capability": "7.5"}, False,
     "plan needs an Ampere or newer GPU, this is Tesla T4 (sm 7.5)"),
])
def test_plan_compatibility_decisions(built, here, ok, reason, monkeypatch):
    """The rules on a given GPU identity (the GPU query is replaced; TensorRT is the real module)."""
    monkeypatch.setattr(trt_backend, "gpu_here", lambda: here)
    meta = {"tensorrt_version": TRT.__version__, "flags": ["VERSION_COMPATIBLE"], **built}
    assert trt_backend.plan_compatibility({"backend": "tensorrt", "tensorrt": meta}) == (("cuda", "") if ok else (None, reason))


@pytest.mark.parametrize("built, running, flags, lean, ok", [
    ("10.9.0", "10.9.0", [], False, True),
    ("10.9.0", "10.9.1", [], False, False),                                    # plain plans: that version only
    ("10.9.0", "11.4.0.106", ["VERSION_COMPATIBLE"], False, True),              # later versions, across majors
    ("11.4.0.106", "11.1.0", ["VERSION_COMPATIBLE"], False, False),             # never an older one
    ("11.1.0", "11.4.0.106", ["VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME"], False, False),
    ("11.1.0", "11.4.0.106", ["VERSION_COMPATIBLE"], True, False),              # the lean runtime: its own only
    ("11.4.0.106", "11.4.0.106", ["VERSION_COMPATIBLE"], True, True),
])
def test_which_tensorrt_versions_can_load_a_plan(built, running, flags, lean, ok):
    problem = trt_backend.version_problem(built, running, flags, lean)
    assert (problem == "") == ok, problem
    if not ok:
        assert problem.startswith(f"plan built with TensorRT {built}") and running in problem


@needs_trt
def test_the_installed_runtime_applies_its_version_rule(monkeypatch):
    monkeypatch.setattr(trt_backend, "gpu_here", lambda: H100)
    older = "10.0.0"
    meta = {"tensorrt_version": older, "flags": ["VERSION_COMPATIBLE"], "hardware_compatibility": "NONE", **H100}
    device, why = trt_backend.plan_compatibility({"backend": "tensorrt", "tensorrt": meta})
    if TRT.__name__.startswith("tensorrt_lean"):
        assert device is None and "the lean runtime runs only plans built by its own version" in why
    else:
        assert (device, why) == ("cuda", "")
