"""The registry end to end: real git repositories, real DVC (a local-directory remote), GTO tags.

A producer repository publishes sealed tiny releases with `stages.publish.run`; consumers pull
them with `sbert-bundle pull` (in a process where torch cannot be imported), `dvc artifacts get`
and `gto`. The producer's pipeline is a one-stage stand-in (copy a prebuilt release archive to
artifacts/tiny/release/), so that each test takes seconds; the real pipeline's release is the same
kind of archive.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, build_bundle, fast_params, make_st_model
from serving import free_port
from sbert_bundle import Bundle, IntegrityError
from sbert_bundle.cli import main
from sbert_bundle.manifest import MANIFEST_FILE, sha256_file
from sbert_bundle.registry import RegistryError, list_registry, pull
from stages import publish
from stages.common import StageError

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
       "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com", "GIT_COMMITTER_NAME": "test",
       "GIT_COMMITTER_EMAIL": "test@example.com"}
CORPUS = ["a cat sat on the mat", "the quick brown fox", "hello world", "python code is fast",
          "embedding vector search for a query document", "one two three", "green and blue and red",
          "the dog is in the park with a ball", "two", "fast slow red", "a long sentence about data and code",
          "", "the lazy dog jumps over the quick fox"]

# The real pipeline's shape: release is one cell per model (release@tiny), and dvc.yaml's artifacts:
# names each model's release literally, as `python -m stages.compose` writes it.
DVC_YAML = """
stages:
  release:
    foreach: ${{model}}
    do:
      cmd: mkdir -p artifacts/${{key}}/release && cp src/release.tar.gz artifacts/${{key}}/release/${{item.name}}-${{item.version}}.tar.gz
      deps: [src/release.tar.gz]
      params: ["model.${{key}}"]
      outs: ["artifacts/${{key}}/release"]
artifacts:
  {name}:
    path: artifacts/tiny/release/{name}-{version}.tar.gz
    type: model
"""


def sealed_release(bundle: Path, out: Path) -> Path:
    """The release stage's archive for bundle, with a passing report (as verify would write it)."""
    from stages import release

    out.mkdir(parents=True, exist_ok=True)
    report = {"bundle": {"manifest_sha256": sha256_file(bundle / MANIFEST_FILE)}, "failures": [],
              "variants": {v: {"passed": True, "device": "cpu", "min_cosine": 1.0}
                           for v in ("fp32", "fp32-fused")}}
    (out / "report.json").write_text(json.dumps(report))
    return release.run({"name": "x", "version": "1.0.0"}, 1, bundle, out / "report.json", out)


@pytest.fixture(scope="module")
def releases(tiny_bundle, params, tmp_path_factory) -> dict[str, Path]:
    """'a': the tiny bundle; 'b': another random model (other embeddings) of the same shape."""
    root = tmp_path_factory.mktemp("releases")
    other = make_st_model(root / "other-model", seed=7)
    other_bundle = build_bundle(other, root / "other-build", fast_params(params), fp16=False)
    return {"a": sealed_release(tiny_bundle, root / "a"), "b": sealed_release(other_bundle, root / "b")}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, env=ENV, check=True, capture_output=True, text=True).stdout


class Producer:
    """A model registry repository: git + DVC with a local-directory remote."""

    def __init__(self, root: Path, remote: Path):
        self.root, self.remote = root, remote
        root.mkdir(parents=True)
        git(root, "init", "-q", "-b", "main")
        git(root, "config", "user.email", "test@example.com")
        git(root, "config", "user.name", "test")
        subprocess.run([BIN / "dvc", "init", "-q"], cwd=root, env=ENV, check=True)
        (root / ".dvc" / "config").write_text(
            f"[core]\n    analytics = false\n    remote = registry\n['remote \"registry\"']\n    url = {remote}\n")
        (root / "corpus.jsonl").write_text("".join(json.dumps(s) + "\n" for s in CORPUS))
        (root / "src").mkdir()

    def params(self) -> dict:
        return yaml.safe_load((self.root / "params.yaml").read_text())

    def build(self, release: Path, name: str = "tiny-model", version: str = "1.0.0") -> None:
        """Set the model and its release, reproduce and commit: a clean tree, as publish wants."""
        (self.root / "dvc.yaml").write_text(DVC_YAML.format(name=name, version=version))
        (self.root / "params.yaml").write_text(yaml.safe_dump({
            "model": {"tiny": {"name": name, "version": version, "overrides": {}}},
            "publish": {"remote": None, "corpus": "corpus.jsonl", "batch_size": 4, "min_cosine": 0.9999}}))
        shutil.copy(release, self.root / "src" / "release.tar.gz")
        subprocess.run([BIN / "dvc", "repro", "-q"], cwd=self.root, env=ENV, check=True)
        git(self.root, "add", "-A")
        git(self.root, "commit", "-q", "-m", f"{name} {version}", "--allow-empty")

    def publish(self, stage: str | None = None) -> dict:
        return publish.run(self.root, self.params(), stage)

    def tags(self) -> list[str]:
        return sorted(git(self.root, "tag").split())


