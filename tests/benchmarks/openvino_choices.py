"""The measurements behind the OpenVINO choices, on this CPU (not part of `make test`).

    .venv/bin/python tests/benchmarks/openvino_choices.py [--bundle B] [--rounds 5] [--json FILE]

1. IR or ONNX in the bundle: seconds to read + compile the bundle's IR (openvino/model.xml) and
   to compile onnx/model.onnx, and sentences/s of each afterwards (same f32 graph).
2. The CPU rule (sbert_bundle.cpu): ov-fp32 against onnxruntime's fp32-fused, throughput on the
   evaluation corpus and single-sentence latency. Run it on another kind of CPU to check the rule.
3. Batch caps: sentences/s of ov-bf16, ov-fp32 and fp32-fused at several padded-token caps per batch.

Each figure is the median over alternating rounds in one process; the CPU model and flags are
printed with the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--bundle", type=Path, default=REPO / "artifacts" / "minilm_l6" / "bundle")
    parser.add_argument("--corpus", type=Path, default=REPO / "stages" / "data" / "eval_corpus.jsonl")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="default: one per core")
    parser.add_argument("--caps", type=int, nargs="*", default=[512, 1024, 2048, 4096])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import openvino

    from sbert_bundle import Bundle
    from sbert_bundle.cpu import cpu_info, describe_cpu
    from sbert_bundle.manifest import cpu_count
    from sbert_bundle.ov import OvBackend

    threads = args.threads or cpu_count()
    sentences = [json.loads(line) for line in args.corpus.read_text(encoding="utf-8").splitlines()]
    root = args.bundle
    results = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_info(), "threads": threads,
               "openvino": openvino.__version__.split("-")[0], "command": " ".join(sys.argv)}

    def timed(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    # 1. load: IR against ONNX, alternating
    loads = {"ir": [], "onnx": []}
    for _ in range(args.rounds):
        loads["ir"].append(timed(lambda: OvBackend(root / "openvino" / "model.xml", root / "openvino" / "model.bin",
                                                   "f32", threads)))
        loads["onnx"].append(timed(lambda: OvBackend(root / "onnx" / "model.onnx", "", "f32", threads)))
    from_onnx = Bundle.load(root, variant="ov-fp32", threads=threads)
    from_onnx.backend = OvBackend(root / "onnx" / "model.onnx", "", "f32", threads)
    bundles = {"fp32-fused": Bundle.load(root, variant="fp32-fused", threads=threads),
               "ov-fp32": Bundle.load(root, variant="ov-fp32", threads=threads),
               "ov-fp32 (from onnx)": from_onnx}
    if "ov-bf16" in bundles["ov-fp32"].manifest["variants"]:
        try:
            bundles["ov-bf16"] = Bundle.load(root, variant="ov-bf16", threads=threads)
        except LookupError as e:
            print(f"ov-bf16 left out: {e}".splitlines()[0])

    # 2 and 3. throughput per cap, alternating contenders within each round; then latency
    speed = {(name, cap): [] for name in bundles for cap in args.caps}
    for b in bundles.values():
        b.encode(sentences)
    for _ in range(args.rounds):
        for (name, cap) in speed:
            speed[(name, cap)].append(len(sentences) / timed(lambda: bundles[name].encode(sentences,
                                                                                         max_batch_tokens=cap)))
    latency = {name: [] for name in bundles}
    for _ in range(args.rounds * 20):
        for name, b in bundles.items():
            latency[name].append(timed(lambda: b.encode([sentences[5]])) * 1e3)

    print(f"\n{results['date']} CPU {describe_cpu(cpu_info())}, {threads} threads, OpenVINO {results['openvino']}, "
          f"{len(sentences)} sentences, {args.rounds} alternating rounds")
    print(f"load (read + compile): IR {statistics.median(loads['ir']):.3f} s, ONNX {statistics.median(loads['onnx']):.3f} s")
    print(f"{'variant':<20} {'default cap':>11} " + " ".join(f"{'cap ' + str(c):>9}" for c in args.caps)
          + f" {'1 sentence p50':>15}")
    rows = []
    for name, b in bundles.items():
        per_cap = {cap: statistics.median(speed[(name, cap)]) for cap in args.caps}
        p50 = statistics.median(latency[name])
        rows.append({"variant": name, "default_cap": b.max_batch_tokens, "sentences_per_s": per_cap,
                     "single_p50_ms": p50})
        print(f"{name:<20} {str(b.max_batch_tokens):>11} " + " ".join(f"{per_cap[c]:>9.0f}" for c in args.caps)
              + f" {p50:>12.2f} ms")
    results.update(load_s={k: statistics.median(v) for k, v in loads.items()}, rows=rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
