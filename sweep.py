"""Sweeps: many ``main_clip.py`` runs (methods x datasets x seeds x grids) on this machine or on
SLURM, through submitit (facebookincubator/submitit).

    python sweep.py list                                          # the presets (sweeps/*.json)
    python sweep.py plan vlpl -- --data-root data                 # its runs, folders, protocols
    python sweep.py launch vlpl -- --data-root data               # run them here, one after another
    python sweep.py launch vlpl --executor slurm --partition gpu --time 720 -- --data-root data
    python sweep.py status results/sweep_vlpl                     # finished / running / failed / pending
    python sweep.py select results/sweep_cole-grid                # grid selection by val mAP
    python instrumentation.py results/                            # the paper's table

A sweep is a JSON file (``sweeps/<preset>.json``, or any path), flags (``--axis KEY=V1,V2``), or
both: ``base`` flags of main_clip.py, ``axes`` whose product gives the runs, ``cells`` adding flags
where axes take given values, explicit ``runs``; flags after ``--`` are added to every run. A run's
protocol (learning rate, batch, epochs, ...) is what main_clip.py resolves from the method registry
for the flags it is given: a sweep names no setting the registry already holds.

Every run is an ordinary run folder ``<output-dir>/<config.default_run_name>``: the folder
``python main_clip.py`` gives the same flags. A launch skips finished runs (summary.json), resumes
started ones (``--resume``) and starts the others. The sweep's own files are in
``<output-dir>/sweep_<name>/`` (``sweep.json``: the runs, itself a sweep file; ``tasks/``: each
run's last outcome; ``jobs/``: submitit's logs and pickles); a grid selection is
``<output-dir>/selection_<name>.json``.

Each run is one submitit task, ``RunTask``: it calls ``main_clip.main`` in the task's process
(submitit runs each task in a fresh Python process under the local and SLURM executors, in the
sweep's own process under the debug executor). In-process rather than a ``python main_clip.py``
subprocess so that a run's error reaches the task as the exception itself (its one line is what
``status`` shows), and so that submitit's preemption signal lands in the process that trains:
``RunTask.checkpoint`` (submitit.helpers.Checkpointable) resubmits the same task, which finds
the run started and continues it with ``--resume``.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import math
import os
import shlex
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import submitit

import config as config_module
import datasets
import methods
import rundir
from errors import RunError
from fileio import atomic_write_json

REPO_ROOT = Path(__file__).resolve().parent
PRESETS_DIR = REPO_ROOT / "sweeps"
SPEC_KEYS = {"name", "description", "base", "axes", "cells", "runs", "only_published", "select_by", "grid",
             "columns", "gpus_per_run"}
# Axes every sweep shows; a grid selection picks one run per value of these (and the other non-grid axes).
IDENTITY = ("method", "dataset", "seed")
SELECT_BY = ("val",)
# Flags a sweep cannot set: it names, places and resumes the runs itself.
NOT_IN_SWEEPS = {"run_name", "resume", "config", "demo"}
# A local run is never timed out by submitit (its default is 2 minutes): a week.
LOCAL_TIMEOUT_MIN = 7 * 24 * 60
STATES = ("finished", "running", "failed", "pending")


class SweepError(RunError):
    """A mistake in a sweep (file, flags, executor options): one line, exit code 2."""


# -- flags ------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _actions() -> dict[str, argparse.Action]:
    """main_clip.py's flags by destination and by each option string without its dashes."""
    table = {}
    for action in config_module.get_args_parser()._actions:
        if not action.option_strings or action.dest == "help":
            continue
        table[action.dest] = action
        for option in action.option_strings:
            table.setdefault(option.lstrip("-"), action)
            table.setdefault(option.lstrip("-").replace("-", "_"), action)
    return table


def setting_of(key: str) -> str:
    """The configuration key (``lr``, ``head_lr``, ``method``) of an axis named by it or by a flag
    (``--head-lr``, ``-l``)."""
    action = _actions().get(key.lstrip("-")) or _actions().get(key.lstrip("-").replace("-", "_"))
    if action is None:
        raise SweepError(f"{key!r} is not a flag of main_clip.py (python main_clip.py --help lists them)")
    if action.dest in NOT_IN_SWEEPS:
        raise SweepError(f"{key!r}: a sweep names and resumes its runs itself; leave --run-name, --resume, "
                         f"--config and --demo out")
    return action.dest


def flag_args(setting: str, value) -> list[str]:
    """The command-line words that set ``setting`` to a JSON value (None: leave it at its default)."""
    action = _actions()[setting]
    option = next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])
    if value is None:
        return []
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise SweepError(f"{option} is a switch: give true or false, not {value!r}")
        return [option] if value else []
    if isinstance(value, bool):
        text = "on" if value else "off"                      # the on / off switches of methods
    elif isinstance(value, (list, tuple)):
        text = ",".join(str(item) for item in value)         # comma lists (GR's schedules)
    else:
        text = str(value)
    return [f"{option}={text}"]                              # '=': negative numbers stay values


def _words(flags, what: str) -> list[str]:
    if flags is None:
        return []
    if isinstance(flags, str):
        return shlex.split(flags)
    if isinstance(flags, list) and all(isinstance(word, (str, int, float)) for word in flags):
        return [str(word) for word in flags]
    raise SweepError(f"{what}: give main_clip.py flags as a list of words or one string, not {flags!r}")


