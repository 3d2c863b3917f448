"""Finished run folders read back: the results summariser (summarize.py) and its command
(cli.py, run as ``python instrumentation.py RESULTS_DIR``), its plots (plots.py), and a run's
configuration, model and data rebuilt for evaluate.py and predict.py (saved_run.py).

These modules read what the training code wrote; the training code never imports them.
"""
