"""CPU speed and parity table: every CPU variant of a bundle against sentence-transformers.

    .venv/bin/python tests/benchmarks/cpu_table.py [--bundle artifacts/minilm_l6/bundle] [--rounds 5]

End to end (tokenization included) on the evaluation corpus. PyTorch and each variant are
timed in alternating rounds in this one process, and the ratio is the median of the
per-round ratios, so a noisy machine moves both sides together.
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "artifacts" / "minilm_l6" / "bundle")
    parser.add_argument("--reference", type=Path, default=REPO / "artifacts" / "minilm_l6" / "source" / "model")
    parser.add_argument("--corpus", type=Path, default=REPO / "stages" / "data" / "eval_corpus.jsonl")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    from sbert_bundle import Bundle
    from sbert_bundle.bundle import rank_variants
    from stages.common import row_cosines

    sentences = [json.loads(line) for line in args.corpus.read_text(encoding="utf-8").splitlines()]
    reference = SentenceTransformer(str(args.reference), device="cpu")
    encode_ref = lambda: reference.encode(sentences, batch_size=args.batch_size)  # noqa: E731
    ref = encode_ref()
    manifest = Bundle.load(args.bundle).manifest
    cpu = [n for n, d, why in rank_variants(manifest, None) if d == "cpu" and not why]
    print(f"{platform.node()} {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"{len(sentences)} sentences, sentence-transformers batch_size {args.batch_size}, {args.rounds} rounds")
    print(f"{'variant':<12} {'sent/s':>8} {'torch sent/s':>12} {'ratio':>6} {'min cos':>9} {'mean cos':>9}")
    for name in cpu:
        bundle = Bundle.load(args.bundle, variant=name, verify_integrity=False)
        emb = bundle.encode(sentences, batch_size=args.batch_size)
        cos = row_cosines(emb, ref)
        ratios, ours, theirs = [], [], []
        for _ in range(args.rounds):
            t_ref = timed(encode_ref)
            t_bundle = timed(lambda: bundle.encode(sentences, batch_size=args.batch_size))
            ratios.append(t_ref / t_bundle)
            ours.append(len(sentences) / t_bundle)
            theirs.append(len(sentences) / t_ref)
        print(f"{name:<12} {statistics.median(ours):>8.0f} {statistics.median(theirs):>12.0f} "
              f"{statistics.median(ratios):>5.2f}x {cos.min():>9.6f} {cos.mean():>9.6f}")


if __name__ == "__main__":
    main()
