"""The CUDA path: bucket choice and the IO-binding / bucket-padding code on the CPU provider
(anywhere): per-bucket failure, graph dtypes, no silent downgrade of a CUDA variant; and, on a GPU
with onnxruntime-gpu, parity of the fp16 fused graph with IO binding and CUDA graphs actually
captured."""

import logging

import numpy as np
import pytest

from conftest import SENTENCES, st_encode
from sbert_bundle import BackendError, Bundle
from sbert_bundle.backends import OrtBackend, OrtCudaBackend, ort_providers, pick_bucket

HAS_CUDA = "CUDAExecutionProvider" in ort_providers()
BUCKETS = [(1, 16), (1, 64), (8, 64), (32, 128), (256, 256)]


@pytest.mark.parametrize("shape, bucket", [
    ((1, 9), (1, 16)), ((1, 16), (1, 16)), ((1, 40), (1, 64)), ((6, 50), (8, 64)), ((32, 100), (32, 128)),
    ((3, 40), None),      # (8, 64) is more than twice the work
    ((300, 10), None),    # larger than every bucket
    ((200, 250), (256, 256)),
])
def test_pick_bucket(shape, bucket):
    assert pick_bucket(BUCKETS, *shape) == bucket


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu with a CUDA GPU (CUDAExecutionProvider absent)")
def test_fp16_fused_on_cuda_matches_sentence_transformers(tiny_bundle, tiny_model):
    bundle = Bundle.load(tiny_bundle, variant="fp16-fused")
    assert bundle.device == "cuda"
    ref = st_encode(tiny_model, SENTENCES)
    first = bundle.encode(SENTENCES, batch_size=4)   # captures CUDA graphs for the buckets used
    backend = bundle.backend
    assert backend.graphs and backend.failed == {}, backend.graph_status()
    assert backend.captured and backend.captured == set(backend.bound), backend.graph_status()
    second = bundle.encode(SENTENCES, batch_size=4)  # replays them
    np.testing.assert_array_equal(first, second)
    assert backend.failed == {} and "captured" in backend.graph_status().values()
    cos = (first * ref).sum(1) / (np.linalg.norm(first, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() > 0.999
    big = bundle.encode(SENTENCES * 40, batch_size=512)  # beyond every bucket: no graph
    np.testing.assert_allclose(big[: len(SENTENCES)], first, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu with a CUDA GPU (CUDAExecutionProvider absent)")
def test_best_variant_on_a_gpu_is_fp16_fused_on_cuda(tiny_bundle):
    bundle = Bundle.load(tiny_bundle)
    assert (bundle.variant, bundle.device) == ("fp16-fused", "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu with a CUDA GPU (CUDAExecutionProvider absent)")
def test_fp16_output_graph_is_captured_on_cuda(tiny_bundle, tmp_path):
    plain = Bundle.load(tiny_bundle, variant="fp32")
    path = fp16_output_graph(tiny_bundle / "onnx" / "model.onnx", tmp_path / "fp16_out.onnx")
    bound = OrtCudaBackend(path, BUCKETS, plain.head.pad_token_id, tf32=False)
    assert bound.output_dtype == np.float16
    features = plain.tokenizer(SENTENCES[:6])
    got = bound(features)
    assert got.dtype == np.float32 and bound.failed == {} and bound.captured, bound.graph_status()
    mask = features["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[mask], OrtBackend(path)(features)[mask], atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu with a CUDA GPU (CUDAExecutionProvider absent)")
def test_a_cuda_device_that_does_not_exist_is_an_error(tiny_bundle):
    with pytest.raises(BackendError):
        Bundle.load(tiny_bundle, variant="fp16-fused", device_id=64)


# --- no silent downgrade: onnxruntime lists CUDAExecutionProvider, but CUDA cannot start -----------

@pytest.fixture
def cuda_listed_but_broken(monkeypatch):
    """What onnxruntime-gpu without a usable GPU or driver looks like: the provider is listed, and a
    session asked for it runs on the CPU provider instead (the CPU build here does exactly that)."""
    if HAS_CUDA:
        pytest.skip("CUDA works here: a CUDA session really starts")
    import sbert_bundle.backends as backends

    monkeypatch.setattr(backends, "ort_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])


@pytest.mark.parametrize("variant", ["fp16-fused", "fp32-fused"])
def test_a_named_cuda_variant_that_cannot_start_cuda_is_an_error(tiny_bundle, cuda_listed_but_broken, variant):
    with pytest.raises(BackendError, match="could not start its CUDA provider on device 0"):
        Bundle.load(tiny_bundle, variant=variant)


def test_the_default_moves_on_from_a_cuda_variant_that_cannot_start_cuda(tiny_bundle, cuda_listed_but_broken,
                                                                         caplog):
    bundle = Bundle.load(tiny_bundle)
    assert (bundle.variant, bundle.device) == ("fp32-fused", "cpu")  # never the fp16 graph on the CPU
    for name in ("fp16-fused", "fp16"):
        assert f"variant {name} on cuda failed to open" in caplog.text
    assert "variant fp32-fused: CUDA failed" in caplog.text and "using the CPU" in caplog.text


def test_device_id_must_be_a_device_number(tiny_bundle):
    for bad in (-1, True, "1"):
        with pytest.raises(ValueError, match="device_id must be a CUDA device number"):
            Bundle.load(tiny_bundle, device_id=bad)
    assert Bundle.load(tiny_bundle, device_id=3).device == ("cuda" if HAS_CUDA else "cpu")  # CPU variants ignore it


def widen(features: dict, length: int, pad_id: int) -> dict:
    """The same batch padded (masked) to `length` tokens."""
    extra = length - features["input_ids"].shape[1]
    return {k: np.pad(v, ((0, 0), (0, extra)), constant_values=pad_id if k == "input_ids" else 0)
            for k, v in features.items()}


@pytest.mark.parametrize("variant", ["fp32-fused", "fp32"])
def test_bound_bucketed_path_matches_the_plain_session_on_cpu(tiny_bundle, variant):
    """The CUDA backend's IO binding, bucket padding and slicing, run on the CPU provider."""
    from sbert_bundle.backends import OrtBackend, OrtCudaBackend

    plain = Bundle.load(tiny_bundle, variant=variant)
    pad = plain.head.pad_token_id
    path = tiny_bundle / plain.manifest["variants"][variant]["file"]
    bound = OrtCudaBackend(path, BUCKETS, pad, device="cpu")
    reference = OrtBackend(path)
    short = [s for s in SENTENCES if len(s) < 60]
    batches = [  # (batch, length) -> bucket
        plain.tokenizer(short[:1]),                            # (1, ~11) -> (1, 16): padded columns
        widen(plain.tokenizer(short[:6]), 50, pad),            # (6, 50) -> (8, 64): padded rows and columns
        widen(plain.tokenizer(short[:8]), 64, pad),            # (8, 64) exactly
        plain.tokenizer(SENTENCES * 30),                       # (360, ...) -> no bucket, no binding kept
        plain.tokenizer(short[1:2]),                           # (1, ...) -> (1, 16) again, new values
    ]
    kept = []
    for features in batches:
        got = bound(features)
        assert got.shape == features["input_ids"].shape + (plain.head.hidden_size,)
        mask = features["attention_mask"].astype(bool)
        np.testing.assert_allclose(got[mask], reference(features)[mask], rtol=1e-4, atol=1e-4)
        kept.append((got.copy(), got))
    assert sorted(bound.bound) == [(1, 16), (8, 64)]  # each bucket bound once, then reused
    status = bound.graph_status()
    assert status["1x16"] == status["8x64"] == "bound (no CUDA graphs on the CPU)"
    assert status["32x128"] == "not run yet" and not bound.captured and not bound.failed
    for before, returned in kept:  # later calls did not overwrite earlier results
        np.testing.assert_array_equal(before, returned)


def test_bound_path_from_several_threads_matches_serial(tiny_bundle):
    """Runs go through one worker thread (onnxruntime keeps CUDA graphs per thread)."""
    from concurrent.futures import ThreadPoolExecutor

    from sbert_bundle.backends import OrtCudaBackend

    plain = Bundle.load(tiny_bundle, variant="fp32-fused")
    bound = OrtCudaBackend(tiny_bundle / "onnx" / "model_fused.onnx", BUCKETS, plain.head.pad_token_id, device="cpu")
    batches = [plain.tokenizer(SENTENCES[i:i + 3]) for i in range(0, len(SENTENCES), 3)] * 4
    serial = [bound(f) for f in batches]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(bound, batches))
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a, b)


def fp16_output_graph(src, dest):
    """The graph with its last_hidden_state cast to float16, as a graph converted with fp16 outputs has."""
    import onnx

    model = onnx.load(str(src))
    out = model.graph.output[0]
    for node in model.graph.node:
        node.output[:] = [f"{out.name}_fp32" if o == out.name else o for o in node.output]
    model.graph.node.append(onnx.helper.make_node("Cast", [f"{out.name}_fp32"], [out.name],
                                                  to=onnx.TensorProto.FLOAT16))
    out.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    onnx.save(model, str(dest))
    return dest


def test_fp16_output_binds_an_fp16_buffer_and_returns_float32(tiny_bundle, tmp_path):
    """The bound output takes the graph's dtype: a float32 buffer for an fp16 output fails to bind."""
    plain = Bundle.load(tiny_bundle, variant="fp32")
    path = fp16_output_graph(tiny_bundle / "onnx" / "model.onnx", tmp_path / "fp16_out.onnx")
    bound = OrtCudaBackend(path, BUCKETS, plain.head.pad_token_id, device="cpu")
    assert bound.output_dtype == np.float16
    reference = OrtBackend(tiny_bundle / "onnx" / "model.onnx")
    for features in (plain.tokenizer(SENTENCES[:1]), plain.tokenizer(SENTENCES * 30)):  # a bucket, and none
        got = bound(features)
        assert got.dtype == np.float32
        mask = features["attention_mask"].astype(bool)
        np.testing.assert_allclose(got[mask], reference(features)[mask], atol=1e-2)
    assert sorted(bound.bound) == [(1, 16)] and bound.failed == {}


LONG_BUCKETS = [(1, 16), (8, 64), (1, 200)]  # the tiny BERT has 128 positions: a 1x200 run cannot work


def test_a_failing_bucket_is_disabled_alone_and_said_once(tiny_bundle, caplog):
    plain = Bundle.load(tiny_bundle, variant="fp32")
    pad = plain.head.pad_token_id
    bound = OrtCudaBackend(tiny_bundle / "onnx" / "model.onnx", LONG_BUCKETS, pad, device="cpu")
    reference = OrtBackend(tiny_bundle / "onnx" / "model.onnx")
    long = widen(plain.tokenizer(SENTENCES[:1]), 110, pad)  # 1x110 fits the model, its 1x200 bucket does not
    caplog.set_level(logging.WARNING, logger="sbert_bundle.backends")
    for _ in range(2):
        got = bound(long)
        mask = long["attention_mask"].astype(bool)
        np.testing.assert_allclose(got[mask], reference(long)[mask], rtol=1e-4, atol=1e-4)
    assert list(bound.failed) == [(1, 200)] and "its run failed" in bound.failed[(1, 200)]
    warnings = [r.getMessage() for r in caplog.records if "without a CUDA graph" in r.getMessage()]
    assert len(warnings) == 1 and "bucket 1x200 " in warnings[0], warnings
    short = plain.tokenizer(SENTENCES[:1])  # the other buckets still run bound
    np.testing.assert_allclose(bound(short), reference(short), rtol=1e-4, atol=1e-4)
    status = bound.graph_status()
    assert status["1x16"] == "bound (no CUDA graphs on the CPU)" and status["1x200"].startswith("failed: ")


def test_a_bad_input_disables_no_bucket(tiny_bundle):
    plain = Bundle.load(tiny_bundle, variant="fp32")
    bound = OrtCudaBackend(tiny_bundle / "onnx" / "model.onnx", BUCKETS, plain.head.pad_token_id, device="cpu")
    features = plain.tokenizer(SENTENCES[:1])
    bad = {**features, "input_ids": np.full_like(features["input_ids"], 10**6)}  # beyond the vocabulary
    with pytest.raises(BackendError, match="onnxruntime could not run it"):
        bound(bad)
    assert bound.failed == {}
    np.testing.assert_allclose(bound(features), OrtBackend(tiny_bundle / "onnx" / "model.onnx")(features),
                               rtol=1e-4, atol=1e-4)
    assert sorted(bound.bound) == [(1, 16)]
