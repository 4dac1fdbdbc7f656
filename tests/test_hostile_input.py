"""Bundles and model folders from strangers: no code runs, nothing unbounded is trusted,
nothing half-written is left, and every refusal is one line naming the file or value.

One section per class of attack or breakage (issue 9). Each test checks the message and
that nothing was left behind outside a temporary folder.
"""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, SENTENCES
from sbert_bundle import Bundle, IntegrityError, NonFiniteError
from sbert_bundle.archive import MAX_MEMBERS, TMP_PREFIX, extract_bundle
from sbert_bundle.cli import main
from sbert_bundle.manifest import MANIFEST_FILE, cpu_count, sha256_file, write_manifest
from stages.common import StageError, atomic_dir, atomic_outputs

ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


@pytest.fixture
def tmpdir_env(tmp_path, monkeypatch) -> Path:
    """A private temporary folder for extraction, so that leftovers can be counted."""
    import tempfile

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


def leftovers(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.glob(f"{TMP_PREFIX}*"))


def one_line(message: str) -> bool:
    return "\n" not in message.strip()


def pack(dest: Path, members: dict[str, bytes | Path], dirs: tuple[str, ...] = ()) -> Path:
    """A .tar.gz with these members (bytes, or a file to copy), written in the order given."""
    with tarfile.open(dest, "w:gz", compresslevel=1) as tar:
        for name in dirs:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, data in members.items():
            data = data.read_bytes() if isinstance(data, Path) else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return dest


def bundle_members(root: Path, prefix: str = "bundle/") -> dict[str, Path]:
    return {prefix + p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


# --- archives: checked before anything is written ------------------------------------------

class Zeros(io.RawIOBase):
    """n zero bytes, read without holding them in memory."""

    def __init__(self, n: int):
        self.left = n

    def readable(self):
        return True

    def readinto(self, buffer):
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def test_bomb_archive_is_refused_before_its_bytes_are_written(tiny_bundle, tmp_path, tmpdir_env):
    """256 MiB of zeros (about 250 KB compressed) beside a valid bundle: refused, with the
    loader limited to 16 MiB per file so that writing the member would have failed instead."""
    bomb = tmp_path / "bomb.tar.gz"
    size = 256 << 20
    with tarfile.open(bomb, "w:gz", compresslevel=1) as tar:
        for name, path in bundle_members(tiny_bundle).items():
            tar.add(path, arcname=name)
        info = tarfile.TarInfo("bundle/onnx/zeros.bin")
        info.size = size
        tar.addfile(info, Zeros(size))
    assert bomb.stat().st_size < 4 << 20
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))\n"
            "from sbert_bundle import Bundle, IntegrityError\n"
            "try:\n"
            f"    Bundle.load({str(bomb)!r})\n"
            "except IntegrityError as e:\n"
            "    print(e); sys.exit(3)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 3, result.stderr
    assert "bundle/onnx/zeros.bin: not listed in the manifest" in result.stdout
    assert leftovers(tmpdir_env) == [] and list(tmpdir_env.iterdir()) == []


def test_archive_larger_than_the_limit_is_refused_from_its_headers(tiny_bundle, tmp_path, tmpdir_env):
    archive = pack(tmp_path / "b.tar.gz", bundle_members(tiny_bundle))
    with pytest.raises(IntegrityError, match="add up to more than 1000 bytes") as e:
        extract_bundle(archive, max_bytes=1000)
    assert one_line(str(e.value)) and leftovers(tmpdir_env) == []


def test_many_member_archive_is_refused_in_one_line(tiny_bundle, tmp_path, tmpdir_env):
    archive = tmp_path / "many.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        for name, path in bundle_members(tiny_bundle).items():
            tar.add(path, arcname=name)
        for i in range(MAX_MEMBERS + 10):
            tar.addfile(tarfile.TarInfo(f"bundle/empty/{i}"), io.BytesIO(b""))
    start = time.perf_counter()
    with pytest.raises(IntegrityError, match=f"more than {MAX_MEMBERS} members") as e:
        Bundle.load(archive)
    assert one_line(str(e.value)), str(e.value)
    assert time.perf_counter() - start < 60
    assert leftovers(tmpdir_env) == []


