"""Pull published bundles from a registry: git tags (GTO) + a DVC remote.

A published version is a GTO version tag `<name>@v<semver>` on the commit whose `dvc.lock`
built the release archive, with the archive's sha256 in the tag message, and the archive
itself in the repository's DVC remote (`stages.publish` writes both). Stages are GTO stage
tags (`<name>#<stage>#<n>`). So this module reads any DVC model registry, and DVC / GTO's
own tools (`dvc artifacts get`, `gto show`) read ours.

Needs the `registry` extra (`pip install 'sbert-bundle[registry]'`: dvc and gto); the core
runtime never imports this module.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .archive import RELEASE_FILES, extract_bundle
from .bundle import PUBLISHED_FILE
from .manifest import IntegrityError, sha256_file

log = logging.getLogger(__name__)

_SHA_LINE = re.compile(r"^sha256: ([0-9a-f]{64})$", re.MULTILINE)
_CHANGELOG = "changelog:\n"
_REF = re.compile(r"^(?P<name>[^@#]+)(?:@(?P<version>v?\d+\.\d+\.\d+\S*)|#(?P<stage>[A-Za-z0-9][\w/-]*))?$")


class RegistryError(RuntimeError):
    """A registry look-up or download failed; the message says what exists instead."""


def _require():
    try:
        import dvc  # noqa: F401
        import gto  # noqa: F401
    except ImportError:
        raise RegistryError("pulling from a registry needs dvc and gto: pip install 'sbert-bundle[registry]'") from None


@dataclass
class Published:
    name: str
    version: str          # with the leading "v", as GTO writes it
    commit: str
    sha256: str
    changelog: dict | None
    message: str


def tag_message(name: str, version: str, sha256: str, archive: str, changelog: dict) -> str:
    """The version tag's message: what a consumer checks the archive against, then the changelog."""
    return (f"{name} {version}\nsha256: {sha256}\narchive: {archive}\n\n"
            f"{_CHANGELOG}{json.dumps(changelog, indent=2, sort_keys=True)}\n")


def parse_message(message: str) -> tuple[str | None, dict | None]:
    """(sha256, changelog) from a version tag's message; None where absent."""
    match = _SHA_LINE.search(message or "")
    changelog = None
    if _CHANGELOG in (message or ""):
        try:
            changelog = json.loads(message.split(_CHANGELOG, 1)[1])
        except json.JSONDecodeError:
            changelog = None
    return (match.group(1) if match else None), changelog


def parse_ref(spec: str) -> tuple[str, str | None, str | None]:
    """NAME, NAME@VERSION (v optional) or NAME#STAGE -> (name, "vX.Y.Z" or None, stage or None)."""
    match = _REF.match(spec)
    if not match:
        raise RegistryError(f"{spec!r}: expected NAME, NAME@VERSION (e.g. all-MiniLM-L6-v2@v1.0.0) or NAME#STAGE")
    version = match["version"]
    if version and not version.startswith("v"):
        version = "v" + version
    return match["name"], version, match["stage"]


def published_versions(repo: str) -> dict:
    """{name: {"versions": [Published...] newest first, "stages": {stage: version}}} from the repo's tags."""
    _require()
    from gto.registry import GitRegistry

    found = {}
    try:
        with GitRegistry.from_url(repo) as registry:
            state = registry.get_state()
            for name, artifact in sorted(state.artifacts.items()):
                versions = [v for v in artifact.versions if v.is_registered and v.is_active]
                versions.sort(key=lambda v: _semver_key(v.version), reverse=True)
                if not versions:
                    continue
                published = []
                for v in versions:
                    message = v.registrations[-1].message if v.registrations else ""
                    sha, changelog = parse_message(message)
                    published.append(Published(name, v.version, v.commit_hexsha, sha, changelog, message))
                stages = {}
                for v in versions:
                    for stage, vstage in v.stages.items():
                        if vstage.is_active and stage not in stages:
                            stages[stage] = v.version
                found[name] = {"versions": published, "stages": stages}
    except Exception as e:  # noqa: BLE001 - gto / scmrepo raise their own types for a bad repo or URL
        raise RegistryError(f"{repo}: cannot read its tags as a registry ({type(e).__name__}: {e})") from None
    return found


