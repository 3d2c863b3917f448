"""The results summariser: run folders read into table rows, seed groups and the paper's table.

``summarize(paths)`` gives one row per run, the mean and sample standard deviation over runs that
differ only in their seed, and the paper's table: methods as rows, datasets as columns, test mAP
mean ± std over seeds with the number of seeds (``paper_table``, also as markdown, csv or latex).
It reads only the JSON files a run writes (``read_json``: a missing or corrupt file becomes a
problem of its row), so it needs neither torch nor the datasets.
"""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path
from typing import Any, Iterable

import rundir
from instrumentation import CONFIG_FILE, LOG_FILE, METRICS_FILE, SUMMARY_FILE, format_value

# config.json keys that do not change the experiment (bookkeeping, paths, hardware): runs that
# differ only in these and in the seed form one group. Keys ending in "_dir" are ignored too.
# "config" names the --config file the settings were read from; the settings themselves count.
# "deterministic" chooses kernels, not the experiment.
BOOKKEEPING_KEYS = frozenset({"seed", "run_name", "output_dir", "resume", "gpu", "device", "num_workers",
                              "data_root", "cache_dir", "test_every_epoch", "echo", "config", "deterministic",
                              "image_cache"})


def _is_run_dir(path: Path) -> bool:
    return any((path / name).exists() for name in (SUMMARY_FILE, CONFIG_FILE, LOG_FILE, METRICS_FILE))


def _expand(paths: Iterable[Path]) -> list[tuple[Path, str | None]]:
    """(run dir, problem) pairs: a run dir as given, or the run dirs one level below a parent."""
    runs: list[tuple[Path, str | None]] = []
    for path in map(Path, paths):
        if not path.is_dir():
            runs.append((path, "no such directory"))
        elif _is_run_dir(path):
            runs.append((path, None))
        else:
            children = sorted(child for child in path.iterdir() if child.is_dir() and _is_run_dir(child))
            if not children:
                runs.append((path, "no run directories in it (nothing with summary.json or config.json)"))
            runs.extend((child, None) for child in children)
    return runs


def read_json(path: Path) -> tuple[dict | None, str | None]:
    """(content, problem): a problem says what is wrong instead of raising."""
    if not path.exists():
        return None, f"no {path.name}"
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        return None, f"{path.name} unreadable (invalid JSON at line {error.lineno}, column {error.colno})"
    except (OSError, UnicodeDecodeError) as error:
        return None, f"{path.name} unreadable ({type(error).__name__}: {error})"
    if not isinstance(content, dict):
        return None, f"{path.name} is not a JSON object"
    return content, None


