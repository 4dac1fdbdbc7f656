"""Stage `release`: seal the verified bundle with the verify report that cleared it.

Writes artifacts/<model>/release/<name>-<version>.tar.gz holding bundle/ (unchanged: what was
verified), verify.json (the report: which gates each variant passed, on which device) and
release.json, the seal: the sha256 of verify.json and of bundle/manifest.json (which covers
every file of the bundle). `sbert_bundle.Bundle.load` on this archive uses the report only
when the seal matches, and then picks the preferred exact variant that passed on this device.
The report holds no timings, so the same bundle gives the same release archive.
Runs only after `verify` succeeded (DVC stops at a failed stage).
"""

from __future__ import annotations

import logging
from pathlib import Path

from sbert_bundle.archive import REPORT_FILE, SEAL_FILE
from sbert_bundle.bundle import report_problems
from sbert_bundle.manifest import MANIFEST_FILE, sha256_file

from .common import StageError, atomic_dir, load_model, read_json, stage_main, write_json
from .package import archive

log = logging.getLogger("stages.release")


def run(model: dict, compresslevel: int, bundle: Path, report: Path, out_dir: Path) -> Path:
    verdict = read_json(report, "verify report")
    if verdict.get("failures"):
        raise StageError(f"{report} lists failed gates; a bundle that failed verify is not released")
    manifest_sha = sha256_file(bundle / MANIFEST_FILE)
    if (verdict.get("bundle") or {}).get("manifest_sha256") != manifest_sha:
        raise StageError(f"{report} was made for another bundle (manifest sha256 differs from "
                         f"{bundle / MANIFEST_FILE}): run verify again")
    problems = report_problems(verdict, manifest_sha)
    if problems:
        raise StageError(f"{report} cannot be released: {'; '.join(problems)}")
    seal = out_dir / SEAL_FILE
    write_json(seal, {"name": model["name"], "version": str(model["version"]),
                      "bundle_manifest_sha256": manifest_sha, "report_sha256": sha256_file(report)})
    dest = out_dir / f"{model['name']}-{model['version']}.tar.gz"
    archive(bundle, dest, compresslevel, extra={REPORT_FILE: report, SEAL_FILE: seal})
    seal.unlink()  # it lives in the archive; the release folder holds the archive only
    return dest


def main() -> None:
    def body(args):
        _, params, art = load_model(args)
        with atomic_dir(art / "release") as tmp:
            dest = run(params["model"], params["package"]["compresslevel"], art / "bundle",
                       art / "verify" / "report.json", tmp)
        log.info("released %s", art / "release" / dest.name)

    stage_main(__doc__, body)


if __name__ == "__main__":
    main()
