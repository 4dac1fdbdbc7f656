"""sbert_bundle.manifest: how a bundle is sealed and how the runtime checks the seal.

Pure unit tests on small hand-made folders: no model, no onnxruntime.
"""

import hashlib
import json

import pytest

from sbert_bundle.manifest import (MANIFEST_FILE, MANIFEST_SCHEMA, IntegrityError, check_integrity,
                                   describe_files, read_manifest, write_manifest)


def make_tree(root, files: dict[str, bytes]):
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def fields(version="1.2.3", variants=None) -> dict:
    return {"name": "tiny", "version": version, "embedding_dimension": 8, "max_seq_length": 16,
            "variants": variants if variants is not None else
            {"fp32": {"file": "onnx/model.onnx", "backend": "onnxruntime", "precision": "fp32"}}}


TREE = {
    "onnx/model.onnx": b"graph bytes",
    "head.json": b"{}",
    "tokenizer.json": b'{"model": {}}',
    "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
    "deep/er/still/file.bin": bytes(range(256)),
}


# --- write_manifest ------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["1.0", "1", "v1.0.0", "1.0.0.0", "latest", "", "1.0.x"])
def test_write_manifest_refuses_a_non_semver_version(tmp_path, version):
    make_tree(tmp_path, TREE)
    with pytest.raises(ValueError, match="semantic version") as e:
        write_manifest(tmp_path, fields(version=version))
    assert repr(version) in str(e.value)  # the message names the offending value
    assert not (tmp_path / MANIFEST_FILE).exists()


def test_write_manifest_refuses_a_missing_version(tmp_path):
    make_tree(tmp_path, TREE)
    f = fields()
    del f["version"]
    with pytest.raises(ValueError, match="semantic version"):
        write_manifest(tmp_path, f)


@pytest.mark.parametrize("version", ["0.0.1", "1.2.3", "10.20.30", "1.0.0-rc.1", "1.0.0+build.5"])
def test_write_manifest_accepts_semver(tmp_path, version):
    make_tree(tmp_path, TREE)
    assert write_manifest(tmp_path, fields(version=version))["version"] == version


def test_write_manifest_refuses_a_variant_pointing_at_a_missing_file(tmp_path):
    make_tree(tmp_path, TREE)
    variants = {"fp32": {"file": "onnx/model.onnx", "backend": "onnxruntime"},
                "int8": {"file": "onnx/model_int8.onnx", "backend": "onnxruntime"}}
    with pytest.raises(ValueError) as e:
        write_manifest(tmp_path, fields(variants=variants))
    assert "'int8'" in str(e.value) and "onnx/model_int8.onnx" in str(e.value)
    assert not (tmp_path / MANIFEST_FILE).exists()


def test_write_manifest_content_and_roundtrip(tmp_path):
    make_tree(tmp_path, TREE)
    written = write_manifest(tmp_path, fields())
    assert written["schema_version"] == MANIFEST_SCHEMA
    assert set(written["files"]) == set(TREE)
    on_disk = read_manifest(tmp_path)
    assert on_disk == written
    check_integrity(tmp_path, on_disk)  # a fresh seal passes


def test_resealing_replaces_the_file_list(tmp_path):
    """write_manifest over an existing manifest (what tests and re-packaging do) seals the new content."""
    make_tree(tmp_path, TREE)
    old = write_manifest(tmp_path, fields())
    (tmp_path / "head.json").write_bytes(b'{"changed": true}')
    with pytest.raises(IntegrityError):
        check_integrity(tmp_path, read_manifest(tmp_path))
    kept = {k: v for k, v in old.items() if k != "files"}
    new = write_manifest(tmp_path, kept)
    assert MANIFEST_FILE not in new["files"]
    assert new["files"]["head.json"] != old["files"]["head.json"]
    check_integrity(tmp_path, read_manifest(tmp_path))


# --- describe_files ------------------------------------------------------------------------

