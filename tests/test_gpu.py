"""The CUDA path: bucket choice and the IO-binding / bucket-padding code on the CPU provider
(anywhere), and, on a GPU with onnxruntime-gpu, parity of the fp16 fused graph with IO binding
and CUDA graphs."""

import numpy as np
import pytest

from conftest import SENTENCES, st_encode
from sbert_bundle import Bundle
from sbert_bundle.backends import ort_providers, pick_bucket

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
    second = bundle.encode(SENTENCES, batch_size=4)  # replays them
    np.testing.assert_array_equal(first, second)
    cos = (first * ref).sum(1) / (np.linalg.norm(first, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() > 0.999
    big = bundle.encode(SENTENCES * 40, batch_size=512)  # beyond every bucket: no graph
    np.testing.assert_allclose(big[: len(SENTENCES)], first, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu with a CUDA GPU (CUDAExecutionProvider absent)")
def test_best_variant_on_a_gpu_is_fp16_fused_on_cuda(tiny_bundle):
    bundle = Bundle.load(tiny_bundle)
    assert (bundle.variant, bundle.device) == ("fp16-fused", "cuda")


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
