"""The bundle manifest: its schema, how it is written, and the integrity check on load.

`manifest.json` sits at the root of a bundle:

    schema_version   int, MANIFEST_SCHEMA
    name, version    bundle name and semantic version
    created          ISO-8601 UTC time of packaging
    source           provenance record from `stages.fetch` (kind, id, revision, file sums)
    params_sha256    digest of the params that built the bundle
    tools            versions of the tools that built it
    embedding_dimension, max_seq_length
    variants         {name: {file, backend, precision, fused, ...}}
    files            {relative path: {sha256, size}} for every file except manifest.json
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

MANIFEST_FILE = "manifest.json"
MANIFEST_SCHEMA = 1
_SEMVER = re.compile(r"^\d+\.\d+\.\d+(?:[-+][0-9A-Za-z.-]+)?$")


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
    for name, variant in manifest.get("variants", {}).items():
        if variant["file"] not in manifest["files"]:
            raise ValueError(f"variant {name!r} points at {variant['file']}, which is not in the bundle")
    (Path(root) / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def read_manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise IntegrityError(f"{path} not found: {root} is not a bundle") from None
    except json.JSONDecodeError as e:
        raise IntegrityError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise IntegrityError(f"{path} holds a JSON {type(manifest).__name__}, expected an object")
    if manifest.get("schema_version") != MANIFEST_SCHEMA:
        raise IntegrityError(
            f"{path} has schema_version {manifest.get('schema_version')!r}; this runtime reads {MANIFEST_SCHEMA}")
    return manifest


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
    listed = manifest.get("files", {})
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
        raise IntegrityError(f"bundle {root} failed its integrity check:\n  " + "\n  ".join(sorted(problems)))
