"""The method registry: every single-positive method the command line's ``-l`` offers.

Adding a method: one module with a ``methods.base.Method`` subclass (plus its tests), and its
class in ``REGISTRY`` below. Its flags, defaults, checks and checkpoint state follow from it.
"""
from __future__ import annotations

import argparse

from methods.aevlp import AEVLP
from methods.base import CoefficientMethod, Hyperparameter, LossInputs, Method, PROTOCOL_DEFAULTS
from methods.baselines import BCE, AssumeNegative, IgnoreUnobservedNegatives
from methods.cole import ROLE, AssumeNegativeLabelSmoothing, ExpectedPositiveRegularizer, WeakAssumeNegative
from methods.entropy import EM, EMAPL
from methods.gr import GR
from methods.large_loss import LargeLossCorrectPermanent, LargeLossCorrectTemporary, LargeLossReject
from methods.vlpl import EMPL, EMPLASL

REGISTRY: dict[str, type[Method]] = {method.name: method for method in (
    BCE, AssumeNegative, IgnoreUnobservedNegatives, EM, EMAPL, EMPL, EMPLASL,
    LargeLossReject, LargeLossCorrectTemporary, LargeLossCorrectPermanent,
    AssumeNegativeLabelSmoothing, WeakAssumeNegative, ExpectedPositiveRegularizer, ROLE, GR, AEVLP,
)}

__all__ = ["REGISTRY", "Method", "CoefficientMethod", "Hyperparameter", "LossInputs", "PROTOCOL_DEFAULTS",
           "get_method", "all_hyperparameters", "add_hyperparameter_arguments"]


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
