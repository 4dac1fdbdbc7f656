"""The CUDA path: bucket choice (anywhere) and, on a GPU with onnxruntime-gpu, parity of the
fp16 fused graph with IO binding and CUDA graphs."""

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