def _check_words(words: list[str], what: str) -> None:
    """No flag a sweep sets itself (--run-name, --resume, --config, --demo); argparse reports the rest."""
    forbidden = {option: action.dest for action in _actions().values() if action.dest in NOT_IN_SWEEPS
                 for option in action.option_strings}
    for word in words:
        if word.split("=", 1)[0] in forbidden:
            raise SweepError(f"{what}: {word.split('=', 1)[0]}: a sweep names and resumes its runs itself; leave "
                             f"--run-name, --resume, --config and --demo out")


class _FlagError(Exception):
    pass


@functools.lru_cache(maxsize=1)
def _parser() -> argparse.ArgumentParser:
    parser = config_module.get_args_parser()

    def error(message: str):
        raise _FlagError(message)
    parser.error = error
    return parser


def parse_run_flags(words: list[str], what: str) -> argparse.Namespace:
    """main_clip.py's parser on a run's flags; a mistake is a SweepError naming the run."""
    try:
        return _parser().parse_args(words)
    except _FlagError as error:
        raise SweepError(f"{what}: {error} (flags: {shlex.join(words)})") from None


def _flag_value(setting: str, value):
    """What main_clip.py's parser makes of a JSON value for ``setting`` (a method's alias is the method)."""
    words = flag_args(setting, value)
    if not words:
        return None if value is None else False
    parsed = parse_run_flags(words, f"{setting}={value!r}")
    return getattr(parsed, setting)


# -- the sweep --------------------------------------------------------------------------------------

@dataclass
class Run:
    argv: list[str]          # main_clip.py flags (without --run-name, --resume)
    config: dict             # resolve_config's result: what config.json records

    @property
    def name(self) -> str:
        return self.config["run_name"]


@dataclass
class Sweep:
    name: str
    runs: list[Run]
    columns: list[str]                 # settings shown per run: the identity, then the other axes
    output_dir: Path
    select_by: str | None = None
    grid: list[str] = field(default_factory=list)
    gpus_per_run: int = 1
    description: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def state_dir(self) -> Path:
        return self.output_dir / f"sweep_{self.name}"

    @property
    def selection_file(self) -> Path:
        return self.output_dir / f"selection_{self.name}.json"

    def saved_form(self) -> dict:
        """The sweep as a sweep file of explicit runs (``sweep_<name>/sweep.json``)."""
        return {"name": self.name, "description": self.description, "columns": self.columns,
                "select_by": self.select_by, "grid": self.grid, "gpus_per_run": self.gpus_per_run,
                "runs": [run.argv for run in self.runs]}


def presets() -> dict[str, Path]:
    return {path.stem: path for path in sorted(PRESETS_DIR.glob("*.json"))}


def load_spec(source: str | None) -> dict:
    """A sweep file: a path, a preset name, or a launched sweep's folder (its sweep.json)."""
    if source is None:
        return {}
    path = Path(source)
    if path.is_dir():
        path = path / "sweep.json"
        if not path.is_file():
            raise SweepError(f"{source}: a folder without sweep.json (not a launched sweep's sweep_<name> folder)")
    elif not path.is_file():
        if source not in presets():
            raise SweepError(f"{source!r} is neither a sweep file nor a preset ({', '.join(presets())})")
        path = presets()[source]
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SweepError(f"{path}: cannot read a sweep ({error})") from error
    if not isinstance(spec, dict):
        raise SweepError(f"{path}: a sweep file holds a JSON object")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise SweepError(f"{path}: unknown keys {', '.join(unknown)} (a sweep file has {', '.join(sorted(SPEC_KEYS))})")
    spec.setdefault("name", path.parent.name[len("sweep_"):] if path.name == "sweep.json"
                    and path.parent.name.startswith("sweep_") else path.stem)
    return spec


def _axis_values(setting: str, values) -> list:
    if values == "all" and setting == "method":
        return list(methods.REGISTRY)
    if values == "all" and setting == "dataset":
        return list(datasets.DATASETS)
    return values if isinstance(values, list) else [values]


def _matches(where: dict, parsed: dict) -> bool:
    for key, wanted in where.items():
        setting = setting_of(key)
        options = [_flag_value(setting, option) for option in (wanted if isinstance(wanted, list) else [wanted])]
        if parsed.get(setting) not in options:
            return False
    return True


