"""Preparation scripts: each runs as ``python preproc/<script>.py`` and is importable by tests."""
from __future__ import annotations

import argparse
import sys
from typing import Callable


def run_script(main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser,
               next_step: Callable[[argparse.Namespace], str] | None = None) -> None:
    """A script's command line: input errors become one ``error: ...`` line and exit status 1; on
    success, ``next_step(args)``, the command to run next. Only the script says it: the demo,
    which calls ``main`` and runs the next step itself, does not."""
    args = parser.parse_args()
    try:
        main(args)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    if next_step is not None:
        print(next_step(args))


def after_formatting(name: str) -> Callable[[argparse.Namespace], str]:
    """A formatter's next step: drawing the observed labels of what it wrote to --save-path."""
    def next_step(args: argparse.Namespace) -> str:
        import datasets

        return datasets.next_step_hint(name, args.save_path)
    return next_step


def report_formatted(name: str, result: dict, save_path) -> None:
    """What a formatter prints: per phase images, classes, positives per image."""
    import datasets

    for phase, (_, labels) in result.items():
        print(datasets.label_summary(phase, labels))
    print(f"wrote formatted files to {save_path}")