def test_archive_holding_two_bundles_is_refused(tiny_bundle, tmp_path, tmpdir_env):
    archive = pack(tmp_path / "two.tar.gz", {**bundle_members(tiny_bundle, "a/"), **bundle_members(tiny_bundle, "b/")})
    with pytest.raises(IntegrityError, match=r"holds 2 bundles \(a/manifest.json, b/manifest.json\)") as e:
        Bundle.load(archive)
    assert one_line(str(e.value)) and leftovers(tmpdir_env) == []


def test_member_with_another_size_than_listed_is_refused(tiny_bundle, tmp_path, tmpdir_env):
    members = {name: path.read_bytes() for name, path in bundle_members(tiny_bundle).items()}
    members["bundle/head.json"] += b" "
    with pytest.raises(IntegrityError, match="bundle/head.json: .* bytes, the manifest says"):
        Bundle.load(pack(tmp_path / "b.tar.gz", members))
    assert leftovers(tmpdir_env) == []


def test_links_and_duplicates_are_refused(tiny_bundle, tmp_path, tmpdir_env):
    members = bundle_members(tiny_bundle)
    archive = tmp_path / "link.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, path in members.items():
            tar.add(path, arcname=name)
        link = tarfile.TarInfo("bundle/evil")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(IntegrityError, match="'bundle/evil' is a link or special file"):
        Bundle.load(archive)
    twice = tmp_path / "twice.tar.gz"
    with tarfile.open(twice, "w:gz") as tar:
        for name, path in [*members.items(), ("bundle/head.json", tiny_bundle / "head.json")]:
            tar.add(path, arcname=name)
    with pytest.raises(IntegrityError, match="'bundle/head.json' appears twice"):
        Bundle.load(twice)
    assert leftovers(tmpdir_env) == []


def test_extraction_folder_is_removed_when_the_bundle_is_refused_after_extraction(tiny_bundle, tmp_path, tmpdir_env):
    """Sizes match but a byte differs: caught by the sha256 check after extraction; the folder goes."""
    members = {name: path.read_bytes() for name, path in bundle_members(tiny_bundle).items()}
    head = bytearray(members["bundle/tokenizer.json"])
    head[10] ^= 1
    members["bundle/tokenizer.json"] = bytes(head)
    with pytest.raises(IntegrityError, match="tokenizer.json: sha256 differs"):
        Bundle.load(pack(tmp_path / "b.tar.gz", members))
    assert leftovers(tmpdir_env) == []


def test_folders_of_killed_processes_are_removed_by_the_next_load(tiny_bundle, tmp_path, tmpdir_env):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmpdir_env / f"{TMP_PREFIX}{dead.pid}-abc"
    (stale / "bundle").mkdir(parents=True)
    (stale / "bundle" / "big.onnx").write_bytes(bytes(1000))
    alive = tmpdir_env / f"{TMP_PREFIX}{os.getppid()}-xyz"  # a running process's: kept
    alive.mkdir()
    archive = pack(tmp_path / "b.tar.gz", bundle_members(tiny_bundle))
    bundle = Bundle.load(archive)
    assert not stale.exists() and alive.exists()
    assert len(leftovers(tmpdir_env)) == 2  # the live one and this bundle's own
    del bundle


def test_extraction_folder_is_removed_at_interpreter_exit(tiny_bundle, tmp_path, tmpdir_env):
    archive = pack(tmp_path / "b.tar.gz", bundle_members(tiny_bundle))
    code = f"from sbert_bundle import Bundle\nb = Bundle.load({str(archive)!r})\nprint(b.root)\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**ENV, "TMPDIR": str(tmpdir_env)}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert str(tmpdir_env) in result.stdout
    assert leftovers(tmpdir_env) == []


