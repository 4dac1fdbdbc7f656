"""Rebuild a revision in a temporary clone and compare its outputs with what was published.

    python -m stages.rebuild_check [REV] [--model KEY] [--archive FILE] [--sha256 HEX] [--keep]
                                   [--emulate-cpu MODEL]

Clones this repository at REV (default HEAD) into a temporary folder, runs `dvc repro` there
with this environment's python and dvc (first on PATH), and compares the md5 of every stage
output in the rebuilt dvc.lock with the one committed at REV, stage by stage in the order of
the DAG.

What must be the same bytes, on any x86-64 CPU type: every build output up to and including
`package` (the bundle and bundle.tar.gz). The check fails on the first of those that differs and
names its stage. What may differ: verify's report and the release archive that seals it. They
hold parity figures measured on the machine (cosines to PyTorch), whose last bits follow the
CPU's instruction set; on the same CPU type they repeat bit for bit, on another they are
printed as "measured here" and do not fail the check.
Given --archive (a published release archive), the published report is put in the clone and
`release` re-run: the result must be the archive, bit for bit, whatever this CPU measured.
--archive FILE also takes a bundle.tar.gz; --sha256 HEX compares a published digest with
the rebuilt bundle.tar.gz and release archive of every model. --model names the model an
--archive belongs to where REV builds several. --emulate-cpu MODEL (a qemu CPU model such as
Haswell-noTSX: AVX2, no AVX-512) runs every stage command under qemu-user's emulation of that
CPU, so that PyTorch, onnxruntime and OpenVINO pick their kernels for it: the check of "another
CPU type" on the machine at hand. It rebuilds the stages up to package only (verify would time
PyTorch under emulation), and is slow: 10 to several hundred times (PyTorch's export the
slowest; docs/reproducibility.md).
Exit 0 when every build output (and every given archive or digest) is the same, 1 otherwise.
The environment is checked against the lock at REV first.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from sbert_bundle.manifest import sha256_file

from .common import REPO, StageError, git, model_dir, pick_model, stage_environment, stage_main
from .package import LOCK_NAME, lock_drift, lock_pins

log = logging.getLogger("stages.rebuild_check")
MAX_REPORT_BYTES = 16 << 20


@dataclass(frozen=True)
class Outcome:
    stage: str
    path: str
    status: str          # same | differs | missing
    committed: str | None = None
    rebuilt: str | None = None


def lock_outs(lock: dict) -> dict[str, dict[str, str]]:
    """{stage: {output path: md5}} of a parsed dvc.lock (schema 2.0)."""
    stages = (lock or {}).get("stages") or {}
    return {name: {o["path"]: o.get("md5") for o in stage.get("outs") or []} for name, stage in stages.items()}


def stage_order(lock: dict) -> list[str]:
    """Stages of a dvc.lock, each after every stage whose output it reads (ties: file order)."""
    stages = (lock or {}).get("stages") or {}
    producer = {o["path"]: name for name, s in stages.items() for o in s.get("outs") or []}

    def upstream(name: str) -> set[str]:
        found = set()
        for dep in (d["path"] for d in stages[name].get("deps") or []):
            for out, prod in producer.items():
                if prod != name and (dep == out or dep.startswith(out.rstrip("/") + "/")):
                    found.add(prod)
        return found

    order, placed = [], set()
    pending = list(stages)
    while pending:
        ready = [n for n in pending if upstream(n) <= placed] or pending[:1]  # a cycle: take file order
        order.append(ready[0])
        placed.add(ready[0])
        pending.remove(ready[0])
    return order


def compare(committed: dict, rebuilt: dict) -> list[Outcome]:
    """Every output of the committed dvc.lock against the rebuilt one, in DAG order."""
    want, got = lock_outs(committed), lock_outs(rebuilt)
    outcomes = []
    for stage in stage_order(committed):
        for path, md5 in want[stage].items():
            new = got.get(stage, {}).get(path)
            if new is None:
                status = "missing"
            else:
                status = "same" if new == md5 else "differs"
            outcomes.append(Outcome(stage, path, status, md5, new))
    return outcomes


# Stages whose outputs hold what was measured on the machine (verify's parity figures; the
# release that seals them): they may differ on another CPU type and do not fail the check.
MEASURED_STAGES = ("verify", "release")


def measured_here(stage: str) -> bool:
    return stage.split("@", 1)[0] in MEASURED_STAGES


def verdict(outcomes: list[Outcome], repro_ok: bool) -> tuple[list[str], str | None]:
    """Lines to print, and the first build stage whose output differs (None: every build output the same)."""
    lines, first = [], None
    for o in outcomes:
        measured = measured_here(o.stage)
        if o.status == "same":
            text = "same"
        elif o.status == "missing":
            text = "not rebuilt (dvc repro stopped before this stage)"
        elif measured:
            text = (f"differs: measured here (parity figures follow the CPU type; committed {o.committed}, "
                    f"rebuilt {o.rebuilt})")
        elif repro_ok:
            text = f"DIFFERS, though the rebuild passes verify's gates (committed {o.committed}, rebuilt {o.rebuilt})"
        else:
            text = f"DIFFERS (committed {o.committed}, rebuilt {o.rebuilt}); verify did not pass on the rebuild"
        if first is None and (o.status == "missing" or (o.status == "differs" and not measured)):
            first = o.stage
        lines.append(f"{o.stage:<24} {o.path:<44} {text}")
    return lines, first


def release_report(archive: Path, report_name: str) -> bytes | None:
    """The verify report at the top of a release archive, or None for a bare bundle archive."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if member.name == report_name:
                    if not member.isfile() or member.size > MAX_REPORT_BYTES:
                        raise StageError(f"{archive}: {report_name} is not a plain file of at most "
                                         f"{MAX_REPORT_BYTES} bytes")
                    return tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise StageError(f"{archive}: not a readable .tar.gz ({e})") from None
    return None