def build_sweep(spec: dict, extra: list[str] = ()) -> Sweep:
    """The runs of a sweep file (``spec``) with ``extra`` flags added to each, resolved as
    main_clip.py resolves them; finished with one SweepError line where a run cannot be."""
    name = str(spec.get("name") or "sweep")
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise SweepError(f"sweep name {name!r}: letters, digits, '-', '_' and '.' only (it names files)")
    base = _words(spec.get("base"), "base")
    extra = list(extra)
    _check_words(base + extra, "flags")
    axes = spec.get("axes") or {}
    if not isinstance(axes, dict):
        raise SweepError("axes: a JSON object of setting -> list of values")
    axes = {setting_of(key): _axis_values(setting_of(key), values) for key, values in axes.items()}
    if "output_dir" in axes:
        raise SweepError("output_dir cannot be an axis: a sweep's runs share one --output-dir")
    cells = spec.get("cells") or []
    for cell in cells:
        if not isinstance(cell, dict) or set(cell) - {"where", "flags"} or not isinstance(cell.get("where", {}), dict):
            raise SweepError(f"cells: each is {{\"where\": {{setting: value(s)}}, \"flags\": [...]}}, not {cell!r}")
        _check_words(_words(cell.get("flags"), "cells"), "cells")
    explicit = [_words(run, "runs") for run in spec.get("runs") or []]
    for words in explicit:
        _check_words(words, "runs")

    candidates = [base + [word for setting, value in zip(axes, combo) for word in flag_args(setting, value)]
                  for combo in itertools.product(*axes.values())] if axes else ([] if explicit else [base])
    candidates += [base + words for words in explicit]

    runs: list[Run] = []
    seen: dict[str, int] = {}
    notes = []
    for number, words in enumerate(candidates, 1):
        parsed = vars(parse_run_flags(words, f"run {number}"))
        for cell in cells:
            if _matches(cell.get("where", {}), parsed):
                words = words + _words(cell.get("flags"), "cells")
        words = words + extra
        args = parse_run_flags(words, f"run {number}")
        method = methods.get_method(args.method)
        if spec.get("only_published") and method.protocol_row(args.dataset) is methods.NO_PROTOCOL:
            notes.append(f"-l {args.method} -d {args.dataset}: no published protocol in the registry, left out")
            continue
        try:
            config = config_module.resolve_config(args)
        except RunError as error:
            raise SweepError(f"run {number} ({shlex.join(words)}): {error}") from error
        if config["run_name"] in seen:
            notes.append(f"run {number} is run {seen[config['run_name']]} again (same configuration): counted once")
            continue
        seen[config["run_name"]] = number
        runs.append(Run(words, config))
    if not runs:
        raise SweepError(f"sweep {name}: no runs")
    output_dirs = {str(run.config["output_dir"]) for run in runs}
    if len(output_dirs) > 1:
        raise SweepError(f"sweep {name}: its runs name several --output-dir ({', '.join(sorted(output_dirs))}); one only")

    columns = [setting_of(key) for key in spec.get("columns") or []] or \
        list(IDENTITY) + [setting for setting in axes if setting not in IDENTITY]
    select_by = spec.get("select_by")
    if select_by is not None and select_by not in SELECT_BY:
        raise SweepError(f"select_by {select_by!r}: the grid is chosen by {', '.join(SELECT_BY)} mAP only "
                         f"(choosing by test mAP would report a number chosen on the test set)")
    grid = [setting_of(key) for key in spec.get("grid") or []]
    if select_by and not grid:
        grid = [setting for setting in axes if setting not in IDENTITY and setting != "model"]
        if not grid:
            raise SweepError(f"sweep {name}: select_by needs a grid: axes other than method, dataset and seed, "
                             f"or \"grid\": [settings]")
    if set(grid) & set(IDENTITY):
        raise SweepError(f"grid {grid}: method, dataset and seed are what a selection is made for, not grid settings")
    gpus = spec.get("gpus_per_run", 1)
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 0:
        raise SweepError(f"gpus_per_run {gpus!r}: a whole number >= 0")
    return Sweep(name=name, runs=runs, columns=columns, output_dir=Path(next(iter(output_dirs))), select_by=select_by,
                 grid=grid, gpus_per_run=gpus, description=str(spec.get("description") or ""), notes=notes)


# -- run folders and task records ---------------------------------------------------------------------

def read_json(path: Path) -> dict | None:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def finished_summary(run_dir: Path, config: dict) -> dict | None:
    """The run's summary.json when the run is finished for ``config``: written (it is written
    last) by a run of at least the epochs asked for; None otherwise (a started run with fewer
    epochs is continued by ``--resume --epochs N``)."""
    summary = read_json(run_dir / "summary.json")
    if summary is None:
        return None
    saved = read_json(run_dir / "config.json") or {}
    if isinstance(saved.get("epochs"), int) and saved["epochs"] < config["epochs"] and rundir.is_started(run_dir):
        return None
    return summary


def record_path(state_dir: Path, run_name: str) -> Path:
    return Path(state_dir) / "tasks" / f"{run_name}.json"


def write_record(state_dir: Path, run_name: str, **fields) -> None:
    path = record_path(state_dir, run_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"run": run_name, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **fields})


def error_line(error: BaseException) -> str:
    """The line ``status`` shows for a failed run: a RunError's own line, else 'Type: last line'."""
    if isinstance(error, RunError):
        return f"error: {error}"
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1]}" if lines else type(error).__name__


def _job_environment():
    try:
        return submitit.JobEnvironment()
    except RuntimeError:      # the debug executor's job.exception() sets no environment
        return None