# --- the verify report of a release is sealed ----------------------------------------------

def good_report(bundle: Path) -> dict:
    return {"bundle": {"name": "tiny", "manifest_sha256": sha256_file(bundle / MANIFEST_FILE)}, "failures": [],
            "variants": {"fp32": {"passed": True, "device": "cpu", "min_cosine": 1.0}}}


def make_release(bundle: Path, report: dict, out: Path) -> Path:
    from stages import release

    (out / "rel").mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report))
    return release.run({"name": "tiny", "version": "1.0.0"}, 1, bundle, out / "report.json", out / "rel")


def repack(archive: Path, dest: Path, **replace: bytes) -> Path:
    """The release archive with some top-level members replaced (verify_json=..., release_json=...)."""
    names = {k.replace("_", "."): v for k, v in replace.items()}
    with tarfile.open(archive) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    members.update(names)
    return pack(dest, members)


def read_member(archive: Path, name: str) -> bytes:
    with tarfile.open(archive) as tar:
        return tar.extractfile(name).read()


def test_sealed_report_picks_the_variant(tiny_bundle, tmp_path, tmpdir_env):
    archive = make_release(tiny_bundle, good_report(tiny_bundle), tmp_path)
    assert Bundle.load(archive).variant == "fp32"  # the only one the report checked, not the default fp32-fused


def test_edited_report_is_refused(tiny_bundle, tmp_path, tmpdir_env):
    archive = make_release(tiny_bundle, good_report(tiny_bundle), tmp_path)
    report = json.loads(read_member(archive, "verify.json"))
    report["variants"]["fp32-fused"] = {"passed": True, "device": "cpu", "min_cosine": 1.0}
    edited = repack(archive, tmp_path / "edited.tar.gz", verify_json=json.dumps(report).encode())
    with pytest.raises(IntegrityError, match="verify.json in the release archive was changed after release") as e:
        Bundle.load(edited)
    assert one_line(str(e.value)) and leftovers(tmpdir_env) == []


def test_report_of_another_bundle_is_refused(tiny_bundle, tmp_path, tmpdir_env):
    other = tmp_path / "other"
    shutil.copytree(tiny_bundle, other)
    manifest = json.loads((other / MANIFEST_FILE).read_text())
    write_manifest(other, {**{k: v for k, v in manifest.items() if k not in ("files", "schema_version")},
                           "version": "9.9.9"})
    foreign = make_release(other, good_report(other), tmp_path / "o")
    mine = make_release(tiny_bundle, good_report(tiny_bundle), tmp_path / "m")
    swapped = repack(mine, tmp_path / "swapped.tar.gz", verify_json=read_member(foreign, "verify.json"),
                     release_json=read_member(foreign, "release.json"))
    with pytest.raises(IntegrityError, match="release.json in the release archive seals another bundle") as e:
        Bundle.load(swapped)
    assert one_line(str(e.value))


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["variants"]["fp32"].update(passed="no"), r"variants\['fp32'\].passed: 'no'"),
    (lambda r: r.update(failures=["fp32: min cosine 0.5 < 0.99999"]), "it lists failed gates"),
    (lambda r: r["variants"]["fp32"].update(min_cosine="1.0"), "min_cosine: '1.0' is not a finite"),
    (lambda r: r["bundle"].update(manifest_sha256="0" * 64), "made for another bundle"),
    (lambda r: r.update(variants=[]), "variants: expected an object"),
], ids=["passed-string", "failures", "string-cosine", "foreign-bundle-field", "variants-list"])
def test_forged_and_resealed_report_is_still_refused(tiny_bundle, tmp_path, tmpdir_env, edit, message):
    """Even a report whose seal was recomputed to match must be a passing report for this bundle."""
    archive = make_release(tiny_bundle, good_report(tiny_bundle), tmp_path)
    report = json.loads(read_member(archive, "verify.json"))
    edit(report)
    data = json.dumps(report).encode()
    seal = json.loads(read_member(archive, "release.json"))
    seal["report_sha256"] = __import__("hashlib").sha256(data).hexdigest()
    forged = repack(archive, tmp_path / "forged.tar.gz", verify_json=data, release_json=json.dumps(seal).encode())
    with pytest.raises(IntegrityError, match=message):
        Bundle.load(forged)
    assert leftovers(tmpdir_env) == []


