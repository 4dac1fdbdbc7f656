"""`make matrix`: build every model (and GPU target) of params.yaml on Ray, DVC deciding what is built.

    python -m stages.matrix [--models a,b] [--no-report]
    RAY_ADDRESS=ray://head:10001 python -m stages.matrix     # on a team's cluster

Not a DVC stage: DVC (dvc.yaml, dvc.lock, the remote's run-cache) decides what is built, Ray
decides where each cell runs. Tasks:
  - one per model for its CPU cells (matrix.cpu_stages, e.g. fetch@m .. quantize@m);
  - one per (model, GPU target) for build_trt@<model>-<target> where trt.targets names targets,
    asking Ray for that target's resource (trt.targets.<t>.resource, e.g. {"gpu_h100": 1});
  - one per model for the rest (matrix.final_stage and what it needs: package, verify, release),
    after that model's build_trt cells; without targets a model is one task.
A worker clones the driver's commit (matrix.git_url, default this folder), runs its cells with
`dvc repro --pull` (restoring upstream cells that other workers pushed) and
`dvc push --run-cache --with-deps` (the run-cache, and the outputs of its cells and their upstream).
The driver then runs `dvc repro --pull` on the cells that succeeded: DVC restores them from the
remote's run-cache instead of recomputing, and dvc.lock stays the single record.
Without RAY_ADDRESS a local Ray starts (no set-up); with it the driver joins that cluster.
A failed cell is in the report and stops only the cells that need it; a task whose worker dies
is retried (matrix.max_retries); one whose resource no node offers fails after
matrix.resource_wait_s, naming the resource and what the nodes offer.
Writes artifacts/matrix/cells.json (each cell: state, node, seconds, error) and the matrix
report (stages.report: printed table, artifacts/matrix/metrics.json, artifacts/matrix/plots/).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .common import (ARTIFACTS, StageError, atomic_file, git, load_params, model_keys, model_params, stage_environment,
                     stage_main, write_json)

log = logging.getLogger("stages.matrix")
CELLS_FILE = ARTIFACTS / "matrix" / "cells.json"
STATES = ("pending", "running", "done", "failed")
INSTALL = "pip install 'sbert-bundle[cluster]' (or make install: the lock holds ray)"


@dataclass
class Task:
    """One Ray task: the DVC cells it reproduces, what it asks Ray for, and how it went."""

    name: str                         # e.g. cpu@minilm_l6, build_trt@minilm_l6-h100, final@minilm_l6
    model: str
    cells: list[str]                  # dvc repro targets
    resources: dict = field(default_factory=dict)
    cpus: float = 1
    gpus: float = 0
    collect: list[str] = field(default_factory=list)   # files (not DVC outputs) to bring back: verify's speed
    after: list[str] = field(default_factory=list)   # task names that must be done first
    target: str | None = None
    state: str = "pending"
    error: str | None = None
    node_id: str | None = None
    node_ip: str | None = None
    seconds: float | None = None
    restored: list[str] = field(default_factory=list)   # cells the worker restored from the remote
    ran: list[str] = field(default_factory=list)        # cells the worker computed


def targets_of(params: dict) -> dict:
    """trt.targets (name -> {resource, ...}), {} when the pipeline has no per-target build_trt cells."""
    targets = (params.get("trt") or {}).get("targets") or {}
    for name, spec in targets.items():
        if not isinstance(spec, dict) or not spec.get("resource"):
            raise StageError(f"params.yaml trt.targets.{name} has no `resource` (the Ray custom resource a node "
                             "with that GPU offers, e.g. gpu_h100)")
    return targets


def plan(params: dict, models: list[str] | None = None) -> list[Task]:
    """The tasks of the matrix, in submission order."""
    cfg = params["matrix"]
    keys = model_keys(params)
    if models:
        unknown = [m for m in models if m not in keys]
        if unknown:
            raise StageError(f"--models {','.join(unknown)}: not in params.yaml's models ({', '.join(keys)})")
        keys = [k for k in keys if k in models]
    tasks = []
    for key in keys:
        targets = targets_of(model_params(params, key))
        final = f"{cfg['final_stage']}@{key}"
        speed = [f"artifacts/{key}/verify/speed.json"]  # measured where verify ran; not a DVC output
        if not targets:
            tasks.append(Task(f"model@{key}", key, [final], cpus=cfg["cpus"], collect=speed))
            continue
        cpu = Task(f"cpu@{key}", key, [f"{s}@{key}" for s in cfg["cpu_stages"]], cpus=cfg["cpus"])
        trt = [Task(f"{cfg['target_stage']}@{key}-{t}", key, [f"{cfg['target_stage']}@{key}-{t}"],
                    resources={spec["resource"]: 1}, cpus=cfg["target_cpus"], gpus=cfg["target_gpus"],
                    after=[cpu.name], target=t)
               for t, spec in targets.items()]
        tasks += [cpu, *trt, Task(f"final@{key}", key, [final], cpus=cfg["cpus"], after=[t.name for t in trt],
                                  collect=speed)]
    return tasks


def dvc_remote_url(repo: Path) -> str:
    """The default DVC remote's URL as every node must see it (DVC makes a relative folder absolute)."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        config = dvc_repo.config
        name = config["core"].get("remote")
        url = (config["remote"].get(name) or {}).get("url") if name else None
    if not url:
        raise StageError(f"{repo}: no default DVC remote (core.remote in .dvc/config), and matrix.remote_url is not "
                         "set: workers share their cells through a DVC remote")
    return str(url)


