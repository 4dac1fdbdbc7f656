"""GPU benchmark for issue-5 targets: model-only latency and end-to-end throughput vs PyTorch.

    python tests/benchmarks/gpu_bench.py --out benchmarks/results/   # on a CUDA machine
    python tests/benchmarks/gpu_bench.py --device cpu --quick          # smoke run of the script

Model only (inputs already on the device, no tokenization): PyTorch fp32 / fp16 eager
(transformers AutoModel from artifacts/split/transformer) against onnxruntime running the
bundle's fp16-fused graph with IO binding, without and with a CUDA graph, and the TensorRT
plan when the bundle has one. End to end: sentence-transformers fp32 `encode` against
`Bundle.encode` on short sentences. Every ratio comes from this one run; the table and a JSON
record (date, device, command, versions) are written to --out.
"""

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SHAPES = [(1, 16), (1, 128), (32, 128), (128, 128), (256, 256)]


def median_ms(fn, sync, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def ort_runner(path: Path, device: str, shape, vocab: int, cuda_graph: bool):
    """A no-argument callable running the graph once on device-resident inputs."""
    import onnxruntime as ort

    dev = "cuda" if device == "cuda" else "cpu"
    providers = ([("CUDAExecutionProvider", {"enable_cuda_graph": "1" if cuda_graph else "0"})] if dev == "cuda"
                 else []) + ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), providers=providers)
    if dev == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":  # onnxruntime falls back quietly
        sys.exit(f"onnxruntime did not start CUDA for {path} (providers {session.get_providers()})")
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(1000, vocab, size=shape, dtype=np.int64),
             "attention_mask": np.ones(shape, dtype=np.int64), "token_type_ids": np.zeros(shape, dtype=np.int64)}
    binding = session.io_binding()
    for inp in session.get_inputs():
        binding.bind_ortvalue_input(inp.name, ort.OrtValue.ortvalue_from_numpy(feeds[inp.name], dev, 0))
    out = session.get_outputs()[0]
    hidden = out.shape[-1]
    dtype = np.float16 if out.type == "tensor(float16)" else np.float32  # the graph's own output type
    binding.bind_ortvalue_output(out.name, ort.OrtValue.ortvalue_from_shape_and_type([*shape, hidden], dtype, dev, 0))
    options = ort.RunOptions()
    if cuda_graph:
        options.add_run_config_entry("gpu_graph_id", "1")
    return lambda: session.run_with_iobinding(binding, options)