def test_release_without_its_seal_is_refused(tiny_bundle, tmp_path, tmpdir_env):
    archive = make_release(tiny_bundle, good_report(tiny_bundle), tmp_path)
    with tarfile.open(archive) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()
                   if m.isfile() and m.name != "release.json"}
    with pytest.raises(IntegrityError, match="no release.json: the verify report is not sealed"):
        Bundle.load(pack(tmp_path / "unsealed.tar.gz", members))


def test_release_stage_refuses_a_report_with_a_failed_variant(tiny_bundle, tmp_path):
    report = good_report(tiny_bundle)
    report["variants"]["fp32"]["passed"] = False
    with pytest.raises(StageError, match=r"cannot be released: variants\['fp32'\].passed: False"):
        make_release(tiny_bundle, report, tmp_path)


# --- the manifest: one schema check at load --------------------------------------------------

def edited_bundle(tiny_bundle: Path, tmp_path: Path, edit) -> Path:
    root = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, root)
    manifest = json.loads((root / MANIFEST_FILE).read_text())
    edit(manifest)
    (root / MANIFEST_FILE).write_text(json.dumps(manifest))
    return root


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(variants=list(m["variants"])), "variants: expected a non-empty object"),
    (lambda m: m["files"]["head.json"].update(size="12"), r"files\['head.json'\].size: expected an integer"),
    (lambda m: m["variants"]["fp32"].pop("file"), r"variants\['fp32'\].file: None is not a file listed"),
    (lambda m: m["variants"]["fp32"].update(backend="python"), r"variants\['fp32'\].backend: 'python'"),
    (lambda m: m["runtime"].update(cpu_threads=1000), r"runtime.cpu_threads: 1000; expected 0 \(one per core\)"),
    (lambda m: m["runtime"].update(cpu_max_batch_tokens=-5), "runtime.cpu_max_batch_tokens: -5"),
    (lambda m: m["runtime"].update(cuda_graph_buckets=[[1, 10 ** 9]]), "runtime.cuda_graph_buckets"),
    (lambda m: m.update(embedding_dimension="384"), "embedding_dimension: expected an integer"),
    (lambda m: m.update(files=None), "files: expected an object"),
], ids=["variants-list", "size-string", "file-missing", "backend", "threads", "batch-tokens", "buckets", "dim",
        "files-null"])
def test_wrong_typed_manifest_is_one_integrity_error(tiny_bundle, tmp_path, edit, message):
    root = edited_bundle(tiny_bundle, tmp_path, edit)
    with pytest.raises(IntegrityError, match=message):
        Bundle.load(root)
    assert main(["inspect", str(root)]) == 1


def test_a_manifest_with_many_problems_shows_a_screenful_and_a_count(tiny_bundle, tmp_path):
    def edit(m):
        m["files"] = {f"f{i}": {"sha256": "x", "size": -1} for i in range(500)}

    with pytest.raises(IntegrityError) as e:
        Bundle.load(edited_bundle(tiny_bundle, tmp_path, edit))
    text = str(e.value)
    assert "problem(s)" in text and "... and" in text and "more" in text
    assert len(text.splitlines()) <= 25


def test_manifest_thread_hint_is_capped_at_the_cores_here(tiny_bundle, tmp_path):
    root = edited_bundle(tiny_bundle, tmp_path, lambda m: m["runtime"].update(cpu_threads=200))
    bundle = Bundle.load(root, variant="fp32")
    assert bundle.backend.session.get_session_options().intra_op_num_threads == cpu_count()


