"""The one exception type a user can act on."""


class RunError(Exception):
    """A problem the user can fix (bad flag, missing file); shown as one line, exit code 2."""
