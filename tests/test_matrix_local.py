"""make matrix without RAY_ADDRESS: a local Ray, started and stopped by the driver with no set-up.

Its own module, so that it runs after test_cluster.py's loopback cluster is shut down."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_cluster import ENV, dvc, make_repo


def test_without_ray_address_a_local_ray_builds_every_model(tmp_path):
    pytest.importorskip("ray", reason="Ray is the optional extra [cluster]: pip install 'sbert-bundle[cluster]'")
    made = make_repo(tmp_path, {}, {})
    repo = made["repo"]
    done = subprocess.run([sys.executable, "-m", "stages.matrix"], cwd=repo, env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no RAY_ADDRESS: starting a local Ray" in done.stderr
    cells = json.loads((repo / "artifacts" / "matrix" / "cells.json").read_text())
    assert cells["ray"] == "local"
    assert {t["name"]: t["state"] for t in cells["tasks"]} == {"model@a": "done", "model@b": "done"}
    assert cells["driver"]["ran"] == [] and set(cells["driver"]["restored"]) == {
        f"{s}@{m}" for s in ("fetch", "split", "release") for m in "ab"}
    assert "Data and pipelines are up to date." in dvc(repo, "status").stdout
