"""Stage `package`: assemble the self-contained bundle and its archive.

Writes artifacts/<model>/bundle/ and artifacts/<model>/bundle.tar.gz:
  manifest.json                      schema in sbert_bundle.manifest
  head.json, head/                   Pooling / Dense / Normalize for sbert_bundle
  tokenizer.json, config.json, …     tokenizer and model config
  modules.json, 1_Pooling/, …        sentence-transformers configuration
  onnx/model.onnx                    fp32; other ONNX variants beside it
  openvino/model.xml, model.bin      OpenVINO IR (ov-fp32, ov-bf16), where convert_openvino built it
  trt/<target>/*.plan                TensorRT plans, one per GPU target that build_trt built
The bundle needs nothing from the source folder or the pipeline.

Both are reproducible: the same inputs and locked environment give the same bytes. No
clock time goes in: the manifest's `created` is SOURCE_DATE_EPOCH (as ISO-8601 UTC) when
that is set, else null; archive members are sorted, with fixed owner, modes and mtime
(SOURCE_DATE_EPOCH or 0), in a gzip stream without name or time. The manifest records the
lock file's sha256 and the versions of the tools that built the bundle.
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import importlib.metadata
import logging
import os
import re
import shutil
import sys
import tarfile
from pathlib import Path

from sbert_bundle.head import load_head
from sbert_bundle.manifest import write_manifest

from . import build_trt
from .common import REPO, StageError, atomic_outputs, load_model, params_digest, read_json, stage_main
from .split import WEIGHT_FILES

log = logging.getLogger("stages.package")
# Params sections that decide the bundle's content (verify's do not).
BUILD_SECTIONS = ("model", "fetch", "export", "fp16", "quantize", "openvino", "trt", "package")
# variant name -> (artifact, path in the bundle, description)
ONNX_VARIANTS = {
    "fp32": ("onnx/model.onnx", "onnx/model.onnx", {"precision": "fp32", "fused": False, "devices": ["cuda", "cpu"]}),
    "fp32-fused": ("onnx/model_fused.onnx", "onnx/model_fused.onnx",
                   {"precision": "fp32", "fused": True, "devices": ["cuda", "cpu"]}),
    "fp16": ("fp16/model_fp16.onnx", "onnx/model_fp16.onnx", {"precision": "fp16", "fused": False,
                                                             "devices": ["cuda", "cpu"]}),
    "fp16-fused": ("fp16/model_fp16_fused.onnx", "onnx/model_fp16_fused.onnx",
                   {"precision": "fp16", "fused": True, "devices": ["cuda", "cpu"]}),
    "int8": ("int8/model_int8.onnx", "onnx/model_int8.onnx", {"precision": "int8", "fused": True, "devices": ["cpu"]}),
}
# OpenVINO variants: one IR (artifacts/<model>/openvino/, from convert_openvino) run at two inference
# precisions. ov-bf16 runs where the CPU has native bf16, and only when named (lossy, like int8).
OPENVINO_DIR = "openvino"
OPENVINO_VARIANTS = {
    "ov-fp32": {"precision": "fp32", "inference_precision": "f32"},
    "ov-bf16": {"precision": "bf16", "inference_precision": "bf16"},
}
TOOLS = ("sbert-bundle", "torch", "transformers", "sentence-transformers", "onnx", "onnxruntime",
         "onnxconverter-common", "openvino", "tokenizers", "numpy", "tensorrt")
# The locked build environment (`make lock`), named in the manifest by its path in the repository.
LOCK_NAME = "requirements/lock-py311.txt"
LOCK_FILE = REPO / LOCK_NAME
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def source_date_epoch() -> int | None:
    """SOURCE_DATE_EPOCH (https://reproducible-builds.org/specs/source-date-epoch/) or None."""
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None or value == "":
        return None
    if not value.isdigit():
        raise StageError(f"SOURCE_DATE_EPOCH={value!r}: expected a non-negative integer (seconds since 1970 UTC)")
    return int(value)


def created_time() -> str | None:
    """The manifest's `created`: SOURCE_DATE_EPOCH as ISO-8601 UTC, else None (never the clock)."""
    epoch = source_date_epoch()
    if epoch is None:
        return None
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat(timespec="seconds")


def canonical_name(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins(text: str) -> dict[str, str]:
    """{normalised name: version} of every `name==version` line of a pip requirements lock."""
    return {canonical_name(m.group(1)): m.group(2) for line in text.splitlines() if (m := _PIN.match(line))}


def lock_drift(pins: dict[str, str]) -> dict[str, str | None]:
    """Locked packages whose installed version is another: {name: installed version or None}."""
    drift = {}
    for name, want in sorted(pins.items()):
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have != want:
            drift[name] = have
    return drift


def lock_record(lock: Path = LOCK_FILE) -> dict | None:
    """The lock's name and sha256, and which locked packages are installed at other versions."""
    if not lock.is_file():
        log.warning("%s not found: the manifest records no lock", lock)
        return None
    data = lock.read_bytes()
    drift = lock_drift(lock_pins(data.decode("utf-8")))
    if drift:
        log.warning("the environment differs from %s (not reproducible): %s", LOCK_NAME,
                    ", ".join(f"{k} {v or 'missing'}" for k, v in drift.items()))
    return {"file": LOCK_NAME, "sha256": hashlib.sha256(data).hexdigest(), "drift": drift}


def tool_versions() -> dict:
    found = {"python": f"{sys.version_info.major}.{sys.version_info.minor}"}
    for name in TOOLS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def copy_variants(wanted: list[str], artifacts: Path, bundle: Path, trt_targets: dict | None = None,
                  variant_runtime: dict | None = None) -> dict:
    variants = {}
    known = {**ONNX_VARIANTS, **OPENVINO_VARIANTS}
    for name in wanted:
        if name not in known:
            raise StageError(f"package.variants has {name!r}; known: {', '.join(known)}")
        if name in OPENVINO_VARIANTS:
            continue
        src, dest, info = ONNX_VARIANTS[name]
        if not (artifacts / src).is_file():
            log.info("variant %s: %s not built, left out", name, src)
            continue
        (bundle / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(artifacts / src, bundle / dest)
        variants[name] = {"file": dest, "backend": "onnxruntime", **info}
    onnx_report = artifacts / "onnx" / "report.json"
    if onnx_report.is_file() and read_json(onnx_report).get("fusion") == {}:
        # export_onnx validated no fusion: model_fused.onnx is a copy of the plain graph, and the
        # variants made from it (fp16-fused, int8) are no more fused than it is
        for name in ("fp32-fused", "fp16-fused", "int8"):
            if name in variants:
                variants[name]["fused"] = False
    fp16_report = artifacts / "fp16" / "report.json"
    for name, record in (read_json(fp16_report).items() if fp16_report.is_file() else []):
        if name in variants and not record["parity"]["checked"]:  # this onnxruntime's CPU cannot run it
            variants[name]["devices"] = ["cuda"]
    int8_report = artifacts / "int8" / "report.json"
    if "int8" in variants and int8_report.is_file():
        report = read_json(int8_report)
        variants["int8"]["quantization"] = {k: report.get(k) for k in (
            "method", "per_channel", "weight_type", "smoothed", "smoothing_alpha", "outlier_channels",
            "weight_only", "excluded_nodes", "calibration") if k in report}
    variants.update(openvino_variants([n for n in wanted if n in OPENVINO_VARIANTS], artifacts, bundle))
    variants.update(trt_plans(trt_targets, artifacts / "trt", bundle))
    for name, extra in (variant_runtime or {}).items():  # per-variant runtime defaults (package.variant_runtime)
        if name in variants:
            variants[name].update(extra)
    if "fp32" not in variants:
        raise StageError("the bundle needs the fp32 variant (artifacts/<model>/onnx/model.onnx); it is missing")
    return variants


def openvino_build(artifacts: Path) -> dict:
    """What convert_openvino did, for the manifest ({skipped, reason, openvino}); inspect shows it."""
    path = artifacts / OPENVINO_DIR / "report.json"
    if not path.is_file():
        return {"skipped": True, "reason": "convert_openvino has not run", "openvino": None}
    report = read_json(path, "OpenVINO conversion report")
    return {"skipped": bool(report.get("skipped")), "reason": report.get("reason"), "openvino": report.get("openvino")}


def openvino_variants(wanted: list[str], artifacts: Path, bundle: Path) -> dict[str, dict]:
    """The IR copied to bundle/openvino/ once, and one variant per wanted inference precision."""
    src = artifacts / OPENVINO_DIR
    if not wanted or openvino_build(artifacts)["skipped"]:
        if wanted:
            log.info("variants %s: left out (%s)", ", ".join(wanted), openvino_build(artifacts)["reason"])
        return {}
    (bundle / OPENVINO_DIR).mkdir(parents=True, exist_ok=True)
    for name in ("model.xml", "model.bin"):
        shutil.copy2(src / name, bundle / OPENVINO_DIR / name)
    return {name: {"file": f"{OPENVINO_DIR}/model.xml", "weights": f"{OPENVINO_DIR}/model.bin", "backend": "openvino",
                   "fused": False, "devices": ["cpu"], **OPENVINO_VARIANTS[name]} for name in wanted}


def trt_records(trt_targets: dict, trt_dir: Path) -> dict[str, dict]:
    """artifacts/<model>/trt/<target>/build.json of every configured GPU target ({target: record}); a
    target build_trt has not run for is recorded as skipped, saying so (no path: the manifest is
    the same wherever the artifacts are)."""
    records = {}
    for name, spec in (trt_targets or {}).items():
        path = trt_dir / name / "build.json"
        if not path.is_file():
            records[name] = {"target": name, "compute_capability": spec["compute_capability"], "skipped": True,
                             "reason": f"build_trt has not run for target {name}", "plans": []}
            continue
        record = read_json(path, "TensorRT build record")
        if record.get("target") != name or record.get("compute_capability") != spec["compute_capability"]:
            raise StageError(f"{path} is for target {record.get('target')!r} (compute capability "
                             f"{record.get('compute_capability')!r}); trt.targets.{name} needs "
                             f"{spec['compute_capability']}: run build_trt --target {name} again")
        records[name] = record
    return records


def plan_variant_name(plan: dict, target: str) -> str:
    """A plan's variant name in the bundle: trt-<precision>-<target> (one plan per target)."""
    return f"trt-{plan['precision']}-{target}"


def trt_plans(trt_targets: dict, trt_dir: Path, bundle: Path) -> dict[str, dict]:
    """Each built plan copied to bundle/trt/<target>/: {variant name: manifest entry}."""
    found = {}
    for name, record in trt_records(trt_targets, trt_dir).items():
        for plan in record.get("plans", []):
            if not isinstance(plan.get("file"), str) or Path(plan["file"]).name != plan["file"]:
                raise StageError(f"{trt_dir / name / 'build.json'}: plan file {plan.get('file')!r} is not a file name")
            capability = plan["metadata"]["compute_capability"]
            if capability != record["compute_capability"]:
                raise StageError(f"{trt_dir / name / 'build.json'}: plan {plan['file']} was built on a GPU of "
                                 f"compute capability {capability}; target {name} needs {record['compute_capability']}")
            dest = f"trt/{name}/{plan['file']}"
            (bundle / dest).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(trt_dir / name / plan["file"], bundle / dest)
            found[plan_variant_name(plan, name)] = {
                "file": dest, "backend": "tensorrt", "precision": plan["precision"], "fused": True,
                "devices": ["cuda"], "target": name, "compute_capability": capability,
                "tensorrt": plan["metadata"]}
    return found


def trt_summary(trt_targets: dict, trt_dir: Path) -> dict:
    """Per GPU target: built or skipped, and why (shown by `sbert-bundle inspect`)."""
    return {"targets": {
        name: {"compute_capability": r["compute_capability"], "skipped": r.get("skipped", False),
               "reason": r.get("reason"), "plans": [plan_variant_name(p, name) for p in r.get("plans", [])]}
        for name, r in trt_records(trt_targets, trt_dir).items()}}


def run(params: dict, artifacts: Path, bundle: Path) -> dict:
    split = artifacts / "split"
    for f in sorted((split / "transformer").iterdir()):  # config + tokenizer, not the torch weights
        if f.is_file() and f.name not in WEIGHT_FILES and not f.name.endswith(".md"):
            shutil.copy2(f, bundle / f.name)
    shutil.copytree(split / "modules", bundle, dirs_exist_ok=True)
    head = load_head(bundle)
    expected = params["model"].get("embedding_dimension")
    if expected is not None and expected != head.embedding_dimension:
        raise StageError(f"model.embedding_dimension is {expected}, but the model's modules give "
                         f"{head.embedding_dimension}: fix conf/model (the registry advertises this value)")
    trt_targets = build_trt.targets(params["trt"])
    variants = copy_variants(params["package"]["variants"], artifacts, bundle, trt_targets,
                             params["package"].get("variant_runtime"))
    source = read_json(artifacts / "source" / "provenance.json", "provenance")
    fields = {
        "name": params["model"]["name"],
        "version": str(params["model"]["version"]),
        "created": created_time(),
        "source": source,
        "params_sha256": params_digest({k: params.get(k) for k in BUILD_SECTIONS}),
        "tools": tool_versions(),
        "lock": lock_record(),
        "embedding_dimension": head.embedding_dimension,
        "max_seq_length": head.max_seq_length,
        "variants": variants,
        "runtime": dict(params["package"]["runtime"]),
        "tensorrt_build": trt_summary(trt_targets, artifacts / "trt"),
        "openvino_build": openvino_build(artifacts),
    }
    try:
        return write_manifest(bundle, fields)
    except ValueError as e:
        raise StageError(str(e)) from None


def archive_members(bundle: Path, extra: dict[str, Path] | None = None) -> list[tuple[str, Path]]:
    """(archive name, path): bundle/ and everything under it in sorted order, then the extra
    files in sorted order of their archive names. Only folders and plain files."""
    bundle = Path(bundle)
    members = [("bundle", bundle)]
    for path in sorted(bundle.rglob("*"), key=lambda p: p.relative_to(bundle).parts):
        members.append((f"bundle/{path.relative_to(bundle).as_posix()}", path))
    members += [(name, Path(extra[name])) for name in sorted(extra or {})]
    for name, path in members:
        if path.is_symlink() or not (path.is_dir() or path.is_file()):
            raise StageError(f"{path}: only folders and plain files go into an archive (archive name {name})")
    return members


def archive(bundle: Path, dest: Path, level: int, extra: dict[str, Path] | None = None) -> None:
    """dest.tar.gz holding bundle/ (and extra files at the top, by archive name).

    Byte-reproducible: members sorted, owner root:root with no names, modes 0755 / 0644,
    mtime SOURCE_DATE_EPOCH or 0; PAX tar in a gzip stream whose header has no name and no time."""
    mtime = source_date_epoch() or 0
    with open(dest, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=level, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, path in archive_members(bundle, extra):
            info = tarfile.TarInfo(name)
            info.mtime = mtime
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if path.is_dir():
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.mode, info.size = 0o644, path.stat().st_size
                with open(path, "rb") as f:
                    tar.addfile(info, f)


def main() -> None:
    def body(args):
        _, params, art = load_model(args)
        # bundle/ and bundle.tar.gz are replaced together: never one from this run beside one from another
        with atomic_outputs(folders=[art / "bundle"], files=[art / "bundle.tar.gz"]) as (tmp, tmp_archive):
            manifest = run(params, art, tmp)
            archive(tmp, tmp_archive, params["package"]["compresslevel"])
        log.info("bundle %s %s: variants %s, %d files", manifest["name"], manifest["version"],
                 sorted(manifest["variants"]), len(manifest["files"]))

    stage_main(__doc__, body)


if __name__ == "__main__":
    main()