@pytest.fixture
def producer(tmp_path) -> Producer:
    return Producer(tmp_path / "producer", tmp_path / "remote")


def run_without_torch(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Python where `import torch` fails, as in a consumer environment with only the runtime."""
    guard = "import sys\nsys.modules['torch'] = None\n"
    return subprocess.run([sys.executable, "-c", guard + code], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=300)


def test_publish_then_pull_by_version_and_stage_without_torch(producer, releases, tmp_path):
    producer.build(releases["a"])
    result = producer.publish(stage="prod")
    assert result["published"] and result["sha256"] == sha256_file(releases["a"])
    assert producer.tags() == ["tiny-model#prod#1", "tiny-model@v1.0.0"]
    message = git(producer.root, "tag", "-l", "--format=%(contents)", "tiny-model@v1.0.0")
    assert f"sha256: {result['sha256']}" in message
    code = (
        "from sbert_bundle.cli import main\n"
        f"assert main(['pull', {str(producer.root)!r}, 'tiny-model@v1.0.0', '-o', 'by-version']) == 0\n"
        f"assert main(['pull', {str(producer.root)!r}, 'tiny-model#prod', '-o', 'by-stage']) == 0\n"
        "assert main(['encode', 'by-version', '-i', 'in.txt', '-o', 'v.npy']) == 0\n"
        "assert main(['encode', 'by-stage', '-i', 'in.txt', '-o', 's.npy']) == 0\n"
        "assert main(['inspect', 'by-version']) == 0\n"
        "assert sys.modules.get('torch') is None\n")
    (tmp_path / "in.txt").write_text("a cat\nhello world\n")
    out = run_without_torch(code, tmp_path)
    assert out.returncode == 0, out.stderr
    assert "pulled tiny-model v1.0.0" in out.stdout and "runs here: variant fp32" in out.stdout
    assert "published: tiny-model@v1.0.0" in out.stdout and "first published version" in out.stdout
    emb = np.load(tmp_path / "v.npy")
    assert emb.shape == (2, 32) and np.array_equal(emb, np.load(tmp_path / "s.npy"))
    # the pulled release folder loads like the archive, sealed report included
    assert np.array_equal(emb, Bundle.load(releases["a"]).encode(["a cat", "hello world"]))
    assert Bundle.load(tmp_path / "by-version").report is not None


def test_dvc_artifacts_get_and_gto_read_the_registry(producer, releases, tmp_path):
    producer.build(releases["a"])
    producer.publish()
    out = tmp_path / "got.tar.gz"
    subprocess.run([BIN / "dvc", "artifacts", "get", str(producer.root), "tiny-model", "--rev", "v1.0.0",
                    "-o", str(out)], cwd=tmp_path, env=ENV, check=True, capture_output=True)
    assert sha256_file(out) == sha256_file(releases["a"])
    shown = subprocess.run([BIN / "gto", "show", "-r", str(producer.root)], env=ENV, check=True,
                           capture_output=True, text=True).stdout
    assert "tiny-model" in shown and "v1.0.0" in shown


def test_same_version_same_bytes_is_a_no_op_and_other_bytes_are_refused(producer, releases):
    producer.build(releases["a"])
    assert producer.publish()["published"]
    again = producer.publish()
    assert again["published"] is False
    producer.build(releases["b"])  # same version 1.0.0, other archive
    with pytest.raises(StageError, match=r"tiny-model@v1.0.0 is already published with archive sha256 .*"
                                         r"a published version never changes"):
        producer.publish()
    assert producer.tags() == ["tiny-model@v1.0.0"]


def test_moved_embeddings_need_a_major_version(producer, releases):
    producer.build(releases["a"])
    producer.publish()
    producer.build(releases["b"], version="1.1.0")
    with pytest.raises(StageError, match=r"tiny-model 1.1.0: the fp32-fused embeddings moved against v1.0.0 "
                                         r"\(min cosine .* < 0.9999\).*publish it as 2.0.0"):
        producer.publish()
    assert producer.tags() == ["tiny-model@v1.0.0"]
    producer.build(releases["b"], version="2.0.0")
    result = producer.publish()
    changelog = result["changelog"]
    assert changelog["previous"] == "v1.0.0" and changelog["embeddings_moved"] is True
    assert changelog["variants"][changelog["default_variant"]]["min_cosine"] < 0.9999
    assert changelog["params_sha256"]["before"] and changelog["verdict"].startswith("major")
    assert [p for p in list_registry(str(producer.root))["tiny-model"]["versions"]] == ["v2.0.0", "v1.0.0"]


def test_unchanged_embeddings_allow_a_minor_bump(producer, releases):
    producer.build(releases["a"])
    producer.publish()
    producer.build(releases["a"], version="1.0.1")
    result = producer.publish()
    assert result["changelog"]["embeddings_moved"] is False
    assert result["changelog"]["variants"]["fp32"]["min_cosine"] > 0.99999
    assert result["changelog"]["verdict"].startswith("compatible")


def test_a_push_that_fails_leaves_no_tag(producer, releases, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the remote folder should be")
    producer.remote = blocker / "remote"
    (producer.root / ".dvc" / "config").write_text(
        f"[core]\n    analytics = false\n    remote = registry\n['remote \"registry\"']\n    url = {producer.remote}\n")
    producer.build(releases["a"])
    with pytest.raises(StageError, match="dvc push of the release to the remote failed .*no version tag was created"):
        producer.publish()
    assert producer.tags() == []


def test_unclean_tree_and_unsealed_release_are_refused(producer, releases, tmp_path):
    producer.build(releases["a"])
    (producer.root / "notes.txt").write_text("uncommitted")
    with pytest.raises(StageError, match=r"git has uncommitted changes \(notes.txt\)"):
        producer.publish()
    (producer.root / "notes.txt").unlink()
    with tarfile_without(releases["a"], "release.json", tmp_path / "unsealed.tar.gz") as unsealed:
        producer.build(unsealed, version="1.0.0")
    with pytest.raises(StageError, match="not sealed|no release.json"):
        producer.publish()


class tarfile_without:
    """A copy of an archive without one member (a context manager, for readability above)."""

    def __init__(self, archive: Path, member: str, dest: Path):
        import tarfile

        with tarfile.open(archive) as src, tarfile.open(dest, "w:gz") as out:
            for m in src.getmembers():
                if m.name != member:
                    out.addfile(m, src.extractfile(m) if m.isfile() else None)
        self.dest = dest

    def __enter__(self) -> Path:
        return self.dest

    def __exit__(self, *exc) -> None:
        return None


def test_corrupted_object_in_the_remote_is_refused_on_pull(producer, releases, tmp_path):
    producer.build(releases["a"])
    digest = producer.publish()["sha256"]
    objects = [p for p in (producer.remote / "files").rglob("*") if p.is_file() and not p.name.endswith(".dir")]
    archive_object = max(objects, key=lambda p: p.stat().st_size)
    data = bytearray(archive_object.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive_object.chmod(0o644)
    archive_object.write_bytes(bytes(data))
    shutil.rmtree(producer.root / ".dvc" / "cache", ignore_errors=True)  # only the remote has it now
    with pytest.raises((IntegrityError, RegistryError), match=digest):
        pull(str(producer.root), "tiny-model@v1.0.0", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pulling_a_version_that_does_not_exist_lists_those_that_do(producer, releases, tmp_path, capsys):
    producer.build(releases["a"])
    producer.publish()
    assert main(["pull", str(producer.root), "tiny-model@v9.9.9", "-o", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "tiny-model has no published version v9.9.9; published: v1.0.0" in err
    assert main(["pull", str(producer.root), "other@v1.0.0", "-o", str(tmp_path / "y")]) == 1
    assert "no published model 'other'; published models: tiny-model" in capsys.readouterr().err
    assert main(["pull", str(producer.root), "tiny-model#prod", "-o", str(tmp_path / "z")]) == 1
    assert "tiny-model has no version in stage 'prod'; stages: none" in capsys.readouterr().err


def test_two_models_in_one_registry_are_independent(producer, releases, capsys):
    producer.build(releases["a"], name="tiny-model")
    producer.publish(stage="prod")
    producer.build(releases["b"], name="other-model", version="3.0.0")
    producer.publish()  # its own first version: no policy against tiny-model
    assert main(["list", str(producer.root)]) == 0
    out = capsys.readouterr().out
    assert "other-model  latest v3.0.0  versions v3.0.0  stages none" in out
    assert "tiny-model  latest v1.0.0  versions v1.0.0  stages prod -> v1.0.0" in out


def test_package_refuses_an_embedding_dimension_the_model_does_not_have(tiny_bundle, params, tmp_path):
    """The registry advertises model.embedding_dimension (dvc.yaml meta): package checks it."""
    import copy

    from stages import package

    p = copy.deepcopy(params)
    p["package"]["variants"] = ["fp32"]
    p["model"]["embedding_dimension"] = 384
    with pytest.raises(StageError, match="model.embedding_dimension is 384, but the model's modules give 32"):
        package.run(p, tiny_bundle.parent, tmp_path)
    p["model"]["embedding_dimension"] = 32
    assert package.run(p, tiny_bundle.parent, tmp_path)["embedding_dimension"] == 32


# --- a team remote: S3 (a local S3-compatible server, moto, started by the test) ------------


@pytest.fixture
def s3_server():
    """moto's S3 server on loopback with a bucket; yields (endpoint URL, credentials env)."""
    pytest.importorskip("dvc_s3", reason="needs dvc-s3 (the test extra: pip install -e '.[test]')")
    pytest.importorskip("moto.server", reason="needs moto[server] (the test extra: pip install -e '.[test]')")
    import socket
    import time

    import boto3

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    creds = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                     region_name="us-east-1").create_bucket(Bucket="registry")
        yield endpoint, creds
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_publish_to_s3_and_pull_from_it(tmp_path, releases, s3_server, monkeypatch):
    endpoint, creds = s3_server
    for key, value in creds.items():
        monkeypatch.setenv(key, value)
    ENV.update(creds)
    producer = Producer(tmp_path / "producer", tmp_path / "unused")
    (producer.root / ".dvc" / "config").write_text(
        "[core]\n    analytics = false\n    remote = team\n"
        f"['remote \"team\"']\n    url = s3://registry/sbert\n    endpointurl = {endpoint}\n")
    producer.build(releases["a"])
    digest = producer.publish()["sha256"]
    import boto3

    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=endpoint).list_objects_v2(
        Bucket="registry")["Contents"]]
    assert any(k.startswith("sbert/files/md5/") for k in keys)
    shutil.rmtree(producer.root / ".dvc" / "cache")  # the bytes can only come from S3 now
    published, out = pull(str(producer.root), "tiny-model@v1.0.0", tmp_path / "pulled")
    assert published.sha256 == digest
    assert Bundle.load(out).encode("a cat").shape == (32,)