@pytest.mark.parametrize("threads", [0, -1, 100_000, cpu_count() + 1, "4"])
def test_explicit_thread_count_outside_the_cores_is_refused(tiny_bundle, threads):
    with pytest.raises(ValueError, match=rf"threads {threads!r}: expected an integer in 1\.\.{cpu_count()}"):
        Bundle.load(tiny_bundle, threads=threads)


def test_cli_huge_thread_count_is_one_line(tiny_bundle, capsys):
    assert main(["encode", str(tiny_bundle), "--threads", "100000"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sbert-bundle: error: --threads 100000") and one_line(err)


# --- wrong numbers are never returned silently ---------------------------------------------

def nan_graph(path: Path, hidden: int) -> None:
    """A graph with the Transformer's inputs whose last_hidden_state is NaN everywhere."""
    import onnx
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
              for n in ("input_ids", "attention_mask", "token_type_ids")]
    out = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", hidden])
    nan = helper.make_tensor("nan", TensorProto.FLOAT, [hidden], [float("nan")] * hidden)
    nodes = [helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["ids_f", "axes"], ["ids_3d"]),
             helper.make_node("Mul", ["ids_3d", "nan"], ["last_hidden_state"])]
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [2])
    graph = helper.make_graph(nodes, "nan", inputs, [out], initializer=[nan, axes])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_nan_graph_is_refused_naming_variant_and_sentence(tiny_bundle, tmp_path, capsys):
    root = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, root)
    manifest = json.loads((root / MANIFEST_FILE).read_text())
    nan_graph(root / "onnx" / "model.onnx", manifest["embedding_dimension"])
    write_manifest(root, {k: v for k, v in manifest.items() if k not in ("files", "schema_version")})
    bundle = Bundle.load(root, variant="fp32")
    with pytest.raises(NonFiniteError, match=r"variant fp32 on cpu gave a NaN or Inf embedding for sentence 0 "):
        bundle.encode(["a cat", "hello world"])
    inp = tmp_path / "in.txt"
    inp.write_text("a cat\n")
    assert main(["encode", str(root), "--variant", "fp32", "-i", str(inp)]) == 1
    captured = capsys.readouterr()
    assert "NaN" in captured.err and one_line(captured.err) and captured.out == ""


# --- outputs are swapped, never half-written -------------------------------------------------

KILL_AT_SWAP = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from stages import common
calls = [0]
real = os.replace
def replace(a, b):
    calls[0] += 1
    if calls[0] == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(a, b)
common.os.replace = replace
root = Path({root!r})
with common.atomic_outputs(folders=[root / "bundle"], files=[root / "bundle.tar.gz"]) as (d, f):
    (d / "data.txt").write_text("new")
    (d / "more.txt").write_text("new")
    f.write_text("new")
