"""Plots of run folders (``python instrumentation.py RUNS... --plot OUT_DIR``), drawn headless.

Per run, under ``OUT_DIR/<run name>/``:

* ``map_curves.png``: mAP per epoch of the train, val and test phases, against the clean
  (solid) and the observed (dashed) labels, with the best epoch marked (``metrics.jsonl``);
* ``test_ap_per_class.png``: the test AP of every class at the best epoch (``summary.json``);
* ``pseudo_labels_per_class.png``: for methods with pseudo-labels, their precision and recall
  per class against the clean train labels. The run keeps only their overall precision and
  recall (``summary.json``); the per-class values are recomputed from the teacher embeddings
  the run cached (named in its ``log.txt``; those of the images as they are, not flipped, like
  the run's report), its text features and its ``-t``/``-th``/``-p``, and are drawn only when
  they give back exactly the run's overall numbers.

Across runs, ``OUT_DIR/test_map_by_method.png``: the paper's table as a chart, one panel per
dataset, the test mAP of each method (``summarize.paper_cells``) as its mean with the
sample std over seeds, each seed a dot.
"""
from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")  # headless: no display needed, nothing opens a window
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402

import fileio  # noqa: E402
import instrumentation  # noqa: E402
from reading import summarize  # noqa: E402

PHASE_COLOURS = {"train": "tab:blue", "val": "tab:orange", "test": "tab:green"}
DPI = 110
# "teacher-<view> train: using cached embeddings PATH" / "... wrote PATH (N x 2 x D)" (caches.py);
# runs from before --teacher-view wrote "teacher train: ..." and N x D files.
TEACHER_CACHE_LINE = re.compile(r"^teacher(?:-[\w-]+)? train: (?:using cached embeddings (?P<used>.+)"
                                r"|wrote (?P<wrote>.+) \(\d+(?: x \d+)+\))$")