class RunTask(submitit.helpers.Checkpointable):
    """One run of a sweep, as submitit runs it (a module-level class: submitit pickles it).

    ``RunTask()(argv, run_name, state_dir, cwd)`` runs ``main_clip.main`` on ``argv`` in the run
    folder ``run_name``: nothing when the run is finished, ``--resume`` when it is started, else
    a fresh start. With several tasks (a run given several GPUs) each task is one torchrun-style
    process (submitit's TorchDistributedEnvironment sets RANK, WORLD_SIZE, MASTER_ADDR...). Task 0
    records the outcome in ``<state_dir>/tasks/<run_name>.json``.

    Preemption or timeout (SLURM's signal, submitit's handler): ``checkpoint`` records the run as
    requeued and resubmits the same task; the requeued task finds the run started and resumes it
    from last.pt (the epoch in progress is redone: on CPUs, and on CUDA with --deterministic, the
    numbers are those of a run in one go)."""

    def __init__(self, requeues: int = 0):
        self.requeues = requeues
        self._preempted = False

    def __call__(self, argv: list[str], run_name: str, state_dir: str, cwd: str) -> dict:
        import main_clip  # here: the task's process imports torch, not the pickling one

        os.chdir(cwd)
        env = _job_environment()
        tasks = env.num_tasks if env is not None else 1
        if tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        rank0 = env is None or env.global_rank == 0
        job_id = env.job_id if env is not None else None
        words = [*argv, "--run-name", run_name]
        config = config_module.resolve_config(parse_run_flags(words, run_name))
        run_dir = rundir.run_dir_for(config["output_dir"], run_name)
        summary = finished_summary(run_dir, config)
        if summary is not None:   # by an earlier job of it (a requeue after the end), or by hand
            if rank0:
                write_record(state_dir, run_name, state="finished", job_id=job_id, note="found finished")
            return {"run": run_name, "outcome": "already finished", "best_val_map": summary.get("best_val_map"),
                    "best_test_map": summary.get("best_test_map")}
        resume = rundir.is_started(run_dir)
        words += ["--resume"] if resume else []
        record = dict(job_id=job_id, executor=env.name() if env is not None else "debug", host=socket.gethostname(),
                      pid=os.getpid(), tasks=tasks, requeues=self.requeues, resumed=resume)
        if rank0:
            write_record(state_dir, run_name, state="running", **record)
        parser = main_clip.get_args_parser()
        try:
            summary = main_clip.main(parser.parse_args(words), given=config_module.given_flags(parser, words))
        except BaseException as error:
            if isinstance(error, submitit.core.utils.UncompletedJobError):   # timed out too many times
                self._preempted = False
            if rank0 and not self._preempted:     # a preempted task's record says requeued
                interrupted = isinstance(error, (KeyboardInterrupt, SystemExit))
                write_record(state_dir, run_name, state="interrupted" if interrupted else "failed",
                             error="interrupted (Ctrl-C, cancelled or killed); a launch resumes it" if interrupted
                             else error_line(error), **record)
            raise
        if rank0:
            write_record(state_dir, run_name, state="finished", **record)
        return {"run": run_name, "outcome": "finished", "best_val_map": summary.get("best_val_map"),
                "best_test_map": summary.get("best_test_map")}

    def checkpoint(self, argv: list[str], run_name: str, state_dir: str, cwd: str) -> submitit.helpers.DelayedSubmission:
        """submitit's preemption / timeout hook: the same run again (it resumes from last.pt)."""
        self._preempted = True
        env = _job_environment()
        write_record(state_dir, run_name, state="requeued", job_id=env.job_id if env else None,
                     executor=env.name() if env else "debug", host=socket.gethostname(), pid=os.getpid(),
                     requeues=self.requeues + 1,
                     note="preempted or timed out: requeued, resumes from last.pt")
        return submitit.helpers.DelayedSubmission(RunTask(self.requeues + 1), argv, run_name, state_dir, cwd)


