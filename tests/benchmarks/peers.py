"""CPU speed against the tools a user would pick instead, in one process, alternating rounds.

    .venv-st5/bin/python tests/benchmarks/peers.py                       # all-MiniLM-L6-v2 (make repro)
    .venv-st5/bin/python tests/benchmarks/peers.py --model M --bundle B  # another model
    .venv-st5/bin/python tests/benchmarks/peers.py --json benchmarks/results/peers-minilm.json

Runs in the compat venv (`make compat`: sentence-transformers 5 with its ONNX backend), which
also loads our runtime (numpy, tokenizers, onnxruntime). Contenders, all on the evaluation
corpus, every one with the same thread count:
  pytorch        SentenceTransformer(model).encode                  (the reference embeddings)
  st-onnx        backend="onnx", the plain exported graph
  st-O3          its export_optimized_onnx_model(..., "O3") graph    (fused, GELU approximated)
  st-int8-*      its export_dynamic_quantized_onnx_model graphs: one per config
  ours: every CPU variant of the bundle                               (Bundle.encode)
Peers' graphs are exported once into --work (a copy of the model folder), as a user would.

Each round times every contender once on the whole corpus, in an order that rotates from round
to round; a ratio is the median over rounds of the two times measured in the same round, so a
noisy machine moves both sides together. Printed per contender: sentences/s, ratio to
PyTorch, ratio to the best peer of its precision class (fp32: pytorch, st-onnx, st-O3; int8:
the st-int8 graphs; best = highest median sentences/s), min / mean cosine to PyTorch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # our runtime, from the checkout (the compat venv does not install it)

# Issue 11's targets per --targets: our variant's class -> (ratio to beat, against what, min cosine)
TARGETS = {"peers": {"fp32": (2.0, "best peer", 0.99999), "int8": (1.8, "best peer", 0.995)},  # all-MiniLM-L6-v2
           "mpnet": {"int8": (2.0, "pytorch", 0.99)}}                                            # all-mpnet-base-v2


def peer_models(model: Path, work: Path, threads: int, qconfigs: list[str]) -> dict:
    """sentence-transformers' ONNX contenders, exported once into a copy of the model folder."""
    import onnxruntime as ort
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.backend import export_dynamic_quantized_onnx_model, export_optimized_onnx_model

    folder = work / model.name
    if not folder.is_dir():
        shutil.copytree(model, folder)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1

    def load(file_name: str | None):
        kwargs = {"provider": "CPUExecutionProvider", "session_options": options}
        if file_name:
            kwargs["file_name"] = file_name
        return SentenceTransformer(str(folder), device="cpu", backend="onnx", model_kwargs=kwargs)

    if not (folder / "onnx" / "model.onnx").is_file():  # export once, as a user would, and keep it
        load(None).save_pretrained(str(folder))
    plain = load("onnx/model.onnx")
    if not (folder / "onnx" / "model_O3.onnx").is_file():
        export_optimized_onnx_model(plain, "O3", str(folder))
    peers = {"st-onnx": ("fp32", plain), "st-O3": ("fp32", load("onnx/model_O3.onnx"))}
    for config in qconfigs:  # the file is model_qint8_<config>.onnx or model_quint8_<config>.onnx (avx2)
        found = sorted((folder / "onnx").glob(f"model_q*int8_{config}.onnx"))
        if not found:
            export_dynamic_quantized_onnx_model(plain, config, str(folder))
            found = sorted((folder / "onnx").glob(f"model_q*int8_{config}.onnx"))
        peers[f"st-int8-{config}"] = ("int8", load(f"onnx/{found[0].name}"))
    return peers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", type=Path, default=REPO / "artifacts" / "minilm_l6" / "source" / "model",
                        help="sentence-transformers folder (the reference and the peers' source)")
    parser.add_argument("--bundle", type=Path, default=REPO / "artifacts" / "minilm_l6" / "bundle")
    parser.add_argument("--corpus", type=Path, default=REPO / "stages" / "data" / "eval_corpus.jsonl")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="for every contender (default: all cores)")
    parser.add_argument("--batch-size", type=int, default=32, help="sentence-transformers' encode batch size")
    parser.add_argument("--qconfigs", nargs="*", default=["avx2", "avx512_vnni"],
                        help="sentence-transformers quantization configs to compare against")
    parser.add_argument("--variants", nargs="*", help="our variants (default: every exact CPU variant and int8)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sbert-bundle-peers"),
                        help="where the peers' graphs are exported (reused between runs)")
    parser.add_argument("--targets", choices=sorted(TARGETS), default="peers",
                        help="which targets to mark: peers (all-MiniLM-L6-v2) or mpnet (all-mpnet-base-v2 INT8)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    import onnxruntime as ort
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    from sbert_bundle import Bundle
    from sbert_bundle.bundle import rank_variants
    from stages.common import row_cosines

    torch.set_num_threads(args.threads)
    sentences = [json.loads(line) for line in args.corpus.read_text(encoding="utf-8").splitlines()]
    reference = SentenceTransformer(str(args.model), device="cpu")
    contenders = {"pytorch": ("fp32", lambda: reference.encode(sentences, batch_size=args.batch_size))}
    for name, (cls, model) in peer_models(args.model, args.work, args.threads, args.qconfigs).items():
        contenders[name] = (cls, lambda m=model: m.encode(sentences, batch_size=args.batch_size))
    peers = list(contenders)
    manifest = Bundle.load(args.bundle).manifest
    ours = args.variants or [n for n, d, why in rank_variants(manifest, None) if d == "cpu" and not why] + \
        [n for n in manifest["variants"] if manifest["variants"][n].get("precision") == "int8"]
    for name in dict.fromkeys(ours):
        precision = manifest["variants"][name].get("precision", "fp32")
        bundle = Bundle.load(args.bundle, variant=name, threads=args.threads, verify_integrity=False)
        contenders[name] = ("int8" if precision == "int8" else "fp32", lambda b=bundle: b.encode(sentences))

    ref = contenders["pytorch"][1]()
    parity = {name: row_cosines(np.asarray(fn(), dtype=np.float64), ref) for name, (_, fn) in contenders.items()}
    times = {name: [] for name in contenders}
    order = list(contenders)
    for r in range(args.rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:
            start = time.perf_counter()
            contenders[name][1]()
            times[name].append(time.perf_counter() - start)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    speed = {name: len(sentences) / statistics.median(t) for name, t in times.items()}
    best = {cls: max((p for p in peers if contenders[p][0] == cls), key=speed.get)
            for cls in {c for c, _ in contenders.values()} if any(contenders[p][0] == cls for p in peers)}
    ratio = lambda a, b: statistics.median(tb / ta for ta, tb in zip(times[a], times[b]))  # noqa: E731
    rows = []
    for name, (cls, _) in contenders.items():
        rows.append({"contender": name, "class": cls, "ours": name not in peers, "sentences_per_s": speed[name],
                     "vs_pytorch": ratio(name, "pytorch"), "best_peer": best.get(cls),
                     "vs_best_peer": ratio(name, best[cls]) if cls in best else None,
                     "min_cos": float(parity[name].min()), "mean_cos": float(parity[name].mean())})

    tokens = [min(len(e), reference.max_seq_length) for e in reference.tokenizer(sentences)["input_ids"]]
    print(f"\n{time.strftime('%Y-%m-%d')} {platform.node()} {platform.processor() or platform.machine()}, "
          f"{args.threads} threads each, {len(sentences)} sentences ({np.mean(tokens):.1f} tokens on average after "
          f"truncation to {reference.max_seq_length}), "
          f"{args.rounds} alternating rounds; sentence-transformers {sentence_transformers.__version__}, "
          f"onnxruntime {ort.__version__}, torch {torch.__version__}")
    print(f"{'contender':<20} {'class':<5} {'sent/s':>7} {'vs torch':>8} {'vs best peer':>22} {'min cos':>9} {'mean cos':>9}  target")
    for row in rows:
        versus = f"{row['vs_best_peer']:.2f}x {row['best_peer']}" if row["vs_best_peer"] else ""
        target = ""
        if row["ours"] and row["class"] in TARGETS[args.targets]:
            want, against, cos = TARGETS[args.targets][row["class"]]
            got = row["vs_best_peer"] if against == "best peer" else row["vs_pytorch"]
            ok = got >= want and row["min_cos"] >= cos
            target = f"{'met' if ok else 'MISSED'} (>= {want}x {against} at min cos >= {cos})"
            row["target"] = {"ratio": want, "against": against, "min_cos": cos, "met": ok}
        print(f"{row['contender']:<20} {row['class']:<5} {row['sentences_per_s']:>7.0f} {row['vs_pytorch']:>7.2f}x "
              f"{versus:>22} {row['min_cos']:>9.6f} {row['mean_cos']:>9.6f}  {target}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "host": platform.node(),
                                         "threads": args.threads, "rounds": args.rounds, "command": " ".join(sys.argv),
                                         "versions": {"sentence-transformers": sentence_transformers.__version__,
                                                      "onnxruntime": ort.__version__, "torch": torch.__version__},
                                         "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
