"""Exactly one onnxruntime build: the packaging that gives it, and what the runtime says when a
machine has two (they share one `onnxruntime` folder) or none.

The two-build machines are made of real distribution metadata (dist-info folders, as pip writes
them) in a site folder put first on PYTHONPATH, and the runtime runs in a subprocess there.
"""

import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from sbert_bundle.backends import onnxruntime_builds, onnxruntime_install_problem

REPO = Path(__file__).resolve().parent.parent


def test_pyproject_installs_one_onnxruntime_build_per_extra():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core, extras = project["dependencies"], project["optional-dependencies"]
    assert not [d for d in core if d.startswith("onnxruntime")], core  # a core install chooses no build
    assert [d for d in extras["cpu"] if d.startswith("onnxruntime")] == ["onnxruntime>=1.20"]
    assert [d for d in extras["gpu"] if d.startswith("onnxruntime")] == ["onnxruntime-gpu>=1.20"]
    for name, deps in extras.items():  # no extra brings two builds
        builds = {d.split(">")[0].split("=")[0].split(";")[0].strip() for d in deps if d.startswith("onnxruntime")}
        assert len(builds) <= 1, (name, builds)
    assert "onnxruntime>=1.20" in extras["build"]  # the build and test side: the CPU build


def test_the_lock_has_the_cpu_build_and_this_environment_one_build():
    lock = (REPO / "requirements" / "lock-py311.txt").read_text().splitlines()
    assert [line.split("==")[0] for line in lock if line.startswith("onnxruntime")] == ["onnxruntime"]
    builds, folder = onnxruntime_builds()
    assert len(builds) == 1 and folder.name == "onnxruntime", builds
    assert builds[0][1] == importlib.metadata.version(builds[0][0]) and onnxruntime_install_problem() == ""


def fake_site(root: Path, *dists: tuple[str, str]) -> Path:
    """A site folder holding an `onnxruntime` package that each of dists claims, as pip leaves it."""
    (root / "onnxruntime").mkdir(parents=True)
    (root / "onnxruntime" / "__init__.py").write_text("raise ImportError('the stand-in onnxruntime was imported')\n")
    for name, version in dists:
        info = root / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "top_level.txt").write_text("onnxruntime\n")
        (info / "RECORD").write_text(f"onnxruntime/__init__.py,,\n{info.name}/METADATA,,\n")
    return root


def run_here(site: Path | None, code: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(REPO), "PYTHONPATH": str(site) if site else ""}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


LOAD_AND_INSPECT = """
import sys
from sbert_bundle import Bundle
from sbert_bundle.cli import main
try:
    Bundle.load({bundle!r})
except ImportError as e:
    print(type(e).__name__, e)
sys.exit(main(["inspect", {bundle!r}]))
"""


def test_two_builds_in_one_folder_are_refused_with_the_fix(tiny_bundle, tmp_path):
    site = fake_site(tmp_path / "site", ("onnxruntime", "1.32.0"), ("onnxruntime-gpu", "1.31.1"))
    done = run_here(site, LOAD_AND_INSPECT.format(bundle=str(tiny_bundle)))
    fix = "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu==1.31.1"
    assert done.stdout.startswith("InstallError onnxruntime 1.32.0 and onnxruntime-gpu 1.31.1 are both installed in "
                                  f"{site}"), done.stdout + done.stderr
    assert fix in done.stdout and "pip install onnxruntime==1.32.0" in done.stdout  # a CPU-only machine's fix
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sbert-bundle: error: onnxruntime 1.32.0 and onnxruntime-gpu")
    assert fix in lines[0]


def test_a_build_shadowed_by_another_folder_is_not_a_conflict(tmp_path):
    """pip install --target DIR onnxruntime-gpu, DIR first on the path, the CPU build in site-packages
    (the lent GPU machine's layout): Python imports only DIR's, whole."""
    site = fake_site(tmp_path / "site", ("onnxruntime-gpu", "1.31.1"))
    done = run_here(site, "from sbert_bundle.backends import onnxruntime_builds as b, "
                          "onnxruntime_install_problem as p\nprint(b()[0], repr(p()))")
    assert done.stdout.strip() == "[('onnxruntime-gpu', '1.31.1')] ''", done.stdout + done.stderr


def test_without_onnxruntime_one_line_names_the_install_command(tiny_bundle):
    code = ("import sys\nsys.modules['onnxruntime'] = None  # not importable, as on a core install\n"
            + LOAD_AND_INSPECT.format(bundle=str(tiny_bundle)))
    done = run_here(None, code)
    message = "onnxruntime is not installed: pip install 'sbert-bundle[cpu]', or 'sbert-bundle[gpu]' on a machine"
    assert done.stdout.startswith(f"InstallError {message}"), done.stdout + done.stderr
    assert done.returncode == 1 and done.stderr.splitlines() == [f"sbert-bundle: error: {message} with an NVIDIA GPU"]


@pytest.mark.skipif("CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers(),
                    reason="this onnxruntime has the CUDA provider")
def test_the_cuda_hint_for_the_cpu_build_replaces_it(tiny_bundle, tmp_path):
    """Installing onnxruntime-gpu over the CPU build makes two builds: the hint uninstalls first."""
    from sbert_bundle.backends import pick_device

    device, why = pick_device({"backend": "onnxruntime", "devices": ["cuda"]})
    assert device is None
    assert why.endswith("on a machine with an NVIDIA GPU: pip uninstall -y onnxruntime && pip install onnxruntime-gpu)")


def test_every_runtime_package_is_installed_by_a_wheel():
    """A non-editable install ships only the packages pyproject.toml names: each folder of
    sbert_bundle/ with an __init__.py must be one (sbert_bundle.serve was missing once)."""
    packages = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "sbert_bundle").rglob("__init__.py")}
    assert found <= packages, sorted(found - packages)
