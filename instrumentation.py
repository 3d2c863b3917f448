"""The run logger (docs/DESIGN.md §7) and the names of the run files it writes.

``RunLogger`` collects one phase's predictions and labels into preallocated arrays, scores them
with ``metrics.py`` against the clean and the observed labels, keeps the best epoch (strictly
higher val mAP) and writes the run files: ``log.txt`` (the console lines), ``metrics.jsonl``
(one JSON object per phase and epoch) and ``summary.json``.

``python instrumentation.py RESULTS_DIR...`` runs the results summariser, which reads those files
back (``reading/cli.py``; the summariser, its paper table and plots are in ``reading/``).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import fileio
import metrics

PHASES = ("train", "val", "test")
LOG_FILE = "log.txt"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"


def _to_numpy(array: Any) -> np.ndarray:
    """numpy view of a numpy array, list or torch tensor (any device), without importing torch."""
    if hasattr(array, "detach"):
        array = array.detach()
        if array.is_floating_point():
            # float16 / bfloat16 have no (or no exact) numpy counterpart; scores are kept as float32.
            array = array.float()
        return array.cpu().numpy()
    return np.asarray(array)


def format_value(value: float | None, decimals: int = 3) -> str:
    """'n/a' for a missing value: the log lines' and the summariser's tables' convention."""
    return "n/a" if value is None else f"{value:.{decimals}f}"


