"""sbert_bundle.trt against the real TensorRT runtime API and cuda-python, without a GPU.

Where TensorRT (`tensorrt`, or the lean runtime `tensorrt_lean` that PyPI serves as
tensorrt-lean-cu13) and cuda-python are installed, every name the TensorRT backend calls must
exist in them: an API that TensorRT renamed or removed (TensorRT 11 dropped several) fails here
instead of on the first GPU machine. Building and running a plan needs a GPU: test_build_trt.py.
"""

import ast
import ctypes
from pathlib import Path

import numpy as np
import pytest

from conftest import TRT, first_module, needs_trt
from sbert_bundle import trt as trt_backend


try:
    CUDART = trt_backend._cudart()
except ImportError:
    CUDART = None
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


@pytest.mark.skipif(first_module("tensorrt") is not None or first_module("tensorrt_lean") is None,
                    reason="needs the lean runtime without full TensorRT")
def test_lean_runtime_refuses_a_plan_that_is_not_version_compatible():
    meta = {"tensorrt_version": TRT.__version__, "flags": [], "hardware_compatibility": "NONE"}
    device, why = trt_backend.plan_compatibility({"backend": "tensorrt", "tensorrt": meta})
    assert device is None and "runs version-compatible plans only" in why


H100 = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


@needs_trt
@pytest.mark.parametrize("built, here, expected", [
    ({"hardware_compatibility": "NONE", **H100}, H100, ("cuda", "")),
    ({"hardware_compatibility": "NONE", **H100}, {"gpu": "NVIDIA H200", "compute_capability": "9.0"},
     (None, "plan built for NVIDIA H100 80GB HBM3 (sm 9.0), this GPU is NVIDIA H200 (sm 9.0)")),
    ({"hardware_compatibility": "SAME_COMPUTE_CAPABILITY", **H100}, {"gpu": "NVIDIA H200", "compute_capability": "9.0"},
     ("cuda", "")),
    ({"hardware_compatibility": "SAME_COMPUTE_CAPABILITY", **H100}, {"gpu": "NVIDIA A100", "compute_capability": "8.0"},
     (None, "built for sm_90 (h100), this GPU is sm_80 (NVIDIA A100)")),
    ({"hardware_compatibility": "AMPERE_PLUS", **H100}, {"gpu": "NVIDIA H200", "compute_capability": "9.0"},
     ("cuda", "")),
    # another target's hardware-compatible plan runs, but only when named: not picked by variant=None
    ({"hardware_compatibility": "AMPERE_PLUS", **H100}, {"gpu": "NVIDIA A100", "compute_capability": "8.0"},
     ("cuda", "built for sm_90 (h100), this GPU is sm_80 (NVIDIA A100); hardware-compatible, so used only when named")),
    ({"hardware_compatibility": "AMPERE_PLUS", **H100}, {"gpu": "Tesla T4", "compute_capability": "7.5"},
     (None, "built for sm_90 (h100), this GPU is sm_75 (Tesla T4)")),
])
def test_plan_compatibility_decisions(built, here, expected, monkeypatch):
    """The rules on a given GPU identity (the GPU query is replaced; TensorRT is the real module)."""
    monkeypatch.setattr(trt_backend, "gpu_here", lambda device_id=0: here)
    meta = {"tensorrt_version": TRT.__version__, "flags": ["VERSION_COMPATIBLE"], **built}
    variant = {"backend": "tensorrt", "target": "h100", "compute_capability": "9.0", "tensorrt": meta}
    assert trt_backend.plan_compatibility(variant) == expected


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
    monkeypatch.setattr(trt_backend, "gpu_here", lambda device_id=0: H100)
    older = "10.0.0"
    meta = {"tensorrt_version": older, "flags": ["VERSION_COMPATIBLE"], "hardware_compatibility": "NONE", **H100}
    device, why = trt_backend.plan_compatibility({"backend": "tensorrt", "tensorrt": meta})
    if TRT.__name__.startswith("tensorrt_lean"):
        assert device is None and "the lean runtime runs only plans built by its own version" in why
    else:
        assert (device, why) == ("cuda", "")