def test_a_tag_that_cannot_be_created_is_one_line_and_publish_can_be_rerun(producer, releases, monkeypatch):
    import gto.api

    producer.build(releases["a"])

    def refuse(*args, **kwargs):
        raise RuntimeError("no git identity")

    monkeypatch.setattr(gto.api, "register", refuse)
    with pytest.raises(StageError, match=r"the release is in the remote, but tagging tiny-model@v1.0.0 failed "
                                         r"\(RuntimeError: no git identity\)"):
        producer.publish()
    assert producer.tags() == []
    monkeypatch.undo()
    assert producer.publish()["published"] and producer.tags() == ["tiny-model@v1.0.0"]


def test_serve_pull_serves_the_published_version_without_torch(producer, releases, tmp_path):
    """`sbert-bundle serve --pull REPO NAME@vX.Y.Z` in a process where torch cannot be imported:
    /info names the registry version, the archive's sha256 and the gates the served variant passed."""
    import signal
    import time

    import httpx

    producer.build(releases["a"])
    published = producer.publish()
    port = free_port()
    code = ("import sys\nsys.modules['torch'] = None\nfrom sbert_bundle.cli import main\n"
            f"sys.exit(main(['serve', '--pull', {str(producer.root)!r}, 'tiny-model@v1.0.0', '--port', '{port}']))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline, info = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                    info = httpx.get(f"http://127.0.0.1:{port}/info").json()
                    served = httpx.post(f"http://127.0.0.1:{port}/embed", json={"inputs": ["a cat"]}).json()
                    break
            except httpx.TransportError:
                time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert info is not None, out[-3000:]
    assert proc.returncode == 0, out[-3000:]
    assert info["registry"]["name"] == "tiny-model" and info["registry"]["version"] == "v1.0.0"
    assert info["archive_sha256"] == published["sha256"]
    assert info["verified"] is True and info["verify"]["variant"] == info["variant"] == "fp32-fused"
    assert np.allclose(served, Bundle.load(releases["a"]).encode(["a cat"]), atol=1e-5)


def test_pull_without_onnxruntime_unpacks_and_says_how_to_install_a_backend(producer, releases, tmp_path):
    """A consumer who installed only [registry]: the checked release is unpacked, exit 0, and the
    line that would name the variant says which extra to install instead of failing the pull."""
    producer.build(releases["a"])
    producer.publish()
    code = ("sys.modules['onnxruntime'] = None\nfrom sbert_bundle.cli import main\n"
            f"sys.exit(main(['pull', {str(producer.root)!r}, 'tiny-model@v1.0.0', '-o', 'pulled']))\n")
    out = run_without_torch(code, tmp_path)
    assert out.returncode == 0, out.stderr
    assert "pulled tiny-model v1.0.0" in out.stdout
    assert "no backend to run it here yet: onnxruntime is not installed: pip install 'sbert-bundle[cpu]'" in out.stdout
    assert (tmp_path / "pulled" / "bundle" / "manifest.json").is_file()
    assert np.allclose(Bundle.load(tmp_path / "pulled").encode(["a cat"]), Bundle.load(releases["a"]).encode(["a cat"]))
