"""The method registry: every single-positive method the command line's ``-l`` offers.

Adding a method: one module with a ``methods.base.Method`` subclass (plus its tests), and its
class in ``REGISTRY`` below. Its flags, defaults, checks and checkpoint state follow from it.
Its per-dataset table (``dataset_defaults``) must have an entry for every dataset of
``datasets.DATASETS``, a row or ``NO_PROTOCOL``: importing this package checks that.
"""
from __future__ import annotations

import argparse

import datasets
from methods.aevlp import AEVLP
from methods.base import NO_PROTOCOL, CoefficientMethod, Hyperparameter, LossInputs, Method, PROTOCOL_DEFAULTS
from methods.baselines import BCE, AssumeNegative, IgnoreUnobservedNegatives
from methods.cole import ROLE, AssumeNegativeLabelSmoothing, ExpectedPositiveRegularizer, WeakAssumeNegative
from methods.dualcoop import DualCoOp
from methods.entropy import EM, EMAPL
from methods.gr import GR
from methods.large_loss import LargeLossCorrectPermanent, LargeLossCorrectTemporary, LargeLossReject
from methods.vlpl import EMPL, EMPLASL

REGISTRY: dict[str, type[Method]] = {method.name: method for method in (
    BCE, AssumeNegative, IgnoreUnobservedNegatives, EM, EMAPL, EMPL, EMPLASL,
    LargeLossReject, LargeLossCorrectTemporary, LargeLossCorrectPermanent,
    AssumeNegativeLabelSmoothing, WeakAssumeNegative, ExpectedPositiveRegularizer, ROLE, GR, AEVLP, DualCoOp,
)}

# Other names a method is known by: the paper's name of EM_PL.
ALIASES = {"VLPL": "EM_PL"}

__all__ = ["REGISTRY", "ALIASES", "Method", "CoefficientMethod", "Hyperparameter", "LossInputs", "PROTOCOL_DEFAULTS",
           "NO_PROTOCOL", "get_method", "all_hyperparameters", "add_hyperparameter_arguments",
           "protocol_table_gaps", "check_protocol_tables"]


def get_method(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def all_hyperparameters() -> dict[str, tuple[Hyperparameter, list[str]]]:
    """Every method's hyperparameters by name, with the methods that use each."""
    table: dict[str, tuple[Hyperparameter, list[str]]] = {}
    for method in REGISTRY.values():
        for hyperparameter in method.hyperparameters:
            known = table.setdefault(hyperparameter.name, (hyperparameter, []))
            if known[0] != hyperparameter:
                raise TypeError(f"methods disagree on hyperparameter {hyperparameter.name!r}: one definition each")
            known[1].append(method.name)
    return table


def add_hyperparameter_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per hyperparameter of any method; each defaults to None (the method's value)."""
    group = parser.add_argument_group("method hyperparameters (defaults per method and dataset)")
    for name, (hyperparameter, users) in all_hyperparameters().items():
        default = "per dataset" if hyperparameter.default is None else hyperparameter.default
        group.add_argument(hyperparameter.flag, type=hyperparameter.type, default=None,
                           help=f"{hyperparameter.help} [{', '.join(users)}; default {default}]")


def protocol_table_gaps() -> list[str]:
    """What the registered methods' per-dataset tables get wrong, one phrase each: a dataset of
    ``datasets.DATASETS`` without an entry, an entry that is neither a row nor NO_PROTOCOL, a row
    for a name that is no dataset (a misspelt key would leave the real one without a row)."""
    gaps = []
    for name, method in REGISTRY.items():
        table = method.dataset_defaults
        gaps += [f"-l {name} has no entry for {dataset}" for dataset in datasets.DATASETS if dataset not in table]
        gaps += [f"-l {name}'s entry for {dataset} is {entry!r}, neither a row (dict) nor NO_PROTOCOL"
                 for dataset, entry in table.items() if not (entry is NO_PROTOCOL or isinstance(entry, dict))]
        gaps += [f"-l {name} has a row for {key!r}, which is not a dataset of datasets.DATASETS"
                 for key in table if key not in datasets.DATASETS]
    return gaps


def check_protocol_tables() -> None:
    """TypeError naming every gap of ``protocol_table_gaps``: a method is unusable on a dataset
    its table does not cover, and that is found here rather than as a KeyError in some run."""
    gaps = protocol_table_gaps()
    if gaps:
        raise TypeError(f"per-dataset tables (dataset_defaults) incomplete: {'; '.join(gaps)}. Give each dataset "
                        f"a row of the method's published protocol, or methods.base.NO_PROTOCOL")


# At import: a table that misses a dataset fails here, naming method and dataset.
check_protocol_tables()
