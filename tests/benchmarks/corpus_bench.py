"""Corpus-scale embedding against the tools a user would pick instead (not part of `make test`).

    .venv-peers/bin/python tests/benchmarks/corpus_bench.py [--rows 100000] [--json FILE]

Builds a corpus of --rows sentences (the evaluation corpus repeated, each copy numbered so that
no two rows are equal), then runs each contender as its own process on 2 cores, one after the
other, and records wall time (process start to exit: loading included), sentences/s, and peak
RSS of the whole process tree (sampled every 50 ms, workers included):
  ours-w1, ours-w2     `sbert-bundle encode` (the runtime from this checkout, in .venv) with
                       --workers 1 (1 process x 2 threads) and --workers 2 (2 x 1), to .npy
  fastembed-p1/-p2     fastembed TextEmbedding.embed(parallel=None / 2) on the bundle's own
                       onnx/model.onnx, batch_size 256 (its default) and threads 2 / 1 each
  st, st-mp2           sentence-transformers encode (batch 32), and its multi-process pool of 2
Parity: min cosine of each against `st` (the reference). fastembed runs on a copy of the bundle
whose tokenizer_config.json says max_length 256, the model's max_seq_length: fastembed reads that
file, not sentence_bert_config.json, and would otherwise cut sentences at 128 tokens.
Prints the CPU model and flags with the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

FASTEMBED = """
import sys, numpy as np
from fastembed import TextEmbedding
from fastembed.common.model_description import ModelSource, PoolingType
bundle, corpus, out, parallel, dim = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
TextEmbedding.add_custom_model(model="sbert-bundle/peer", pooling=PoolingType.MEAN, normalization=True,
                               sources=ModelSource(hf="sbert-bundle/peer"), dim=dim, model_file="onnx/model.onnx")
model = TextEmbedding(model_name="sbert-bundle/peer", specific_model_path=bundle, threads=2 if parallel <= 1 else 1)
texts = [line.rstrip("\\n") for line in open(corpus, encoding="utf-8")]
np.save(out, np.stack(list(model.embed(texts, parallel=parallel if parallel > 1 else None))).astype(np.float32))
"""
ST = """
import sys, numpy as np, torch
from sentence_transformers import SentenceTransformer
model_dir, corpus, out, processes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
texts = [line.rstrip("\\n") for line in open(corpus, encoding="utf-8")]
model = SentenceTransformer(model_dir, device="cpu")
if processes > 1:
    torch.set_num_threads(1)
    pool = model.start_multi_process_pool(["cpu"] * processes)
    emb = model.encode(texts, pool=pool, batch_size=32, chunk_size=2000)
    model.stop_multi_process_pool(pool)
else:
    torch.set_num_threads(2)
    emb = model.encode(texts, batch_size=32)
np.save(out, np.asarray(emb, dtype=np.float32))
"""


def measure(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS of the process tree in MiB)."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} ... exited {proc.returncode}")
    return time.perf_counter() - start, peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--bundle", type=Path, default=REPO / "artifacts" / "minilm_l6" / "bundle")
    parser.add_argument("--model", type=Path, default=REPO / "artifacts" / "minilm_l6" / "source" / "model")
    parser.add_argument("--ours-python", type=Path, default=REPO / ".venv" / "bin" / "python",
                        help="the venv our runtime runs in (make install)")
    parser.add_argument("--only", nargs="*", help="contenders to run (default: all)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from sbert_bundle.cpu import cpu_info, describe_cpu

    work = Path(tempfile.mkdtemp(prefix="corpus-bench-"))
    base = [json.loads(line).replace("\n", " ").replace("\r", " ")
            for line in (REPO / "stages" / "data" / "eval_corpus.jsonl").read_text(encoding="utf-8").splitlines()]
    corpus = work / "corpus.txt"
    with open(corpus, "w", encoding="utf-8") as f:
        for i in range(args.rows):
            f.write(f"{base[i % len(base)]} ({i // len(base)})\n")
    fe_bundle = work / "bundle-fastembed"
    shutil.copytree(args.bundle, fe_bundle)
    config = json.loads((fe_bundle / "tokenizer_config.json").read_text())
    config["max_length"] = json.loads((args.bundle / "sentence_bert_config.json").read_text())["max_seq_length"]
    (fe_bundle / "tokenizer_config.json").write_text(json.dumps(config))
    from sbert_bundle import Bundle

    dim = Bundle.load(args.bundle).embedding_dimension
    ours = [str(args.ours_python), "-m", "sbert_bundle.cli", "encode", str(args.bundle), "-i", str(corpus), "-q"]
    contenders = {
        "ours-w1": ours + ["--workers", "1", "-o", str(work / "ours-w1.npy")],
        "ours-w2": ours + ["--workers", "2", "-o", str(work / "ours-w2.npy")],
        "fastembed-p1": [sys.executable, "-c", FASTEMBED, str(fe_bundle), str(corpus), str(work / "fastembed-p1.npy"),
                         "1", str(dim)],
        "fastembed-p2": [sys.executable, "-c", FASTEMBED, str(fe_bundle), str(corpus), str(work / "fastembed-p2.npy"),
                         "2", str(dim)],
        "st": [sys.executable, "-c", ST, str(args.model), str(corpus), str(work / "st.npy"), "1"],
        "st-mp2": [sys.executable, "-c", ST, str(args.model), str(corpus), str(work / "st-mp2.npy"), "2"],
    }
    if args.only:
        contenders = {k: v for k, v in contenders.items() if k in args.only or k == "st"}
    results = {}
    for name, cmd in contenders.items():
        seconds, peak = measure(cmd)
        results[name] = {"seconds": seconds, "sentences_per_s": args.rows / seconds, "peak_rss_mib": peak}
        print(f"{name}: {seconds:.1f} s, {args.rows / seconds:.0f} sentences/s, peak RSS {peak:.0f} MiB",
              file=sys.stderr)
    ref = np.load(work / "st.npy")
    for name in results:
        emb = np.load(work / f"{name}.npy").astype(np.float32)
        cos = (emb * ref).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref, axis=1)
        results[name]["min_cos"] = float(cos.min())
    best = {prefix: max((n for n in results if n.startswith(prefix + "-") or n == prefix),
                        key=lambda n: results[n]["sentences_per_s"], default=None)
            for prefix in ("ours", "fastembed", "st")}
    print(f"\n{time.strftime('%Y-%m-%d')} CPU {describe_cpu(cpu_info())}, {args.rows} sentences, 2 cores; "
          f"each contender alone, one after the other")
    print(f"{'contender':<14} {'seconds':>8} {'sent/s':>8} {'peak RSS':>9} {'min cos':>9}")
    for name, r in results.items():
        print(f"{name:<14} {r['seconds']:>8.1f} {r['sentences_per_s']:>8.0f} {r['peak_rss_mib']:>6.0f} MiB "
              f"{r['min_cos']:>9.6f}")
    if best["ours"]:
        for peer in ("fastembed", "st"):
            if best[peer]:
                ratio = results[best["ours"]]["sentences_per_s"] / results[best[peer]]["sentences_per_s"]
                print(f"best ours ({best['ours']}) vs best {peer} ({best[peer]}): {ratio:.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "cpu": cpu_info(), "rows": args.rows,
                                         "command": " ".join(sys.argv), "results": results, "best": best},
                                        indent=2) + "\n")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
