"""The build matrix on a real Ray cluster on loopback, and DVC cells per model.

A head node (127.0.0.2, resource gpu_h100) and a second node (127.0.0.3, resource gpu_l4),
started by the test (ray.cluster_utils.Cluster: real GCS and raylets) and always shut down.
A git + DVC repository with two tiny models: the real fetch and split cells per model, and a
build_trt cell per (model, target) that records the node it ran on (it stands in for the
TensorRT build, which needs a GPU), then a release cell per model. `python -m stages.matrix`
runs it with RAY_ADDRESS set, exactly as a team would.

Ray is the optional extra [cluster]: without it these tests skip, naming the install.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import make_st_model

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "GIT_AUTHOR_NAME": "test",
       "GIT_AUTHOR_EMAIL": "test@example.com", "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
       "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
ENV.pop("RAY_ADDRESS", None)
NODES = {"127.0.0.2": "gpu_h100", "127.0.0.3": "gpu_l4"}

# Stand-in for TensorRT: one cell per (model, target), on a node with that target's resource.
# It records where it ran; a kill-once marker makes it kill its own Ray worker mid-cell.
TRT_CELL = '''
import hashlib, json, os, signal, sys
from pathlib import Path
model, target = sys.argv[1], sys.argv[2]
cell = f"build_trt@{model}-{target}"
log = Path("{log}")
with log.open("a") as f:
    f.write(cell + "\\n")
marker = Path("{kill}") / cell
if marker.exists():
    marker.unlink()
    os.kill(int(os.environ["SBERT_MATRIX_WORKER_PID"]), signal.SIGKILL)
    sys.exit(1)
head = hashlib.sha256(Path(f"artifacts/{model}/split/modules/head.json").read_bytes()).hexdigest()
out = Path(f"artifacts/{model}/trt/{target}")
out.mkdir(parents=True)
(out / "build.json").write_text(json.dumps({
    "skipped": True, "reason": "test stand-in for TensorRT", "plans": [], "target": target,
    "node_ip": os.environ["SBERT_MATRIX_NODE_IP"], "node_id": os.environ["SBERT_MATRIX_NODE_ID"],
    "split_head_sha256": head}))
'''
RELEASE_CELL = '''
import json, sys
from pathlib import Path
model = sys.argv[1]
plans = {p.parent.name: json.loads(p.read_text()) for p in sorted(Path(f"artifacts/{model}/trt").glob("*/build.json"))}
out = Path(f"artifacts/{model}/release")
out.mkdir(parents=True)
(out / "release.json").write_text(json.dumps({"model": model, "targets": sorted(plans)}))
'''


def dvc_yaml(targets: list[str]) -> str:
    """The pipeline's shape: cells per model, build_trt per (model, target) when there are targets."""
    trt = """
  build_trt:
    matrix:
      model: ${model}
      target: ${trt.targets}
    cmd: python cells/trt_cell.py ${item.model} ${item.target}
    deps: [cells/trt_cell.py, "artifacts/${item.model}/split"]
    params: ["trt.targets.${item.target}"]
    outs: ["artifacts/${item.model}/trt/${item.target}"]
""" if targets else ""
    return """
stages:
  fetch:
    foreach: ${model}
    do:
      cmd: python -m stages.fetch --model ${key}
      deps: [cells/trt_cell.py]
      params: ["model.${key}.source", fetch]
      outs: ["artifacts/${key}/source"]
  split:
    foreach: ${model}
    do:
      cmd: python -m stages.split --model ${key}
      deps: ["artifacts/${key}/source"]
      outs: ["artifacts/${key}/split"]
""" + trt + """
  release:
    foreach: ${model}
    do:
      cmd: python cells/release_cell.py ${key}
      deps: [cells/release_cell.py, "artifacts/${key}/TRT"]
      outs: ["artifacts/${key}/release"]
""".replace("TRT", "trt" if targets else "split")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, env=ENV, check=True, capture_output=True, text=True).stdout


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=ENV, capture_output=True, text=True)


