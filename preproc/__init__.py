"""Preparation scripts: each runs as ``python preproc/<script>.py`` and is importable by tests."""
from __future__ import annotations

import argparse
import sys
from typing import Callable


def run_script(main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser) -> None:
    """A script's command line: input errors become one ``error: ...`` line and exit status 1."""
    try:
        main(parser.parse_args())
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")


def report_formatted(name: str, result: dict, save_path) -> None:
    """What a formatter prints: per phase images, classes, positives per image; then the next step."""
    import datasets

    for phase, (_, labels) in result.items():
        print(datasets.label_summary(phase, labels))
    print(f"wrote formatted files to {save_path}")
    print(datasets.next_step_hint(name, save_path))