def _semver_key(version: str) -> tuple:
    core = version.lstrip("v").split("-", 1)[0].split("+", 1)[0]
    return tuple(int(x) for x in core.split("."))


def list_registry(repo: str) -> dict:
    """What `sbert-bundle list` prints: each model's versions (newest first) and stages."""
    return {name: {"versions": [p.version for p in entry["versions"]], "stages": entry["stages"],
                   "latest": entry["versions"][0].version}
            for name, entry in published_versions(repo).items()}


def resolve(repo: str, spec: str) -> Published:
    """The published version that NAME[@VERSION|#STAGE] names (no version: the latest)."""
    name, version, stage = parse_ref(spec)
    registry = published_versions(repo)
    if name not in registry:
        known = ", ".join(registry) or "none"
        raise RegistryError(f"{repo} has no published model {name!r}; published models: {known}")
    entry = registry[name]
    by_version = {p.version: p for p in entry["versions"]}
    if stage is not None:
        if stage not in entry["stages"]:
            stages = ", ".join(f"{s} -> {v}" for s, v in entry["stages"].items()) or "none"
            raise RegistryError(f"{name} has no version in stage {stage!r}; stages: {stages}")
        version = entry["stages"][stage]
    if version is None:
        return entry["versions"][0]
    if version not in by_version:
        raise RegistryError(f"{name} has no published version {version}; published: "
                            f"{', '.join(p.version for p in entry['versions'])}")
    return by_version[version]


def download(repo: str, published: Published, dest: Path) -> Path:
    """The release archive of a published version, via DVC (`dvc artifacts get`), sha256 checked."""
    _require()
    from dvc.repo.artifacts import Artifacts

    if not published.sha256:
        raise RegistryError(f"{published.name}@{published.version}: its tag message holds no sha256, so the "
                            "archive cannot be checked; it was not published by sbert-bundle")
    dest.mkdir(parents=True, exist_ok=True)
    try:
        _, out = Artifacts.get(repo, published.name, version=published.version, out=str(dest / "release.tar.gz"),
                               force=True)
    except Exception as e:  # noqa: BLE001 - DVC raises many types (remote missing, object missing, ...)
        raise RegistryError(f"{published.name}@{published.version}: download from {repo}'s DVC remote failed "
                            f"({type(e).__name__}: {e})") from None
    archive = Path(out)
    digest = sha256_file(archive)
    if digest != published.sha256:
        raise IntegrityError(f"{published.name}@{published.version}: the downloaded archive has sha256 {digest}, "
                             f"the version tag says {published.sha256}; the registry's copy is corrupt or "
                             "was replaced")
    return archive


def pull(repo: str, spec: str, out_dir: Path) -> tuple[Published, Path]:
    """Download, check and unpack a published release into out_dir (a release folder:
    bundle/, verify.json, release.json, published.json). out_dir must not exist yet."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; pull writes a new folder (choose another -o)")
    published = resolve(repo, spec)
    with tempfile.TemporaryDirectory(prefix="sbert-bundle-pull-") as work:
        archive = download(repo, published, Path(work))
        root, tmp = extract_bundle(archive)
        staging = None
        try:
            staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent or "."))
            shutil.move(str(root), staging / "bundle")
            for name in RELEASE_FILES:
                if (root.parent / name).is_file():
                    shutil.move(str(root.parent / name), staging / name)
            (staging / PUBLISHED_FILE).write_text(json.dumps(
                {"name": published.name, "version": published.version, "commit": published.commit,
                 "archive_sha256": published.sha256, "repository": str(repo), "changelog": published.changelog},
                indent=2, sort_keys=True) + "\n")
            staging.chmod(0o755)
            staging.rename(out_dir)
        except BaseException:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            tmp.cleanup()
    return published, out_dir
