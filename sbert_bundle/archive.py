"""Open a bundle archive from someone else without trusting it.

Nothing is written to disk until the archive's headers and its manifest are checked:

- at most MAX_MEMBERS members, each a regular file or a folder, no name twice;
- exactly one bundle: one shallowest `manifest.json` (at the top, or in one folder);
- every file is listed in that manifest with the listed size; a sealed release may also
  hold `verify.json` and `release.json` beside the bundle folder;
- the listed sizes add up to at most `max_bytes` and fit in the temporary folder's free space.

Then only those members are written, into a temporary folder `sbert-bundle-<pid>-*` that is
removed on every failure, at interpreter exit, and, if the process was killed, by the next
load in any process (it removes the folders of processes that no longer run). The sha256 of
each file is checked afterwards by `manifest.check_integrity`, against the same manifest.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from .manifest import MANIFEST_FILE, MAX_BUNDLE_BYTES, MAX_MANIFEST_BYTES, IntegrityError, parse_manifest, summarize

log = logging.getLogger(__name__)

MAX_MEMBERS = 20_000
REPORT_FILE = "verify.json"
SEAL_FILE = "release.json"
RELEASE_FILES = (REPORT_FILE, SEAL_FILE)
MAX_REPORT_BYTES = 16 << 20
TMP_PREFIX = "sbert-bundle-"
_TMP_NAME = re.compile(rf"^{TMP_PREFIX}(\d+)-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_folders(parent: Path | None = None) -> list[Path]:
    """Remove this user's extraction folders left by processes that were killed; returns them."""
    parent = Path(parent or tempfile.gettempdir())
    removed = []
    for folder in parent.glob(f"{TMP_PREFIX}*"):
        match = _TMP_NAME.match(folder.name)
        try:
            mine = folder.is_dir() and not folder.is_symlink() and folder.stat().st_uid == os.getuid()
        except OSError:
            continue
        if match and mine and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    if removed:
        log.info("removed %d extraction folder(s) of killed processes from %s", len(removed), parent)
    return removed


def _member_name(member: tarfile.TarInfo) -> str:
    name = member.name
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


def _check_members(path: Path, tar: tarfile.TarFile, max_members: int, max_bytes: int) -> list[tarfile.TarInfo]:
    """Read every header (no data is written); refuse links, devices, duplicates and overflows."""
    members, names, declared = [], set(), 0
    while (member := tar.next()) is not None:
        if len(members) >= max_members:
            raise IntegrityError(f"{path} has more than {max_members} members; a bundle archive holds a few dozen")
        name = _member_name(member)
        if not (member.isfile() or member.isdir()):
            raise IntegrityError(f"{path}: member {name!r} is a link or special file; bundles hold plain files")
        if not name or name.startswith("/") or ".." in PurePosixPath(name).parts:
            raise IntegrityError(f"{path}: member {name!r} is not a plain relative path")
        if name in names:
            raise IntegrityError(f"{path}: member {name!r} appears twice")
        names.add(name)
        declared += member.size if member.isfile() else 0
        if declared > max_bytes:
            raise IntegrityError(f"{path}: its members add up to more than {max_bytes} bytes (the limit)")
        members.append(member)
    return members


def _plan(path: Path, tar: tarfile.TarFile, members: list[tarfile.TarInfo], max_bytes: int):
    """(prefix of the bundle folder, manifest, members to write) once everything is checked."""
    manifests = [m for m in members if m.isfile() and PurePosixPath(_member_name(m)).name == MANIFEST_FILE]
    if not manifests:
        raise IntegrityError(f"{path} holds no {MANIFEST_FILE}: not a bundle archive")
    depth = min(len(PurePosixPath(_member_name(m)).parts) for m in manifests)
    top = [_member_name(m) for m in manifests if len(PurePosixPath(_member_name(m)).parts) == depth]
    if len(top) > 1:
        raise IntegrityError(f"{path} holds {len(top)} bundles ({', '.join(sorted(top))}); "
                             "an archive must hold exactly one")
    manifest_member = next(m for m in manifests if _member_name(m) == top[0])
    prefix = str(PurePosixPath(top[0]).parent)
    prefix = "" if prefix == "." else prefix + "/"
    if manifest_member.size > MAX_MANIFEST_BYTES:
        raise IntegrityError(f"{path}: {top[0]} is {manifest_member.size} bytes; at most {MAX_MANIFEST_BYTES}")
    manifest = parse_manifest(tar.extractfile(manifest_member).read(), f"{path}:{top[0]}")
    listed = manifest["files"]
    problems, wanted, seen = [], [], set()
    for member in members:
        name = _member_name(member)
        if member.isdir():
            if prefix.startswith(name + "/") or (name + "/").startswith(prefix):
                continue  # the bundle folder, its parents, or a folder inside it
            problems.append(f"{name}/: a folder outside the bundle folder {prefix or '.'}")
            continue
        rel = name[len(prefix):] if name.startswith(prefix) else None
        if rel == MANIFEST_FILE:
            wanted.append(member)
        elif rel is not None and rel in listed:
            seen.add(rel)
            if member.size != listed[rel]["size"]:
                problems.append(f"{name}: {member.size} bytes, the manifest says {listed[rel]['size']}")
            else:
                wanted.append(member)
        elif prefix and name in RELEASE_FILES and member.size <= MAX_REPORT_BYTES:
            wanted.append(member)
        else:
            problems.append(f"{name}: not listed in the manifest")
    problems += [f"{prefix}{rel}: listed in the manifest but not in the archive" for rel in sorted(set(listed) - seen)]
    if problems:
        raise IntegrityError(f"{path} does not match its manifest: {summarize(problems)}")
    return prefix, manifest, wanted


def extract_bundle(path: Path, max_members: int = MAX_MEMBERS,
                   max_bytes: int = MAX_BUNDLE_BYTES) -> tuple[Path, tempfile.TemporaryDirectory]:
    """Check, then extract, the bundle in a .tar/.tar.gz; returns (bundle folder, its temporary folder).

    The caller keeps the TemporaryDirectory alive as long as it uses the files."""
    path = Path(path)
    remove_stale_folders()
    try:
        with tarfile.open(path, "r:*") as tar:
            members = _check_members(path, tar, max_members, max_bytes)
            prefix, manifest, wanted = _plan(path, tar, members, max_bytes)
            need = sum(m.size for m in wanted)
            free = shutil.disk_usage(tempfile.gettempdir()).free
            if need > free:
                raise IntegrityError(f"{path} needs {need} bytes to extract; {tempfile.gettempdir()} has {free} free")
            tmp = tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}{os.getpid()}-")
            try:
                for member in wanted:
                    member.name = _member_name(member)
                    tar.extract(member, tmp.name, filter="data")
            except BaseException:
                tmp.cleanup()
                raise
    except (tarfile.TarError, EOFError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise IntegrityError(f"{path} is not a readable bundle archive ({type(e).__name__}: {e})") from None
    return Path(tmp.name) / prefix, tmp