class RunLogger:
    """Per-phase metrics, best-epoch tracking and the run files of one run directory."""

    def __init__(self, run_dir: Path, *, resume: bool = False, echo: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.echo = echo
        self.resume = resume
        self._log_file = open(self.run_dir / LOG_FILE, "a" if resume else "w", encoding="utf-8")
        self._metrics_path = self.run_dir / METRICS_FILE
        if resume:
            text = self._metrics_path.read_text(encoding="utf-8") if self._metrics_path.exists() else ""
            lines = _complete_lines(text)
            if text and not text.endswith("\n"):
                # A torn last line (crash mid-write): drop it so the next append starts a clean line.
                fileio.atomic_write_text(self._metrics_path, "".join(line + "\n" for line in lines))
            self._metrics_lines = len(lines)
        else:
            # A fresh run starts a fresh metrics log (a leftover one belongs to an older run).
            fileio.atomic_write_text(self._metrics_path, "")
            self._metrics_lines = 0
        self.best_epoch: int | None = None
        self.best_val_map: float | None = None
        self.best_test_map: float | None = None
        self.best_test_ap: list[float] | None = None
        self.epochs_run = 0
        self.last_ap_clean: np.ndarray | None = None
        self._phase: dict | None = None

    # -- console and log.txt ------------------------------------------------------------------
    def log(self, message: str) -> None:
        """One line to the console (when echo) and to log.txt, flushed at once."""
        if self.echo:
            print(message, flush=True)
        self._log_file.write(message + "\n")
        self._log_file.flush()

    # -- one phase --------------------------------------------------------------------------------
    def begin_phase(self, phase: str, epoch: int, num_examples: int, num_classes: int) -> None:
        """Start a phase: preallocate its arrays and start its timer."""
        if phase not in PHASES:
            raise ValueError(f"RunLogger.begin_phase: phase must be one of {PHASES}, got {phase!r}")
        if self._phase is not None:
            raise RuntimeError(f"RunLogger.begin_phase({phase!r}) while phase "
                               f"{self._phase['phase']!r} has not ended (call end_phase first)")
        self._phase = {
            "phase": phase, "epoch": int(epoch), "start": time.perf_counter(),
            "scores": np.zeros((num_examples, num_classes), dtype=np.float32),
            "clean": np.zeros((num_examples, num_classes), dtype=np.float32),
            "observed": np.zeros((num_examples, num_classes), dtype=np.float32),
            "recorded": np.zeros(num_examples, dtype=bool),
            "loss_sum": 0.0, "loss_count": 0,
        }

    def record_batch(self, indices, scores, clean_labels, observed_labels, loss: float | None = None) -> None:
        """Store one batch; ``indices`` are positions 0..num_examples-1 within the phase.

        ``loss`` is the batch's mean loss; the phase loss is its mean over examples (as the original).
        """
        state = self._require_phase("record_batch")
        indices = _to_numpy(indices).astype(np.int64, copy=False).reshape(-1)
        batch = {"scores": _to_numpy(scores), "clean": _to_numpy(clean_labels),
                 "observed": _to_numpy(observed_labels)}
        num_examples, num_classes = state["scores"].shape
        for name, values in batch.items():
            if values.shape != (len(indices), num_classes):
                raise ValueError(f"RunLogger.record_batch: {name} has shape {values.shape}, expected "
                                 f"({len(indices)}, {num_classes}) for {len(indices)} indices")
        if len(indices) and (indices.min() < 0 or indices.max() >= num_examples):
            raise ValueError(f"RunLogger.record_batch: indices must lie in [0, {num_examples}), "
                             f"got {indices.min()}..{indices.max()}")
        for name, values in batch.items():
            state[name][indices] = values
        state["recorded"][indices] = True
        if loss is not None:
            state["loss_sum"] += float(loss) * len(indices)
            state["loss_count"] += len(indices)

    def end_phase(self) -> dict:
        """Score the phase, log its line, append it to metrics.jsonl and return that record."""
        state = self._require_phase("end_phase")
        self._phase = None
        recorded = state["recorded"]
        num_recorded = int(recorded.sum())
        scores, clean, observed = state["scores"], state["clean"], state["observed"]
        if num_recorded < len(recorded):
            # Score what was seen rather than zeros; say so, since the numbers cover fewer images.
            self.log(f"[{state['phase']}] note: {num_recorded} of {len(recorded)} examples recorded; "
                     f"metrics use those only")
            scores, clean, observed = scores[recorded], clean[recorded], observed[recorded]
        clean_metrics, ap_clean = metrics.metrics_and_ap(scores, clean)
        observed_metrics = metrics.compute_metrics(scores, observed)
        loss = state["loss_sum"] / state["loss_count"] if state["loss_count"] else None
        time_min = (time.perf_counter() - state["start"]) / 60.0
        record = {"epoch": state["epoch"], "phase": state["phase"], "time_min": time_min, "loss": loss,
                  "num_examples": num_recorded, "clean": clean_metrics, "observed": observed_metrics,
                  "ap_clean": [100.0 * float(ap) for ap in ap_clean]}
        self.log(f"[{state['phase']}] time: {time_min:.2f} min, loss: {format_value(loss)}, "
                 f"map_clean: {clean_metrics['map']:.3f}, map_observed: {observed_metrics['map']:.3f}")
        self._append_metrics(record)
        self.last_ap_clean = ap_clean
        if state["phase"] in ("train", "val"):
            self.epochs_run = max(self.epochs_run, state["epoch"])
        return record

    # -- model selection ----------------------------------------------------------------------------
    def update_best(self, epoch: int, val_map: float) -> bool:
        """Record ``epoch`` as the new best when ``val_map`` is strictly higher (NaN never is)."""
        val_map = float(val_map)
        if math.isnan(val_map) or (self.best_val_map is not None and not val_map > self.best_val_map):
            return False
        self.best_epoch, self.best_val_map = int(epoch), val_map
        # The previous best's test result no longer applies; set_best_test brings the new one.
        self.best_test_map, self.best_test_ap = None, None
        return True

    def restart_selection(self) -> None:
        """Forget the best epoch so far: only the epochs from here on compete (a later training
        stage under --model-selection final_stage)."""
        self.best_epoch = self.best_val_map = self.best_test_map = self.best_test_ap = None

    def set_best_test(self, test_result: dict) -> None:
        """Keep the test ``end_phase`` record of the best epoch as the run's reported result."""
        if test_result.get("phase") != "test" or test_result.get("epoch") != self.best_epoch:
            raise ValueError(f"RunLogger.set_best_test: expected the test record of the best epoch "
                             f"{self.best_epoch}, got phase {test_result.get('phase')!r} epoch "
                             f"{test_result.get('epoch')!r}")
        self.best_test_map = float(test_result["clean"]["map"])
        self.best_test_ap = [float(ap) for ap in test_result["ap_clean"]]

    # -- end of run ---------------------------------------------------------------------------------
    def finish(self, config: dict, extra: dict | None = None) -> dict:
        """Log the three final lines and write summary.json atomically; return the summary."""
        self.log(f"Best epoch: {self.best_epoch if self.best_epoch is not None else 'n/a'}")
        self.log(f"Best epoch validation score: {format_value(self.best_val_map)}")
        self.log(f"Best epoch test score: {format_value(self.best_test_map)}")
        summary = {"dataset": config.get("dataset"), "model": config.get("model"), "method": config.get("method"),
                   "seed": config.get("seed"), "best_epoch": self.best_epoch,
                   "best_val_map": self.best_val_map, "best_test_map": self.best_test_map,
                   "test_ap_per_class": self.best_test_ap, "epochs_run": self.epochs_run, **(extra or {})}
        fileio.atomic_write_json(self.run_dir / SUMMARY_FILE, summary)
        return summary

    # -- resume -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Best-so-far state for a checkpoint (plain Python types: loads with weights_only=True)."""
        return {"best_epoch": self.best_epoch, "best_val_map": self.best_val_map,
                "best_test_map": self.best_test_map, "best_test_ap": self.best_test_ap,
                "epochs_run": self.epochs_run, "metrics_lines": self._metrics_lines}

    def load_state_dict(self, state: dict) -> None:
        """Restore the best-so-far state; drop metrics.jsonl lines written after that checkpoint
        (a crash between a phase and the next checkpoint would otherwise repeat those phases)."""
        self.best_epoch = state["best_epoch"]
        self.best_val_map = state["best_val_map"]
        self.best_test_map = state["best_test_map"]
        self.best_test_ap = state["best_test_ap"]
        self.epochs_run = state["epochs_run"]
        keep = int(state.get("metrics_lines", self._metrics_lines))
        if self._metrics_lines < keep:
            self.log(f"resume: {METRICS_FILE} has {self._metrics_lines} of the {keep} phase records the checkpoint "
                     f"expects (deleted or cut); the missing ones cannot be restored (summary.json is unaffected)")
        if self._metrics_lines > keep:
            lines = _complete_lines(self._metrics_path.read_text(encoding="utf-8"))[:keep]
            fileio.atomic_write_text(self._metrics_path, "".join(line + "\n" for line in lines))
            self.log(f"resume: {METRICS_FILE} cut back to the {len(lines)} phases of the checkpoint")
            self._metrics_lines = len(lines)

    def close(self) -> None:
        if not self._log_file.closed:
            self._log_file.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- helpers ------------------------------------------------------------------------------------
    def _require_phase(self, caller: str) -> dict:
        if self._phase is None:
            raise RuntimeError(f"RunLogger.{caller} called outside a phase (call begin_phase first)")
        return self._phase

    def _append_metrics(self, record: dict) -> None:
        # A log, so appending is right; flush + fsync so a crash keeps every finished phase.
        with open(self._metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self._metrics_lines += 1


def _complete_lines(text: str) -> list[str]:
    """The newline-terminated lines of ``text``; a torn last line (no newline) is left out."""
    return text.split("\n")[:-1]  # the piece after the last newline is empty or a torn write


if __name__ == "__main__":
    # The command the README documents; the summariser reads run folders, so it lives in reading/.
    from reading import cli

    sys.exit(cli.main())