def _number(value: Any) -> float | None:
    """A finite number, else None (NaN or infinity are not results)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _read_run(run_dir: Path) -> dict:
    """One table row: values from summary.json (and config.json), plus what is wrong, if anything."""
    summary, summary_problem = read_json(run_dir / SUMMARY_FILE)
    config, config_problem = read_json(run_dir / CONFIG_FILE)
    # Older versions recorded the method as "loss".
    summary, config = (rundir.renamed_settings(record) if record is not None else None for record in (summary, config))
    problems = [problem for problem in (summary_problem, config_problem) if problem]
    if summary_problem and summary_problem.startswith("no ") and config is not None:
        problems[0] = "no summary.json (unfinished or crashed run?)"

    def field(key: str) -> Any:
        for source in (summary, config):
            if source is not None and source.get(key) is not None:
                return source[key]
        return None

    model = field("model")
    if model is not None and config is not None and config.get("tiny_models"):
        model = f"{model} (tiny)"  # tiny random models: a pipeline check, not a benchmark result
    row = {"run": run_dir.name, "run_path": str(run_dir), "dataset": field("dataset"), "model": model,
           "method": field("method"), "seed": field("seed"), "best_epoch": None, "val": None, "test": None,
           "problems": problems, "group": None, "config": config}
    if summary is not None:
        row["best_epoch"] = summary.get("best_epoch")
        row["val"] = _number(summary.get("best_val_map"))
        row["test"] = _number(summary.get("best_test_map"))
        for key, value in (("best_val_map", row["val"]), ("best_test_map", row["test"])):
            if value is None and summary.get(key) is not None:
                problems.append(f"summary.json has a {key} that is not a finite number ({summary.get(key)!r})")
        if row["val"] is None and summary.get("best_val_map") is None:
            problems.append("summary.json has no best_val_map")
    if config is not None and summary is not None:
        # A setting left unset (None) counts as absent: a config written before its flag existed agrees.
        # A config.json from before a setting existed had the value rundir.ADDED_SETTINGS names.
        key = {k: v for k, v in rundir.with_added_settings(config).items()
               if k not in BOOKKEEPING_KEYS and not k.endswith("_dir") and v is not None}
        row["group"] = json.dumps(key, sort_keys=True, default=str)
    return row


def _problem_row(path: Path, problem: str) -> dict:
    return {"run": str(path), "run_path": None, "dataset": None, "model": None, "method": None, "seed": None,
            "best_epoch": None, "val": None, "test": None, "problems": [problem], "group": None, "config": None}


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip()
             for line in [header, ["-" * width for width in widths], *rows]]
    return "\n".join(lines)


def _mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"  # sample std (ddof=1)


def _differing_keys(configs: list[dict]) -> set[str]:
    """The keys whose values are not the same in all ``configs`` (a missing key differs from any value)."""
    return {k for k in set().union(*configs)
            if len({(k in c, json.dumps(c.get(k), default=str)) for c in configs}) > 1}


def _setting(config: dict, key: str, separator: str = " ") -> str:
    """'key value', or 'no key' for a key the configuration lacks (unset, or written by another version)."""
    return f"{key}{separator}{config[key]}" if key in config else f"no {key}"


def _family(row: dict) -> tuple:
    return row["dataset"], row["model"], row["method"]


def _differing_settings(group_rows: list[dict], all_groups: dict[str, list[dict]]) -> list[str]:
    """'key=value' for the settings that tell this group apart from the other groups of the same
    dataset, model and loss (e.g. ["lr=0.0001"]); empty when there are none."""
    siblings = [json.loads(key) for key, rows in all_groups.items() if _family(rows[0]) == _family(group_rows[0])]
    config = json.loads(group_rows[0]["group"])
    return [_setting(config, k, "=") for k in sorted(_differing_keys(siblings))]


def _group_label(group_rows: list[dict], all_groups: dict[str, list[dict]]) -> str:
    """'dataset model loss', plus the settings that tell this group apart (``_differing_settings``)."""
    first = group_rows[0]
    settings = _differing_settings(group_rows, all_groups)
    label = f"{first['dataset']} {first['model']} {first['method']}"
    return label + (" [" + ", ".join(settings) + "]" if settings else "")


def read_runs(paths: Iterable[Path]) -> list[dict]:
    """One row per run folder found in ``paths`` (see ``summarize``), problems included; a run
    that a sweep's grid selection picked has ``selections`` (``_mark_selected``)."""
    paths = list(paths)
    rows = [_read_run(path) if problem is None else _problem_row(path, problem) for path, problem in _expand(paths)]
    _mark_selected(rows, paths)
    return rows


# -- grid selections: sweep.py --select-by val writes selection_<sweep>.json beside the runs -----------

SELECTION_FILES = "selection_*.json"


def _mark_selected(rows: list[dict], paths: list[Path]) -> None:
    """The rows of the runs a selection file in one of ``paths`` picked (per method, dataset and
    seed the grid point with the best val mAP) get ``selections``: the sweep, the criterion, the
    group's other settings and whether every grid point had finished."""
    by_path = {row["run_path"]: row for row in rows if row["run_path"]}
    for folder in dict.fromkeys(Path(path) for path in paths if Path(path).is_dir()):
        for file in sorted(folder.glob(SELECTION_FILES)):
            content, _ = read_json(file)
            groups = (content or {}).get("groups")
            for group in groups if isinstance(groups, list) else []:
                row = by_path.get(str(folder / str(group.get("selected")))) if isinstance(group, dict) else None
                if row is not None:
                    row.setdefault("selections", []).append(
                        {"sweep": content.get("sweep"), "select_by": content.get("select_by"),
                         "axes": group.get("axes") or {}, "complete": group.get("complete", True),
                         "points": f"{group.get('finished')} of {group.get('grid_points')} grid points"})


def _selection_notes(row: dict) -> list[str]:
    return [f"selected by {s['select_by']} mAP in sweep {s['sweep']}" + ("" if s["complete"] else f" ({s['points']})")
            for s in row.get("selections", [])]


def selected_rows(rows: list[dict]) -> list[dict]:
    """The selected runs as rows of one configuration per (sweep, criterion, other settings), so
    that the paper's table gives per method and dataset the mean over seeds of the selected runs."""
    return [{**row, "problems": [], "group": json.dumps({**s["axes"], "selected_by": s["select_by"], "sweep": s["sweep"],
                                                         **{key: row[key] for key in ("dataset", "model", "method")}},
                                                        sort_keys=True, default=str)}
            for row in rows for s in row.get("selections", [])]