def emulated_python(cpu: str, work: Path) -> Path:
    """A folder whose `python` is this interpreter under qemu-user emulating CPU `cpu`; first on PATH,
    it runs every `python -m stages.<name>` of dvc.yaml there while dvc itself runs natively."""
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        raise StageError("--emulate-cpu needs qemu-user's qemu-x86_64 (Debian / Ubuntu: apt-get install qemu-user)")
    probe = subprocess.run([qemu, "-cpu", cpu, sys.executable, "-c", "pass"], capture_output=True, text=True)
    if probe.returncode:
        said = (probe.stderr.strip().splitlines() or ["no message"])[-1]
        raise StageError(f"--emulate-cpu {cpu}: qemu-x86_64 refused it ({said}); "
                         "`qemu-x86_64 -cpu help` lists the models")
    folder = work / "emulated-bin"
    folder.mkdir()
    wrapper = folder / "python"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(qemu)} -cpu {shlex.quote(cpu)} {shlex.quote(sys.executable)} "$@"\n')
    wrapper.chmod(0o755)
    return folder


def dag_stages(clone: Path) -> set[str]:
    """The stages dvc.yaml defines in clone (foreach and matrix cells by their names)."""
    done = subprocess.run([sys.executable, "-m", "dvc", "stage", "list", "--name-only"], cwd=clone,
                          env=stage_environment(), capture_output=True, text=True)
    if done.returncode:
        raise StageError(f"dvc stage list failed in {clone}: {done.stderr.strip()}")
    return set(done.stdout.split())


def rebuild(rev: str, work: Path, emulate_cpu: str | None = None) -> tuple[Path, dict, bool]:
    """Clone REPO at rev into work/src and run dvc repro (up to package under an emulated CPU);
    (clone, committed dvc.lock, repro passed)."""
    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}").strip()
    clone = work / "src"
    git("clone", "--quiet", "--no-checkout", str(REPO), str(clone))
    git("checkout", "--quiet", "--detach", commit, cwd=clone)
    committed_lock = clone / "dvc.lock"
    if not committed_lock.is_file():
        raise StageError(f"{rev} ({commit[:12]}) has no dvc.lock: nothing to compare with")
    committed = yaml.safe_load(committed_lock.read_text())
    committed_lock.unlink()  # rebuilt from nothing: a stage the repro does not reach is missing, not "same"
    stale = sorted(set((committed or {}).get("stages") or {}) - dag_stages(clone))
    if stale:  # DVC keeps the entries of stages since removed from dvc.yaml; there is nothing to rebuild
        log.warning("dvc.lock at %s holds stages that dvc.yaml no longer has, not compared: %s", rev, ", ".join(stale))
        for name in stale:
            del committed["stages"][name]
    lock = clone / LOCK_NAME
    if lock.is_file():
        drift = lock_drift(lock_pins(lock.read_text()))
        if drift:
            log.warning("this environment differs from %s at %s, so outputs may differ: %s", LOCK_NAME, rev,
                        ", ".join(f"{k} {v or 'missing'}" for k, v in drift.items()))
    else:
        log.warning("%s at %s has no %s: the build environment is not locked there", rev, commit[:12], LOCK_NAME)
    env, targets = stage_environment(), []
    if emulate_cpu:
        env["PATH"] = f"{emulated_python(emulate_cpu, work)}{os.pathsep}{env['PATH']}"
        targets = ["package"]
        log.info("stage commands run under qemu-x86_64 -cpu %s, up to package", emulate_cpu)
    log.info("rebuilding %s (%s) in %s", rev, commit[:12], clone)
    done = subprocess.run([sys.executable, "-m", "dvc", "repro", *targets], cwd=clone, env=env)
    return clone, committed, done.returncode == 0