def write_params(root: Path, models: dict, targets: dict, matrix_overrides: dict) -> None:
    from stages.compose import compose

    base = compose([])
    params = {
        "model": {k: {"name": f"tiny-{k}", "version": "1.0.0", "embedding_dimension": None,
                      "source": {"kind": "local", "path": str(path), "id": None, "revision": None}, "overrides": {}}
                  for k, path in models.items()},
        "fetch": base["fetch"],
        "trt": {"targets": targets},
        "matrix": {**base["matrix"], **matrix_overrides},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "dvc.yaml").write_text(dvc_yaml(list(targets)))


@pytest.fixture(scope="module")
def ray_cluster():
    cluster_utils = pytest.importorskip(
        "ray.cluster_utils", reason="Ray is the optional extra [cluster]: pip install 'sbert-bundle[cluster]'")
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"gpu_h100": 1}, "node_ip_address": "127.0.0.2", "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=2, resources={"gpu_l4": 1}, node_ip_address="127.0.0.3")
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


def make_repo(root: Path, targets: dict, matrix: dict) -> dict:
    """A git + DVC repository building two tiny models (and GPU targets), and its shared folders."""
    repo, remote, work = root / "repo", root / "remote", root / "work"
    for d in (repo / "cells", remote, work, root / "kill"):
        d.mkdir(parents=True)
    models = {"a": make_st_model(root / "models" / "a", seed=1), "b": make_st_model(root / "models" / "b", seed=2,
                                                                                     hidden=16)}
    git(repo, "init", "-q", "-b", "main")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, env=ENV, check=True)
    (repo / ".dvc" / "config").write_text(f"[core]\n    analytics = false\n    remote = shared\n"
                                          f"['remote \"shared\"']\n    url = {remote}\n")
    # the cell's log and kill markers are outside the repository, shared by the nodes (one machine here)
    (repo / "cells" / "trt_cell.py").write_text(TRT_CELL.replace("{log}", str(root / "cells.log"))
                                                .replace("{kill}", str(root / "kill")))
    (repo / "cells" / "release_cell.py").write_text(RELEASE_CELL)
    (repo / ".gitignore").write_text("/artifacts/\n")
    write_params(repo, models, targets, {**matrix, "work_dir": str(work)})
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "two tiny models")
    return {"repo": repo, "root": root, "models": models, "log": root / "cells.log", "kill": root / "kill"}


@pytest.fixture(scope="module")
def producer(tmp_path_factory):
    """Two tiny models, two GPU targets."""
    return make_repo(tmp_path_factory.mktemp("matrix"), {"h100": {"resource": "gpu_h100"}, "l4": {"resource": "gpu_l4"}},
                     {"cpu_stages": ["fetch", "split"], "max_retries": 2, "resource_wait_s": 5})


def run_matrix(producer, ray_cluster) -> subprocess.CompletedProcess:
    env = {**ENV, "RAY_ADDRESS": ray_cluster.address}
    return subprocess.run([sys.executable, "-m", "stages.matrix"], cwd=producer["repo"], env=env, capture_output=True,
                          text=True, timeout=600)


