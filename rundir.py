"""The run folder: where a run lives, and the rules that keep it whole (docs/DESIGN.md §7).

A run folder is either a started run (``last.pt`` exists: ``--resume`` continues it) or not yet
one (only files a run writes before its first checkpoint: the same command starts it again).
While a run works in it, it holds an exclusive lock on the folder, so a second run into the
same folder stops with one line instead of interleaving its files.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from errors import RunError

LAST = "last.pt"
# What a run writes into its folder (temporary files of atomic writes are ".<name>.*.tmp").
RUN_FILES = frozenset({"config.json", "log.txt", "metrics.jsonl", "summary.json", LAST, "best.pt"})


def _model_selection_before_the_flag(config: dict) -> str:
    """Before --model-selection every epoch of every stage competed. With one stage that is its
    final stage; linear_init, the one multi-stage mode then, selected over both stages."""
    return "all_stages" if config.get("train_mode") == "linear_init" else "final_stage"


# Settings newer than some run folders' config.json, with the value the runs that lack them used
# (a resume fills them in; the summariser groups such runs with those that record the value): a
# value, or a function of the older config.json when the value depended on other settings.
ADDED_SETTINGS = {"teacher": "ViT-L-14-336", "deterministic": False, "head_bsize": None, "head": "linear",
                  "sync_bn": False, "model_selection": _model_selection_before_the_flag,
                  # --lr-schedule and its warm-up: a constant rate (methods.base.ADDED_PROTOCOL_DEFAULTS).
                  "lr_schedule": "constant", "lr_warmup_epochs": 0, "lr_warmup_lr": 1e-5,
                  # --augmentation: the horizontal flip (the same table).
                  "augmentation": "flip"}
# Settings that may change when a run is resumed without changing what it computes.
RESUMABLE_CHANGES = frozenset({"resume", "epochs", "num_workers", "gpu", "test_every_epoch", "amp", "deterministic",
                               "image_cache"})
# Where the run folder is and how it was reached: they may differ from config.json (a moved folder).
LOCATION_SETTINGS = frozenset({"run_name", "output_dir", "config"})


# Settings recorded under another name by older versions: old name -> name now.
RENAMED_SETTINGS = {"loss": "method"}


def renamed_settings(record: dict) -> dict:
    """``record`` (a config.json, a checkpoint's configuration or a summary.json) with the settings
    older versions recorded under another name under their names now."""
    return {RENAMED_SETTINGS.get(key, key) if RENAMED_SETTINGS.get(key) not in record else key: value
            for key, value in record.items()}


def with_added_settings(config: dict) -> dict:
    """``config`` (a run's config.json) under today's names (``renamed_settings``), with the value
    of each ``ADDED_SETTINGS`` entry it lacks."""
    config = renamed_settings(config)
    added = {key: value(config) if callable(value) else value for key, value in ADDED_SETTINGS.items()
             if key not in config}
    return {**added, **config}


def run_dir_for(output_dir: str | os.PathLike, run_name: str) -> Path:
    """``output_dir / run_name`` after checking that the name stays inside ``output_dir``."""
    if not run_name or run_name in (".", "..") or "/" in run_name or os.sep in run_name \
            or (os.altsep and os.altsep in run_name):
        raise RunError(f"--run-name {run_name!r}: give a plain folder name (no path separators); "
                       f"runs go under --output-dir")
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise RunError(f"--output-dir {output_dir} is a file, not a folder")
    return output_dir / run_name


def is_started(run_dir: Path) -> bool:
    return (run_dir / LAST).is_file()


def _is_temp_file(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".tmp") and \
        any(path.name.startswith(f".{name}.") for name in RUN_FILES)


def foreign_files(run_dir: Path) -> list[str]:
    """Files in ``run_dir`` that no run writes (a folder holding them is not a run's)."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir()
                  if p.name not in RUN_FILES and not _is_temp_file(p) and not p.name.startswith("eval_"))


def result_files(run_dir: Path) -> list[str]:
    """The files in ``run_dir`` that hold a run's results: best.pt, summary.json, evaluations and
    a metrics log with records (a run that stopped before its first checkpoint leaves none)."""
    if not run_dir.is_dir():
        return []
    found = [p.name for p in sorted(run_dir.iterdir())
             if p.name in ("best.pt", "summary.json") or (p.name.startswith("eval_") and p.suffix == ".json")]
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append(metrics.name)
    return found


def changed_settings(saved: dict, config: dict, joiner: str = " -> ") -> list[str]:
    """'key: saved -> config' for each setting on which the two differ and that changes what a run
    computes (not a resumable change, not the folder's location), in key order. A setting recorded
    as None and one not recorded are the same unset setting."""
    def shown(settings: dict, key: str) -> str:
        return repr(settings[key]) if key in settings else "unset"
    keys = sorted((set(saved) | set(config)) - RESUMABLE_CHANGES - LOCATION_SETTINGS)
    return [f"{key}: {shown(saved, key)}{joiner}{shown(config, key)}" for key in keys if saved.get(key) != config.get(key)]


def clear_unstarted(run_dir: Path) -> list[str]:
    """Remove what a run left before its first checkpoint (nothing else); the names removed."""
    if is_started(run_dir):
        raise RuntimeError(f"{run_dir} holds a started run")
    if result_files(run_dir):
        raise RuntimeError(f"{run_dir} holds results ({', '.join(result_files(run_dir))})")
    removed = []
    for path in sorted(run_dir.iterdir()):
        if path.name in RUN_FILES or _is_temp_file(path):
            path.unlink()
            removed.append(path.name)
    return removed


def remove_temp_files(run_dir: Path) -> list[str]:
    """Temporary files of writes that a killed run never finished (only with the lock held)."""
    removed = []
    for path in sorted(run_dir.iterdir()):
        if _is_temp_file(path):
            path.unlink()
            removed.append(path.name)
    return removed


class RunFolderLock:
    """An exclusive, non-blocking lock on the run folder for the life of a run (flock on the
    folder itself: released when the process ends, however it ends)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._fd: int | None = None

    def __enter__(self) -> RunFolderLock:
        fd = os.open(self.run_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunError(f"run folder {self.run_dir} is in use by another run; wait for it to finish or "
                           f"choose another --run-name") from None
        self._fd = fd
        return self

    def __exit__(self, *exc_info) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