def seed_groups(rows: list[dict]) -> dict[str, list[dict]]:
    """Finished runs (config.json and a val mAP) grouped by their configuration without the seed.
    A seed counts once per group: a second run of the same configuration and seed (a rerun) is
    left out of the group, and its row says so."""
    groups: dict[str, list[dict]] = {}
    seen: dict[tuple, dict] = {}
    for row in sorted(rows, key=lambda r: str(r["run_path"] or r["run"])):
        if row["group"] is None or row["val"] is None:
            continue
        first = seen.setdefault((row["group"], json.dumps(row["seed"])), row)
        if first is not row:
            note = f"same configuration and seed as {first['run']}: left out of the means over seeds"
            if note not in row["problems"]:
                row["problems"].append(note)
            continue
        groups.setdefault(row["group"], []).append(row)
    return groups


def summarize(run_dirs: list[Path]) -> str:
    """The results report: one row per run, mean ± sample std over runs differing only in seed,
    then the paper's table (``paper_table``).

    Each path is a run directory (holding summary.json / config.json) or a folder of run
    directories (scanned one level deep). Missing or corrupt files become a row that says
    what is wrong; they never stop the table.
    """
    return summary_text(read_runs(run_dirs))


def summary_text(rows: list[dict]) -> str:
    """``summarize`` of rows already read (``read_runs``)."""
    groups = seed_groups(rows)  # first: it notes reruns of a seed in their rows
    header = ["run", "dataset", "model", "method", "seed", "best epoch", "val mAP", "test mAP", "notes"]
    body = [[row["run"], row["dataset"] or "?", row["model"] or "?", row["method"] or "?",
             "?" if row["seed"] is None else row["seed"],
             "n/a" if row["best_epoch"] is None else row["best_epoch"],
             format_value(row["val"], 2), format_value(row["test"], 2),
             "; ".join(row["problems"] + _selection_notes(row))]
            for row in rows]
    text = _table(header, body)

    several = [group for group in groups.values() if len(group) >= 2]
    if several:
        group_body = []
        for group in several:
            seeds = ",".join(str(row["seed"]) for row in sorted(group, key=lambda r: str(r["seed"])))
            tests = [row["test"] for row in group if row["test"] is not None]
            group_body.append([_group_label(group, groups), len(group), seeds,
                               _mean_std([row["val"] for row in group]),
                               _mean_std(tests) + ("" if len(tests) == len(group) else f" ({len(tests)} runs)")])
        text += "\n\nRuns differing only in seed (mean ± sample std):\n"
        text += _table(["configuration", "runs", "seeds", "val mAP", "test mAP"], group_body)
    table = paper_table(rows, "text")
    if table:
        text += "\n\n" + table
    selected = paper_table(selected_rows(rows), "text")
    if selected:
        text += "\n\nGrid selection (sweep.py --select-by val): per method, dataset and seed the run with the best " \
                "val mAP of its grid\n" + selected
    return text + "\n"


# -- the paper's table: methods as rows, datasets as columns -------------------------------------

# Column order and titles of the paper (VOC, COCO, NUS-WIDE, CUB); other datasets follow. These
# are datasets.PAPER_TITLES, written out because importing datasets would load torch into a
# summariser that only reads JSON files (tests/test_reading_results.py holds the two equal).
PAPER_DATASETS = {"pascal": "VOC", "coco": "COCO", "nuswide": "NUS", "cub": "CUB"}
# Row order: the baselines, then VLPL and its variant; unknown methods follow by name.
METHOD_ORDER = ("bce", "iun", "an", "EM", "EM_APL", "EM_PL", "EM_PL_ASL")
FORMATS = ("text", "markdown", "csv", "latex")
MAX_LABEL_SETTINGS = 3  # settings named in a method label; more are counted
PAPER_TITLE = "Test mAP at the best val epoch: mean ± sample std over seeds (number of seeds)"


def _method_key(row: dict) -> tuple:
    method = row["method"] or "?"
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def _dataset_key(dataset: str) -> tuple:
    names = list(PAPER_DATASETS)
    return (names.index(dataset) if dataset in names else len(names), dataset)


