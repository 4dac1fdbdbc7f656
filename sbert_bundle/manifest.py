"""The bundle manifest: its schema, how it is written, and the integrity check on load.

`manifest.json` sits at the root of a bundle:

    schema_version   int, MANIFEST_SCHEMA
    name, version    bundle name and semantic version
    created          ISO-8601 UTC time from SOURCE_DATE_EPOCH, or null (never the clock)
    source           provenance record from `stages.fetch` (kind, id, revision, file sums)
    params_sha256    digest of the params that built the bundle
    tools            versions of the tools that built it
    embedding_dimension, max_seq_length
    variants         {name: {file, backend, precision, fused, ...}}; a TensorRT plan also has
                     target (the GPU target's name) and compute_capability ("9.0": the GPU it runs on);
                     an OpenVINO IR has weights (its .bin) and inference_precision (f32 or bf16)
    openvino_build   {skipped, reason, openvino}: what convert_openvino did
    tensorrt_build   {targets: {name: {compute_capability, skipped, reason, plans}}}: what build_trt
                     did for each GPU target (older bundles: {skipped, reason, plans})
    files            {relative path: {sha256, size}} for every file except manifest.json
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

MANIFEST_FILE = "manifest.json"
MANIFEST_SCHEMA = 1
_SEMVER = re.compile(r"^\d+\.\d+\.\d+(?:[-+][0-9A-Za-z.-]+)?$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

# Bounds on what a manifest from someone else may ask for. A bundle holds a few dozen files;
# the largest real one (all-mpnet-base-v2 with every variant) is about 2 GB.
MAX_MANIFEST_BYTES = 16 << 20
MAX_FILES = 10_000
MAX_BUNDLE_BYTES = 64 << 30
MAX_THREADS = 256            # manifest hint: above this it is not a plausible default but an attack
MAX_BATCH_TOKENS = 1 << 20
MAX_BUCKET_SIDE = 1 << 16
MAX_SHOWN_PROBLEMS = 20
BACKENDS = ("onnxruntime", "tensorrt", "openvino")
PRECISIONS = ("fp32", "fp16", "int8", "bf16", "fp8")
DEVICES = ("cpu", "cuda")
MAX_TRT_PLANS = 32           # TensorRT plans in one bundle: one per GPU target
MAX_TRT_TARGETS = 32
MAX_REASON_CHARS = 1000
# A GPU target's name: a folder name in the bundle (trt/<target>/) and part of variant names.
TARGET_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
COMPUTE_CAPABILITY = re.compile(r"^[0-9]{1,2}\.[0-9]{1,2}$")


class IntegrityError(RuntimeError):
    """The bundle on disk is not the one its manifest describes."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def describe_files(root: Path) -> dict[str, dict]:
    """sha256 and size of every file under root except the manifest, by POSIX relative path."""
    root = Path(root)
    return {
        p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() != MANIFEST_FILE
    }