def test_matrix_places_cells_by_resource_retries_a_killed_worker_and_the_driver_restores(producer, ray_cluster):
    (producer["kill"] / "build_trt@a-l4").touch()  # this cell's worker dies once, mid-cell
    done = run_matrix(producer, ray_cluster)
    assert done.returncode == 0, done.stdout + done.stderr
    repo = producer["repo"]
    cells = json.loads((repo / "artifacts" / "matrix" / "cells.json").read_text())
    tasks = {t["name"]: t for t in cells["tasks"]}
    assert sorted(tasks) == ["build_trt@a-h100", "build_trt@a-l4", "build_trt@b-h100", "build_trt@b-l4",
                             "cpu@a", "cpu@b", "final@a", "final@b"]
    assert all(t["state"] == "done" for t in tasks.values()), tasks
    # placement: each target's cell ran on the node that offers its resource (the cell's own output says where)
    for model in ("a", "b"):
        for target, ip in (("h100", "127.0.0.2"), ("l4", "127.0.0.3")):
            build = json.loads((repo / "artifacts" / model / "trt" / target / "build.json").read_text())
            assert build["node_ip"] == ip, (model, target, build)
            assert tasks[f"build_trt@{model}-{target}"]["node_ip"] == ip
    # retry: the killed cell started twice and finished; every other cell ran once
    starts = producer["log"].read_text().split()
    assert starts.count("build_trt@a-l4") == 2 and starts.count("build_trt@b-l4") == 1, starts
    assert not (producer["kill"] / "build_trt@a-l4").exists()
    # the driver restored every cell from the workers' run-cache instead of computing it
    assert cells["driver"]["ran"] == [], cells["driver"]
    assert {"fetch@a", "split@b", "build_trt@a-l4", "release@b"} <= set(cells["driver"]["restored"])
    assert json.loads((repo / "artifacts" / "b" / "release" / "release.json").read_text())["targets"] == ["h100", "l4"]
    head = hashlib.sha256((repo / "artifacts" / "b" / "split" / "modules" / "head.json").read_bytes()).hexdigest()
    assert json.loads((repo / "artifacts" / "b" / "trt" / "l4" / "build.json").read_text())["split_head_sha256"] == head
    # the progress display: counts of each state, and each task as it starts and ends
    assert "matrix: 8 pending, 0 running, 0 done, 0 failed" in done.stdout
    assert "matrix: 0 pending, 0 running, 8 done, 0 failed" in done.stdout
    assert "running build_trt@a-h100 on 127.0.0.2" in done.stdout and "done build_trt@b-l4 on 127.0.0.3" in done.stdout
    # dvc.lock is the record: the driver's dvc status and dvc repro find nothing to rebuild
    status = dvc(repo, "status")
    assert "Data and pipelines are up to date." in status.stdout, status.stdout + status.stderr
    again = dvc(repo, "repro")
    assert again.returncode == 0 and "Running stage" not in again.stdout, again.stdout
    assert producer["log"].read_text().split() == starts  # nothing ran again


