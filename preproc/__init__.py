"""Preparation scripts: each runs as ``python preproc/<script>.py`` and is importable by tests."""