def _log_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _save(fig, path: Path) -> Path:
    """Write the figure to ``path`` atomically (nothing clipped: the box fits the labels)."""
    fileio.atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=DPI, bbox_inches="tight",
                                                         pad_inches=0.15))
    plt.close(fig)
    return path


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl's records (a torn or corrupt line is skipped); the last record of each
    (phase, epoch) wins, as a resumed run's log may repeat one."""
    path = Path(run_dir) / instrumentation.METRICS_FILE
    if not path.is_file():
        return []
    records: dict[tuple, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("phase") in instrumentation.PHASES and "epoch" in record:
            records[(record["phase"], record["epoch"])] = record
    return sorted(records.values(), key=lambda r: (r["epoch"], instrumentation.PHASES.index(r["phase"])))


def class_names(dataset: str | None, num_classes: int) -> list[str]:
    """The dataset's class names, or 'class <i>' when they are unknown or do not match."""
    import datasets

    if dataset in datasets.DATASETS and datasets.DATASETS[dataset].num_classes == num_classes:
        return list(datasets.DATASETS[dataset].class_names)
    return [f"class {i}" for i in range(num_classes)]


def _title(row: dict) -> str:
    return f"{row['run']}: {row['dataset']}, {row['model']}, {row['method']}, seed {row['seed']}"


def plot_map_curves(records: list[dict], row: dict, best_epoch: int | None, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7.5, 4.2), layout="constrained")
    for phase in instrumentation.PHASES:
        phase_records = [r for r in records if r["phase"] == phase]
        if not phase_records:
            continue
        epochs = [r["epoch"] for r in phase_records]
        for labels, style in (("clean", "-"), ("observed", "--")):
            ax.plot(epochs, [r[labels]["map"] for r in phase_records], style, marker="o", markersize=4,
                    color=PHASE_COLOURS[phase], label=f"{phase}, {labels} labels")
    if best_epoch is not None:
        ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch ({best_epoch})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mAP (%)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.set_title(_title(row), fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return _save(fig, path)


def _class_bars(values: dict[str, list[float]], names: list[str], xlabel: str, title: str, path: Path,
                xmax: float, reference: tuple[float, str] | None = None, notes: list[str] | None = None) -> Path:
    """Horizontal bars per class (class-index order, top to bottom), one colour per series;
    ``notes``: a text per class, right of the axes."""
    num_classes, num_series = len(names), len(values)
    fig, ax = plt.subplots(figsize=(7.0, 1.0 + 0.2 * num_classes * max(1, num_series) ** 0.5), layout="constrained")
    height = 0.8 / num_series
    positions = np.arange(num_classes)
    for i, (label, series) in enumerate(values.items()):
        ax.barh(positions + (i - (num_series - 1) / 2) * height, series, height=height, label=label)
    if reference is not None:
        ax.axvline(reference[0], color="black", linestyle="--", linewidth=1, label=reference[1])
    ax.set_yticks(positions, names, fontsize=8)
    ax.set_ylim(num_classes - 0.5, -0.5)  # first class at the top
    ax.set_xlim(0, 1.02 * xmax)
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=10)
    for y, note in enumerate(notes or []):
        ax.annotate(note, (1.0, y), xycoords=("axes fraction", "data"), xytext=(4, 0), textcoords="offset points",
                    va="center", fontsize=7)
    if num_series > 1 or reference is not None:
        fig.legend(loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    return _save(fig, path)


def pseudo_label_quality(run_dir: Path, config: dict, summary: dict) -> tuple[dict | None, str]:
    """({"precision", "recall", "positives", "true"}: K values each, '') per class, recomputed from the run's
    cached teacher embeddings; (None, why not) when they cannot be had or do not give back the
    run's overall precision and recall."""
    import torch

    import teacher
    from reading import saved_run
    from errors import RunError

    reported = summary.get("pseudo_labels") or {}
    log_path = Path(run_dir) / instrumentation.LOG_FILE
    lines = log_path.read_text(encoding="utf-8").splitlines() if log_path.is_file() else []
    found = [m.group("used") or m.group("wrote") for m in map(TEACHER_CACHE_LINE.match, lines) if m]
    if not found:
        return None, "log.txt names no teacher embedding cache"
    cache = Path(found[-1])
    try:
        with np.load(cache, allow_pickle=False) as contents:
            embeddings = contents["embeddings"]
        if embeddings.ndim == 3:
            embeddings = embeddings[:, 0]  # N x views x D: the report scores the images as they are
        benchmark = saved_run.load_benchmark(saved_run.read_config(run_dir), check_images=False)
        text = teacher.load_text_features(config["text_features"], benchmark.info.num_classes, embeddings.shape[1],
                                          dataset=config["dataset"], teacher=config.get("teacher"))
        if len(embeddings) <= benchmark.train_indices.max():
            return None, f"{cache} has {len(embeddings)} rows, fewer than the official train set"
        rows = torch.nn.functional.normalize(torch.from_numpy(embeddings[benchmark.train_indices]).float(), dim=-1)
        q, _ = teacher.pseudo_labels_from_embeddings(rows, text, config["temp"], config["threshold"],
                                                     config["partial"])
    except (OSError, KeyError, ValueError, RunError) as error:
        return None, f"cannot recompute them ({error})"
    q, clean = q.numpy(), benchmark.train.labels == 1
    overall = teacher.pseudo_label_report(q, benchmark.train.labels)
    for key in ("precision", "recall"):
        if key in reported and not np.isclose(overall[key], reported[key], rtol=0, atol=1e-9):
            return None, (f"{cache} no longer gives the run's pseudo-labels (overall {key} {overall[key]:.4f}, "
                          f"the run reported {reported[key]:.4f})")
    positive = q == 1
    hits = (positive & clean).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(positive.sum(axis=0) > 0, hits / positive.sum(axis=0), 0.0)
        recall = np.where(clean.sum(axis=0) > 0, hits / clean.sum(axis=0), 0.0)
    return {"precision": precision.tolist(), "recall": recall.tolist(),
            "positives": positive.sum(axis=0).tolist(), "true": clean.sum(axis=0).tolist()}, ""


def plot_run(row: dict, out_dir: Path, log: Callable[[str], None] = _log_stderr) -> list[Path]:
    """The plots of one run (a row of ``summarize.read_runs``) under ``out_dir``."""
    run_dir = Path(row["run_path"])
    summary, _ = summarize.read_json(run_dir / instrumentation.SUMMARY_FILE)
    summary = summary or {}
    written = []
    records = read_metrics(run_dir)
    if records:
        written.append(plot_map_curves(records, row, summary.get("best_epoch"), out_dir / "map_curves.png"))
    else:
        log(f"{run_dir}: no mAP curves (no readable {instrumentation.METRICS_FILE})")
    ap = summary.get("test_ap_per_class")
    if isinstance(ap, list) and ap:
        names = class_names(row["dataset"], len(ap))
        written.append(_class_bars(
            {"test AP": ap}, names, "test AP (%) at the best epoch",
            f"{_title(row)}\ntest AP per class, best epoch {summary.get('best_epoch')}",
            out_dir / "test_ap_per_class.png", 100.0, reference=(float(np.mean(ap)), f"mAP {np.mean(ap):.2f}")))
    else:
        log(f"{run_dir}: no per-class test AP (summary.json has no test_ap_per_class)")
    if summary.get("pseudo_labels") and row["config"] is not None:
        quality, reason = pseudo_label_quality(run_dir, row["config"], summary)
        if quality is None:
            log(f"{run_dir}: no per-class pseudo-label plot: {reason}")
        else:
            names = class_names(row["dataset"], len(quality["precision"]))
            report = summary["pseudo_labels"]
            written.append(_class_bars(
                {"precision": quality["precision"], "recall": quality["recall"]}, names,
                "precision and recall of the positive pseudo-labels (vs clean train labels)",
                f"{_title(row)}\npositive pseudo-labels per class: overall precision {report['precision']:.3f}, "
                f"recall {report['recall']:.3f}", out_dir / "pseudo_labels_per_class.png", 1.0,
                notes=[f"{q} pseudo / {t} true" for q, t in zip(quality["positives"], quality["true"])]))
    return written


def plot_methods(rows: list[dict], path: Path) -> Path | None:
    """Test mAP per method (rows) and dataset (panels): mean, sample std over seeds, each seed."""
    methods, dataset_names, cells = summarize.paper_cells(rows)
    if not cells:
        return None
    fig, axes = plt.subplots(1, len(dataset_names), sharey=True, squeeze=False, layout="constrained",
                             figsize=(1.5 + 3.2 * len(dataset_names), 1.4 + 0.45 * len(methods)))
    positions = np.arange(len(methods))
    for ax, dataset in zip(axes[0], dataset_names):
        for y, method in zip(positions, methods):
            values = [row["test"] for row in cells.get((method, dataset), [])]
            if not values:
                continue
            mean = statistics.mean(values)
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            ax.barh(y, mean, height=0.6, color="tab:blue", alpha=0.6)
            if len(values) > 1:
                ax.errorbar(mean, y, xerr=std, color="black", capsize=3, linewidth=1)
            ax.scatter(values, [y] * len(values), color="black", s=10, zorder=3)
            ax.annotate(f"{mean:.1f}" + (f" ± {std:.1f}" if len(values) > 1 else "") + f" ({len(values)})",
                        (mean + std, y), xytext=(4, 0), textcoords="offset points", va="center", fontsize=7)
        ax.set_title(summarize.PAPER_DATASETS.get(dataset, dataset), fontsize=10)
        ax.set_xlabel("test mAP (%)")
        ax.set_xlim(0, 135)  # room right of 100 for the numbers
        ax.set_xticks(range(0, 101, 20))
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(positions, methods, fontsize=9)
    axes[0][0].set_ylim(len(methods) - 0.5, -0.5)
    fig.suptitle("Test mAP at the best val epoch\nmean ± sample std over seeds (number of seeds); dots: seeds",
                 fontsize=9)
    return _save(fig, path)


def plot_runs(rows: list[dict], out_dir: Path, log: Callable[[str], None] = _log_stderr) -> list[Path]:
    """Every plot of the runs in ``rows`` (``summarize.read_runs``) under ``out_dir``."""
    out_dir = Path(out_dir)
    written: list[Path] = []
    used: set[str] = set()
    for row in rows:
        if row.get("run_path") is None:
            continue  # a path that is no run folder: the summary table says why
        name, n = row["run"], 2
        while name in used:  # same run name under two parents
            name, n = f"{row['run']}-{n}", n + 1
        used.add(name)
        written += plot_run(row, out_dir / name, log)
    methods = plot_methods(rows, out_dir / "test_map_by_method.png")
    if methods is None:
        log("no test mAP across runs to plot (no finished run with config.json and summary.json)")
    else:
        written.append(methods)
    return written