def test_a_resource_no_node_offers_fails_clearly_and_the_others_finish(producer, ray_cluster):
    repo = producer["repo"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    write_params(repo, producer["models"], {**params["trt"]["targets"], "a10g": {"resource": "gpu_a10g"}},
                 params["matrix"])
    git(repo, "commit", "-q", "-am", "a third target that no node has")
    done = run_matrix(producer, ray_cluster)
    assert done.returncode == 1
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("error: failed: build_trt@a-a10g: no node of the Ray cluster offers resource 'gpu_a10g' "
                            "(trt.targets.a10g.resource) after waiting"), error
    cells = json.loads((repo / "artifacts" / "matrix" / "cells.json").read_text())
    states = {t["name"]: t["state"] for t in cells["tasks"]}
    assert states["build_trt@a-a10g"] == states["build_trt@b-a10g"] == "failed"
    assert states["final@a"] == states["final@b"] == "failed"          # they need the missing plans
    assert all(states[f"build_trt@{m}-{t}"] == "done" for m in "ab" for t in ("h100", "l4"))
    assert "ray start --address <head> --resources '{\"gpu_a10g\": 1}'" in done.stdout
    status = dvc(repo, "status", "build_trt@a-h100", "build_trt@b-l4")
    assert "Data and pipelines are up to date." in status.stdout, status.stdout


def test_ray_data_embeds_a_parquet_corpus_as_the_single_process_job_does(ray_cluster, tiny_bundle, tmp_path):
    """`sbert-bundle ray-encode` against the two-node cluster (3 actors of 1 CPU, so on both nodes; the
    fourth CPU reads and writes),
    Parquet in two files, a null row dropped by --on-invalid skip; the embeddings equal the
    single-process job's (to float rounding of other batchings) and the input's columns are kept."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from conftest import SENTENCES
    from sbert_bundle.corpus.job import Settings, run

    texts = [f"{SENTENCES[i % len(SENTENCES)]} number {i}" for i in range(300)]
    (tmp_path / "in").mkdir()
    for part, rows in enumerate((range(0, 150), range(150, 300))):
        pq.write_table(pa.table({"doc": list(rows), "text": [None if i == 77 else texts[i] for i in rows]}),
                       tmp_path / "in" / f"part{part}.parquet")
    single = tmp_path / "single.parquet"
    run(str(tiny_bundle), Settings(input=str(tmp_path / "in" / "part0.parquet"), output=str(single), column="text",
                                   keep=["doc"], on_invalid="skip", quiet=True))
    run(str(tiny_bundle), Settings(input=str(tmp_path / "in" / "part1.parquet"), output=str(tmp_path / "s1.parquet"),
                                   column="text", keep=["doc"], quiet=True))
    expected = pa.concat_tables([pq.read_table(single), pq.read_table(tmp_path / "s1.parquet")])
    done = subprocess.run([sys.executable, "-m", "sbert_bundle.cli", "ray-encode", str(tiny_bundle),
                           str(tmp_path / "in"), str(tmp_path / "out"), "--column", "text", "--concurrency", "3",
                           "--num-cpus", "1", "--batch-rows", "40", "--on-invalid", "skip"],
                          env={**ENV, "RAY_ADDRESS": ray_cluster.address, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    got = pq.read_table(tmp_path / "out").sort_by("doc")
    assert got.schema.names == ["doc", "text", "embedding"]
    assert got.column("doc").to_pylist() == expected.column("doc").to_pylist() == [i for i in range(300) if i != 77]
    np.testing.assert_allclose(np.array(got.column("embedding").to_pylist()),
                               np.array(expected.column("embedding").to_pylist()), atol=2e-6)
    assert "wrote 299 embeddings" in done.stderr


def test_repro_of_two_models_rebuilds_only_the_model_whose_params_changed(tmp_path):
    """The real dvc.yaml's cells (fetch -> split -> export_onnx) on two tiny models."""
    repo = tmp_path / "repo"
    repo.mkdir()
    models = {"a": make_st_model(tmp_path / "models" / "a", seed=1),
              "b": make_st_model(tmp_path / "models" / "b", seed=2, hidden=16)}
    for item in ("dvc.yaml", "stages", "sbert_bundle", "requirements", "conf", ".dvcignore"):
        src = REPO / item
        subprocess.run(["cp", "-r", str(src), str(repo / item)], check=True)
    from stages.compose import compose

    params = compose([])
    params["model"] = {k: {"name": f"tiny-{k}", "version": "1.0.0", "embedding_dimension": None,
                           "source": {"kind": "local", "path": str(p), "id": None, "revision": None}, "overrides": {}}
                       for k, p in models.items()}
    params["export"]["validation"] = {"batch_sizes": [1], "lengths": [4, 40]}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(repo, "init", "-q", "-b", "main")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, env=ENV, check=True)
    first = dvc(repo, "repro", "export_onnx@a", "export_onnx@b")
    assert first.returncode == 0, first.stdout + first.stderr
    assert (repo / "artifacts" / "a" / "onnx" / "model.onnx").is_file()
    assert (repo / "artifacts" / "b" / "onnx" / "model.onnx").is_file()

    params["model"]["b"]["overrides"] = {"export": {"atol": 2.0e-4}}  # model b only
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = dvc(repo, "status", "export_onnx@a", "export_onnx@b")
    assert "export_onnx@b:" in status.stdout and "model.b.overrides" in status.stdout, status.stdout
    assert "@a" not in status.stdout, status.stdout
    second = dvc(repo, "repro", "export_onnx@a", "export_onnx@b")
    assert second.returncode == 0, second.stdout + second.stderr
    ran = [line for line in second.stdout.splitlines() if line.startswith("Running stage")]
    # a model's overrides are one param of each of its cells (fetch@b re-runs, gives the same bytes, and
    # split@b is skipped); nothing of model a runs
    assert ran == ["Running stage 'fetch@b':", "Running stage 'export_onnx@b':"], second.stdout
    assert "Stage 'split@b' didn't change, skipping" in second.stdout

