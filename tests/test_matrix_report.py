"""The matrix's plan (which Ray task runs which DVC cells, asking for what) and its report; no Ray needed."""

import csv
import json
from pathlib import Path

import pytest
from stages import matrix, report
from stages.common import StageError
from stages.compose import compose


def two_models(targets: dict | None = None) -> dict:
    params = compose(["model=[minilm_l6,mpnet_base]"])
    params["trt"]["targets"] = targets or {}
    return params


def test_plan_without_targets_is_one_task_per_model():
    tasks = matrix.plan(two_models())
    assert [(t.name, t.cells, t.resources, t.after) for t in tasks] == [
        ("model@minilm_l6", ["release@minilm_l6"], {}, []), ("model@mpnet_base", ["release@mpnet_base"], {}, [])]


def test_plan_with_targets_asks_each_build_trt_cell_for_its_targets_resource():
    params = two_models({"h100": {"resource": "gpu_h100"}, "l4": {"resource": "gpu_l4"}})
    tasks = {t.name: t for t in matrix.plan(params, ["mpnet_base"])}
    assert list(tasks) == ["cpu@mpnet_base", "build_trt@mpnet_base-h100", "build_trt@mpnet_base-l4", "final@mpnet_base"]
    assert tasks["cpu@mpnet_base"].cells == [f"{s}@mpnet_base" for s in params["matrix"]["cpu_stages"]]
    assert tasks["build_trt@mpnet_base-l4"].resources == {"gpu_l4": 1}
    assert tasks["build_trt@mpnet_base-l4"].after == ["cpu@mpnet_base"]
    assert tasks["final@mpnet_base"].after == ["build_trt@mpnet_base-h100", "build_trt@mpnet_base-l4"]
    assert tasks["final@mpnet_base"].cells == ["release@mpnet_base"]
    # verify's speed is not a DVC output: the task that runs verify brings it back to the driver
    assert tasks["final@mpnet_base"].collect == ["artifacts/mpnet_base/verify/speed.json"]
    assert tasks["cpu@mpnet_base"].collect == []


def test_plan_errors_name_the_value():
    with pytest.raises(StageError, match=r"--models nope: not in params.yaml's models \(minilm_l6, mpnet_base\)"):
        matrix.plan(two_models(), ["nope"])
    with pytest.raises(StageError, match=r"trt.targets.l4 has no `resource`"):
        matrix.plan(two_models({"l4": {"compute_capability": "8.9"}}))


def test_stage_outcomes_reads_dvc_repro_output():
    out = ("Stage 'fetch@a' is cached - skipping run, checking out outputs\nRunning stage 'split@a':\n"
           "> python -m stages.split --model a\nStage 'x@a' didn't change, skipping\n")
    assert matrix.stage_outcomes(out) == (["fetch@a"], ["split@a"])


def write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_report_rows_metrics_and_plot(tmp_path):
    params = two_models()
    art = tmp_path / "artifacts" / "minilm_l6"
    write(art / "verify" / "report.json", {
        "variants": {"fp32": {"device": "cpu", "passed": True, "min_cosine": 0.99999},
                     "int8": {"device": "cpu", "passed": False, "min_cosine": 0.98}},
        "skipped": {"trt-fp16-h100": "no CUDA GPU"}})
    write(art / "verify" / "speed.json", {"variants": {"fp32": {"speedup": 4.2}, "int8": {"speedup": 3.5}}})
    write(art / "trt" / "h100" / "build.json", {"skipped": True, "reason": "no GPU here", "plans": []})
    write(art / "trt" / "l4" / "build.json", {"skipped": False, "plans": [
        {"name": "trt-fp16-s1-nvidia-l4-trt10.13", "file": "trt-fp16-s1-nvidia-l4-trt10.13.plan", "precision": "fp16",
         "metadata": {"gpu": "NVIDIA L4"}}]})
    record = {"tasks": [{"name": "build_trt@mpnet_base-l4", "model": "mpnet_base", "target": "l4", "state": "failed",
                         "error": "no node of the Ray cluster offers resource 'gpu_l4'\nmore"}]}
    rows = report.main_report(tmp_path, params, record)
    got = {(r["model"], r["variant"], r["target"]): (r["state"], r["passed"], r["speedup"]) for r in rows}
    assert got == {("minilm_l6", "fp32", "cpu"): ("verified", True, 4.2),
                   ("minilm_l6", "int8", "cpu"): ("verified", False, 3.5),
                   ("minilm_l6", "trt-fp16-h100", "-"): ("not run", None, None),
                   ("minilm_l6", "tensorrt", "h100"): ("skipped", None, None),
                   ("minilm_l6", "trt-fp16-l4", "l4"): ("built", None, None),
                   ("mpnet_base", "-", "l4"): ("failed", None, None)}
    table = report.table(rows)
    assert "FAIL" in table and "no node of the Ray cluster offers resource 'gpu_l4'" in table and "more" not in table
    metrics = json.loads((tmp_path / "artifacts" / "matrix" / "metrics.json").read_text())
    assert metrics["models"] == {"minilm_l6": {"fp32": {"passed": True, "min_cosine": 0.99999, "speedup": 4.2},
                                               "int8": {"passed": False, "min_cosine": 0.98, "speedup": 3.5}}}
    assert metrics["cells"] == {"built": 1, "failed": 1, "not run": 1, "skipped": 1, "verified": 2}
    with open(tmp_path / "artifacts" / "matrix" / "plots" / "speedup.csv") as f:
        assert list(csv.DictReader(f)) == [{"cell": "minilm_l6/fp32", "speedup": "4.200"},
                                           {"cell": "minilm_l6/int8", "speedup": "3.500"}]