def check_archive(clone: Path, archive: Path, key: str) -> tuple[bool, str]:
    """A published bundle.tar.gz or release archive of model `key` against the rebuild."""
    from sbert_bundle.bundle import REPORT_FILE

    want = sha256_file(archive)
    report = release_report(archive, REPORT_FILE)
    if report is None:
        built = clone / model_dir(key) / "bundle.tar.gz"
        got = sha256_file(built) if built.is_file() else None
        return got == want, f"bundle archive {archive.name}: sha256 {want}, rebuilt {got}"
    target = clone / model_dir(key) / "verify" / "report.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(report)
    done = subprocess.run([sys.executable, "-m", "stages.release", "--quiet", "--model", key], cwd=clone, env=stage_environment(),
                          capture_output=True, text=True)
    if done.returncode:
        return False, (f"release archive {archive.name}: `release` refused the rebuilt bundle with the published "
                       f"report: {done.stderr.strip()}")
    built = sorted((clone / model_dir(key) / "release").glob("*.tar.gz"))
    got = sha256_file(built[0]) if len(built) == 1 else None
    return got == want, f"release archive {archive.name} (with its own verify report): sha256 {want}, rebuilt {got}"


def check_sha256(clone: Path, digest: str) -> tuple[bool, str]:
    candidates = [*sorted(clone.glob("artifacts/*/bundle.tar.gz")), *sorted(clone.glob("artifacts/*/release/*.tar.gz"))]
    for path in candidates:
        if path.is_file() and sha256_file(path) == digest.lower():
            return True, f"sha256 {digest}: the rebuilt {path.relative_to(clone)}"
    return False, (f"sha256 {digest}: no rebuilt archive has it (pass the published archive with --archive to "
                   "check it against the rebuild with its own verify report)")


def run(rev: str, work: Path, archive: Path | None = None, digest: str | None = None, model: str | None = None,
        emulate_cpu: str | None = None) -> int:
    clone, committed, repro_ok = rebuild(rev, work, emulate_cpu)
    rebuilt_lock = clone / "dvc.lock"
    rebuilt = yaml.safe_load(rebuilt_lock.read_text()) if rebuilt_lock.is_file() else {}
    outcomes = compare(committed, rebuilt)
    if emulate_cpu:  # verify and release were not run
        outcomes = [o for o in outcomes if not measured_here(o.stage)]
    lines, first = verdict(outcomes, repro_ok)
    print(f"rebuild of {rev} against its dvc.lock:")
    print("\n".join(lines))
    ok = first is None and repro_ok
    results = []
    if archive:
        key = pick_model(yaml.safe_load((clone / "params.yaml").read_text()), model)
        results.append(check_archive(clone, archive, key))
    if digest:
        results.append(check_sha256(clone, digest))
    for same, text in results:
        print(("same: " if same else "DIFFERS: ") + text)
        ok = ok and same
    if first:
        print(f"first difference: stage {first}")
    if not repro_ok:
        print("dvc repro failed in the clone (its log is above)")
    measured_differ = any(o.status == "differs" and measured_here(o.stage) for o in outcomes)
    if ok:
        print("rebuild check passed: every build output up to package, bundle.tar.gz included, is the same bytes"
              + ("; verify's report and the release differ, as parity measured on another CPU type may"
                 if measured_differ else "; verify's report and the release too"))
    else:
        print("rebuild check FAILED")
    return 0 if ok else 1


def main() -> None:
    def add_args(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("rev", nargs="?", default="HEAD", help="git revision or tag to rebuild (default HEAD)")
        parser.add_argument("--archive", type=Path, help="a published release archive or bundle.tar.gz")
        parser.add_argument("--sha256", help="a published archive's sha256 (e.g. from the version tag)")
        parser.add_argument("--keep", action="store_true", help="keep the temporary clone and print its path")
        parser.add_argument("--emulate-cpu", metavar="MODEL",
                            help="run the stages up to package under qemu-user emulating this CPU (e.g. "
                                 "Haswell-noTSX: AVX2, no AVX-512); needs qemu-user; 10 to several hundred times slower")

    def body(args):
        if args.archive and not args.archive.is_file():
            raise StageError(f"--archive {args.archive}: no such file")
        work = Path(tempfile.mkdtemp(prefix="sbert-rebuild-"))
        try:
            code = run(args.rev, work, args.archive and args.archive.resolve(), args.sha256, args.model,
                       args.emulate_cpu)
        finally:
            if args.keep:
                print(f"clone kept in {work / 'src'}")
            else:
                shutil.rmtree(work, ignore_errors=True)
        sys.exit(code)

    stage_main(__doc__, body, add_args)


if __name__ == "__main__":
    main()