def write_manifest(root: Path, fields: dict) -> dict:
    """Write manifest.json for the files now under root; returns the manifest."""
    version = fields.get("version", "")
    if not _SEMVER.match(str(version)):
        raise ValueError(f"bundle version {version!r} is not a semantic version (MAJOR.MINOR.PATCH)")
    manifest = {"schema_version": MANIFEST_SCHEMA, **fields, "files": describe_files(root)}
    problems = manifest_problems(manifest)  # write nothing that read_manifest would refuse (variant files too)
    if problems:
        raise ValueError(f"manifest for {root} is not valid: {summarize(problems)}")
    (Path(root) / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def read_manifest(root: Path) -> dict:
    """Read and validate root/manifest.json; IntegrityError names every problem."""
    path = Path(root) / MANIFEST_FILE
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise IntegrityError(f"{path} is {size} bytes; a manifest is at most {MAX_MANIFEST_BYTES}")
        return parse_manifest(path.read_bytes(), str(path))
    except FileNotFoundError:
        raise IntegrityError(f"{path} not found: {root} is not a bundle") from None


def parse_manifest(data: bytes, where: str) -> dict:
    """Decode and validate a manifest's bytes (from a file or an archive member named `where`)."""
    try:
        manifest = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise IntegrityError(f"{where} is not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise IntegrityError(f"{where} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise IntegrityError(f"{where} holds a JSON {type(manifest).__name__}, expected an object")
    if manifest.get("schema_version") != MANIFEST_SCHEMA:
        raise IntegrityError(
            f"{where} has schema_version {manifest.get('schema_version')!r}; this runtime reads {MANIFEST_SCHEMA}")
    problems = manifest_problems(manifest)
    if problems:
        raise IntegrityError(f"{where} is not a valid manifest: {summarize(problems)}")
    return manifest


def summarize(problems: list[str]) -> str:
    """At most a screenful of problems, then how many more."""
    shown = problems[:MAX_SHOWN_PROBLEMS]
    more = len(problems) - len(shown)
    text = f"{len(problems)} problem(s):\n  " + "\n  ".join(shown)
    return text + (f"\n  ... and {more} more" if more else "")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_in(value, low: int, high: int) -> bool:
    return _is_int(value) and low <= value <= high


def manifest_problems(m: dict) -> list[str]:
    """Every type and range problem of a decoded manifest: the schema, checked before anything is used."""
    problems = []

    def need(ok: bool, what: str) -> bool:
        if not ok:
            problems.append(what)
        return ok

    for key in ("name", "version"):
        need(isinstance(m.get(key), str) and 0 < len(m[key]) <= 200, f"{key}: expected a non-empty string")
    if isinstance(m.get("version"), str):
        need(bool(_SEMVER.match(m["version"])), f"version {m['version']!r}: not a semantic version")
    for key in ("embedding_dimension", "max_seq_length"):
        need(_int_in(m.get(key), 1, 1 << 20), f"{key}: expected an integer in 1..{1 << 20}, got {m.get(key)!r}")
    files = m.get("files")
    if need(isinstance(files, dict), f"files: expected an object of path -> {{sha256, size}}, "
                                     f"got {type(files).__name__}"):
        need(len(files) <= MAX_FILES, f"files: {len(files)} entries; at most {MAX_FILES}")
        total = 0
        for rel, entry in list(files.items())[:MAX_FILES]:
            if not need(isinstance(entry, dict), f"files[{rel!r}]: expected an object, got {type(entry).__name__}"):
                continue
            need(isinstance(entry.get("sha256"), str) and bool(_SHA256.match(entry["sha256"])),
                 f"files[{rel!r}].sha256: expected 64 lowercase hex digits")
            if need(_int_in(entry.get("size"), 0, MAX_BUNDLE_BYTES),
                    f"files[{rel!r}].size: expected an integer in 0..{MAX_BUNDLE_BYTES}, got {entry.get('size')!r}"):
                total += entry["size"]
        need(total <= MAX_BUNDLE_BYTES, f"files: {total} bytes in all; at most {MAX_BUNDLE_BYTES}")
    variants = m.get("variants")
    if need(isinstance(variants, dict) and bool(variants),
            f"variants: expected a non-empty object of name -> variant, got {type(variants).__name__}"):
        for name, v in variants.items():
            if not need(isinstance(v, dict), f"variants[{name!r}]: expected an object, got {type(v).__name__}"):
                continue
            need(isinstance(v.get("file"), str) and isinstance(files, dict) and v["file"] in files,
                 f"variants[{name!r}].file: {v.get('file')!r} is not a file listed in the manifest")
            need(v.get("backend") in BACKENDS, f"variants[{name!r}].backend: {v.get('backend')!r}; known: "
                                               f"{', '.join(BACKENDS)}")
            need(v.get("precision") in PRECISIONS, f"variants[{name!r}].precision: {v.get('precision')!r}; known: "
                                                   f"{', '.join(PRECISIONS)}")
            devices = v.get("devices", ["cpu"])
            need(isinstance(devices, list) and bool(devices) and all(d in DEVICES for d in devices),
                 f"variants[{name!r}].devices: {devices!r}; expected a list of {', '.join(DEVICES)}")
            need(isinstance(v.get("fused", False), bool), f"variants[{name!r}].fused: expected true or false")
            if v.get("backend") == "tensorrt":
                _plan_problems(name, v, need)
            if v.get("backend") == "openvino":  # IR: the graph (.xml) and its weights (.bin)
                need(isinstance(v.get("weights"), str) and isinstance(files, dict) and v["weights"] in files,
                     f"variants[{name!r}].weights: {_short(v.get('weights'))} is not a file listed in the manifest")
                need(v.get("cpu_max_batch_tokens") is None or _int_in(v["cpu_max_batch_tokens"], 1, MAX_BATCH_TOKENS),
                     f"variants[{name!r}].cpu_max_batch_tokens: {_short(v.get('cpu_max_batch_tokens'))}; expected "
                     f"null or 1..{MAX_BATCH_TOKENS}")
                need(v.get("inference_precision") in ("f32", "bf16"),
                     f"variants[{name!r}].inference_precision: {_short(v.get('inference_precision'))}; "
                     "known: f32, bf16")
        plans = sum(isinstance(v, dict) and v.get("backend") == "tensorrt" for v in variants.values())
        need(plans <= MAX_TRT_PLANS, f"variants: {plans} TensorRT plans; at most {MAX_TRT_PLANS}")
    _trt_build_problems(m.get("tensorrt_build"), need)
    ov_build = m.get("openvino_build")
    if ov_build is not None and need(isinstance(ov_build, dict), "openvino_build: expected an object"):
        need(isinstance(ov_build.get("skipped"), bool), "openvino_build.skipped: expected true or false")
        for key in ("reason", "openvino"):
            value = ov_build.get(key)
            need(value is None or (isinstance(value, str) and len(value) <= MAX_REASON_CHARS),
                 f"openvino_build.{key}: expected null or a string of at most {MAX_REASON_CHARS} characters")
    runtime = m.get("runtime", {})
    if need(isinstance(runtime, dict), f"runtime: expected an object, got {type(runtime).__name__}"):
        threads = runtime.get("cpu_threads")
        need(threads is None or _int_in(threads, 0, MAX_THREADS),
             f"runtime.cpu_threads: {threads!r}; expected 0 (one per core) to {MAX_THREADS}")
        tokens = runtime.get("cpu_max_batch_tokens")
        need(tokens is None or _int_in(tokens, 1, MAX_BATCH_TOKENS),
             f"runtime.cpu_max_batch_tokens: {tokens!r}; expected null or 1..{MAX_BATCH_TOKENS}")
        buckets = runtime.get("cuda_graph_buckets")
        need(buckets is None or (isinstance(buckets, list) and len(buckets) <= 256 and all(
            isinstance(b, list) and len(b) == 2 and all(_int_in(x, 1, MAX_BUCKET_SIDE) for x in b) for b in buckets)),
             f"runtime.cuda_graph_buckets: expected at most 256 [batch, length] pairs of integers in "
             f"1..{MAX_BUCKET_SIDE}")
    return problems


def _short(value) -> str:
    return f"{value!r:.60}"


def _plan_problems(name: str, v: dict, need) -> None:
    """A TensorRT plan names its GPU target and that target's compute capability."""
    target, capability = v.get("target"), v.get("compute_capability")
    need(isinstance(target, str) and bool(TARGET_NAME.fullmatch(target)),
         f"variants[{name!r}].target: {_short(target)}; expected a GPU target name (lowercase letters, digits, "
         f"- and _, at most 32)")
    need(isinstance(capability, str) and bool(COMPUTE_CAPABILITY.fullmatch(capability)),
         f"variants[{name!r}].compute_capability: {_short(capability)}; expected MAJOR.MINOR such as \"9.0\"")
    meta = v.get("tensorrt", {})
    if need(isinstance(meta, dict), f"variants[{name!r}].tensorrt: expected an object"):
        built = meta.get("compute_capability", capability)
        need(built == capability, f"variants[{name!r}]: built on a GPU of compute capability {_short(built)}, "
                                  f"but its target needs {_short(capability)}")


def _trt_build_problems(record, need) -> None:
    """tensorrt_build: per GPU target, built or skipped and why (bounded: it is printed by inspect)."""
    if record is None or not need(isinstance(record, dict), "tensorrt_build: expected an object"):
        return
    if "targets" not in record:  # a bundle from before GPU targets: {skipped, reason, plans}
        need(isinstance(record.get("skipped", False), bool), "tensorrt_build.skipped: expected true or false")
        need(record.get("reason") is None or (isinstance(record["reason"], str)
                                              and len(record["reason"]) <= MAX_REASON_CHARS),
             f"tensorrt_build.reason: expected null or a string of at most {MAX_REASON_CHARS} characters")
        return
    targets = record["targets"]
    if not need(isinstance(targets, dict), "tensorrt_build.targets: expected an object of target name -> record"):
        return
    if not need(len(targets) <= MAX_TRT_TARGETS,
                f"tensorrt_build.targets: {len(targets)} targets; at most {MAX_TRT_TARGETS}"):
        return
    for name, t in targets.items():
        where = f"tensorrt_build.targets[{_short(name)}]"
        if not need(bool(TARGET_NAME.fullmatch(name)), f"{where}: not a GPU target name (lowercase letters, digits, "
                                                  "- and _, at most 32)"):
            continue
        if not need(isinstance(t, dict), f"{where}: expected an object"):
            continue
        capability = t.get("compute_capability")
        need(isinstance(capability, str) and bool(COMPUTE_CAPABILITY.fullmatch(capability)),
             f"{where}.compute_capability: {_short(t.get('compute_capability'))}; expected MAJOR.MINOR")
        need(isinstance(t.get("skipped"), bool), f"{where}.skipped: expected true or false")
        need(t.get("reason") is None or (isinstance(t["reason"], str) and len(t["reason"]) <= MAX_REASON_CHARS),
             f"{where}.reason: expected null or a string of at most {MAX_REASON_CHARS} characters")
        plans = t.get("plans", [])
        need(isinstance(plans, list) and len(plans) <= MAX_TRT_PLANS
             and all(isinstance(p, str) and len(p) <= 200 for p in plans),
             f"{where}.plans: expected a list of at most {MAX_TRT_PLANS} variant names")


def cpu_count() -> int:
    """Cores this process may use (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def check_threads(threads, what: str = "threads") -> int:
    """An explicit thread count: an integer in 1..cpu_count(), else ValueError naming it."""
    limit = cpu_count()
    if not _int_in(threads, 1, limit):
        raise ValueError(f"{what} {threads!r}: expected an integer in 1..{limit} (the cores this process may use)")
    return threads


def inside(root: Path, rel: str) -> bool:
    """rel names a regular file path under root: relative, no '..', no symlink on the way."""
    if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        return False
    path = Path(root) / rel
    return not any(p.is_symlink() for p in [path, *path.parents] if p != Path(root) and Path(root) in p.parents)


def check_integrity(root: Path, manifest: dict, required: list[str] = ()) -> None:
    """Refuse a bundle whose files differ from the manifest: lists every problem found.

    required: paths the caller will read (variant files, head, tokenizer); each must be listed."""
    root = Path(root)
    problems = []
    listed = manifest["files"]
    problems += [f"{rel}: read by the runtime but not listed in the manifest" for rel in required if rel not in listed]
    for rel, want in listed.items():
        path = root / rel
        if not inside(root, rel):
            problems.append(f"{rel}: not a plain relative path inside the bundle")
        elif not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != want["size"]:
            problems.append(f"{rel}: size {path.stat().st_size} bytes, manifest says {want['size']}")
        elif sha256_file(path) != want["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest (modified)")
    for p in root.rglob("*"):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            problems.append(f"{rel}: a symbolic link (bundles hold plain files)")
        elif p.is_file() and rel != MANIFEST_FILE and rel not in listed:
            problems.append(f"{rel}: not listed in the manifest")
    if problems:
        raise IntegrityError(f"bundle {root} failed its integrity check: {summarize(sorted(problems))}")
