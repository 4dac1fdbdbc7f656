"""CPU speed against the tools a user would pick instead, in one process, alternating rounds.

    make peers-venv                                                          # once
    .venv-peers/bin/python tests/benchmarks/peers.py                         # all-MiniLM-L6-v2 (make repro)
    .venv-peers/bin/python tests/benchmarks/peers.py --model M --bundle B --targets mpnet  # another model
    .venv-peers/bin/python tests/benchmarks/peers.py --json benchmarks/results/peers-minilm.json

Runs in the peers venv (`make peers-venv`: sentence-transformers 5 with its ONNX and OpenVINO
backends, fastembed, openvino; not locked, it builds nothing), which also loads our runtime from the
checkout (numpy, tokenizers, onnxruntime, openvino). Contenders, all on the evaluation corpus,
every one with the same thread count:
  pytorch          SentenceTransformer(model).encode                  (the reference embeddings)
  st-onnx          backend="onnx", the plain exported graph
  st-O3            its export_optimized_onnx_model(..., "O3") graph    (fused, GELU approximated)
  st-int8-*        its export_dynamic_quantized_onnx_model graphs: one per config
  st-openvino      backend="openvino" at its defaults (bf16 on a CPU with native bf16)
  st-openvino-f32  the same, INFERENCE_PRECISION_HINT f32
  fastembed        fastembed's TextEmbedding on the bundle's onnx/model.onnx (add_custom_model +
                   specific_model_path), its default batch size
  ours: every exact CPU variant of the bundle and every lossy one  (Bundle.encode)
Peers' graphs are exported once into --work (a copy of the model folder), as a user would.

Each round times every contender once on the whole corpus, in an order that rotates from round
to round; a ratio is the median over rounds of the two times measured in the same round, so a
noisy machine moves both sides together. Printed per contender: sentences/s, ratio to
PyTorch, ratio to the best peer of its precision class (fp32, int8, bf16; best = highest median
sentences/s), min / mean cosine to PyTorch; then each target of --targets, met or missed; and with
every table, the CPU model and its relevant flags.
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
sys.path.insert(0, str(REPO))  # our runtime, from the checkout (the peers venv does not install it)

# Targets per --targets set: name -> (which of our rows, ratio, against, min cosine). Our rows:
# "class:C" every variant of class C; "default" the variant Bundle.load() picks here; "fastest lossy"
# our fastest variant that is not fp32. against: "pytorch", or peers (a trailing * matches a prefix),
# of which the fastest in this run counts.
FP32_PEERS = ["pytorch", "st-onnx", "st-O3", "st-openvino-f32", "fastembed"]
TARGETS = {
    "peers": {  # issue 11, all-MiniLM-L6-v2
        "fp32 vs best fp32 peer": ("class:fp32", 2.0, FP32_PEERS, 0.99999),
        "int8 vs best st int8": ("class:int8", 1.8, ["st-int8-*"], 0.995)},
    "mpnet": {"int8 vs pytorch": ("class:int8", 2.0, ["pytorch"], 0.99)},  # all-mpnet-base-v2
    "openvino": {  # issue 22
        "exact: default vs st-O3": ("default", 2.0, ["st-O3"], 0.99999),
        "exact: default vs st-openvino-f32": ("default", 1.3, ["st-openvino-f32"], 0.99999),
        "fast: best lossy vs fastest st option": ("fastest lossy", 1.5, ["st-openvino", "st-int8-*"], 0.9999)},
}


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
    peers.update(openvino_peers(folder, threads))
    for config in qconfigs:  # the file is model_qint8_<config>.onnx or model_quint8_<config>.onnx (avx2)
        found = sorted((folder / "onnx").glob(f"model_q*int8_{config}.onnx"))
        if not found:
            export_dynamic_quantized_onnx_model(plain, config, str(folder))
            found = sorted((folder / "onnx").glob(f"model_q*int8_{config}.onnx"))
        peers[f"st-int8-{config}"] = ("int8", load(f"onnx/{found[0].name}"))
    return peers


def openvino_peers(folder: Path, threads: int) -> dict:
    """sentence-transformers' OpenVINO backend (optimum-intel): at its defaults, and forced to f32."""
    import openvino
    from sentence_transformers import SentenceTransformer

    def load(config: dict):
        kwargs = {"ov_config": {"INFERENCE_NUM_THREADS": threads, **config}}
        if (folder / "openvino" / "openvino_model.xml").is_file():
            kwargs["file_name"] = "openvino/openvino_model.xml"
        return SentenceTransformer(str(folder), device="cpu", backend="openvino", model_kwargs=kwargs)

    if not (folder / "openvino" / "openvino_model.xml").is_file():  # export once, as a user would
        load({}).save_pretrained(str(folder))
    bf16 = "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return {"st-openvino": ("bf16" if bf16 else "fp32", load({})),
            "st-openvino-f32": ("fp32", load({"INFERENCE_PRECISION_HINT": "f32"}))}


