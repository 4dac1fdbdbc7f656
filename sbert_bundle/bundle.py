"""Load a bundle and encode sentences the way sentence-transformers would."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from .archive import REPORT_FILE, SEAL_FILE, extract_bundle
from .backends import open_backend, pick_device
from . import cpu
from .head import HEAD_FILE, load_head
from .manifest import (MANIFEST_FILE, IntegrityError, check_integrity, check_threads, cpu_count, read_manifest,
                       sha256_file)
from .tokenization import TOKENIZER_FILE, TextTokenizer

log = logging.getLogger(__name__)

PUBLISHED_FILE = "published.json"  # written by `sbert-bundle pull` beside a release's bundle/
# Exact CPU variants are ranked by what this CPU is (sbert_bundle.cpu.exact_order): onnxruntime's
# fp32-fused and fp32, and OpenVINO's ov-fp32, in the order measured fastest on such a CPU.
# Lossy variants (int8, ov-bf16) are never picked by default: they run only when named.
# On a GPU: the TensorRT plan of this GPU's target first (sbert_bundle.trt.target_choice), then
# the fused fp16 graph on onnxruntime CUDA.
GPU_PREFERENCE = ("fp16-fused", "fp16", "fp32-fused", "fp32")


class VariantError(LookupError):
    """The requested variant is unknown or cannot run here; lists what can."""


class TextError(ValueError):
    """sentences[index] cannot be tokenized; `problem` says why (callers with their own field names,
    such as the server, name the input from index and problem)."""

    def __init__(self, index: int, problem: str):
        super().__init__(f"sentences[{index}] {problem}")
        self.index, self.problem = index, problem


class NonFiniteError(ArithmeticError):
    """A variant produced NaN or Inf embeddings: its numbers are wrong, not just imprecise."""


def exact_here(variant: dict, device: str | None) -> bool:
    """Whether `variant=None` may pick this variant on device: fp32 anywhere, fp16 only on a GPU.
    Lossy ones (int8, fp16 on a CPU) give other embeddings than the reference: only when named."""
    precision = variant.get("precision")
    return precision == "fp32" or (precision == "fp16" and device == "cuda")


def rank_variants(manifest: dict, report: dict | None, device_id: int = 0) -> list[tuple[str, str | None, str]]:
    """Every variant as (name, device or None, why), best first for `variant=None` (GPU variants on
    CUDA device `device_id`)."""
    variants = manifest["variants"]
    placed = {name: pick_device(v, device_id) for name, v in variants.items()}
    cpu_order, _ = cpu.exact_order(cpu.cpu_info())
    passed = None
    if report:  # a result counts only on the device it was measured on (a CPU pass says nothing of CUDA)
        passed = {name: r for name, r in report["variants"].items()
                  if name in placed and r["passed"] is True and r["device"] == placed[name][0]}

    def key(name: str):
        device, note = placed[name]
        v = variants[name]
        if device is None:
            return (9, 0.0, name)
        if note:  # runs here, but only when named (a TensorRT plan tuned for another GPU target)
            return (8, 0.0, name)
        if not exact_here(v, device):  # runs when named (int8; fp16 on a CPU, for checking): never by default
            return (8, 0.0, name)
        if passed is not None and name not in passed:
            return (7, 0.0, name)
        if v["backend"] == "tensorrt":
            return (0, 0.0, name)
        if device == "cuda":
            return (1, GPU_PREFERENCE.index(name) if name in GPU_PREFERENCE else 9, name)
        return (3, cpu_order.index(name) if name in cpu_order else 9, name)

    ranked = []
    for name in sorted(variants, key=key):
        device, reason = placed[name]
        if device is not None and not exact_here(variants[name], device):
            reason = (f"{variants[name].get('precision')} on {device} differs from the reference: "
                      "used only when named (variant=...)")
        elif device is not None and passed is not None and name not in passed:
            result = report["variants"].get(name)
            if result is None:
                reason = "not checked by the verify report"
            elif result["device"] != device:
                reason = f"verify measured it on {result['device']}, not on {device}"
            else:
                reason = "did not pass its verify gates"
        ranked.append((name, device, reason))
    return ranked


class Bundle:
    """A loaded bundle variant. `encode` is safe to call from several threads at once."""

    def __init__(self, root: Path, manifest: dict, variant: str, device: str, threads: int | None = None,
                 report: dict | None = None, _tmp=None, cpu_fallback: bool = False, _text=None, device_id: int = 0,
                 release: Path | None = None):
        self.root = Path(root)
        self.device_id = device_id
        self.manifest = manifest
        self.variant = variant
        self.device = device
        self.report = report
        self._tmp = _tmp  # keeps an extracted archive alive as long as the bundle
        self.release = release  # the folder holding verify.json / release.json, for a release
        self.head, self.tokenizer = _text or load_text_side(self.root)
        runtime = manifest.get("runtime", {})  # defaults the bundle was built with (conf/package)
        if threads is not None:
            threads = check_threads(threads)
        elif runtime.get("cpu_threads"):  # a hint from the build machine: never more than the cores here
            threads = min(runtime["cpu_threads"], cpu_count())
        spec = manifest["variants"][variant]
        try:
            self.backend = open_backend(self.root, spec, device, threads if device == "cpu" else None,
                                        runtime.get("cuda_graph_buckets"), self.head.pad_token_id, device_id)
        except Exception as e:  # e.g. onnxruntime-gpu but no usable GPU or driver (onnxruntime's own error types)
            if not cpu_fallback or device != "cuda" or "cpu" not in spec.get("devices", []) \
                    or spec["backend"] != "onnxruntime" or not exact_here(spec, "cpu"):
                raise
            log.warning("variant %s: CUDA failed (%s); using the CPU", variant, e)
            self.device = device = "cpu"
            self.backend = open_backend(self.root, spec, "cpu", threads)
        self.embedding_dimension = self.head.embedding_dimension
        # On CPU, token-capped batches are much faster (activations stay in cache); GPUs like big ones.
        # A variant may carry its own cap (OpenVINO's bf16 kernels like larger batches than onnxruntime's).
        self.max_batch_tokens = spec.get("cpu_max_batch_tokens", runtime.get("cpu_max_batch_tokens")) \
            if self.device == "cpu" else None

    @classmethod
    def load(cls, path: str | Path, variant: str | None = None, threads: int | None = None,
             verify_integrity: bool = True, device_id: int = 0) -> "Bundle":
        """Open a bundle folder or .tar.gz, check every file against the manifest, pick a variant.

        variant: a name from the manifest (`fp32`, `fp16-fused`, `int8`, a TensorRT plan…) or
        None for the best exact one that runs here (lossy variants such as int8 only when named).
        threads: onnxruntime intra-op threads on CPU, 1..the cores this process may use.
        device_id: the CUDA device GPU variants run on (0: the first that CUDA_VISIBLE_DEVICES leaves).
        An archive is checked before anything is written (see `sbert_bundle.archive`); a
        sealed release's verify report is used only when its seal matches (`read_sealed_report`).
        """
        path = Path(path)
        if threads is not None:
            check_threads(threads)
        if isinstance(device_id, bool) or not isinstance(device_id, int) or device_id < 0:
            raise ValueError(f"device_id must be a CUDA device number (0 or more), got {device_id!r}")
        tmp = release = None
        if path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar")):
            root, tmp = extract_bundle(path)
            if root != Path(tmp.name):  # a release archive: bundle/ beside verify.json and release.json
                release = root.parent
        elif path.is_dir():
            root = path
            if is_release_folder(path):  # a release unpacked by `sbert-bundle pull`
                root, release = path / "bundle", path
        else:
            raise FileNotFoundError(f"{path}: no such bundle folder or archive")
        try:
            return cls._open(root, variant, threads, verify_integrity, tmp, release, device_id)
        except BaseException:
            if tmp is not None:
                tmp.cleanup()
            raise

    @classmethod
    def _open(cls, root: Path, variant: str | None, threads: int | None, verify_integrity: bool, tmp,
              release: Path | None, device_id: int = 0) -> "Bundle":
        manifest = read_manifest(root)
        if verify_integrity:
            check_integrity(root, manifest, required=runtime_files(root, manifest))
        report = read_sealed_report(release, root) if release is not None else None
        text = load_text_side(root)  # a broken head or tokenizer is the bundle's fault, not a variant's
        ranked = rank_variants(manifest, report, device_id)
        runnable = [(n, d) for n, d, r in ranked if d is not None and not r]
        if variant is None:  # the best that opens: a plan or GPU graph may still fail to load here
            failed = []
            for name, device in runnable:
                try:
                    log.info("bundle %s: using variant %s on %s", root, name, device)
                    return cls(root, manifest, name, device, threads, report, tmp, cpu_fallback=True, _text=text,
                               device_id=device_id, release=release)
                except Exception as e:  # noqa: BLE001 - TensorRT / onnxruntime raise their own types
                    log.warning("variant %s on %s failed to open (%s); trying the next one", name, device, e)
                    failed.append((name, None, f"failed to open: {e}"))
            ranked = failed + [r for r in ranked if r[0] not in {f[0] for f in failed}]
            raise VariantError(_explain(f"no variant of {root} runs here", ranked))
        if variant not in manifest["variants"]:
            raise VariantError(_explain(f"variant {variant!r} is not in {root}", ranked))
        device, why = next((d, r) for n, d, r in ranked if n == variant)
        if device is None:
            raise VariantError(_explain(f"variant {variant!r} cannot run here: {why}", ranked))
        log.info("bundle %s: using variant %s on %s", root, variant, device)
        return cls(root, manifest, variant, device, threads, report, tmp, _text=text, device_id=device_id,
                   release=release)

    def encode(self, sentences: str | Sequence[str], batch_size: int = 32,
               max_batch_tokens: int | None = -1, prompt: str | None = None,
               prompt_name: str | None = None) -> np.ndarray:
        """Embeddings as float32 (n, dim), in input order; a single string gives (dim,).

        prompt / prompt_name: text prepended to every sentence, as SentenceTransformer.encode does
        (an explicit prompt wins; with neither, the model's default_prompt_name, if it has one;
        `bundle.head.prompts` lists the names). A Pooling with include_prompt false leaves the
        prompt's tokens out of the embedding.

        Sentences are tokenized once, sorted by token length and batched so that a batch
        holds at most `batch_size` sentences and at most `max_batch_tokens` padded tokens
        (-1: the bundle's default for this device; None: no token limit). Small batches
        keep activations in cache on CPUs; results do not depend on the batching.
        """
        single = isinstance(sentences, str)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_batch_tokens == -1:
            max_batch_tokens = self.max_batch_tokens
        encodings, prompt_length = self.tokenize([sentences] if single else list(sentences), prompt, prompt_name)
        out = np.empty((len(encodings), self.embedding_dimension), dtype=np.float32)
        for idx in plan_batches([len(e.ids) for e in encodings], batch_size, max_batch_tokens):
            out[idx] = self.embed([encodings[i] for i in idx], prompt_length, idx)
        return out[0] if single else out

    def tokenize(self, texts: list, prompt: str | None = None, prompt_name: str | None = None) -> tuple[list, int]:
        """(truncated encodings, prompt length in tokens) of texts with the prompt prepended, as
        `encode` does. An encoding's `overflowing` is non-empty where truncation cut its text."""
        for i, s in enumerate(texts):
            if not isinstance(s, str):
                raise TypeError(f"sentences[{i}] is {type(s).__name__}, expected str")
            try:
                s.encode("utf-8")
            except UnicodeEncodeError as e:
                raise TextError(i, f"is not valid Unicode text: {e.reason} "
                                   f"(U+{ord(s[e.start]):04X} at character {e.start})") from None
        prompt = self.head.resolve_prompt(prompt, prompt_name)
        prompt_length = 0
        if prompt:
            texts = [prompt + s for s in texts]
            prompt_length = self.tokenizer.prompt_length(prompt) if self.head.prompts_matter else 0
        return self.tokenizer.encode(texts), prompt_length

    def embed(self, encodings: list, prompt_length: int = 0, numbers: Sequence[int] | None = None) -> np.ndarray:
        """One batch of encodings (from `tokenize`, or `tokenization.Tokens` of token ids) through
        the backend and the head: float32 (len(encodings), dim). Rows do not depend on what else is
        in the batch. Callers that batch themselves (the server's scheduler) use this and `tokenize`.
        numbers: each row's index in the caller's input, for the error naming a non-finite row."""
        features = self.tokenizer.pad(encodings)
        emb = self.head(self.backend(features), features["attention_mask"], prompt_length)
        finite = np.isfinite(emb).all(axis=1)
        if not finite.all():
            rows = np.flatnonzero(~finite)
            first = min(numbers[r] for r in rows) if numbers is not None else int(rows[0])
            raise NonFiniteError(f"variant {self.variant} on {self.device} gave a NaN or Inf embedding for "
                                 f"sentence {first} (0-based); this variant's numbers are wrong here")
        return emb

    def describe(self) -> dict:
        """What `sbert-bundle inspect` prints: manifest summary and the variant choice here."""
        ranked = rank_variants(self.manifest, self.report, self.device_id)
        return {
            "name": self.manifest.get("name"),
            "version": self.manifest.get("version"),
            "created": self.manifest.get("created"),
            "source": {k: self.manifest.get("source", {}).get(k) for k in ("kind", "id", "revision")},
            "embedding_dimension": self.embedding_dimension,
            "max_seq_length": self.head.max_seq_length,
            "selected": {"variant": self.variant, "device": self.device,
                         **({"device_id": self.device_id} if self.device == "cuda" else {})},
            "variants": [
                {"name": n, "runs_here": d is not None and not r, "device": d, "why_not": r or None,
                 "gpu_note": _gpu_note(self.manifest["variants"][n], d),
                 **{k: self.manifest["variants"][n].get(k) for k in ("file", "backend", "precision", "fused")}}
                for n, d, r in ranked
            ],
            "cpu": _cpu_choice(),
            "openvino_build": self.manifest.get("openvino_build"),
            "tensorrt_build": self.manifest.get("tensorrt_build"),
            "tensorrt_targets": trt_targets(self.manifest, ranked),
            "verify": self.report,
            "published": _published(self.release),
        }


def _cpu_choice() -> dict:
    """This CPU and the order its kind gives the exact CPU variants (sbert_bundle.cpu), and why."""
    info = cpu.cpu_info()
    order, why = cpu.exact_order(info)
    return {**info, "exact_order": list(order), "why": why}


def trt_targets(manifest: dict, ranked) -> list[dict]:
    """Per GPU target of the bundle's TensorRT build: its plan and whether it would run here, or
    why not (not built, and why; built for another GPU; no TensorRT runtime here ...)."""
    build = manifest.get("tensorrt_build") or {}
    placed = {n: (d, r) for n, d, r in ranked}
    rows = []
    for target, record in (build.get("targets") or {}).items():
        base = {"target": target, "compute_capability": record.get("compute_capability")}
        plans = [p for p in record.get("plans") or [] if p in placed]
        if not plans:
            rows.append({**base, "plan": None, "would_run_here": False,
                         "why_not": f"not built: {record.get('reason') or 'no plan in this bundle'}"})
        for plan in plans:
            device, why = placed[plan]
            rows.append({**base, "plan": plan, "would_run_here": device is not None and not why,
                         "why_not": why or None})
    return rows


def is_release_folder(path: Path) -> bool:
    """bundle/ beside a sealed report, as `sbert-bundle pull` writes it (a bundle folder is not one)."""
    return not (path / MANIFEST_FILE).is_file() and (path / "bundle" / MANIFEST_FILE).is_file() \
        and any((path / name).is_file() for name in (REPORT_FILE, SEAL_FILE))


def _published(release: Path | None) -> dict | None:
    """What `sbert-bundle pull` recorded of the published version (from its tag: name, version,
    archive sha256, changelog). Informational: the archive was checked against it when pulled."""
    path = release / PUBLISHED_FILE if release is not None else None
    if path is None or not path.is_file() or path.stat().st_size > 1 << 20:
        return None
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _gpu_note(variant: dict, device: str | None) -> str | None:
    """Why a variant meant for a GPU is running on CPU (or not at all) here."""
    if "cuda" not in variant.get("devices", []) or device == "cuda" or variant.get("backend") == "tensorrt":
        return None  # a plan's why_not already says why it does not run here
    _, why = pick_device({**variant, "devices": ["cuda"]})
    if variant.get("precision") == "fp16" and device == "cpu":
        return f"GPU variant, run on CPU only when named (for checking): {why}"
    return f"not on GPU: {why}"


def load_text_side(root: Path) -> tuple:
    """(head, tokenizer) of a bundle: what every variant shares."""
    head = load_head(root)
    return head, TextTokenizer(Path(root) / TOKENIZER_FILE, head)


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
    variants = manifest.get("variants", {}).values()
    files = [HEAD_FILE, TOKENIZER_FILE] + [v["file"] for v in variants] + [v["weights"] for v in variants
                                                                          if "weights" in v]
    try:
        spec = json.loads((Path(root) / HEAD_FILE).read_bytes())
    except (OSError, ValueError):
        return files  # reported as missing / modified by the integrity check, or by load_head
    modules = spec.get("modules") if isinstance(spec, dict) else None
    for m in modules if isinstance(modules, list) else []:
        files += [m[k] for k in ("weight", "bias") if isinstance(m, dict) and isinstance(m.get(k), str)]
    return files


def read_sealed_report(top: Path, root: Path) -> dict | None:
    """The verify report of a release (top/verify.json), only if release.json seals it to this bundle.

    release.json records the sha256 of verify.json and of the bundle's manifest.json (which
    covers every file by sha256): an edited report, a report for another bundle, a report that
    lists failures or is malformed is refused. The archive's own sha256, published with its
    version, is what a consumer checks the whole release against (`sbert-bundle pull`)."""
    report_path, seal_path = top / REPORT_FILE, top / SEAL_FILE
    if not report_path.is_file() and not seal_path.is_file():
        return None
    if not report_path.is_file() or not seal_path.is_file():
        missing = REPORT_FILE if not report_path.is_file() else SEAL_FILE
        raise IntegrityError(f"release archive has no {missing}: the verify report is not sealed to the bundle")
    seal = _json_object(seal_path)
    manifest_sha = sha256_file(root / MANIFEST_FILE)
    if seal.get("report_sha256") != sha256_file(report_path):
        raise IntegrityError(f"{REPORT_FILE} in the release archive was changed after release "
                             f"(its sha256 is not the one {SEAL_FILE} records)")
    if seal.get("bundle_manifest_sha256") != manifest_sha:
        raise IntegrityError(f"{SEAL_FILE} in the release archive seals another bundle "
                             f"(manifest sha256 {str(seal.get('bundle_manifest_sha256'))[:12]}…, this one is "
                             f"{manifest_sha[:12]}…)")
    report = _json_object(report_path)
    problems = report_problems(report, manifest_sha)
    if problems:
        raise IntegrityError(f"{REPORT_FILE} in the release archive cannot be used: " + "; ".join(problems[:5])
                             + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
    return report


def report_problems(report: dict, manifest_sha: str) -> list[str]:
    """What makes a verify report unusable for choosing a variant: foreign, failing or mistyped."""
    problems = []
    bundle = report.get("bundle")
    if not isinstance(bundle, dict) or bundle.get("manifest_sha256") != manifest_sha:
        problems.append("it was made for another bundle (bundle.manifest_sha256 differs)")
    if report.get("failures") != []:
        problems.append(f"it lists failed gates: {report.get('failures')!r:.200}")
    variants = report.get("variants")
    if not isinstance(variants, dict):
        return problems + ["variants: expected an object"]
    for name, r in variants.items():
        if not isinstance(r, dict):
            problems.append(f"variants[{name!r}]: expected an object")
            continue
        if r.get("passed") is not True:
            problems.append(f"variants[{name!r}].passed: {r.get('passed')!r}; a released report has only passes")
        if not isinstance(r.get("device"), str):
            problems.append(f"variants[{name!r}].device: expected a string")
        for key in ("min_cosine",):
            value = r.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < -1:
                problems.append(f"variants[{name!r}].{key}: {value!r} is not a finite number")
    return problems


def _json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IntegrityError(f"{path.name} in the release archive is not valid UTF-8 JSON ({e})") from None
    if not isinstance(data, dict):
        raise IntegrityError(f"{path.name} in the release archive is not a JSON object")
    return data


def _explain(head: str, ranked) -> str:
    lines = [head + "; variants in this bundle:"]
    for name, device, reason in ranked:
        lines.append(f"  {name}: " + (f"runs here on {device}" if device and not reason else f"not usable: {reason}"))
    return "\n".join(lines)
