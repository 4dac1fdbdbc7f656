"""Load a bundle and encode sentences the way sentence-transformers would."""

from __future__ import annotations

import json
import logging
import tarfile
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from .backends import open_backend, pick_device
from .head import HEAD_FILE, load_head
from .manifest import MANIFEST_FILE, IntegrityError, check_integrity, read_manifest
from .tokenization import TOKENIZER_FILE, TextTokenizer

log = logging.getLogger(__name__)

REPORT_FILE = "verify.json"
# Without a verify report, CPU variants are preferred in this order (the most exact first).
CPU_PREFERENCE = ("fp32-fused", "fp32", "int8")
# On a GPU: a TensorRT plan first, then the fused fp16 graph on onnxruntime CUDA.
GPU_PREFERENCE = ("fp16-fused", "fp16", "fp32-fused", "fp32")


class VariantError(LookupError):
    """The requested variant is unknown or cannot run here; lists what can."""


def _extract_tarball(path: Path) -> tuple[Path, tempfile.TemporaryDirectory]:
    tmp = tempfile.TemporaryDirectory(prefix="sbert-bundle-")
    with tarfile.open(path) as tar:
        tar.extractall(tmp.name, filter="data")
    manifests = sorted(Path(tmp.name).rglob(MANIFEST_FILE), key=lambda p: len(p.parts))
    if not manifests:
        tmp.cleanup()
        raise FileNotFoundError(f"{path} holds no {MANIFEST_FILE}: not a bundle archive")
    return manifests[0].parent, tmp


def rank_variants(manifest: dict, report: dict | None) -> list[tuple[str, str | None, str]]:
    """Every variant as (name, device or None, why), best first for `variant=None`."""
    variants = manifest.get("variants", {})
    placed = {name: pick_device(v) for name, v in variants.items()}
    passed = None
    if report:
        passed = {name: r for name, r in report.get("variants", {}).items() if r.get("passed")}

    def key(name: str):
        device, _ = placed[name]
        v = variants[name]
        if device is None:
            return (9, 0.0, name)
        if passed is not None and name not in passed:
            return (7, 0.0, name)
        if v["backend"] == "tensorrt":
            return (0, 0.0, name)
        if device == "cuda":
            return (1, GPU_PREFERENCE.index(name) if name in GPU_PREFERENCE else 9, name)
        if v.get("precision") == "fp16":  # runs on CPU, but only for checking: never chosen first
            return (8, 0.0, name)
        if passed is not None:
            return (2, -passed[name].get("sentences_per_s", 0.0), name)
        return (3, CPU_PREFERENCE.index(name) if name in CPU_PREFERENCE else 9, name)

    ranked = []
    for name in sorted(variants, key=key):
        device, reason = placed[name]
        if device is not None and passed is not None and name not in passed:
            checked = name in report.get("variants", {})
            reason = "did not pass its verify gates" if checked else "not checked by the verify report"
        ranked.append((name, device, reason))
    return ranked


