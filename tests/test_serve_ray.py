"""The server's app under Ray Serve on a local Ray (sbert_bundle.serve.ray_serve), in a subprocess
so that this Ray stops with it. Its own module, after test_cluster.py's loopback cluster is gone."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import SENTENCES
from sbert_bundle import Bundle
from serving import free_port

SCRIPT = r"""
import json, sys
import httpx, ray
from ray import serve
from sbert_bundle.serve import Settings
from sbert_bundle.serve.ray_serve import deployment

bundle, port = sys.argv[1], int(sys.argv[2])
sentences = json.loads(sys.argv[3])
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
try:
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = deployment(bundle, Settings(api_keys=("k",), served_model_names=("tiny-bert",)), threads=1, num_replicas=2,
                     ray_actor_options={"num_cpus": 1}).bind()
    serve.run(app, route_prefix="/")
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer k"}
    out = {"ready": httpx.get(url + "/ready").status_code,
           "no_key": httpx.post(url + "/embed", json={"inputs": "x"}).status_code,
           "bad": httpx.post(url + "/v1/embeddings", json={"model": "tiny-bert", "input": []}, headers=auth).json(),
           "embed": [httpx.post(url + "/embed", json={"inputs": sentences}, headers=auth, timeout=60).json()
                     for _ in range(4)],
           "info": httpx.get(url + "/info", headers=auth).json()}
    print("RESULT " + json.dumps(out))
finally:
    serve.shutdown()
    ray.shutdown()
"""


def test_the_app_runs_under_ray_serve(tiny_bundle):
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'ray[serve]'")
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_bundle), str(free_port()), json.dumps(SENTENCES)],
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads(lines[0][len("RESULT "):])
    assert out["ready"] == 200 and out["no_key"] == 401
    assert out["bad"]["error"]["param"] == "input" and "empty" in out["bad"]["error"]["message"]
    expected = Bundle.load(tiny_bundle, threads=1).encode(SENTENCES)
    for served in out["embed"]:  # two replicas behind Ray's proxy: each gives Bundle.encode's rows
        np.testing.assert_allclose(np.array(served, dtype=np.float32), expected, atol=1e-5)
    assert out["info"]["variant"] == "fp32-fused" and out["info"]["limits"]["api_keys"] == 1
