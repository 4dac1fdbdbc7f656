"""Stage `verify`: parity and speed of every bundle variant against sentence-transformers.

Loads the bundle through sbert_bundle exactly as a consumer would, encodes the evaluation
corpus with each variant that runs here and with SentenceTransformer.encode (PyTorch),
and checks the gates in conf/verify/. Parity is against PyTorch fp32 on the CPU; speed
("vs torch") against PyTorch on the variant's own device (CPU, or the GPU for CUDA and
TensorRT variants). Writes (never touching the bundle), in two kinds:
  what repeats bit for bit on the same CPU type (stage outputs in dvc.lock; release seals
  report.json, so a rebuild there gives the same release archive; on another CPU type the parity
  figures' last bits may differ, which `make rebuild-check` reports as measured here):
    artifacts/<model>/verify/report.json      gate results per variant: device, parity, worst sentence
    artifacts/<model>/verify/metrics.json     DVC metrics: parity per variant
    artifacts/<model>/verify/plots/cosine/    DVC plots: per-sentence cosine, sorted
  measurements that differ on every run (DVC metrics and plots declared at the top of dvc.yaml,
  not stage outputs, so they never make dvc.lock or the release differ):
    artifacts/<model>/verify/speed.json       throughput, speedup and latency buckets per variant
    artifacts/<model>/verify/plots/latency/   DVC plots: latency vs batch size
Exits 1 naming every failed gate (variant, figure, threshold, worst sentence).

Also usable on any bundle:  python -m stages.verify --bundle PATH --reference MODEL_DIR
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .common import (StageError, atomic_dir, atomic_file, load_model, progress_enabled, row_cosines, stage_main,
                     write_json)

log = logging.getLogger("stages.verify")
TOP_K = 10


class GateError(StageError):
    """One or more variants missed a gate."""


def load_corpus(path: Path) -> list[str]:
    sentences = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise StageError(f"{path}:{n} is not a JSON string: {e}") from None
        if not isinstance(item, str):
            raise StageError(f"{path}:{n} is {type(item).__name__}, expected a JSON string")
        sentences.append(item)
    if len(sentences) < TOP_K + 1:
        raise StageError(f"{path} has {len(sentences)} sentences; parity needs at least {TOP_K + 1}")
    return sentences


# --- parity -------------------------------------------------------------------------------

def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def top_k_agreement(ref: np.ndarray, emb: np.ndarray, k: int = TOP_K) -> float:
    """Mean share of each sentence's k nearest neighbours (by the variant) that are among the
    reference's k nearest; ties in the reference (identical sentences) count as agreement."""
    sim_ref, sim_var = _unit(ref) @ _unit(ref).T, _unit(emb) @ _unit(emb).T
    np.fill_diagonal(sim_ref, -np.inf)
    np.fill_diagonal(sim_var, -np.inf)
    kth_ref = -np.sort(-sim_ref, axis=1)[:, k - 1]
    top_var = np.argsort(-sim_var, axis=1)[:, :k]
    picked = np.take_along_axis(sim_ref, top_var, axis=1)
    return float((picked >= kth_ref[:, None] - 1e-6).mean())


def spearman_of_similarities(ref: np.ndarray, emb: np.ndarray) -> float:
    from scipy.stats import spearmanr

    iu = np.triu_indices(len(ref), k=1)
    return float(spearmanr((_unit(ref) @ _unit(ref).T)[iu], (_unit(emb) @ _unit(emb).T)[iu]).statistic)


def parity(ref: np.ndarray, emb: np.ndarray, sentences: list[str]) -> tuple[dict, np.ndarray]:
    cos = row_cosines(ref, emb)
    worst = int(np.argmin(cos))
    return {
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
        "top10_agreement": top_k_agreement(ref, emb),
        "spearman": spearman_of_similarities(ref, emb),
        "worst_index": worst,
        "worst_sentence": sentences[worst][:120],
    }, cos