def fastembed_peer(bundle: Path, threads: int, dim: int):
    """fastembed on the bundle's own plain graph and tokenizer, mean pooling + normalize (the default
    model's head): TextEmbedding.embed with its default batch size."""
    from fastembed import TextEmbedding
    from fastembed.common.model_description import ModelSource, PoolingType

    name = "sbert-bundle/peer"
    if name not in [m["model"] for m in TextEmbedding.list_supported_models()]:
        TextEmbedding.add_custom_model(model=name, pooling=PoolingType.MEAN, normalization=True,
                                       sources=ModelSource(hf="sbert-bundle/peer"), dim=dim,
                                       model_file="onnx/model.onnx")
    model = TextEmbedding(model_name=name, specific_model_path=str(bundle), threads=threads)
    return lambda sentences: np.stack(list(model.embed(sentences)))


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
    parser.add_argument("--targets", nargs="*", choices=sorted(TARGETS), default=["peers", "openvino"],
                        help="which targets to check: peers and openvino (all-MiniLM-L6-v2: issues 11 and 22), "
                             "mpnet (all-mpnet-base-v2 INT8)")
    parser.add_argument("--no-fastembed", action="store_true", help="leave fastembed out")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    import onnxruntime as ort
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    import openvino

    from sbert_bundle import Bundle
    from sbert_bundle.bundle import rank_variants
    from sbert_bundle.cpu import cpu_info, describe_cpu
    from stages.common import row_cosines

    torch.set_num_threads(args.threads)
    sentences = [json.loads(line) for line in args.corpus.read_text(encoding="utf-8").splitlines()]
    reference = SentenceTransformer(str(args.model), device="cpu")
    contenders = {"pytorch": ("fp32", lambda: reference.encode(sentences, batch_size=args.batch_size))}
    for name, (cls, model) in peer_models(args.model, args.work, args.threads, args.qconfigs).items():
        contenders[name] = (cls, lambda m=model: m.encode(sentences, batch_size=args.batch_size))
    if not args.no_fastembed:
        embed = fastembed_peer(args.bundle, args.threads, reference.get_sentence_embedding_dimension())
        contenders["fastembed"] = ("fp32", lambda: embed(sentences))
    peers = list(contenders)
    default = Bundle.load(args.bundle, threads=args.threads)
    manifest = default.manifest
    ranked = rank_variants(manifest, None)
    lossy = [n for n, d, why in ranked if d == "cpu" and manifest["variants"][n]["precision"] in ("int8", "bf16")]
    ours = args.variants or [n for n, d, why in ranked if d == "cpu" and not why] + lossy
    for name in dict.fromkeys(ours):
        bundle = Bundle.load(args.bundle, variant=name, threads=args.threads, verify_integrity=False)
        contenders[name] = (manifest["variants"][name]["precision"], lambda b=bundle: b.encode(sentences))

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
    cpu = cpu_info()
    versions = {"sentence-transformers": sentence_transformers.__version__, "onnxruntime": ort.__version__,
                "torch": torch.__version__, "openvino": openvino.__version__.split("-")[0]}
    if "fastembed" in contenders:
        import fastembed
        versions["fastembed"] = fastembed.__version__
    print(f"\n{time.strftime('%Y-%m-%d')} {platform.node()}, CPU {describe_cpu(cpu)}, "
          f"{args.threads} threads each, {len(sentences)} sentences ({np.mean(tokens):.1f} tokens on average after "
          f"truncation to {reference.max_seq_length}), {args.rounds} alternating rounds; "
          + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"default variant here: {default.variant} ({default.describe()['cpu']['why']})")
    print(f"{'contender':<20} {'class':<5} {'sent/s':>7} {'vs torch':>8} {'vs best peer':>26} {'min cos':>9} {'mean cos':>9}")
    for row in rows:
        versus = f"{row['vs_best_peer']:.2f}x {row['best_peer']}" if row["vs_best_peer"] else ""
        print(f"{row['contender']:<20} {row['class']:<5} {row['sentences_per_s']:>7.0f} {row['vs_pytorch']:>7.2f}x "
              f"{versus:>26} {row['min_cos']:>9.6f} {row['mean_cos']:>9.6f}")
    targets = check_targets(args.targets, rows, peers, default.variant, ratio)
    print("targets:")
    for t in targets:
        print(f"  {'met   ' if t['met'] else 'MISSED'} {t['set']}: {t['target']}: {t['ours']} {t['ratio']:.2f}x "
              f"{t['against']} (want >= {t['want']}x), min cos {t['min_cos']:.6f} (want >= {t['want_cos']})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "host": platform.node(), "cpu": cpu,
                                         "threads": args.threads, "rounds": args.rounds, "command": " ".join(sys.argv),
                                         "versions": versions, "default_variant": default.variant,
                                         "rows": rows, "targets": targets}, indent=2) + "\n")


def check_targets(sets: list[str], rows: list[dict], peers: list[str], default: str, ratio) -> list[dict]:
    """Each target of the chosen sets, for each of our rows it applies to: the ratio against the
    fastest of its peers measured in this run, and whether ratio and parity are met."""
    by_name = {r["contender"]: r for r in rows}
    ours = [r for r in rows if r["ours"]]
    results = []
    for set_name in sets:
        for label, (which, want, against, want_cos) in TARGETS[set_name].items():
            if which == "default":
                subjects = [by_name[default]] if default in by_name else []
            elif which == "fastest lossy":
                lossy = [r for r in ours if r["class"] != "fp32"]
                subjects = [max(lossy, key=lambda r: r["sentences_per_s"])] if lossy else []
            else:
                subjects = [r for r in ours if r["class"] == which.split(":", 1)[1]]
            candidates = [p for p in peers if any(p == a or (a.endswith("*") and p.startswith(a[:-1]))
                                                  for a in against)]
            if not subjects or not candidates:
                continue
            best = max(candidates, key=lambda p: by_name[p]["sentences_per_s"])
            for row in subjects:
                got = ratio(row["contender"], best)
                results.append({"set": set_name, "target": label, "ours": row["contender"], "against": best,
                                "ratio": got, "want": want, "min_cos": row["min_cos"], "want_cos": want_cos,
                                "met": got >= want and row["min_cos"] >= want_cos})
    return results


if __name__ == "__main__":
    main()