"""


def state(root: Path) -> tuple[str | None, str | None]:
    folder = root / "bundle"
    archive = root / "bundle.tar.gz"
    if folder.exists():
        texts = {p.read_text() for p in folder.iterdir()}
        assert len(texts) == 1 and len(list(folder.iterdir())) == 2, "a half-written or half-deleted folder"
        folder_state = texts.pop()
    else:
        folder_state = None
    return folder_state, archive.read_text() if archive.exists() else None


@pytest.mark.parametrize("kill_at", [1, 2, 3, 4])
def test_kill_during_the_output_swap_never_mixes_old_and_new(tmp_path, kill_at):
    (tmp_path / "bundle").mkdir()
    for name in ("data.txt", "more.txt"):
        (tmp_path / "bundle" / name).write_text("old")
    (tmp_path / "bundle.tar.gz").write_text("old")
    code = KILL_AT_SWAP.format(repo=str(REPO), kill_at=kill_at, root=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGKILL
    folder, archive = state(tmp_path)
    assert {folder, archive} - {None} != {"old", "new"}, f"old and new outputs side by side: {folder}, {archive}"
    # the next run cleans up what the killed one left and replaces both
    with atomic_outputs(folders=[tmp_path / "bundle"], files=[tmp_path / "bundle.tar.gz"]) as (d, f):
        for name in ("data.txt", "more.txt"):
            (d / name).write_text("next")
        f.write_text("next")
    assert state(tmp_path) == ("next", "next")
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name) == []


def test_concurrent_run_of_a_stage_stops_at_once_with_one_line(tmp_path):
    out = tmp_path / "artifacts" / "minilm_l6" / "split"  # the default model's
    ready = tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from stages.common import atomic_dir\n"
        f"with atomic_dir(Path({str(out)!r})) as tmp:\n"
        "    (tmp / 'x').write_text('first')\n"
        f"    Path({str(ready)!r}).touch()\n"
        "    time.sleep(30)\n")])
    try:
        for _ in range(300):
            if ready.exists():
                break
            time.sleep(0.1)
        assert ready.exists()
        with pytest.raises(StageError, match="is being written by another run of this stage"):
            with atomic_dir(out):
                pass
        (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
        result = subprocess.run([sys.executable, "-m", "stages.split"], cwd=tmp_path, capture_output=True,
                                text=True, env=ENV, timeout=120)
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
        assert "error: artifacts/minilm_l6/split is being written by another run" in result.stderr
    finally:
        holder.kill()
        holder.wait()
    with atomic_dir(out) as tmp:  # the lock died with its holder; its temporary folder is cleaned up
        (tmp / "x").write_text("second")
    assert (out / "x").read_text() == "second"
    assert [p.name for p in out.parent.iterdir() if ".tmp-" in p.name] == []


def test_cli_output_write_failure_keeps_the_old_file(tiny_bundle, tmp_path):
    """The disk fills up while writing (a 2,000-byte file size limit): the old output stays whole."""
    out = tmp_path / "emb.jsonl"
    out.write_text("previous good output\n")
    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(s for s in SENTENCES if s.strip()) + "\n")

    def limit():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))

    result = subprocess.run([sys.executable, "-m", "sbert_bundle.cli", "encode", str(tiny_bundle), "-i", str(inp),
                             "-o", str(out)], capture_output=True, text=True, env=ENV, preexec_fn=limit, timeout=120)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("sbert-bundle: error:") and one_line(result.stderr)
    assert out.read_text() == "previous good output\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.jsonl", "in.txt"]


# --- input text ------------------------------------------------------------------------------

def test_non_utf8_stdin_is_one_line(tiny_bundle):
    result = subprocess.run([sys.executable, "-m", "sbert_bundle.cli", "encode", str(tiny_bundle)],
                            input=b"fine\nbad \xff byte\n", capture_output=True, env=ENV, timeout=120)
    assert result.returncode == 1
    err = result.stderr.decode()
    assert err == "sbert-bundle: error: standard input is not UTF-8 text: byte 0xff on line 2 (byte offset 9) " \
                  "(invalid start byte)\n"


def test_lone_surrogate_is_refused_naming_the_sentence(tiny_bundle):
    with pytest.raises(ValueError, match=r"sentences\[1\] is not valid Unicode text: .*U\+D800 at character 1"):
        Bundle.load(tiny_bundle).encode(["fine", "a\ud800b"])


def test_truncated_graph_loaded_by_name_is_one_line(tiny_bundle, tmp_path, capsys):
    root = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, root)
    graph = root / "onnx" / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:1000])
    assert main(["inspect", str(root), "--variant", "fp32"]) == 1  # the integrity check catches it first
    assert "onnx/model.onnx: size 1000 bytes" in capsys.readouterr().err
    from sbert_bundle import BackendError

    with pytest.raises(BackendError, match=r"onnx/model.onnx: onnxruntime could not load it \(") as e:
        Bundle.load(root, variant="fp32", verify_integrity=False)
    assert one_line(str(e.value))


# --- model folders: no code from them runs -------------------------------------------------

def remote_code_model(good: Path, dest: Path, where: str) -> tuple[Path, Path]:
    """A copy of a good model whose config (or tokenizer config) asks for its own code,
    which would leave a marker file if it ever ran."""
    model = Path(shutil.copytree(good, dest))
    marker = dest.parent / f"{dest.name}-code-ran"
    (model / "custom.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
                                     "from transformers import BertConfig as CustomConfig\n"
                                     "from transformers import BertModel as CustomModel\n")
    cfg_path = model / where
    cfg = json.loads(cfg_path.read_text())
    cfg["auto_map"] = {"AutoConfig": "custom.CustomConfig", "AutoModel": "custom.CustomModel",
                       "AutoTokenizer": ["custom.CustomConfig", None]}
    cfg_path.write_text(json.dumps(cfg))
    return model, marker


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_auto_map_model_is_refused_on_a_terminal_without_a_prompt(tiny_model, tmp_path, where):
    """On a terminal transformers would ask whether to run the folder's code: no prompt, no code."""
    work = tmp_path / "work"
    model, marker = remote_code_model(tiny_model, work / "artifacts" / "minilm_l6" / "source" / "model", where)
    (work / "params.yaml").write_text((REPO / "params.yaml").read_text())
    pid, fd = pty.fork()
    if pid == 0:  # the child: the stage on a pseudo-terminal
        os.chdir(work)
        os.execve(sys.executable, [sys.executable, "-m", "stages.split"], ENV)
    output, deadline = b"", time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        elif os.waitpid(pid, os.WNOHANG)[0]:
            break
    else:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    text = output.decode(errors="replace")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 1, text
    assert f"{where} has an auto_map" in text and "never does" in text
    assert "[y/N]" not in text and "trust_remote_code" not in text
    assert not marker.exists(), "code from the model folder ran"
    assert not (work / "artifacts" / "minilm_l6" / "split").exists()


