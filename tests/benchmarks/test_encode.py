"""pytest-benchmark suite over the runtime (not part of `make test`).

    make bench                                     # run and save a baseline (.benchmarks/)
    .venv/bin/python -m pytest tests/benchmarks --benchmark-compare --benchmark-compare-fail=mean:10%

The PyTorch reference is in the same group, so every run shows the ratio on this machine.
"""

import pytest

from sbert_bundle import Bundle

VARIANTS = ["fp32", "fp32-fused", "int8"]


@pytest.mark.benchmark(group="encode corpus")
@pytest.mark.parametrize("variant", VARIANTS)
def test_bundle_encode(benchmark, bundle_dir, corpus, variant):
    bundle = Bundle.load(bundle_dir, variant=variant)
    bundle.encode(corpus[:32])
    emb = benchmark(bundle.encode, corpus)
    assert emb.shape == (len(corpus), bundle.embedding_dimension)


@pytest.mark.benchmark(group="encode corpus")
def test_pytorch_reference_encode(benchmark, bundle_dir, reference_dir, corpus):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(reference_dir), device="cpu")
    model.encode(corpus[:32])
    benchmark(model.encode, corpus, batch_size=32)


@pytest.mark.benchmark(group="one short sentence")
@pytest.mark.parametrize("variant", VARIANTS)
def test_bundle_single_sentence(benchmark, bundle_dir, variant):
    bundle = Bundle.load(bundle_dir, variant=variant)
    benchmark(bundle.encode, ["How do I get to the train station from here?"])
