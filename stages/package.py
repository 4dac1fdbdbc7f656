"""Stage `package`: assemble the self-contained bundle and its archive.

Writes artifacts/bundle/ and artifacts/bundle.tar.gz:
  manifest.json                      schema in sbert_bundle.manifest
  head.json, head/                   Pooling / Dense / Normalize for sbert_bundle
  tokenizer.json, config.json, …     tokenizer and model config
  modules.json, 1_Pooling/, …        sentence-transformers configuration
  onnx/model.onnx                    fp32; other ONNX variants beside it
  trt/*.plan                         TensorRT plans, when build_trt made any
The bundle needs nothing from the source folder or the pipeline.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import logging
import shutil
import tarfile
from pathlib import Path

from sbert_bundle.head import load_head
from sbert_bundle.manifest import write_manifest

from .common import ARTIFACTS, StageError, atomic_dir, atomic_file, load_params, params_digest, read_json, stage_main
from .split import WEIGHT_FILES

log = logging.getLogger("stages.package")
OUT = ARTIFACTS / "bundle"
ARCHIVE = ARTIFACTS / "bundle.tar.gz"
# Params sections that decide the bundle's content (verify's do not).
BUILD_SECTIONS = ("model", "fetch", "export", "fp16", "quantize", "trt", "package")
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
TOOLS = ("sbert-bundle", "torch", "transformers", "sentence-transformers", "onnx", "onnxruntime",
         "onnxconverter-common", "tokenizers", "tensorrt")


def tool_versions() -> dict:
    found = {}
    for name in TOOLS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def copy_variants(wanted: list[str], artifacts: Path, bundle: Path) -> dict:
    variants = {}
    for name in wanted:
        if name not in ONNX_VARIANTS:
            raise StageError(f"package.variants has {name!r}; known: {', '.join(ONNX_VARIANTS)}")
        src, dest, info = ONNX_VARIANTS[name]
        if not (artifacts / src).is_file():
            log.info("variant %s: %s not built, left out", name, src)
            continue
        (bundle / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(artifacts / src, bundle / dest)
        variants[name] = {"file": dest, "backend": "onnxruntime", **info}
    fp16_report = artifacts / "fp16" / "report.json"
    for name, record in (read_json(fp16_report).items() if fp16_report.is_file() else []):
        if name in variants and not record["parity"]["checked"]:  # this onnxruntime's CPU cannot run it
            variants[name]["devices"] = ["cuda"]
    int8_report = artifacts / "int8" / "report.json"
    if "int8" in variants and int8_report.is_file():
        report = read_json(int8_report)
        variants["int8"]["quantization"] = {k: report.get(k) for k in (
            "method", "per_channel", "weight_type", "smoothed", "smoothing_alpha", "outlier_channels",
            "excluded_nodes", "calibration")}
    trt_report = artifacts / "trt" / "build.json"
    if trt_report.is_file():
        for plan in read_json(trt_report).get("plans", []):
            dest = f"trt/{plan['file']}"
            (bundle / "trt").mkdir(exist_ok=True)
            shutil.copy2(artifacts / "trt" / plan["file"], bundle / dest)
            variants[plan["name"]] = {"file": dest, "backend": "tensorrt", "precision": plan["precision"],
                                      "fused": True, "devices": ["cuda"], "tensorrt": plan["metadata"]}
    if "fp32" not in variants:
        raise StageError("the bundle needs the fp32 variant (artifacts/onnx/model.onnx); it is missing")
    return variants


def trt_summary(build_json: Path) -> dict:
    """Whether build_trt made plans, and if not, why (shown by `sbert-bundle inspect`)."""
    if not build_json.is_file():
        return {"skipped": True, "reason": "build_trt did not run"}
    record = read_json(build_json)
    return {"skipped": record.get("skipped", False), "reason": record.get("reason"),
            "plans": [p["name"] for p in record.get("plans", [])]}


def run(params: dict, artifacts: Path, bundle: Path) -> dict:
    split = artifacts / "split"
    for f in sorted((split / "transformer").iterdir()):  # config + tokenizer, not the torch weights
        if f.is_file() and f.name not in WEIGHT_FILES and not f.name.endswith(".md"):
            shutil.copy2(f, bundle / f.name)
    shutil.copytree(split / "modules", bundle, dirs_exist_ok=True)
    head = load_head(bundle)
    variants = copy_variants(params["package"]["variants"], artifacts, bundle)
    source = read_json(artifacts / "source" / "provenance.json", "provenance")
    fields = {
        "name": params["model"]["name"],
        "version": str(params["model"]["version"]),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "params_sha256": params_digest({k: params.get(k) for k in BUILD_SECTIONS}),
        "tools": tool_versions(),
        "embedding_dimension": head.embedding_dimension,
        "max_seq_length": head.max_seq_length,
        "variants": variants,
        "runtime": dict(params["package"]["runtime"]),
        "tensorrt_build": trt_summary(artifacts / "trt" / "build.json"),
    }
    try:
        return write_manifest(bundle, fields)
    except ValueError as e:
        raise StageError(str(e)) from None


def archive(bundle: Path, dest: Path, level: int, extra: dict[str, Path] | None = None) -> None:
    """dest.tar.gz holding bundle/ (and extra files at the top, by archive name)."""
    with tarfile.open(dest, "w:gz", compresslevel=level) as tar:
        tar.add(bundle, arcname="bundle")
        for name, path in (extra or {}).items():
            tar.add(path, arcname=name)


def main() -> None:
    def body(args):
        params = load_params(args.params)
        with atomic_dir(OUT) as tmp:
            manifest = run(params, ARTIFACTS, tmp)
            with atomic_file(ARCHIVE) as tmp_archive:
                archive(tmp, tmp_archive, params["package"]["compresslevel"])
        log.info("bundle %s %s: variants %s, %d files", manifest["name"], manifest["version"],
                 sorted(manifest["variants"]), len(manifest["files"]))

    stage_main(__doc__, body)


if __name__ == "__main__":
    main()