# -- launching ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def importable_from_tasks():
    """PYTHONPATH with this repository while jobs are submitted: the task processes (local
    subprocesses, SLURM jobs, which inherit the environment) import sweep and main_clip from it."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *([old] if old else [])])
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def todo(sweep: Sweep) -> tuple[list[Run], list[str]]:
    """The runs a launch submits (not finished, not live elsewhere) and one line per other run."""
    runs, skipped = [], []
    for run in sweep.runs:
        status = run_status(sweep, run)
        if status["state"] == "finished":
            skipped.append(f"{run.name}: finished")
        elif status["state"] == "running" or status.get("queued"):
            skipped.append(f"{run.name}: {status['state']} ({status['note']})")
        else:
            runs.append(run)
    return runs, skipped


def local_gpus(text: str | None) -> list[int]:
    """--gpus: 'none', a comma list of device ids, or (None) every visible CUDA device."""
    if text == "none":
        return []
    if text is not None:
        try:
            return [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise SweepError(f"--gpus {text!r}: device ids separated by commas, or none") from None
    import torch
    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        try:
            return [int(part) for part in visible.split(",") if part.strip()]
        except ValueError:
            raise SweepError(f"CUDA_VISIBLE_DEVICES={visible} names devices by UUID: give --gpus 0,1,... "
                             f"(the ids the local executor then makes visible)") from None
    return list(range(torch.cuda.device_count()))


def local_slots(gpus: list[int], gpus_per_run: int, parallel: int | None) -> list[tuple[int, ...]]:
    """The GPUs of each run at once: one slot per ``gpus_per_run`` GPUs, or ``parallel`` CPU slots."""
    if not gpus:
        return [()] * (parallel or 1)
    per_run = max(gpus_per_run, 1)
    slots = [tuple(gpus[i:i + per_run]) for i in range(0, len(gpus) - per_run + 1, per_run)]
    if not slots:
        raise SweepError(f"--gpus-per-run {per_run}: this machine offers {len(gpus)} GPU(s) ({gpus})")
    return slots[:parallel] if parallel else slots


def task_args(sweep: Sweep, run: Run, gpu_flag: bool) -> tuple:
    argv = run.argv + (["--gpu=0"] if gpu_flag else [])   # the run's devices are the visible ones
    return argv, run.name, str(sweep.state_dir.resolve()), os.getcwd()


def _last_log_line(path: Path) -> str | None:
    try:
        lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    except OSError:
        return None
    return lines[-1].strip() if lines else None


def _outcome_line(sweep: Sweep, run: Run, failure: BaseException | None = None) -> tuple[bool, str]:
    """Whether the run is finished, and the line that says so (or its error)."""
    status = run_status(sweep, run)
    if status["state"] == "finished":
        return True, f"finished {run.name}: val mAP {_fmt(status['val'])}, test mAP {_fmt(status['test'])}"
    error = status.get("error")
    if not error and failure is not None:    # the task failed before recording (a bad flag, an import error)
        error = error_line(failure)
    return False, f"failed {run.name}: {error or status['note'] or 'no outcome recorded'}"


def _job_failure(job) -> BaseException | None:
    try:
        return job.exception()
    except Exception as error:   # no result pickle: the job was killed
        return error


def launch_debug(sweep: Sweep, runs: list[Run]) -> list[bool]:
    """submitit's debug executor: each run in this process, one after another (Ctrl-C stops the
    sweep; its run resumes at the next launch)."""
    executor = submitit.AutoExecutor(folder=sweep.state_dir / "jobs", cluster="debug")
    results = []
    for number, run in enumerate(runs, 1):
        print(f"[{number}/{len(runs)}] {run.name}", flush=True)
        job = executor.submit(RunTask(), *task_args(sweep, run, gpu_flag=False))
        failure = job.exception()   # runs it (job.result() would start pdb on an error)
        ok, line = _outcome_line(sweep, run, failure)
        results.append(ok)
        print(f"[{number}/{len(runs)}] {line}", flush=True)
    return results


def launch_local(sweep: Sweep, runs: list[Run], slots: list[tuple[int, ...]], poll_s: float = 0.5) -> list[bool]:
    """submitit's local executor: each run a subprocess, as many at once as there are slots
    (GPUs / --gpus-per-run, or --parallel on CPUs), each slot's GPUs made visible to its run."""
    executor = submitit.AutoExecutor(folder=sweep.state_dir / "jobs", cluster="local")
    tasks = max(sweep.gpus_per_run, 1)
    executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN, tasks_per_node=tasks, name=f"sweep-{sweep.name}")
    queue = list(enumerate(runs, 1))
    running: dict[int, tuple] = {}
    results: dict[int, bool] = {}
    try:
        with importable_from_tasks():
            while queue or running:
                for slot, gpus in enumerate(slots):
                    if slot in running or not queue:
                        continue
                    number, run = queue.pop(0)
                    executor._executor.update_parameters(gpus_per_node=len(gpus), visible_gpus=gpus)
                    job = executor.submit(RunTask(), *task_args(sweep, run, gpu_flag=bool(gpus)))
                    running[slot] = (number, run, job)
                    where = f"GPU {','.join(map(str, gpus))}" if gpus else "CPU"
                    print(f"[{number}/{len(runs)}] {run.name} ({where}, job {job.job_id})", flush=True)
                time.sleep(poll_s)
                for slot, (number, run, job) in list(running.items()):
                    if job.done():
                        del running[slot]
                        results[number], line = _outcome_line(sweep, run, _job_failure(job))
                        print(f"[{number}/{len(runs)}] {line}", flush=True)
    except KeyboardInterrupt:
        for number, run, job in running.values():
            job.cancel()   # SIGINT: the run stops, last.pt holds its last epoch
        print(f"interrupted: {len(running)} run(s) stopped; launch the sweep again to resume them", file=sys.stderr)
        raise
    return [results[number] for number in sorted(results)]


def slurm_executor(sweep: Sweep, options: argparse.Namespace) -> submitit.AutoExecutor:
    """The AutoExecutor (cluster="slurm") a launch submits through: one job-array task per run,
    ``gpus_per_run`` tasks (processes) of one GPU each per run; nothing is submitted here."""
    try:
        executor = submitit.AutoExecutor(folder=sweep.state_dir / "jobs", cluster="slurm",
                                         slurm_max_num_timeout=options.max_num_timeout)
    except RuntimeError as error:   # submitit finds no srun
        raise SweepError(f"--executor slurm: {error} (run the launch on a SLURM login node)") from error
    gpus = sweep.gpus_per_run
    additional = {}
    for item in options.slurm_additional or []:
        key, _, value = item.partition("=")
        if not key or not _:
            raise SweepError(f"--slurm-additional {item!r}: KEY=VALUE (an sbatch option without its dashes)")
        additional[key] = value
    parameters = dict(name=options.job_name or f"sweep-{sweep.name}", timeout_min=options.time, nodes=1,
                      tasks_per_node=max(gpus, 1), gpus_per_node=gpus or None, cpus_per_task=options.cpus_per_task,
                      mem_gb=options.mem_gb, slurm_partition=options.partition, slurm_account=options.account,
                      slurm_qos=options.qos, slurm_constraint=options.constraint,
                      slurm_array_parallelism=options.array_parallelism, slurm_setup=options.setup or None,
                      slurm_additional_parameters=additional or None)
    executor.update_parameters(**{key: value for key, value in parameters.items() if value is not None})
    return executor


def sbatch_preview(executor: submitit.AutoExecutor, runs: int) -> str:
    """The sbatch script submitit writes for ``runs`` runs (an array when more than one)."""
    from submitit.slurm.slurm import _make_sbatch_string

    inner = executor._executor
    return _make_sbatch_string(command=inner._submitit_command_str, folder=inner.folder,
                               **{**inner.parameters, **({"map_count": runs} if runs > 1 else {})})


def launch_slurm(sweep: Sweep, runs: list[Run], options: argparse.Namespace) -> list:
    """Submit the runs as one SLURM job array (at most --array-parallelism at once); returns the
    jobs. Each task runs its run, is requeued on preemption or timeout, and records its outcome."""
    executor = slurm_executor(sweep, options)
    task = RunTask()
    arguments = [task_args(sweep, run, gpu_flag=sweep.gpus_per_run > 0) for run in runs]
    with importable_from_tasks():
        jobs = executor.map_array(task, *zip(*arguments))
    for run, job in zip(runs, jobs):
        write_record(sweep.state_dir, run.name, state="submitted", job_id=job.job_id, executor="slurm")
    return jobs


