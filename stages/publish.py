"""`make publish`: publish the sealed release as an immutable version in the registry.

Not a DVC stage: it has side effects (a push to the DVC remote, git tags) and runs on a
clean, reproduced tree. It refuses, in one line naming the cause, unless git is clean,
`dvc status` matches dvc.lock, the release archive is sealed with a passing verify report,
dvc.yaml declares it as the model's registry artifact and model.<model>.version is semantic.
With several models in params.yaml, --model names the one to publish. Then:

1. Versions are immutable: `<name>@v<version>` already published with this archive's sha256
   is a no-op that says so; with another sha256 it is refused.
2. Version policy from embeddings: the latest published version of the same model is pulled
   from the registry and both are run on the evaluation corpus (publish.corpus). If the
   default variant's embeddings moved (min cosine below publish.min_cosine), indexes built
   with the old version must be rebuilt, so the major version must go up; a wrong bump is
   refused, naming the version to use. The comparison is the version's changelog.
3. `dvc push` of the release stage's output to the DVC remote; if it fails, nothing is tagged.
4. The GTO version tag on HEAD, whose message holds the archive's sha256 and the changelog;
   with --stage, the GTO stage tag (`gto assign`). With --git-push, the tags go to origin.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
import time
from pathlib import Path

from sbert_bundle.archive import extract_bundle
from sbert_bundle.bundle import Bundle, read_sealed_report
from sbert_bundle.manifest import IntegrityError, sha256_file

from .common import StageError, git, load_params, model_params, pick_model, row_cosines, stage_main
from .compose import release_path
from .verify import load_corpus

log = logging.getLogger("stages.publish")
RELEASE_STAGE = "release"   # a foreach stage: its cell of model <key> is release@<key>
_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")


def semver(version: str) -> tuple[int, int, int]:
    match = _SEMVER.match(str(version).removeprefix("v"))
    if not match:
        raise StageError(f"model.version {version!r} is not a semantic version (MAJOR.MINOR.PATCH, e.g. 1.0.0)")
    return tuple(int(x) for x in match.groups()[:3])


def release_archive(repo: Path, key: str, model: dict) -> Path:

    return repo / release_path(key, model)


def check_declared(repo: Path, key: str, model: dict) -> None:
    """dvc.yaml's `artifacts:` names this model's release (what `dvc artifacts get` and GTO read)."""
    import yaml


    try:
        declared = (yaml.safe_load((repo / "dvc.yaml").read_text()) or {}).get("artifacts") or {}
    except (OSError, yaml.YAMLError) as e:
        raise StageError(f"cannot read {repo / 'dvc.yaml'}: {e}") from None
    want = release_path(key, model)
    got = (declared.get(model["name"]) or {}).get("path")
    if got != want:
        found = f"no artifact {model['name']!r}" if got is None else f"artifact {model['name']!r} at {got}"
        raise StageError(f"dvc.yaml declares {found}, but model {key} releases {want}: run `python -m "
                         "stages.compose` (it writes one artifacts: entry per model) and commit dvc.yaml")


def check_clean(repo: Path) -> None:
    """A published version names one commit: nothing uncommitted, and what DVC built is what dvc.lock says."""
    from dvc.repo import Repo

    changed = [line[3:] for line in git("status", "--porcelain", cwd=repo).splitlines()]
    if changed:
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise StageError(f"git has uncommitted changes ({', '.join(changed[:3])}{more}): commit them first, so that "
                         "the version names the commit that built it")
    with contextlib.chdir(repo), Repo(".") as dvc_repo:
        status = dvc_repo.status()
    if status:
        raise StageError(f"dvc status: {', '.join(sorted(status))} differ from dvc.lock: run `dvc repro` and "
                         "commit dvc.lock")


def check_sealed(archive: Path) -> dict:
    """The sealed verify report of a release archive; StageError if it has none or it does not pass."""
    if not archive.is_file():
        raise StageError(f"{archive} not found: run `make repro` (the release stage writes it)")
    try:
        root, tmp = extract_bundle(archive)
        try:
            report = read_sealed_report(root.parent, root) if root != Path(tmp.name) else None
        finally:
            tmp.cleanup()
    except IntegrityError as e:
        raise StageError(f"{archive} cannot be published: {e}") from None
    if report is None:
        raise StageError(f"{archive} holds no sealed verify report: only releases that passed verify are published")
    return report


def _encode_timed(folder: Path, variant: str, sentences: list[str], batch_size: int):
    bundle = Bundle.load(folder, variant=variant)
    bundle.encode(sentences[:batch_size], batch_size=batch_size)  # warm up
    start = time.perf_counter()
    emb = bundle.encode(sentences, batch_size=batch_size)
    return emb, len(sentences) / (time.perf_counter() - start)


def compare(old_archive: Path, new_archive: Path, sentences: list[str], batch_size: int, threshold: float,
            previous: str) -> dict:
    """The changelog: per variant both versions run here, cross-version cosine and speed; params and tools."""
    old_root, old_tmp = extract_bundle(old_archive)
    new_root, new_tmp = extract_bundle(new_archive)
    try:
        old_folder, new_folder = old_root.parent, new_root.parent  # release folders: bundle/ + sealed report
        old_default, new_default = Bundle.load(old_folder), Bundle.load(new_folder)
        shared = sorted(set(old_default.manifest["variants"]) & set(new_default.manifest["variants"]))
        variants = {}
        for name in shared:
            try:
                before, before_speed = _encode_timed(old_folder, name, sentences, batch_size)
                after, after_speed = _encode_timed(new_folder, name, sentences, batch_size)
            except Exception as e:  # noqa: BLE001 - a variant that does not run here (a TensorRT plan) is skipped
                log.info("variant %s not compared here: %s", name, e)
                continue
            cos = row_cosines(before, after)
            variants[name] = {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
                              "sentences_per_s_before": before_speed, "sentences_per_s_after": after_speed,
                              "speed_ratio": after_speed / before_speed}
        default = new_default.variant
        if default not in variants:
            raise StageError(f"the default variant {default} of the new release is not in {previous}: the versions "
                             "cannot be compared; publish it as a new major version under a new name or version")
        moved = variants[default]["min_cosine"] < threshold
        return {"previous": previous, "default_variant": default, "min_cosine_threshold": threshold,
                "embeddings_moved": moved, "sentences": len(sentences), "variants": variants,
                "params_sha256": {"before": old_default.manifest.get("params_sha256"),
                                  "after": new_default.manifest.get("params_sha256")},
                "tools": {"before": old_default.manifest.get("tools"), "after": new_default.manifest.get("tools")}}
    finally:
        old_tmp.cleanup()
        new_tmp.cleanup()


def check_bump(name: str, version: str, previous: str, changelog: dict) -> str:
    """The verdict for the changelog; StageError naming the version to use for a wrong bump."""
    new, old = semver(version), semver(previous)
    if new <= old:
        raise StageError(f"{name} {version} is not newer than the latest published version {previous}")
    default = changelog["default_variant"]
    min_cos = changelog["variants"][default]["min_cosine"]
    if changelog["embeddings_moved"]:
        if new[0] <= old[0]:
            raise StageError(f"{name} {version}: the {default} embeddings moved against {previous} (min cosine "
                             f"{min_cos:.6f} < {changelog['min_cosine_threshold']}), so vectors indexed with "
                             f"{previous} must be re-embedded: publish it as {old[0] + 1}.0.0 (set model.version)")
        return f"major: {default} embeddings moved (min cosine {min_cos:.6f}); re-embed indexes built with {previous}"
    return f"compatible: {default} embeddings unchanged within {changelog['min_cosine_threshold']} " \
           f"(min cosine {min_cos:.6f}); indexes built with {previous} stay valid"


def run(repo: Path, params: dict, stage: str | None = None, git_push: bool = False, model: str | None = None) -> dict:
    """Publish model `model` of params (None: the only one); returns {"name", "version", "sha256",
    "published": bool, "changelog"}."""
    from gto import api as gto

    from sbert_bundle.registry import RegistryError, download, published_versions, tag_message

    repo = Path(repo).resolve()
    key = pick_model(params, model)
    params = model_params(params, key)
    model, cfg = params["model"], params["publish"]
    name, version = model["name"], str(model["version"])
    semver(version)
    tag_version = f"v{version}"
    check_clean(repo)
    check_declared(repo, key, model)
    archive = release_archive(repo, key, model)
    check_sealed(archive)
    digest = sha256_file(archive)
    try:
        entry = published_versions(str(repo)).get(name)
    except RegistryError as e:
        raise StageError(str(e)) from None
    if entry:
        same = [p for p in entry["versions"] if p.version == tag_version]
        if same:
            if same[0].sha256 == digest:
                log.info("%s@%s is already published with this archive (sha256 %s): nothing to do",
                         name, tag_version, digest)
                return {"name": name, "version": tag_version, "sha256": digest, "published": False,
                        "changelog": same[0].changelog}
            raise StageError(f"{name}@{tag_version} is already published with archive sha256 {same[0].sha256}; this "
                             f"archive is {digest}: a published version never changes, bump model.version")
        latest = entry["versions"][0]
        with tempfile.TemporaryDirectory(prefix="sbert-publish-") as work:
            try:
                old = download(str(repo), latest, Path(work))
            except Exception as e:  # noqa: BLE001 - RegistryError, IntegrityError, DVC's own types
                raise StageError(f"cannot pull the latest published {name}@{latest.version} to compare with: "
                                 f"{e}") from None
            sentences = load_corpus(Path(cfg["corpus"]) if Path(cfg["corpus"]).is_absolute()
                                    else repo / cfg["corpus"])
            changelog = compare(old, archive, sentences, cfg["batch_size"], cfg["min_cosine"], latest.version)
        changelog["verdict"] = check_bump(name, version, latest.version, changelog)
    else:
        changelog = {"previous": None, "verdict": "first published version"}
    log.info("%s %s: %s", name, tag_version, changelog["verdict"])

    from dvc.repo import Repo

    try:  # DVC resolves stage targets against the working directory
        with contextlib.chdir(repo), Repo(".") as dvc_repo:
            pushed = dvc_repo.push(targets=[f"{RELEASE_STAGE}@{key}"], remote=cfg.get("remote"))
            missing = dvc_repo.status(targets=[f"{RELEASE_STAGE}@{key}"], cloud=True, remote=cfg.get("remote"))
    except Exception as e:  # noqa: BLE001 - DVC raises many types for an unreachable or misconfigured remote
        raise StageError(f"dvc push of the release to the remote failed ({type(e).__name__}: {e}); "
                         "no version tag was created") from None
    if missing:
        raise StageError(f"after dvc push the remote still lacks {sorted(missing)}; no version tag was created")
    log.info("pushed %s file(s) to the DVC remote; it holds the release", pushed)
    message = tag_message(name, tag_version, digest, archive.relative_to(repo).as_posix(), changelog)
    try:
        gto.register(str(repo), name, ref="HEAD", version=tag_version, message=message)
    except Exception as e:  # noqa: BLE001 - gto / scmrepo / git raise their own types
        raise StageError(f"the release is in the remote, but tagging {name}@{tag_version} failed ({type(e).__name__}: "
                         f"{e}); fix that (a git identity: git config user.name / user.email) and run publish "
                         "again") from None
    tags = [f"{name}@{tag_version}"]
    if stage:
        try:
            gto.assign(str(repo), name, stage, version=tag_version)
        except Exception as e:  # noqa: BLE001
            raise StageError(f"{name}@{tag_version} is published, but assigning stage {stage!r} failed "
                             f"({type(e).__name__}: {e}); assign it with: gto assign {name} --version "
                             f"{tag_version} --stage {stage}") from None
        tags.append(f"{name}#{stage}")
    if git_push:
        git("push", "origin", "--tags", cwd=repo)
    return {"name": name, "version": tag_version, "sha256": digest, "published": True, "changelog": changelog,
            "tags": tags}


def main() -> None:
    def add_args(p):
        p.add_argument("--stage", help="also assign this GTO stage (e.g. prod) to the new version")
        p.add_argument("--git-push", action="store_true", help="push the tags to the git remote 'origin'")

    def body(args):
        result = run(Path("."), load_params(args.params), args.stage, args.git_push, args.model)
        if not result["published"]:
            print(f"{result['name']}@{result['version']} is already published with this archive "
                  f"(sha256 {result['sha256']}); nothing to do")
            return
        print(f"published {result['name']}@{result['version']} (archive sha256 {result['sha256']}); "
              f"{result['changelog']['verdict']}")
        print(json.dumps(result["changelog"], indent=2, sort_keys=True) if result["changelog"].get("previous")
              else "first published version of this model")

    stage_main(__doc__, body, add_args)


if __name__ == "__main__":
    main()