def check_gates(name: str, metrics: dict, gates: dict, min_speedup: float | None) -> list[str]:
    failures = []
    for key, metric in (("min_cosine", "min_cosine"), ("min_top10_agreement", "top10_agreement"),
                        ("min_spearman", "spearman")):
        threshold = gates.get(key)
        if threshold is not None and metrics[metric] < threshold:
            where = f" (worst sentence #{metrics['worst_index']}: {metrics['worst_sentence']!r})" \
                if metric == "min_cosine" else ""
            failures.append(f"{name}: {metric} {metrics[metric]:.6f} < {threshold}{where}")
    if min_speedup is not None and metrics.get("device") == "cpu" and metrics["speedup"] < min_speedup:
        failures.append(f"{name}: speedup {metrics['speedup']:.2f}x < min_speedup {min_speedup}x")
    return failures


# --- speed --------------------------------------------------------------------------------

def _percentiles(times: list[float]) -> dict:
    ms = np.array(times) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99))}


def time_calls(fn, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def bucket_inputs(batch: int, length: int, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids of exactly `length` (no padding): model + head latency without tokenization."""
    rng = np.random.default_rng(seed)
    low = min(1000, vocab_size // 2)  # skip the special / unused ids at the start of most vocabularies
    ids = rng.integers(low, vocab_size, size=(batch, length), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def throughput(encode, sentences: list[str], rounds: int) -> float:
    """Best sentences/s over `rounds` full passes (tokenization included)."""
    best = min(time_calls(lambda: encode(sentences), 0, rounds))
    return len(sentences) / best


# --- the stage ----------------------------------------------------------------------------

def run(cfg: dict, bundle_path: Path, reference: Path, corpus: Path) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    from sbert_bundle import Bundle
    from sbert_bundle.bundle import rank_variants
    from sbert_bundle.manifest import MANIFEST_FILE, sha256_file

    sentences = load_corpus(corpus)
    bs = cfg["batch_size"]
    threads = cfg["threads"] or None
    if threads:
        torch.set_num_threads(threads)
    probe = Bundle.load(bundle_path)  # integrity check + what runs here
    wanted = cfg["variants"]
    ranked = rank_variants(probe.manifest, None)
    skipped = {n: r for n, d, r in ranked if d is None}
    names = [n for n, d, _ in ranked if d is not None and (wanted == "all" or n in wanted)]
    unknown = [] if wanted == "all" else sorted(set(wanted) - set(probe.manifest["variants"]))
    if unknown:
        raise StageError(f"verify.variants names {unknown}, not in the bundle; it has {sorted(probe.manifest['variants'])}")

    log.info("reference: SentenceTransformer(%s) on %d sentences", reference, len(sentences))
    st = SentenceTransformer(str(reference), device="cpu", trust_remote_code=False)  # parity: always the exact fp32 CPU result
    ref = st.encode(sentences, batch_size=bs, convert_to_numpy=True)
    speed = cfg["speed"]
    vocab = st.tokenizer.vocab_size
    torch_speed = {}  # device -> PyTorch's throughput and latency there: each variant is compared on its device

    def pytorch_on(device: str) -> dict:
        if device not in torch_speed:
            model = st if device == "cpu" else SentenceTransformer(str(reference), device=device,
                                                                           trust_remote_code=False)
            sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
            tput = throughput(lambda s: model.encode(s, batch_size=bs, convert_to_numpy=True), sentences,
                              speed["throughput_rounds"])
            lat = {}
            for b in speed["batch_sizes"]:
                for length in speed["seq_lengths"]:
                    feats = {k: torch.from_numpy(v).to(device) for k, v in bucket_inputs(b, length, vocab).items()}

                    def forward():
                        with torch.inference_mode():
                            model.forward(dict(feats))
                        sync()
                    lat[(b, length)] = _percentiles(time_calls(forward, speed["warmup"], speed["repeats"]))
            torch_speed[device] = {"sentences_per_s": tput, "latency": lat}
        return torch_speed[device]

    cpu_ref = pytorch_on("cpu")
    report = {"bundle": {**{k: probe.manifest.get(k) for k in ("name", "version", "created", "params_sha256")},
                         "manifest_sha256": sha256_file(probe.root / MANIFEST_FILE)},
              "corpus": {"path": str(corpus), "sentences": len(sentences)},
              "reference": {"kind": "sentence-transformers", "path": str(reference), "parity_device": "cpu",
                            "sentences_per_s": cpu_ref["sentences_per_s"]},
              "variants": {}, "skipped": skipped, "failures": []}
    latency_rows, cosines = [], {}
    for name in tqdm(names, desc="verify variants", unit="variant", disable=not progress_enabled()):
        # the probe already extracted (if an archive) and checked the bundle: load from its folder
        bundle = Bundle.load(probe.root, variant=name, threads=threads, verify_integrity=False)
        emb = bundle.encode(sentences, batch_size=bs)
        metrics, cos = parity(ref, emb, sentences)
        cosines[name] = cos
        tput = throughput(lambda s: bundle.encode(s, batch_size=bs), sentences, speed["throughput_rounds"])
        torch_here = pytorch_on(bundle.device)
        metrics.update(device=bundle.device, sentences_per_s=tput, speedup=tput / torch_here["sentences_per_s"])
        buckets = []
        for (b, length), ref_p in torch_here["latency"].items():
            feats = bucket_inputs(b, length, vocab)
            run_once = lambda: bundle.head(bundle.backend(feats), feats["attention_mask"])  # noqa: E731
            p = _percentiles(time_calls(run_once, speed["warmup"], speed["repeats"]))
            buckets.append({"batch_size": b, "seq_len": length, **p, "pytorch_p50_ms": ref_p["p50_ms"],
                            "speedup_p50": ref_p["p50_ms"] / p["p50_ms"]})
        latency_rows.append((name, buckets))
        precision = bundle.manifest["variants"][name]["precision"]
        failures = check_gates(name, metrics, cfg["gates"][precision], cfg.get("min_speedup"))
        metrics["passed"] = not failures
        metrics["latency"] = buckets
        report["variants"][name] = metrics
        report["failures"] += failures
        log.info("%s on %s: min cos %.6f, %.0f sentences/s (%.2fx) %s", name, bundle.device,
                 metrics["min_cosine"], tput, metrics["speedup"], "ok" if not failures else "FAILED")
    report["pytorch"] = {device: {"sentences_per_s": t["sentences_per_s"],
                                  "latency": [{"batch_size": b, "seq_len": l, **p} for (b, l), p in t["latency"].items()]}
                         for device, t in torch_speed.items()}
    report["_plots"] = {"latency": latency_rows, "cosine": cosines}
    return report


def table(report: dict) -> str:
    head = f"{'variant':<14} {'device':<6} {'min cos':>10} {'mean cos':>10} {'top10':>6} {'spearman':>9} " \
           f"{'sent/s':>8} {'vs torch':>8} {'gate':>5}"
    lines = [head, "-" * len(head)]
    for device, t in report["pytorch"].items():  # "vs torch": against PyTorch on the variant's own device
        lines.append(f"{'pytorch (ref)':<14} {device:<6} {'':>10} {'':>10} {'':>6} {'':>9} "
                     f"{t['sentences_per_s']:>8.0f} {'1.00x':>8} {'':>5}")
    for name, m in report["variants"].items():
        lines.append(f"{name:<14} {m['device']:<6} {m['min_cosine']:>10.6f} {m['mean_cosine']:>10.6f} "
                     f"{m['top10_agreement']:>6.3f} {m['spearman']:>9.6f} {m['sentences_per_s']:>8.0f} "
                     f"{m['speedup']:>7.2f}x {'pass' if m['passed'] else 'FAIL':>5}")
    for name, why in report["skipped"].items():
        lines.append(f"{name:<14} not run here: {why}")
    return "\n".join(lines)


# Per-variant figures that are measurements of time: they go to speed.json, never to the report.
SPEED_KEYS = ("sentences_per_s", "speedup", "latency")
PARITY_KEYS = ("min_cosine", "mean_cosine", "top10_agreement", "spearman")


def split_report(report: dict) -> tuple[dict, dict]:
    """(gate report, speed record): the report holds only what repeats on the same machine type."""
    gates = {k: v for k, v in report.items() if k not in ("pytorch", "_plots")}
    gates["reference"] = {k: v for k, v in report["reference"].items() if k != "sentences_per_s"}
    gates["variants"] = {n: {k: v for k, v in m.items() if k not in SPEED_KEYS} for n, m in report["variants"].items()}
    speed = {"reference_sentences_per_s": report["reference"]["sentences_per_s"], "pytorch": report.get("pytorch"),
             "variants": {n: {k: m[k] for k in SPEED_KEYS if k in m} for n, m in report["variants"].items()}}
    return gates, speed


def write_outputs(report: dict, out: Path) -> None:
    plots = report.pop("_plots")
    gates, speed = split_report(report)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {"variants": {n: {k: m[k] for k in (*PARITY_KEYS, "passed")} for n, m in gates["variants"].items()}}
    speed_metrics = {"reference_sentences_per_s": speed["reference_sentences_per_s"],
                     "variants": {n: {k: m[k] for k in ("sentences_per_s", "speedup") if k in m}
                                  for n, m in speed["variants"].items()}}
    for name, data in (("metrics.json", metrics), ("report.json", gates), ("speed.json", {**speed_metrics, **speed})):
        with atomic_file(out / name) as tmp:
            write_json(tmp, data)
    (out / "plots").mkdir(exist_ok=True)
    with atomic_dir(out / "plots" / "latency") as tmp:
        for name, buckets in plots["latency"]:
            for length in sorted({b["seq_len"] for b in buckets}):
                with open(tmp / f"{name}_len{length}.csv", "w", newline="") as f:
                    w = csv.DictWriter(f, ["batch_size", "p50_ms", "p95_ms", "pytorch_p50_ms"], extrasaction="ignore")
                    w.writeheader()
                    w.writerows(b for b in buckets if b["seq_len"] == length)
    with atomic_dir(out / "plots" / "cosine") as tmp:
        for name, cos in plots["cosine"].items():
            with open(tmp / f"{name}.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["rank", "cosine"])
                w.writerows((i, f"{c:.8f}") for i, c in enumerate(np.sort(cos)))


def main() -> None:
    def add_args(p):
        p.add_argument("--bundle", type=Path, help="bundle folder or .tar.gz (default: artifacts/<model>/bundle)")
        p.add_argument("--reference", type=Path,
                       help="sentence-transformers model folder to compare with (default: artifacts/<model>/source/model)")
        p.add_argument("--out", type=Path, help="where metrics, report and plots go (default: artifacts/<model>/verify)")

    def body(args):
        _, params, art = load_model(args)
        cfg = params["verify"]
        args.bundle = args.bundle or art / "bundle"
        args.reference = args.reference or art / "source" / "model"
        args.out = args.out or art / "verify"
        for path, what in ((args.bundle, "bundle"), (args.reference, "reference model")):
            if not path.exists():
                raise StageError(f"{what} {path} not found")
        report = run(cfg, args.bundle, args.reference, Path(cfg["corpus"]))
        failures = report["failures"]
        write_outputs(report, args.out)
        print(table(report))
        if failures:
            raise GateError(f"{len(failures)} gate(s) failed:\n  " + "\n  ".join(failures))
        print(f"all gates passed for {len(report['variants'])} variant(s); report in {args.out}")

    stage_main(__doc__, body, add_args)


if __name__ == "__main__":
    main()