def _dvc(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)


def stage_outcomes(output: str) -> tuple[list[str], list[str]]:
    """(cells restored from the run-cache, cells run) from `dvc repro` output."""
    restored, ran = [], []
    for line in output.splitlines():
        if line.startswith("Stage '") and "is cached - skipping run" in line:
            restored.append(line.split("'")[1])
        elif line.startswith("Running stage '"):
            ran.append(line.split("'")[1])
    return restored, ran


def work_on(job: dict) -> dict:
    """A worker: clone the driver's commit, reproduce the cells, push them with the run-cache.

    Runs inside a Ray task (or in-process from tests); returns what happened, or raises
    StageError naming the command that failed and its last lines of output."""
    import ray

    ctx = ray.get_runtime_context()
    where = {"node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(), "pid": os.getpid()}
    if job.get("tracker") is not None:
        job["tracker"].start.remote(job["name"], where)
    env = {**stage_environment(), "SBERT_MATRIX_NODE_ID": where["node_id"], "SBERT_MATRIX_NODE_IP": where["node_ip"],
           "SBERT_MATRIX_WORKER_PID": str(os.getpid()), "SBERT_MATRIX_TASK": job["name"]}
    base = Path(job["work_dir"] or tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    clone = base / f"sbert-matrix-{job['name'].replace('@', '-')}-{uuid.uuid4().hex[:8]}"
    start = time.monotonic()
    try:
        git("clone", "--quiet", "--no-checkout", job["git_url"], str(clone), cwd=base)
        git("checkout", "--quiet", "--detach", job["commit"], cwd=clone)
        for args in (["remote", "add", "--local", "--force", "--default", "matrix", job["remote_url"]],
                     ["repro", "--pull", *job["cells"]],
                     ["push", "--run-cache", "--with-deps", *job["cells"]]):
            done = _dvc(args, clone, env)
            if done.returncode:
                lines = (done.stdout + done.stderr).strip().splitlines()
                why = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "")
                raise StageError(f"dvc {' '.join(args)} failed on node {where['node_ip']}: {why}\n"
                                 + "\n".join(lines[-15:]))
            if args[0] == "repro":
                restored, ran = stage_outcomes(done.stdout + done.stderr)
        collected = {rel: (clone / rel).read_text() for rel in job.get("collect", []) if (clone / rel).is_file()}
        return {**where, "seconds": round(time.monotonic() - start, 1), "restored": restored, "ran": ran,
                "collected": collected}
    finally:
        shutil.rmtree(clone, ignore_errors=True)


class Matrix:
    """Submit the tasks in dependency order, follow them, report each state change."""

    def __init__(self, tasks: list[Task], job: dict, cfg: dict, strict_resources: bool, echo=print):
        import ray

        self.ray, self.tasks, self.job, self.cfg = ray, {t.name: t for t in tasks}, job, cfg
        self.strict, self.echo = strict_resources, echo
        self.refs: dict = {}          # ObjectRef -> task name
        self.collected: dict[str, str] = {}   # repository-relative path -> text, from the workers
        self.waiting_since: dict[str, float] = {}
        self.remote = ray.remote(_ray_entry)
        self.tracker = _tracker_class(ray).options(num_cpus=0).remote()

    def counts(self) -> str:
        n = {s: sum(t.state == s for t in self.tasks.values()) for s in STATES}
        return ", ".join(f"{n[s]} {s}" for s in STATES)

    def _offered(self) -> set[str]:
        return {r for node in self.ray.nodes() if node.get("Alive") for r in node.get("Resources", {})}

    @staticmethod
    def _needs(task: Task) -> list[str]:
        return [*task.resources, *(["GPU"] if task.gpus else [])]

    def _submit(self, task: Task) -> None:
        missing = [r for r in self._needs(task) if r not in self._offered()]
        if missing and not self.strict:
            log.info("%s: no local node offers %s; it runs on this machine (no cluster: build_trt records the "
                     "target skipped here, as `dvc repro` does)", task.name, missing)
            task.resources, task.gpus = {}, 0
        job = {**self.job, "name": task.name, "cells": task.cells, "tracker": self.tracker, "collect": task.collect}
        ref = self.remote.options(num_cpus=task.cpus, num_gpus=task.gpus, resources=task.resources or None,
                                  max_retries=self.cfg["max_retries"], retry_exceptions=False,
                                  name=task.name).remote(job)
        self.refs[ref] = task.name
        self.waiting_since[task.name] = time.monotonic()
        self.echo(f"submitted {task.name}: dvc repro {' '.join(task.cells)}"
                  + (f" on a node with {task.resources}" if task.resources else ""))

    def _fail(self, task: Task, error: str) -> None:
        task.state, task.error = "failed", error
        self.echo(f"FAILED {task.name}: {error.splitlines()[0]}")
        for other in self.tasks.values():  # whatever needs it cannot run
            if other.state == "pending" and task.name in other.after and other.name not in self.refs.values():
                self._fail(other, f"not run: {task.name} failed")

    def run(self) -> list[Task]:
        for task in self.tasks.values():
            if not task.after:
                self._submit(task)
        self.echo(f"matrix: {self.counts()}")
        while self.refs:
            ready, _ = self.ray.wait(list(self.refs), num_returns=1, timeout=1.0)
            for ref in ready:
                task = self.tasks[self.refs.pop(ref)]
                try:
                    result = self.ray.get(ref)
                except Exception as e:  # noqa: BLE001 - the task's own error (StageError) or Ray's (worker died)
                    cause = getattr(e, "cause", None)
                    self._fail(task, str(cause) if isinstance(cause, StageError) else f"{type(e).__name__}: {e}")
                else:
                    task.state = "done"
                    task.node_id, task.node_ip = result["node_id"], result["node_ip"]
                    task.seconds, task.restored, task.ran = result["seconds"], result["restored"], result["ran"]
                    self.collected.update(result.get("collected", {}))
                    self.echo(f"done {task.name} on {task.node_ip} in {task.seconds}s")
                    for other in self.tasks.values():
                        if other.state == "pending" and other.after and other.name not in self.refs.values() \
                                and all(self.tasks[a].state == "done" for a in other.after):
                            self._submit(other)
            self._follow()
            if ready:
                self.echo(f"matrix: {self.counts()}")
        return list(self.tasks.values())

    def _follow(self) -> None:
        """Running states from the tracker; fail tasks that wait for a resource no node offers."""
        try:
            started = self.ray.get(self.tracker.poll.remote(), timeout=30)
        except Exception as e:  # noqa: BLE001 - the display only: the tasks' own results still count
            log.warning("progress tracker unavailable (%s): running states are not shown", type(e).__name__)
            started = {}
        for name, where in started.items():
            task = self.tasks[name]
            if task.state == "pending":
                task.state, task.node_id, task.node_ip = "running", where["node_id"], where["node_ip"]
                self.echo(f"running {name} on {where['node_ip']}")
        for ref, name in list(self.refs.items()):
            task = self.tasks[name]
            if task.state != "pending" or not self._needs(task):
                continue
            offered = self._offered()
            missing = sorted(r for r in self._needs(task) if r not in offered)
            if not missing:
                self.waiting_since[name] = time.monotonic()
                continue
            waited = time.monotonic() - self.waiting_since[name]
            if waited >= self.cfg["resource_wait_s"]:
                self.ray.cancel(ref, force=True)
                del self.refs[ref]
                target = f" (trt.targets.{task.target}.resource)" if task.target else ""
                self._fail(task, f"no node of the Ray cluster offers resource {missing[0]!r}{target} after waiting "
                                 f"{waited:.0f} s (matrix.resource_wait_s); the nodes offer {sorted(offered)}; start a "
                                 f"node with that GPU: ray start --address <head> --resources "
                                 f"'{{\"{missing[0]}\": 1}}'")


def _ray_entry(job: dict) -> dict:
    return work_on(job)


def _tracker_class(ray):
    @ray.remote
    class Tracker:
        """Where each task started (the driver polls it for the progress display)."""

        def __init__(self):
            self.seen = {}

        def start(self, name, where):
            self.seen[name] = where

        def poll(self):
            return dict(self.seen)

    return Tracker


def connect(cfg: dict):
    """Join RAY_ADDRESS's cluster, or start a local Ray; returns (ray, strict resource checks)."""
    try:
        import ray
    except ImportError:
        raise StageError(f"the matrix runs on Ray, which is not installed: {INSTALL}") from None
    address = os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH")]))}} \
        if os.environ.get("PYTHONPATH") else None
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, logging_level=logging.WARNING, runtime_env=runtime_env)
        return ray, True
    log.info("no RAY_ADDRESS: starting a local Ray (resources %s)", cfg.get("local_resources") or {})
    ray.init(address="local", resources=cfg.get("local_resources") or None, include_dashboard=False,
             logging_level=logging.WARNING, runtime_env=runtime_env)
    return ray, False