class Bundle:
    """A loaded bundle variant. `encode` is safe to call from several threads at once."""

    def __init__(self, root: Path, manifest: dict, variant: str, device: str, threads: int | None = None,
                 report: dict | None = None, _tmp=None):
        self.root = Path(root)
        self.manifest = manifest
        self.variant = variant
        self.device = device
        self.report = report
        self._tmp = _tmp  # keeps an extracted archive alive as long as the bundle
        self.head = load_head(self.root)
        self.tokenizer = TextTokenizer(self.root / TOKENIZER_FILE, self.head)
        runtime = manifest.get("runtime", {})  # defaults the bundle was built with (conf/package)
        if threads is None and device == "cpu":
            threads = runtime.get("cpu_threads") or None
        spec = manifest["variants"][variant]
        try:
            self.backend = open_backend(self.root, spec, device, threads, runtime.get("cuda_graph_buckets"),
                                        self.head.pad_token_id)
        except Exception as e:  # e.g. onnxruntime-gpu but no usable GPU or driver (onnxruntime's own error types)
            if device != "cuda" or "cpu" not in spec.get("devices", []) or spec["backend"] != "onnxruntime":
                raise
            log.warning("variant %s: CUDA failed (%s); using the CPU", variant, e)
            self.device = device = "cpu"
            self.backend = open_backend(self.root, spec, "cpu", threads or runtime.get("cpu_threads") or None)
        self.embedding_dimension = self.head.embedding_dimension
        # On CPU, token-capped batches are much faster (activations stay in cache); GPUs like big ones.
        self.max_batch_tokens = runtime.get("cpu_max_batch_tokens") if device == "cpu" else None

    @classmethod
    def load(cls, path: str | Path, variant: str | None = None, threads: int | None = None,
             verify_integrity: bool = True) -> "Bundle":
        """Open a bundle folder or .tar.gz, check every file against the manifest, pick a variant.

        variant: a name from the manifest (`fp32`, `fp16-fused`, `int8`, a TensorRT plan…) or
        None for the best one that runs here.
        """
        path = Path(path)
        tmp = None
        if path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar")):
            root, tmp = _extract_tarball(path)
        elif path.is_dir():
            root = path
        else:
            raise FileNotFoundError(f"{path}: no such bundle folder or archive")
        manifest = read_manifest(root)
        if verify_integrity:
            check_integrity(root, manifest, required=runtime_files(root, manifest))
        report = None
        if tmp is not None and root != Path(tmp.name) and (root.parent / REPORT_FILE).is_file():
            report = _read_report(root.parent / REPORT_FILE)  # a sealed release: bundle/ + verify.json
        ranked = rank_variants(manifest, report)
        runnable = [(n, d) for n, d, r in ranked if d is not None and not r]
        if variant is None:  # the best that opens: a plan or GPU graph may still fail to load here
            failed = []
            for name, device in runnable:
                try:
                    log.info("bundle %s: using variant %s on %s", root, name, device)
                    return cls(root, manifest, name, device, threads, report, tmp)
                except Exception as e:  # noqa: BLE001 - TensorRT / onnxruntime raise their own types
                    log.warning("variant %s on %s failed to open (%s); trying the next one", name, device, e)
                    failed.append((name, None, f"failed to open: {e}"))
            ranked = failed + [r for r in ranked if r[0] not in {f[0] for f in failed}]
            raise VariantError(_explain(f"no variant of {root} runs here", ranked))
        if variant not in manifest.get("variants", {}):
            raise VariantError(_explain(f"variant {variant!r} is not in {root}", ranked))
        device = dict((n, d) for n, d, _ in ranked)[variant]
        if device is None:
            raise VariantError(_explain(f"variant {variant!r} cannot run here", ranked))
        log.info("bundle %s: using variant %s on %s", root, variant, device)
        return cls(root, manifest, variant, device, threads, report, tmp)

    def encode(self, sentences: str | Sequence[str], batch_size: int = 32,
               max_batch_tokens: int | None = -1) -> np.ndarray:
        """Embeddings as float32 (n, dim), in input order; a single string gives (dim,).

        Sentences are tokenized once, sorted by token length and batched so that a batch
        holds at most `batch_size` sentences and at most `max_batch_tokens` padded tokens
        (-1: the bundle's default for this device; None: no token limit). Small batches
        keep activations in cache on CPUs; results do not depend on the batching.
        """
        single = isinstance(sentences, str)
        items = [sentences] if single else list(sentences)
        for i, s in enumerate(items):
            if not isinstance(s, str):
                raise TypeError(f"sentences[{i}] is {type(s).__name__}, expected str")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_batch_tokens == -1:
            max_batch_tokens = self.max_batch_tokens
        out = np.empty((len(items), self.embedding_dimension), dtype=np.float32)
        encodings = self.tokenizer.encode(items)
        for idx in plan_batches([len(e.ids) for e in encodings], batch_size, max_batch_tokens):
            features = self.tokenizer.pad([encodings[i] for i in idx])
            out[idx] = self.head(self.backend(features), features["attention_mask"])
        return out[0] if single else out

    def describe(self) -> dict:
        """What `sbert-bundle inspect` prints: manifest summary and the variant choice here."""
        ranked = rank_variants(self.manifest, self.report)
        return {
            "name": self.manifest.get("name"),
            "version": self.manifest.get("version"),
            "created": self.manifest.get("created"),
            "source": {k: self.manifest.get("source", {}).get(k) for k in ("kind", "id", "revision")},
            "embedding_dimension": self.embedding_dimension,
            "max_seq_length": self.head.max_seq_length,
            "selected": {"variant": self.variant, "device": self.device},
            "variants": [
                {"name": n, "runs_here": d is not None and not r, "device": d, "why_not": r or None,
                 "gpu_note": _gpu_note(self.manifest["variants"][n], d),
                 **{k: self.manifest["variants"][n].get(k) for k in ("file", "backend", "precision", "fused")}}
                for n, d, r in ranked
            ],
            "tensorrt_build": self.manifest.get("tensorrt_build"),
            "verify": self.report,
        }


def _gpu_note(variant: dict, device: str | None) -> str | None:
    """Why a variant meant for a GPU is running on CPU (or not at all) here."""
    if "cuda" not in variant.get("devices", []) or device == "cuda":
        return None
    _, why = pick_device({**variant, "devices": ["cuda"]})
    if variant.get("precision") == "fp16" and device == "cpu":
        return f"GPU variant, run on CPU only when named (for checking): {why}"
    return f"not on GPU: {why}"


def plan_batches(lengths: list[int], batch_size: int, max_tokens: int | None) -> list[list[int]]:
    """Indices grouped longest first; each group within batch_size items and max_tokens padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and (
                max_tokens is None or (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def runtime_files(root: Path, manifest: dict) -> list[str]:
    """Every file the runtime reads: variant graphs/plans, head.json and what it points at, tokenizer."""
    files = [HEAD_FILE, TOKENIZER_FILE] + [v["file"] for v in manifest.get("variants", {}).values()]
    try:
        spec = json.loads((Path(root) / HEAD_FILE).read_text())
        files += [m[k] for m in spec.get("modules", []) for k in ("weight", "bias") if m.get(k)]
    except (OSError, json.JSONDecodeError):
        pass  # reported as missing / modified by the integrity check
    return files


def _read_report(path: Path) -> dict:
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise IntegrityError(f"{path.name} in the release archive is not valid JSON ({e})") from None
    if not isinstance(report, dict):
        raise IntegrityError(f"{path.name} in the release archive is not a JSON object")
    return report


def _explain(head: str, ranked) -> str:
    lines = [head + "; variants in this bundle:"]
    for name, device, reason in ranked:
        lines.append(f"  {name}: " + (f"runs here on {device}" if device and not reason else f"not usable: {reason}"))
    return "\n".join(lines)