@needs_trt
def test_the_plan_is_checked_against_the_chosen_cuda_device(monkeypatch):
    """device_id reaches the GPU query: a plan built for the H100 runs on device 0, not on an A100 at 1."""
    gpus = {0: H100, 1: {"gpu": "NVIDIA A100", "compute_capability": "8.0"}}
    monkeypatch.setattr(trt_backend, "gpu_here", lambda device_id=0: gpus[device_id])
    meta = {"tensorrt_version": TRT.__version__, "flags": ["VERSION_COMPATIBLE"], "hardware_compatibility": "NONE",
            **H100}
    variant = {"backend": "tensorrt", "file": "trt/plan.engine", "precision": "fp16", "devices": ["cuda"],
               "tensorrt": meta}
    assert trt_backend.plan_compatibility(variant, 0) == ("cuda", "")
    device, why = trt_backend.plan_compatibility(variant, 1)
    assert device is None and why.endswith("this GPU is sm_80 (NVIDIA A100)")
    from sbert_bundle.bundle import rank_variants  # and through the loader's ranking

    manifest = {"variants": {"trt-fp16": variant}}
    assert rank_variants(manifest, None, device_id=0) == [("trt-fp16", "cuda", "")]
    assert rank_variants(manifest, None, device_id=1)[0][1:] == (None, why)


@needs_cudart
def test_gpu_here_names_the_device_it_could_not_query():
    try:
        trt_backend.gpu_here(0)
        count = trt_backend._check(CUDART.cudaGetDeviceCount())
    except RuntimeError as e:  # no GPU or driver here: the CUDA error, by name
        assert str(e).startswith("CUDA error cuda"), e
        return
    with pytest.raises(RuntimeError, match=f"no CUDA device {count}: this machine has {count}"):
        trt_backend.gpu_here(count)


# Profiles as TensorRT reports them: per profile, per input (min, opt, max); inputs share their shape.
def profile(lo, opt, hi, inputs=2):
    return [(lo, opt, hi)] * inputs


PROFILES = [profile((1, 1), (1, 16), (8, 128)),
            profile((1, 1), (8, 128), (64, 256)),
            profile((1, 1), (256, 256), (256, 512))]


@pytest.mark.parametrize("shape, expected", [
    ((1, 16), 0), ((1, 9), 0),       # the profile tuned for it
    ((8, 128), 1), ((2, 100), 1),    # all three allow it: the closest opt above, not the first that fits
    ((8, 200), 2),                   # beyond profile 1's opt: the next opt above
    ((100, 300), 2),                 # only profile 2 allows it
    ((300, 10), None),               # no profile allows 300 rows
])
def test_the_profile_whose_opt_shape_is_closest_above_the_batch_wins(shape, expected):
    assert trt_backend.pick_profile(PROFILES, shape) == expected


def test_without_an_opt_shape_above_the_batch_the_largest_opt_wins():
    profiles = [profile((1, 1), (1, 16), (64, 512)), profile((1, 1), (8, 64), (64, 512))]
    assert trt_backend.pick_profile(profiles, (32, 256)) == 1


def test_profile_choice_needs_every_input_in_range():
    mixed = [[((1, 1), (8, 128), (8, 128)), ((1, 1), (8, 64), (8, 64))],  # the second input stops at 64
             profile((1, 1), (64, 256), (64, 256))]
    assert trt_backend.pick_profile(mixed, (4, 100)) == 1


def test_host_array_is_a_view_of_the_buffer_at_the_address():
    """What TrtBackend does with a pinned buffer from cudaMallocHost, on ordinary host memory."""
    raw = (ctypes.c_byte * 64)()
    view = trt_backend.host_array(ctypes.addressof(raw), (2, 3), np.int32)
    np.copyto(view, np.arange(6, dtype=np.int64).reshape(2, 3), casting="unsafe")  # int64 ids -> int32 input
    assert np.frombuffer(bytes(raw)[:24], dtype=np.int32).tolist() == [0, 1, 2, 3, 4, 5]
    assert trt_backend.host_array(ctypes.addressof(raw), (0, 3), np.float16).shape == (0, 3)


@needs_trt
@needs_cudart
def test_the_backend_without_a_gpu_fails_on_its_device_not_later(tmp_path):
    try:
        trt_backend.gpu_here()
        pytest.skip("a CUDA GPU is present here: test_build_trt.py runs a real plan instead")
    except RuntimeError:
        pass
    plan = tmp_path / "plan.engine"
    plan.write_bytes(b"never read: the device comes first")
    meta = {"tensorrt_version": TRT.__version__, "flags": ["VERSION_COMPATIBLE"]}
    with pytest.raises(RuntimeError, match=r"^CUDA error cuda\w+ \(\d+\) in cudaSetDevice\(2\)$"):
        trt_backend.TrtBackend(plan, {"tensorrt": meta}, device_id=2)