def test_describe_files_covers_nested_folders_with_posix_paths(tmp_path):
    make_tree(tmp_path, TREE)
    (tmp_path / MANIFEST_FILE).write_text("{}")
    (tmp_path / "empty_dir" / "nested").mkdir(parents=True)  # folders alone are not files
    files = describe_files(tmp_path)
    assert set(files) == set(TREE)
    assert MANIFEST_FILE not in files
    assert all("\\" not in rel and not rel.startswith("/") for rel in files)
    for rel, data in TREE.items():
        assert files[rel] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert list(files) == sorted(files)  # stable order: the manifest diff-friendly


def test_describe_files_keeps_a_nested_file_named_manifest_json(tmp_path):
    """Only the bundle's own manifest (at the root) is left out."""
    make_tree(tmp_path, {"sub/manifest.json": b"{}", "a.txt": b"a"})
    (tmp_path / MANIFEST_FILE).write_text("{}")
    assert set(describe_files(tmp_path)) == {"sub/manifest.json", "a.txt"}


# --- read_manifest -------------------------------------------------------------------------

def test_read_manifest_errors_are_integrity_errors(tmp_path):
    with pytest.raises(IntegrityError, match="not found"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(IntegrityError, match="not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({"schema_version": MANIFEST_SCHEMA + 1}))
    with pytest.raises(IntegrityError, match="schema_version"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({"name": "x"}))
    with pytest.raises(IntegrityError, match="schema_version None"):
        read_manifest(tmp_path)


# --- check_integrity -----------------------------------------------------------------------

@pytest.fixture
def sealed(tmp_path):
    make_tree(tmp_path, TREE)
    return tmp_path, write_manifest(tmp_path, fields())


def test_check_integrity_lists_every_problem_in_one_error(sealed):
    root, manifest = sealed
    (root / "onnx" / "model.onnx").write_bytes(b"graph bytez")  # same size, other content
    (root / "tokenizer.json").write_bytes(b"{")  # truncated
    with pytest.raises(IntegrityError) as e:
        check_integrity(root, manifest)
    msg = str(e.value)
    assert "onnx/model.onnx: sha256 differs" in msg
    assert "tokenizer.json: size 1 bytes" in msg
    assert "head.json" not in msg  # intact files are not blamed


def test_check_integrity_reports_missing_modified_and_unlisted_together(sealed):
    root, manifest = sealed
    (root / "head.json").unlink()
    (root / "deep" / "er" / "still" / "file.bin").write_bytes(bytes(reversed(range(256))))
    (root / "deep" / "extra.txt").write_text("smuggled")
    (root / "1_Pooling" / "config.json").write_text("x")
    with pytest.raises(IntegrityError) as e:
        check_integrity(root, manifest)
    lines = str(e.value).splitlines()[1:]
    assert len(lines) == 4, str(e.value)
    msg = str(e.value)
    assert "head.json: missing" in msg
    assert "deep/er/still/file.bin: sha256 differs" in msg
    assert "deep/extra.txt: not listed in the manifest" in msg
    assert "1_Pooling/config.json: size" in msg


@pytest.mark.parametrize("text", ["[]", '"a string"', "null", "3"])
def test_read_manifest_refuses_json_that_is_not_an_object(tmp_path, text):
    (tmp_path / MANIFEST_FILE).write_text(text)
    with pytest.raises(IntegrityError):
        read_manifest(tmp_path)


@pytest.mark.parametrize("fusion,fused", [({"Attention": 6, "SkipLayerNormalization": 12}, True), ({}, False)])
def test_fused_says_whether_export_validated_a_fusion(tmp_path, fusion, fused):
    """export_onnx copies the plain graph to model_fused.onnx where no fusion validates
    (fusion {} in its report): then fp32-fused and what is made from it are not called fused."""
    from stages.package import copy_variants

    art = tmp_path / "artifacts"
    (art / "onnx").mkdir(parents=True)
    for name in ("model.onnx", "model_fused.onnx"):
        (art / "onnx" / name).write_bytes(b"graph")
    (art / "onnx" / "report.json").write_text(json.dumps({"fusion": fusion}))
    (tmp_path / "bundle").mkdir()
    variants = copy_variants(["fp32", "fp32-fused"], art, tmp_path / "bundle")
    assert variants["fp32"]["fused"] is False and variants["fp32-fused"]["fused"] is fused