def paper_cells(rows: list[dict]) -> tuple[list[str], list[str], dict[tuple[str, str], list[dict]]]:
    """(method labels in row order, datasets in column order, {(method, dataset): runs}).

    A cell holds the runs that differ only in their seed and have a test mAP. A method label is
    the loss, with the backbone when the runs use more than one, and the values of the settings
    that tell two configurations of one dataset, backbone and loss apart, on every dataset (e.g.
    ``EM_PL (resnet50, lr 0.0001)``): a row is one configuration wherever it was run.
    """
    groups = seed_groups(rows)
    tested = {key: [row for row in group if row["test"] is not None] for key, group in groups.items()}
    tested = {key: group for key, group in tested.items() if group}
    several_models = len({group[0]["model"] for group in tested.values()}) > 1
    # Per (model, loss): the settings that vary between configurations of one dataset, and the
    # configurations themselves.
    varying: dict[tuple, set[str]] = {}
    configs: dict[tuple, list[dict]] = {}
    for triple in {_family(group[0]) for group in groups.values()}:
        same = [json.loads(key) for key, group in groups.items() if _family(group[0]) == triple]
        varying.setdefault(triple[1:], set()).update(_differing_keys(same))
        configs.setdefault(triple[1:], []).extend(same)
    cells: dict[tuple[str, str], list[dict]] = {}
    order: dict[str, tuple] = {}
    for key, group in tested.items():
        first, config, family = group[0], json.loads(key), _family(group[0])[1:]
        # Settings every configuration has come first (a key some lack is usually version drift).
        keys = sorted(varying[family], key=lambda k: (any(k not in c for c in configs[family]), k))
        settings = [_setting(config, k) for k in keys]
        if len(settings) > MAX_LABEL_SETTINGS:
            settings = settings[:MAX_LABEL_SETTINGS] + [f"+{len(settings) - MAX_LABEL_SETTINGS} more"]
        details = ([str(first["model"])] if several_models else []) + settings
        label = base = (first["method"] or "?") + (f" ({', '.join(details)})" if details else "")
        number = 2
        while (label, first["dataset"] or "?") in cells:  # configurations the shortened label mixes up
            label, number = f"{base} #{number}", number + 1
        cells[(label, first["dataset"] or "?")] = group
        order[label] = (*_method_key(first), str(first["model"]), label)
    methods = sorted(order, key=order.get)
    dataset_names = sorted({dataset for _, dataset in cells}, key=_dataset_key)
    return methods, dataset_names, cells


def _cell_text(values: list[float], latex: bool = False) -> str:
    if not values:
        return "--" if latex else "-"
    text = f"{statistics.mean(values):.2f}"
    if len(values) > 1:
        text += (" $\\pm$ " if latex else " ± ") + f"{statistics.stdev(values):.2f}"
    return text + f" ({len(values)})"


def _latex_escape(text: str) -> str:
    for char in "\\&%$#_{}":
        text = text.replace(char, "\\" + char)
    return text


def paper_table(rows: list[dict], fmt: str = "text") -> str:
    """The paper's layout of the test mAP: methods as rows, datasets as columns, each cell the
    mean ± sample std over seeds and the number of seeds. ``fmt``: text, markdown, csv or
    latex. '' when no run has a test mAP."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    methods, dataset_names, cells = paper_cells(rows)
    if not cells:
        return ""
    titles = [PAPER_DATASETS.get(name, name) for name in dataset_names]

    def values(method: str, dataset: str) -> list[float]:
        return [row["test"] for row in cells.get((method, dataset), [])]

    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["method", *(f"{title} {part}" for title in titles for part in ("mean", "std", "seeds"))])
        for method in methods:
            line = [method]
            for dataset in dataset_names:
                cell = values(method, dataset)
                line += ([f"{statistics.mean(cell):.4f}", f"{statistics.stdev(cell):.4f}" if len(cell) > 1 else "",
                          len(cell)] if cell else ["", "", 0])
            writer.writerow(line)
        return buffer.getvalue().rstrip("\n")
    if fmt == "latex":
        lines = [f"% {PAPER_TITLE}", "\\begin{tabular}{l" + "c" * len(titles) + "}", "\\hline",
                 " & ".join(["Method", *titles]) + " \\\\", "\\hline"]
        lines += [" & ".join([_latex_escape(method), *(_cell_text(values(method, d), latex=True)
                                                       for d in dataset_names)]) + " \\\\" for method in methods]
        return "\n".join(lines + ["\\hline", "\\end{tabular}"])
    body = [[method, *(_cell_text(values(method, d)) for d in dataset_names)] for method in methods]
    if fmt == "markdown":
        lines = ["| " + " | ".join(["method", *titles]) + " |", "|" + "---|" * (len(titles) + 1)]
        lines += ["| " + " | ".join(line) + " |" for line in body]
        return "\n".join(lines)
    return PAPER_TITLE + ":\n" + _table(["method", *titles], body)
