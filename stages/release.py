"""Stage `release`: seal the verified bundle with the verify report that cleared it.

Writes artifacts/release/<name>-<version>.tar.gz holding bundle/ (unchanged: what was
verified) and verify.json (the report: which gates each variant passed, measured speed).
`sbert_bundle.Bundle.load` on this archive reads the report and picks the fastest CPU
variant that passed. Runs only after `verify` succeeded (DVC stops at a failed stage).
"""

from __future__ import annotations

import logging
from pathlib import Path

from sbert_bundle.bundle import REPORT_FILE

from .common import ARTIFACTS, StageError, atomic_dir, load_params, read_json, stage_main
from .package import archive

log = logging.getLogger("stages.release")
BUNDLE = ARTIFACTS / "bundle"
REPORT = ARTIFACTS / "verify" / "report.json"
OUT = ARTIFACTS / "release"


def run(model: dict, compresslevel: int, bundle: Path, report: Path, out_dir: Path) -> Path:
    verdict = read_json(report, "verify report")
    if verdict.get("failures"):
        raise StageError(f"{report} lists failed gates; a bundle that failed verify is not released")
    manifest = read_json(bundle / "manifest.json", "bundle manifest")
    if verdict["bundle"].get("created") != manifest.get("created"):
        raise StageError(f"{report} was made for the bundle created {verdict['bundle'].get('created')}, "
                         f"but {bundle} was created {manifest.get('created')}: run verify again")
    dest = out_dir / f"{model['name']}-{model['version']}.tar.gz"
    archive(bundle, dest, compresslevel, extra={REPORT_FILE: report})
    return dest


def main() -> None:
    def body(args):
        params = load_params(args.params)
        with atomic_dir(OUT) as tmp:
            dest = run(params["model"], params["package"]["compresslevel"], BUNDLE, REPORT, tmp)
        log.info("released %s", OUT / dest.name)

    stage_main(__doc__, body)


if __name__ == "__main__":
    main()
