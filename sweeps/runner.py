"""``landmarks sweep SWEEP.yaml --out DIR``: run a wandb sweep file locally, offline, resumably.

Every run is a separate process (the sweep's ``command``, e.g. ``landmarks fit --config ...
--key=value ...``) started in the current folder, so the paths in the sweep file are relative to
where you start it, as with ``wandb agent``. Each run gets ``DIR/<run name>/``:

* ``output.log`` — the process's stdout and stderr;
* ``run.json`` — parameters, command, status (``running`` → ``ok`` | ``failed`` |
  ``interrupted``), exit code, start/end time, duration, threads, git commit; written atomically;
* its logs: the runner sets ``LANDMARKS_RUN_DIR=DIR/<run name>``, and ``landmarks fit`` then
  points ``trainer.default_root_dir`` and every logger's ``save_dir`` there (CSV logs in
  ``<logger name>/version_0/``, offline wandb runs in ``wandb/``).

Resuming: a run whose ``run.json`` says ``ok`` is skipped; any other run folder (failed,
interrupted, or killed mid-run) is moved to ``DIR/.previous-attempts/`` and the run starts
again. ``DIR/sweep.json`` lists the current runs (what ``landmarks compare --sweep DIR`` reads).

``--parallel N`` runs N processes at once, each with ``OMP_NUM_THREADS`` (and MKL/torch) set to
cores // N so that they do not oversubscribe the CPU.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from core.atomic import write_json_atomic
from core.provenance import git_info
from sweeps.spec import RunSpec, SweepError, SweepSpec

log = logging.getLogger(__name__)

PREVIOUS_ATTEMPTS = ".previous-attempts"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TORCH_NUM_THREADS")


def read_run_json(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _holds_null(value) -> bool:
    """Whether a parameter value is null or holds one in a list or mapping."""
    if isinstance(value, dict):
        return any(_holds_null(v) for v in value.values())
    if isinstance(value, list):
        return any(_holds_null(v) for v in value)
    return value is None


@dataclass
class RunOutcome:
    run: RunSpec
    status: str  # ok | failed | interrupted | skipped
    exit_code: int | None
    duration_s: float


class SweepRunner:
    """Runs the runs of a :class:`SweepSpec` into ``out``; see the module docstring."""

    def __init__(self, spec: SweepSpec, out: str | Path, parallel: int = 1, sample_seed: int = 0,
                 count: int | None = None, threads: int | None = None, progress: bool = True,
                 cwd: str | Path | None = None):
        if parallel < 1:
            raise SweepError(f"--parallel must be >= 1, got {parallel}")
        self.spec = spec
        self.out = Path(out)
        self.parallel = parallel
        self.sample_seed = sample_seed
        self.runs = spec.expand(sample_seed=sample_seed, count=count)
        self.threads = threads if threads is not None else max(1, available_cores() // parallel)
        self.progress = progress
        self.cwd = Path(cwd) if cwd is not None else Path.cwd()
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self._stopping = False

    # ---- planning ----------------------------------------------------------------------------

    def run_dir(self, run: RunSpec) -> Path:
        return self.out / run.name

    def command(self, run: RunSpec) -> list[str]:
        return self.spec.command_for(run, args_json_file=str(self.run_dir(run).resolve() / "args.json"))

    def is_done(self, run: RunSpec) -> bool:
        record = read_run_json(self.run_dir(run))
        return record is not None and record.get("status") == "ok"

    def describe(self) -> str:
        """The plan, for --dry-run: one line per run with its status and command."""
        lines = [(f"sweep {self.spec.path}: method {self.spec.method}, {len(self.runs)} runs, "
                  f"{self.parallel} at a time, {self.threads} thread(s) each, into {self.out}")]
        for run in self.runs:
            state = "done, skipped" if self.is_done(run) else "to run"
            lines.append(f"  [{run.index:>3}] {run.name}  ({state})")
            lines.append(f"        {shlex.join(self.command(run))}")
        return "\n".join(lines)

    def preflight(self) -> None:
        """What would make runs fail or mislead, refused before any starts (``--dry-run`` too, as
        it shows what would be launched): an ``--out`` that is a file, a missing program, and for a
        ``landmarks`` command parameter values it cannot take and configuration files that are missing."""
        if self.out.exists() and not self.out.is_dir():
            raise SweepError(f"--out {self.out}: exists and is not a folder")
        program = self.spec.program
        if program and self.spec.uses_macro("program") and not (self.cwd / program).exists() and not shutil.which(program):
            raise SweepError(f"{self.spec.path}: program {program!r} does not exist (relative to {self.cwd})")
        if self.spec.runs_landmarks():  # another program's parameters are its own business, as for the agent
            self._check_landmarks_parameters()
            self._check_command_config_files()

    def _check_landmarks_parameters(self) -> None:
        for name, parameter in self.spec.parameters.items():
            if not parameter.discrete:  # distributions draw numbers
                continue
            where = f"{self.spec.path}: parameters.{name}"
            for value in parameter.grid_values():
                if name == "config" or name.startswith("config."):  # files (a slot's null: none)
                    if value is None and name == "config":
                        raise SweepError(f"{where}: value null would be passed as the text 'None'; give a config "
                                         "file (null means no file only for a config.<slot> parameter)")
                    files = value if isinstance(value, list) else [] if value is None else [value]
                    if not all(isinstance(f, str) and f for f in files):
                        raise SweepError(f"{where}: value {value!r} is not a config file path, a list of them, or null")
                    for f in files:
                        self._check_config_file(f, where)
                elif _holds_null(value):
                    # The agent prints null as the text None, which landmarks reads as a string. A list
                    # or mapping is fine otherwise: printed as [1.25] or {'a': 1}, which the option
                    # parser reads as YAML (e.g. --model.eval_scales=[1.25]).
                    raise SweepError(f"{where}: value {value!r} holds null, which would be passed as the text "
                                     "'None'; give a value (null is meaningful only for a config.<slot> parameter: "
                                     "no file)")

    def _check_command_config_files(self) -> None:
        command = self.spec.command
        for i, element in enumerate(command):
            value = None
            if element in ("--config", "-c") and i + 1 < len(command):
                value = command[i + 1]
            elif element.startswith("--config") and "=" in element:
                option, value = element.split("=", 1)
                if not (option == "--config" or option.startswith("--config.")):
                    value = None
            if value is None or "${" in value:  # an interpolation or a macro: not a path yet
                continue
            text = value.strip()
            if text in ("", "None", "null", "~"):  # a slot with no file
                continue
            try:
                files = yaml.safe_load(text) if text.startswith("[") else [text]
            except yaml.YAMLError:
                files = None
            if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
                raise SweepError(f"{self.spec.path}: command: {element}: not a config file path or a list of them")
            for f in files:
                self._check_config_file(f, f"{self.spec.path}: command: {element}")

    def _check_config_file(self, file: str, where: str) -> None:
        path = self.cwd / file  # runs start in cwd, so their relative paths are relative to it
        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            raise SweepError(f"{where}: config file {file!r} {what} (relative to {self.cwd})")

    # ---- running -----------------------------------------------------------------------------

    def _env(self, run_dir: Path) -> dict[str, str]:
        env = dict(os.environ)
        # `landmarks` and `python` of this environment first, as in the shell the runner came from.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["LANDMARKS_RUN_DIR"] = str(run_dir.resolve())
        env["LANDMARKS_SWEEP"] = str(self.spec.name or self.spec.path.stem)
        env["PYTHONUNBUFFERED"] = "1"
        for variable in THREAD_VARIABLES:
            env[variable] = str(self.threads)
        return env

    def _execute(self, run: RunSpec) -> RunOutcome:
        run_dir = self.run_dir(run)
        run_dir.mkdir(parents=True, exist_ok=False)
        command = self.command(run)
        if self.spec.uses_macro("args_json_file"):
            write_json_atomic(run_dir / "args.json", run.parameters, default=str)
        record = {
            "name": run.name, "index": run.index, "parameters": run.parameters, "command": command,
            "cwd": str(self.cwd), "sweep_file": str(self.spec.path), "status": "running", "exit_code": None,
            "started": _now(), "finished": None, "duration_s": None, "threads": self.threads,
            "log": "output.log", "git": git_info(),
        }
        write_json_atomic(run_dir / "run.json", record, default=str)
        start = time.monotonic()
        exit_code: int | None = None
        with open(run_dir / "output.log", "wb") as output:
            try:
                # A session of its own: interrupting the sweep stops the run's whole process tree
                # (data-loader workers included) and nothing else.
                proc = subprocess.Popen(command, cwd=self.cwd, env=self._env(run_dir), stdout=output,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as err:
                output.write(f"cannot start {command[0]!r}: {err}\n".encode())
                proc = None
            if proc is not None:
                with self._lock:
                    self._procs[run.name] = proc
                exit_code = proc.wait()
                with self._lock:
                    self._procs.pop(run.name, None)
        duration = time.monotonic() - start
        status = "interrupted" if self._stopping else ("ok" if exit_code == 0 else "failed")
        record.update(status=status, exit_code=exit_code, finished=_now(), duration_s=round(duration, 3))
        write_json_atomic(run_dir / "run.json", record, default=str)
        return RunOutcome(run, status, exit_code, duration)

    def _set_aside(self, run: RunSpec) -> None:
        """Move an unfinished or failed attempt out of the way (kept for its logs)."""
        run_dir = self.run_dir(run)
        if not run_dir.exists():
            return
        record = read_run_json(run_dir) or {}
        attempts = self.out / PREVIOUS_ATTEMPTS
        attempts.mkdir(exist_ok=True)
        k = 1
        while (attempts / f"{run.name}.{k}").exists():
            k += 1
        os.replace(run_dir, attempts / f"{run.name}.{k}")
        log.info("%s: previous attempt (status %s) moved to %s/%s.%d; running again", run.name,
                 record.get("status", "unknown, no run.json"), attempts, run.name, k)

    def _write_manifest(self) -> None:
        write_json_atomic(self.out / "sweep.json", {
            "sweep_file": str(self.spec.path), "name": self.spec.name, "method": self.spec.method,
            "sample_seed": self.sample_seed, "parallel": self.parallel, "threads": self.threads,
            "cwd": str(self.cwd), "sweep": self.spec.raw,
            "runs": [{"name": r.name, "index": r.index, "parameters": r.parameters} for r in self.runs],
        }, default=str)

    def _stop_all(self) -> None:
        self._stopping = True
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)

    def run(self) -> list[RunOutcome]:
        self.preflight()
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / ".sweep.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SweepError(f"{self.out}: another `landmarks sweep` is running into this folder") from None
            self._write_manifest()
            return self._run_locked()

    def _run_locked(self) -> list[RunOutcome]:
        outcomes = [RunOutcome(r, "skipped", 0, 0.0) for r in self.runs if self.is_done(r)]
        todo = [r for r in self.runs if not self.is_done(r)]
        say = tqdm.write if self.progress else print
        say(f"sweep {self.spec.path.name}: {len(self.runs)} runs, {len(outcomes)} already done, {len(todo)} to run "
            f"({self.parallel} at a time, {self.threads} thread(s) each) → {self.out}")
        for run in todo:
            self._set_aside(run)
        bar = tqdm(total=len(todo), desc="runs", unit="run", disable=not self.progress, dynamic_ncols=True)
        pending: dict[Future, RunSpec] = {}
        queue = list(todo)
        pool = ThreadPoolExecutor(max_workers=self.parallel)
        try:
            while queue or pending:
                while queue and len(pending) < self.parallel:
                    run = queue.pop(0)
                    pending[pool.submit(self._execute, run)] = run
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    pending.pop(future)
                    outcome = future.result()
                    outcomes.append(outcome)
                    bar.update(1)
                    tail = "" if outcome.status == "ok" else (
                        f" (exit {outcome.exit_code}; see {self.run_dir(outcome.run) / 'output.log'})")
                    finished = sum(o.status != "skipped" for o in outcomes)
                    say(f"[{finished}/{len(todo)}] {outcome.run.name}: {outcome.status} in "
                        f"{outcome.duration_s / 60:.1f} min{tail}")
        except KeyboardInterrupt:
            say("interrupted: stopping the running runs (they run again on the next start)")
            self._stop_all()
            raise
        finally:
            pool.shutdown(wait=True)
            bar.close()
        return sorted(outcomes, key=lambda o: o.run.index)
