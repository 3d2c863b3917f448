"""The one exception type a user can act on, and how a command line reports it."""
from __future__ import annotations

import sys
from typing import Any, Callable


class RunError(Exception):
    """A problem the user can fix (bad flag, missing file); shown as one line, exit code 2."""


def exit_code(main: Callable[[Any], object], args: Any) -> int:
    """Run a command's ``main(args)``: 0 when it finishes, 2 with one ``error:`` line on stderr
    for a RunError, 130 after Ctrl-C (what to run next is the command's to say)."""
    try:
        main(args)
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