# -- status and selection ------------------------------------------------------------------------------

def _fmt(value) -> str:
    return "n/a" if not isinstance(value, (int, float)) or not math.isfinite(value) else f"{value:.2f}"


def _alive(record: dict) -> bool | None:
    """Whether the task that wrote ``record`` still runs: its process on this host; on another
    host, its SLURM job's state (None: unknown)."""
    if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
        try:
            os.kill(record["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return _slurm_alive(record)


SLURM_LIVE = {"PENDING", "RUNNING", "REQUEUED", "RESIZING", "SUSPENDED", "CONFIGURING", "COMPLETING", "REQUEUE_HOLD",
              "REQUEUE_FED"}


def _slurm_alive(record: dict) -> bool | None:
    import shutil
    if not record.get("job_id") or shutil.which("sacct") is None:
        return None
    try:
        state = submitit.SlurmJob(folder=".", job_id=str(record["job_id"])).state
    except Exception:   # no accounting: unknown
        return None
    state = str(state).split()[0].upper() if state else "UNKNOWN"
    return None if state == "UNKNOWN" else state in SLURM_LIVE


def run_status(sweep: Sweep, run: Run) -> dict:
    """finished / running / failed / pending, with a note, the error line of a failed run, the
    results of a finished one, and ``queued``: a live SLURM job will run it (a launch skips it)."""
    run_dir = sweep.output_dir / run.name
    summary = finished_summary(run_dir, run.config)
    if summary is not None:
        saved = read_json(run_dir / "config.json") or {}
        note = f"ran {saved['epochs']} epochs (sweep: {run.config['epochs']})" \
            if saved.get("epochs") not in (None, run.config["epochs"]) else ""
        return {"state": "finished", "note": note, "val": summary.get("best_val_map"),
                "test": summary.get("best_test_map")}
    record = read_json(record_path(sweep.state_dir, run.name)) or {}
    state = record.get("state")
    started = rundir.is_started(run_dir)
    job = f"job {record['job_id']}" if record.get("job_id") else ""
    interrupted = "started, not finished: a launch resumes it" if started else ""
    if state == "running":
        alive = _alive(record)
        if alive is False:
            log = _last_log_line(submitit.core.utils.JobPaths(sweep.state_dir / "jobs", record["job_id"], 0).stderr) \
                if record.get("job_id") else None
            return {"state": "failed", "note": job, "error": "the task ended without recording an outcome (killed?)"
                    + (f"; last log line: {log}" if log else "")}
        return {"state": "running", "note": ", ".join(filter(None, [job, record.get("host"), "resumed" if
                                                                     record.get("resumed") else ""]))}
    if state in ("failed", "interrupted"):
        return {"state": "failed", "note": job, "error": record.get("error")}
    if state in ("submitted", "requeued") and record.get("executor") == "slurm":
        alive = _slurm_alive(record)
        if alive is False:
            return {"state": "failed", "note": job, "error": f"SLURM {job} ended without recording an outcome"}
        what = "requeued after preemption or timeout" if state == "requeued" else "queued"
        return {"state": "pending", "note": f"{what} as {job}" + ("" if alive else " (SLURM state unknown)"),
                "queued": bool(alive)}
    if state == "requeued":   # the local executor restarts a requeued task at once: this one was not
        return {"state": "pending", "note": "requeued, never restarted: a launch resumes it"}
    return {"state": "pending", "note": interrupted}


def status_table(sweep: Sweep) -> tuple[str, dict[str, int]]:
    statuses = [(run, run_status(sweep, run)) for run in sweep.runs]
    counts = {state: sum(status["state"] == state for _, status in statuses) for state in STATES}
    header = ["run", "state", *sweep.columns, "val mAP", "test mAP", "note"]
    body = [[run.name, status["state"], *(_show(run.config.get(column)) for column in sweep.columns),
             _fmt(status.get("val")), _fmt(status.get("test")), status.get("note") or ""]
            for run, status in statuses]
    text = f"sweep {sweep.name}: {len(sweep.runs)} runs in {sweep.output_dir}: " + \
        ", ".join(f"{counts[state]} {state}" for state in STATES) + "\n\n" + _table(header, body)
    failed = [(run, status) for run, status in statuses if status["state"] == "failed"]
    if failed:
        text += "\n\nfailed runs (the last error line):\n" + "\n".join(
            f"  {run.name}: {status.get('error') or 'no error recorded'}" + (f" ({status['note']})" if status["note"]
                                                                              else "") for run, status in failed)
    return text + "\n", counts


def _show(value) -> str:
    return "-" if value is None else str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip()
                     for line in [header, ["-" * width for width in widths], *rows])


# Settings that a selection group does not compare: where a run is and how it is run.
_NOT_COMPARED = rundir.LOCATION_SETTINGS | rundir.RESUMABLE_CHANGES | {"cache_dir"}


def selection(sweep: Sweep) -> dict:
    """Per (method, dataset, seed) and the values of the other non-grid settings: the grid point
    with the best val mAP (best_val_map of summary.json; the first in sweep order on a tie), its
    test mAP, and every candidate. A group with unfinished points is marked incomplete."""
    if not sweep.select_by:
        raise SweepError(f"sweep {sweep.name} has no grid selection: give --select-by val (and --grid)")
    groups: dict[str, list[Run]] = {}
    for run in sweep.runs:
        key = {k: v for k, v in run.config.items() if k not in _NOT_COMPARED and k not in sweep.grid}
        groups.setdefault(json.dumps(key, sort_keys=True, default=str), []).append(run)
    entries = []
    for runs in groups.values():
        first = runs[0].config
        candidates, best = [], None
        for run in runs:
            status = run_status(sweep, run)
            val = status.get("val") if status["state"] == "finished" else None
            candidate = {"run": run.name, "settings": {k: run.config[k] for k in sweep.grid}, "state": status["state"],
                         "val_map": val, "test_map": status.get("test") if val is not None else None}
            candidates.append(candidate)
            if isinstance(val, (int, float)) and math.isfinite(val) and (best is None or val > best["val_map"]):
                best = candidate
        entries.append({"method": first["method"], "dataset": first["dataset"], "model": first["model"],
                        "seed": first["seed"],
                        "axes": {k: first[k] for k in sweep.columns if k not in IDENTITY and k not in sweep.grid},
                        "selected": best["run"] if best else None, "settings": best["settings"] if best else None,
                        "val_map": best["val_map"] if best else None, "test_map": best["test_map"] if best else None,
                        "finished": sum(c["val_map"] is not None for c in candidates), "grid_points": len(candidates),
                        "complete": all(c["val_map"] is not None for c in candidates), "candidates": candidates})
    return {"sweep": sweep.name, "select_by": sweep.select_by, "grid": sweep.grid, "groups": entries}


def selection_text(content: dict) -> str:
    header = ["method", "dataset", "seed", "selected", *content["grid"], "val mAP", "test mAP", "grid points"]
    body = [[group["method"], group["dataset"], group["seed"], group["selected"] or "-",
             *(_show((group["settings"] or {}).get(k)) for k in content["grid"]), _fmt(group["val_map"]),
             _fmt(group["test_map"]), f"{group['finished']}/{group['grid_points']}"]
            for group in content["groups"]]
    return (f"grid selection by {content['select_by']} mAP over {', '.join(content['grid'])} "
            f"(sweep {content['sweep']}):\n" + _table(header, body) + "\n")


def write_selection(sweep: Sweep) -> Path:
    atomic_write_json(sweep.selection_file, selection(sweep))
    return sweep.selection_file


# -- the command line ---------------------------------------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sweep.py", description="Sweeps of main_clip.py runs through submitit: locally or on SLURM. "
        "Flags after -- go to every run (main_clip.py's flags).")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the presets (sweeps/*.json)")
    for name, help_text in (("plan", "the runs, their folders, protocols and states; nothing runs"),
                            ("launch", "run what is not finished (skip finished runs, resume started ones)"),
                            ("status", "finished / running / failed / pending, each failed run's last error line"),
                            ("select", "write the grid selection (best val mAP per method, dataset and seed)")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("sweep", nargs="?", default=None, metavar="SWEEP",
                         help="a preset name, a sweep file, or a launched sweep's folder <output-dir>/sweep_<name>")
        sub.add_argument("--axis", action="append", default=[], metavar="KEY=V1,V2",
                         help="an axis (a main_clip.py setting or flag) and its values ('all': every method or dataset); "
                              "repeatable; replaces the file's axis of that setting")
        sub.add_argument("--name", default=None, help="the sweep's name (default: the file's, or 'sweep')")
        sub.add_argument("--select-by", choices=SELECT_BY, default=None,
                         help="choose per method, dataset and seed the grid point with the best val mAP")
        sub.add_argument("--grid", default=None, metavar="KEY,KEY",
                         help="the settings selected over (default: the axes other than method, dataset, seed, model)")
        sub.add_argument("--gpus-per-run", type=int, default=None,
                         help="GPUs per run (default: the file's, else 1); above 1 a run is that many "
                              "torchrun-style processes; 0: no GPU")
        if name != "launch":
            continue
        sub.add_argument("--executor", choices=("local", "slurm", "debug"), default="local",
                         help="local: subprocesses on this machine; slurm: a job array; debug: in this process")
        sub.add_argument("--dry-run", action="store_true", help="print what would run, and submit nothing")
        local = sub.add_argument_group("local executor")
        local.add_argument("--gpus", default=None, help="GPU ids to use (0,1,2,3), or none (default: every visible GPU)")
        local.add_argument("--parallel", type=int, default=None,
                           help="runs at once (default: one per --gpus-per-run GPUs; one on CPUs)")
        slurm = sub.add_argument_group("slurm executor (submitit's AutoExecutor)")
        slurm.add_argument("--partition", default=None)
        slurm.add_argument("--account", default=None)
        slurm.add_argument("--qos", default=None)
        slurm.add_argument("--constraint", default=None)
        slurm.add_argument("--time", type=int, default=24 * 60, help="minutes per job (default 1440)")
        slurm.add_argument("--cpus-per-task", type=int, default=None)
        slurm.add_argument("--mem-gb", type=float, default=None)
        slurm.add_argument("--array-parallelism", type=int, default=None,
                           help="at most this many runs at once (submitit's default 256)")
        slurm.add_argument("--max-num-timeout", type=int, default=3,
                           help="requeues after timeouts (preemptions are requeued without limit)")
        slurm.add_argument("--setup", action="append", default=[], metavar="COMMAND",
                           help="a shell line before the run (module load, conda activate); repeatable")
        slurm.add_argument("--slurm-additional", action="append", default=[], metavar="KEY=VALUE",
                           help="any other sbatch option; repeatable")
        slurm.add_argument("--job-name", default=None)
        slurm.add_argument("--wait", action="store_true", help="wait for the jobs, then write the selection")
    return parser


def sweep_from(options: argparse.Namespace, extra: list[str]) -> Sweep:
    spec = load_spec(options.sweep)
    if options.sweep is None and not options.axis and not extra:
        raise SweepError("give a SWEEP (a preset, a file, a sweep folder) or --axis KEY=V1,V2 (python sweep.py list)")
    spec = dict(spec)
    axes = {setting_of(key): values for key, values in (spec.get("axes") or {}).items()}
    for item in options.axis:   # replaces the file's axis of the same setting
        key, _, values = item.partition("=")
        if not key or not _:
            raise SweepError(f"--axis {item!r}: KEY=V1,V2")
        axes[setting_of(key)] = values if values == "all" else values.split(",")
    if axes:
        spec["axes"] = axes
    for key in ("name", "select_by", "gpus_per_run"):
        if getattr(options, key) is not None:
            spec[key] = getattr(options, key)
    if options.grid is not None:
        spec["grid"] = [key for key in options.grid.split(",") if key]
    sweep = build_sweep(spec, extra)
    for note in sweep.notes:
        print(f"note: {note}", file=sys.stderr)
    return sweep


def plan_text(sweep: Sweep) -> str:
    protocol = ("lr", "bsize", "epochs", "optimizer", "patience", "max_drop")
    header = ["run", "state", *sweep.columns, *(k for k in protocol if k not in sweep.columns)]
    body = [[run.name, run_status(sweep, run)["state"], *(_show(run.config.get(k)) for k in sweep.columns),
             *(_show(run.config.get(k)) for k in protocol if k not in sweep.columns)] for run in sweep.runs]
    return (f"sweep {sweep.name}: {len(sweep.runs)} runs into {sweep.output_dir}"
            + (f" ({sweep.description})" if sweep.description else "") + "\n" + _table(header, body) + "\n")


def launch(sweep: Sweep, options: argparse.Namespace) -> int:
    runs, skipped = todo(sweep)
    print(f"sweep {sweep.name}: {len(sweep.runs)} runs, {len(runs)} to run, {len(skipped)} skipped "
          f"({options.executor} executor)", flush=True)
    for line in skipped:
        print(f"  skip {line}")
    if options.dry_run:
        for run in runs:
            print(f"  run  {run.name}: python main_clip.py {shlex.join(run.argv)}"
                  + (" --resume" if rundir.is_started(sweep.output_dir / run.name) else ""))
        if runs and options.executor == "slurm":
            print("the sbatch script submitit would submit:\n" + sbatch_preview(slurm_executor(sweep, options), len(runs)))
        return 0
    sweep.state_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(sweep.state_dir / "sweep.json", sweep.saved_form())
    results: list[bool] = []
    if runs and options.executor == "slurm":
        jobs = launch_slurm(sweep, runs, options)
        print(f"submitted {len(jobs)} run(s) to SLURM: job {jobs[0].job_id.split('_')[0]}"
              + (" (an array)" if len(jobs) > 1 else ""))
        if not options.wait:
            print(f"follow: python sweep.py status {sweep.state_dir}")
            if sweep.select_by:
                print(f"when they are done: python sweep.py select {sweep.state_dir}")
            return 0
        for run, job in zip(runs, jobs):
            job.wait()
            ok, line = _outcome_line(sweep, run, _job_failure(job))
            results.append(ok)
            print(line, flush=True)
    elif runs and options.executor == "debug":
        results = launch_debug(sweep, runs)
    elif runs:
        gpus = local_gpus(options.gpus) if sweep.gpus_per_run > 0 else []
        slots = local_slots(gpus, sweep.gpus_per_run, options.parallel)
        results = launch_local(sweep, runs, slots)
    if sweep.select_by:
        path = write_selection(sweep)
        print(selection_text(read_json(path)) + f"selection written to {path}")
    failed = results.count(False)
    print(f"sweep {sweep.name}: {results.count(True)} run(s) finished now, {failed} failed, {len(skipped)} skipped; "
          f"python sweep.py status {sweep.state_dir}; python instrumentation.py {sweep.output_dir}")
    return 1 if failed else 0


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """sweep.py's own arguments, and the main_clip.py flags after '--'."""
    if "--" in argv:
        index = argv.index("--")
        return argv[:index], argv[index + 1:]
    return argv, []


def main(argv: list[str] | None = None) -> int:
    own, extra = split_argv(list(sys.argv[1:] if argv is None else argv))
    options = get_args_parser().parse_args(own)
    if options.command == "list":
        for name, path in presets().items():
            spec = load_spec(str(path))
            print(f"{name:<12} {spec.get('description', '')}")
        return 0
    sweep = sweep_from(options, extra)
    if options.command == "plan":
        print(plan_text(sweep), end="")
        return 0
    if options.command == "status":
        text, _ = status_table(sweep)
        print(text, end="")
        if sweep.selection_file.is_file():
            print("\n" + selection_text(read_json(sweep.selection_file)), end="")
        return 0
    if options.command == "select":
        path = write_selection(sweep)
        print(selection_text(read_json(path)) + f"written to {path}")
        return 0
    return launch(sweep, options)


def cli(argv: list[str] | None = None) -> int:
    try:
        return main(argv)
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    import sweep as _module  # RunTask pickled as sweep.RunTask (by reference), not as __main__'s copy

    sys.exit(_module.cli())
