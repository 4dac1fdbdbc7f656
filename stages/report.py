"""The matrix report: models x variants x GPU targets, with gates, min cosine and speed vs PyTorch.

    python -m stages.report        # after `make repro` or `make matrix`

Reads each model's verify outputs (artifacts/<model>/verify/report.json, speed.json), its
TensorRT build records (artifacts/<model>/trt/<target>/build.json: a plan, or skipped and
why) and, after `make matrix`, the cells record (artifacts/matrix/cells.json: a failed cell is a
row of its own). Prints the table and writes, as dvc.yaml's top-level metrics and plots (speed
differs on every run, so these are not stage outputs):
  artifacts/matrix/metrics.json          per model and variant: passed, min_cosine, speedup
  artifacts/matrix/plots/speedup.csv     one bar per model/variant: speedup against PyTorch
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from .common import ARTIFACTS, atomic_file, load_params, model_keys, stage_main, write_json
from .package import plan_variant_name

log = logging.getLogger("stages.report")
OUT = ARTIFACTS / "matrix"


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def rows(repo: Path, params: dict, record: dict | None = None) -> list[dict]:
    """One row per (model, variant, target); models without verify outputs get one row saying why."""
    tasks = {} if record is None else {t["name"]: t for t in record["tasks"]}
    out = []
    for key in model_keys(params):
        art = repo / ARTIFACTS / key
        failed = [t for t in tasks.values() if t["model"] == key and t["state"] == "failed"]
        for t in failed:
            out.append({"model": key, "variant": "-", "target": t.get("target") or "-", "state": "failed",
                        "passed": None, "min_cosine": None, "speedup": None, "note": t["error"].splitlines()[0]})
        report, speed = _read(art / "verify" / "report.json"), _read(art / "verify" / "speed.json") or {}
        if report is None:
            if not failed:
                out.append({"model": key, "variant": "-", "target": "-", "state": "not built", "passed": None,
                            "min_cosine": None, "speedup": None, "note": f"no {art / 'verify' / 'report.json'}"})
            continue
        speeds = speed.get("variants", {})
        for name, m in report.get("variants", {}).items():
            out.append({"model": key, "variant": name, "target": m.get("device", "-"), "state": "verified",
                        "passed": m.get("passed"), "min_cosine": m.get("min_cosine"),
                        "speedup": speeds.get(name, {}).get("speedup"), "note": ""})
        for name, why in report.get("skipped", {}).items():
            out.append({"model": key, "variant": name, "target": "-", "state": "not run", "passed": None,
                        "min_cosine": None, "speedup": None, "note": why})
        for build in sorted((art / "trt").glob("*/build.json")):  # one record per GPU target
            rec, target = _read(build) or {}, build.parent.name
            if rec.get("skipped"):
                out.append({"model": key, "variant": "tensorrt", "target": target, "state": "skipped",
                            "passed": None, "min_cosine": None, "speedup": None, "note": rec.get("reason", "")})
            for plan in rec.get("plans", []):  # named as the bundle and verify's report name it
                out.append({"model": key, "variant": plan_variant_name(plan, target), "target": target,
                            "state": "built", "passed": None, "min_cosine": None, "speedup": None,
                            "note": f"{plan.get('metadata', {}).get('gpu', '')} {plan.get('precision', '')}".strip()})
    return out


def table(rows_: list[dict]) -> str:
    head = f"{'model':<16} {'variant':<14} {'target':<10} {'state':<10} {'gate':<5} {'min cos':>10} {'vs torch':>8}  note"
    lines = [head, "-" * len(head)]
    for r in rows_:
        gate = "" if r["passed"] is None else ("pass" if r["passed"] else "FAIL")
        cos = "" if r["min_cosine"] is None else f"{r['min_cosine']:.6f}"
        speed = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        lines.append(f"{r['model']:<16} {r['variant']:<14} {r['target']:<10} {r['state']:<10} {gate:<5} {cos:>10} "
                     f"{speed:>8}  {r['note']}")
    return "\n".join(lines)


def write(repo: Path, rows_: list[dict]) -> None:
    metrics: dict = {}
    for r in rows_:
        if r["state"] == "verified":
            metrics.setdefault(r["model"], {})[r["variant"]] = {
                "passed": r["passed"], "min_cosine": r["min_cosine"], "speedup": r["speedup"]}
    metrics = {"models": metrics,
               "cells": {s: sum(r["state"] == s for r in rows_) for s in sorted({r["state"] for r in rows_})}}
    out = repo / OUT
    (out / "plots").mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "metrics.json") as tmp:
        write_json(tmp, metrics)
    with atomic_file(out / "plots" / "speedup.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["cell", "speedup"])
            w.writerows((f"{r['model']}/{r['variant']}", f"{r['speedup']:.3f}") for r in rows_
                        if r["state"] == "verified" and r["speedup"] is not None)


def main_report(repo: Path, params: dict, record: dict | None = None) -> list[dict]:
    if record is None:  # the last `make matrix`'s cells, if it built this commit
        from .common import git

        record = _read(repo / OUT / "cells.json")
        if record and record.get("commit") != git("rev-parse", "HEAD", cwd=repo).strip():
            record = None
    found = rows(repo, params, record)
    write(repo, found)
    print(table(found))
    return found


def main() -> None:
    def body(args):
        main_report(Path("."), load_params(args.params))

    stage_main(__doc__, body)


if __name__ == "__main__":
    main()
