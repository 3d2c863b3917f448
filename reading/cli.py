"""The command ``python instrumentation.py RESULTS_DIR...``: the summariser's report, or the
paper's table alone (``--format markdown|csv|latex``; with ``--selected``, the table of a sweep's
grid selection), and with ``--plot OUT_DIR`` the plots.

A module of its own: ``plots`` draws the summariser's rows and paper cells, so the command in
``summarize`` would make the two import each other, and in ``plots`` it would load matplotlib for
every summary.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reading.summarize import FORMATS, paper_table, read_runs, selected_rows, summary_text


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Summarise VLPL runs: one row per run, mean ± std over seeds, the paper's table "
                    "(methods x datasets); optionally plots.", add_help=add_help)
    parser.add_argument("results_dirs", nargs="+", type=Path, metavar="RESULTS_DIR",
                        help="a run directory or a folder of run directories (e.g. results/)")
    parser.add_argument("--format", choices=FORMATS, default="text",
                        help="text: every table; markdown, csv, latex: the paper's table alone")
    parser.add_argument("--selected", action="store_true",
                        help="with --format markdown, csv or latex: the paper's table of the runs a sweep's grid "
                             "selection chose (sweep.py --select-by val: per method, dataset and seed the best val "
                             "mAP of its grid), instead of every configuration's")
    parser.add_argument("--plot", type=Path, default=None, metavar="OUT_DIR",
                        help="also write PNG plots there: per run its mAP curves, per-class test AP and "
                             "pseudo-label quality; across runs the test mAP per method and dataset")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.selected and args.format == "text":
        print("error: --selected picks the table of --format markdown, csv or latex (text shows every table)",
              file=sys.stderr)
        return 2
    plots = None
    if args.plot is not None:
        try:
            from reading import plots  # matplotlib, datasets and torch: only when asked for
        except ImportError as error:
            print(f"error: --plot needs matplotlib ({error}); pip install -r requirements.txt", file=sys.stderr)
            return 2
        if args.plot.exists() and not args.plot.is_dir():
            print(f"error: --plot {args.plot} is a file; name a folder", file=sys.stderr)
            return 2
    rows = read_runs(args.results_dirs)
    if all(row["config"] is None and row["val"] is None for row in rows):
        print("error: no run folders (with config.json or summary.json) in "
              + ", ".join(map(str, args.results_dirs)) + ": " + "; ".join(
                  f"{row['run']}: {', '.join(row['problems'])}" for row in rows), file=sys.stderr)
        return 2
    if args.format == "text":
        print(summary_text(rows), end="")
    else:
        table = paper_table(selected_rows(rows) if args.selected else rows, args.format)
        if not table:
            what = ("no run chosen by a grid selection (selection_<sweep>.json, written by sweep.py --select-by val)"
                    if args.selected else "no finished run with a test mAP")
            print(f"error: {what} in " + ", ".join(map(str, args.results_dirs)), file=sys.stderr)
            return 2
        print(table)
    if plots is not None:
        for path in plots.plot_runs(rows, args.plot):
            print(f"plot: {path}", file=sys.stderr)
    return 0