def targets(by: dict, shapes: list, e2e_ratio: float) -> list[str]:
    """Issue 5's targets, each with the measured value and met / MISSED."""
    ours = {shape: min((ms, impl) for (impl, s), ms in by.items() if s == shape and not impl.startswith("pytorch"))
            for shape in shapes}
    lines = ["targets:"]
    if (1, 16) in ours:
        ms, impl = ours[(1, 16)]
        lines.append(f"  1x16 model only <= 0.25 ms: {ms:.3f} ms ({impl}) {'met' if ms <= 0.25 else 'MISSED'}")
    torch16 = by.get(("pytorch float16 eager", (256, 256)))
    if (256, 256) in ours and torch16:
        ms, impl = ours[(256, 256)]
        ratio = torch16 / ms
        lines.append(f"  256x256 >= 1.3x PyTorch fp16 eager: {ratio:.2f}x ({impl}) {'met' if ratio >= 1.3 else 'MISSED'}")
    lines.append(f"  end to end >= 5x sentence-transformers fp32: {e2e_ratio:.2f}x {'met' if e2e_ratio >= 5 else 'MISSED'}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "artifacts" / "minilm_l6" / "bundle")
    parser.add_argument("--transformer", type=Path, default=REPO / "artifacts" / "minilm_l6" / "split" / "transformer")
    parser.add_argument("--reference", type=Path, default=REPO / "artifacts" / "minilm_l6" / "source" / "model")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--sentences", type=int, default=20000)
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats (smoke run)")
    parser.add_argument("--out", type=Path, help="folder for gpu_bench-<date>.json and .md")
    args = parser.parse_args()

    import torch  # before onnxruntime, so that onnxruntime-gpu finds the CUDA libraries torch loaded
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from sbert_bundle import Bundle

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu for a smoke run")
    shapes = [(1, 16), (2, 32)] if args.quick else SHAPES
    warmup, repeats = (1, 3) if args.quick else (10, 50)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    fused16 = args.bundle / manifest["variants"]["fp16-fused"]["file"]
    vocab = AutoModel.from_pretrained(args.transformer).config.vocab_size

    rows = []
    for dtype in (torch.float32, torch.float16):
        if dtype == torch.float16 and args.device == "cpu":
            continue
        model = AutoModel.from_pretrained(args.transformer, dtype=dtype).to(args.device).eval()
        for shape in shapes:
            ids = torch.randint(1000, vocab, shape, device=args.device)
            feeds = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
            with torch.inference_mode():
                ms = median_ms(lambda: model(**feeds), sync, warmup, repeats)
            rows.append({"impl": f"pytorch {str(dtype)[6:]} eager", "shape": shape, "ms": ms})
    for graph in ([False, True] if args.device == "cuda" else [False]):
        for shape in shapes:
            run = ort_runner(fused16, args.device, shape, vocab, graph)
            rows.append({"impl": "ort fp16-fused" + (" + cuda graph" if graph else ""), "shape": shape,
                         "ms": median_ms(run, lambda: None, warmup, repeats)})
    from sbert_bundle.backends import pick_device

    placed = {n: pick_device(v) for n, v in manifest["variants"].items() if v["backend"] == "tensorrt"}
    for name, (device, why) in placed.items():
        if device is None or why:  # not here, or another GPU target's plan (runs only when named)
            print(f"TensorRT plan {name} skipped: {why}")
    trt_plans = [n for n, (device, why) in placed.items() if device is not None and not why]  # this GPU's target
    if trt_plans and args.device == "cuda":
        bundle = Bundle.load(args.bundle, variant=trt_plans[0])
        for shape in shapes:
            feeds = {k: np.asarray(v) for k, v in {
                "input_ids": np.random.default_rng(0).integers(1000, vocab, size=shape, dtype=np.int64),
                "attention_mask": np.ones(shape, dtype=np.int64), "token_type_ids": np.zeros(shape, dtype=np.int64)}.items()}
            rows.append({"impl": f"tensorrt {trt_plans[0]} (host copies included)", "shape": shape,
                         "ms": median_ms(lambda: bundle.backend(feeds), lambda: None, warmup, repeats)})

    words = "the a quick brown fox jumps over lazy dog in park with ball and cat sat on mat".split()
    rng = np.random.default_rng(1)
    n = 500 if args.quick else args.sentences
    sentences = [" ".join(rng.choice(words, size=rng.integers(4, 16))) for _ in range(n)]
    st = SentenceTransformer(str(args.reference), device=args.device)
    st.encode(sentences[:256], batch_size=128)
    t_st = median_ms(lambda: st.encode(sentences, batch_size=128), sync, 0, 1 if args.quick else 3) / 1e3
    best = Bundle.load(args.bundle, variant=None if args.device == "cuda" else "fp32-fused")
    best.encode(sentences[:256], batch_size=128)
    t_b = median_ms(lambda: best.encode(sentences, batch_size=128), lambda: None, 0, 1 if args.quick else 3) / 1e3
    graphs = best.backend.graph_status() if hasattr(best.backend, "graph_status") else {}

    # The host's share of Bundle.encode (tokenize, sort, pad, pool): the same call with a backend
    # that returns zeros at once. If end to end misses its target, this says whether the host is why.
    real_backend, hidden = best.backend, best.head.hidden_size
    best.backend = lambda f: np.zeros((*f["input_ids"].shape, hidden), np.float32)
    t_host = median_ms(lambda: best.encode(sentences, batch_size=128), lambda: None, 0, 1 if args.quick else 3) / 1e3
    best.backend = real_backend

    by = {(r["impl"], tuple(r["shape"])): r["ms"] for r in rows}
    lines = [f"{'implementation (model only, ms)':<46} " + " ".join(f"{f'{b}x{s}':>9}" for b, s in shapes)]
    for impl in dict.fromkeys(r["impl"] for r in rows):
        lines.append(f"{impl:<46} " + " ".join(f"{by.get((impl, s), float('nan')):>9.3f}" for s in shapes))
    lines.append(f"end to end, {n} short sentences: sentence-transformers fp32 {n / t_st:.0f}/s, "
                 f"Bundle.encode ({best.variant} on {best.device}) {n / t_b:.0f}/s, ratio {t_st / t_b:.2f}x; "
                 f"host side alone {n / t_host:.0f}/s")
    if graphs:
        states = [v.split(":")[0] for v in graphs.values()]
        lines.append("CUDA graph buckets: " + ", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(states)))
        lines += [f"  {b}: {v}" for b, v in graphs.items() if v.startswith("failed")]
    lines += targets(by, shapes, t_st / t_b)
    table = "\n".join(lines)
    print(table)
    record = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor(),
              "command": " ".join(sys.argv), "rows": rows, "table": table,
              "end_to_end": {"sentences": n, "pytorch_per_s": n / t_st, "bundle_per_s": n / t_b,
                             "host_side_per_s": n / t_host, "variant": best.variant, "ratio": t_st / t_b,
                             "cuda_graph_buckets": graphs}}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"gpu_bench-{record['date'][:10]}-{args.device}"
        stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
        stem.with_suffix(".md").write_text(f"# {record['device']}, {record['date']}\n\n`{record['command']}`\n\n"
                                           f"```\n{table}\n```\n")


if __name__ == "__main__":
    main()