def finish(repo: Path, tasks: list[Task], env: dict) -> tuple[list[str], list[str], str]:
    """The driver's `dvc repro --pull` on the cells of the tasks that succeeded: (restored, ran, output)."""
    cells = [c for t in tasks if t.state == "done" for c in t.cells]
    if not cells:
        return [], [], ""
    done = _dvc(["repro", "--pull", *cells], repo, env)
    output = done.stdout + done.stderr
    if done.returncode:
        raise StageError("the driver's dvc repro --pull failed:\n" + "\n".join(output.strip().splitlines()[-15:]))
    restored, ran = stage_outcomes(output)
    return restored, ran, output


def run(repo: Path, params: dict, models: list[str] | None = None, echo=print) -> dict:
    """Run the matrix from the repository at repo (the driver); returns the cells record."""
    repo = Path(repo).resolve()
    cfg = params["matrix"]
    tasks = plan(params, models)
    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no", cwd=repo).splitlines()]
    if changed:
        raise StageError(f"git has uncommitted changes ({', '.join(changed[:3])}): workers build the driver's "
                         "commit, so commit them first")
    commit = git("rev-parse", "HEAD", cwd=repo).strip()
    job = {"git_url": cfg["git_url"] or str(repo), "commit": commit,
           "remote_url": cfg["remote_url"] or dvc_remote_url(repo), "work_dir": cfg["work_dir"]}
    ray, strict = connect(cfg)
    start = time.monotonic()
    try:
        matrix = Matrix(tasks, job, cfg, strict, echo)
        done = matrix.run()
    finally:
        ray.shutdown()
    restored, ran, _ = finish(repo, done, stage_environment())
    for rel, text in matrix.collected.items():  # verify's speed, measured on the worker that ran verify
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(repo / rel) as tmp:
            tmp.write_text(text)
    if ran:
        log.warning("the driver computed %s itself: the remote's run-cache did not have them", ", ".join(ran))
    record = {"commit": commit, "ray": os.environ.get("RAY_ADDRESS") or "local", "seconds":
              round(time.monotonic() - start, 1), "driver": {"restored": restored, "ran": ran},
              "tasks": [asdict(t) for t in done]}
    with atomic_file(repo / CELLS_FILE) as tmp:
        write_json(tmp, record)
    return record


def main() -> None:
    def add_args(p):
        p.add_argument("--models", help="comma-separated model keys (default: every model of params.yaml)")
        p.add_argument("--no-report", action="store_true", help="skip the matrix report")

    def body(args):
        params = load_params(args.params)
        record = run(Path("."), params, args.models.split(",") if args.models else None)
        failed = [t for t in record["tasks"] if t["state"] == "failed"]
        if not args.no_report:
            from . import report

            report.main_report(Path("."), params, record)
        print(f"matrix on {record['ray']} Ray: {len(record['tasks']) - len(failed)} task(s) done, {len(failed)} failed "
              f"in {record['seconds']} s; the driver restored {len(record['driver']['restored'])} cell(s) and ran "
              f"{len(record['driver']['ran'])}")
        if failed:
            raise StageError("failed: " + "; ".join(f"{t['name']}: {t['error'].splitlines()[0]}" for t in failed))

    stage_main(__doc__, body, add_args)


if __name__ == "__main__":
    main()