def test_pickle_only_checkpoint_that_is_not_plain_tensors_is_one_line(tiny_model, tmp_path):
    import torch
    from safetensors.torch import load_file

    from stages import split

    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    state = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    state["extra"] = __import__("argparse").Namespace(x=1)  # a class instance: weights_only refuses it
    torch.save(state, model / "pytorch_model.bin")
    with pytest.raises(StageError, match=r"pytorch_model.bin is a pickle checkpoint that does not load as plain "
                                         r"tensors .*give the model as model.safetensors") as e:
        with atomic_dir(tmp_path / "split") as out:
            split.run(model, out)
    assert one_line(str(e.value))
    assert not (tmp_path / "split").exists()


@pytest.mark.parametrize("name, text, message", [
    ("head.json", "[1]", "head.json holds a JSON list, expected an object"),
    ("head.json", '{"schema": 1, "modules": "x", "max_seq_length": 8, "hidden_size": 4, "pad_token_id": 0}',
     "modules: expected a list"),
    ("head.json", '{"schema": 1, "modules": [], "max_seq_length": "8", "hidden_size": 4, "pad_token_id": 0}',
     "expected integers in"),
    ("head.json", '{"schema": 1, "modules": [{"type": "Pooling"}], "max_seq_length": 8, "hidden_size": 4, '
                  '"pad_token_id": 0}', r"head.json is malformed \(KeyError"),
    ("tokenizer.json", '{"model": 5}', "tokenizer.json cannot be loaded by tokenizers"),
], ids=["head-list", "head-modules", "head-int", "head-pooling", "tokenizer"])
def test_malformed_head_or_tokenizer_with_matching_hashes_is_one_line(tiny_bundle, tmp_path, capsys, name, text,
                                                                     message):
    """Hashes prove the bytes are the packager's, not that they are well formed."""
    root = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, root)
    manifest = json.loads((root / MANIFEST_FILE).read_text())
    (root / name).write_text(text)
    write_manifest(root, {k: v for k, v in manifest.items() if k not in ("files", "schema_version")})
    assert main(["inspect", str(root)]) == 1
    err = capsys.readouterr().err
    assert one_line(err) and re.search(message, err), err
