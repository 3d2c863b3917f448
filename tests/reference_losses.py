"""A reference dispatch by loss name over ``losses.py``'s formulas, for the tests only.

Training runs each loss through its method (``methods/``, whose registry is the one dispatch).
This module keeps a second, independent route to the same numbers: the loss of docs/DESIGN.md §3
named ``name``, with VLPL's warm-up rule written out again, the inputs validated, and epr's
regulariser added. tests/test_losses.py checks it against per-entry formulas; tests/test_methods.py
and tests/test_cole.py check each method's loss against it.

``compute_loss`` returns the batch loss ``sum(L) / (B * K)``; ``loss_coefficients`` gives
``losses.combine``'s coefficients (None where the loss is not of that form: EM_PL_ASL after its
warm-up). Where masks of one loss overlap, later rules win, in the order the original code
assigned them (``losses.py`` says which).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import losses

# The seven losses of docs/DESIGN.md §3, then Cole et al.'s three of combine's form.
LOSS_NAMES = ("bce", "an", "iun", "EM", "EM_APL", "EM_PL", "EM_PL_ASL")
COLE_LOSS_NAMES = ("an_ls", "wan", "epr")
LOSSES_NEEDING_PSEUDO = frozenset({"EM_PL", "EM_PL_ASL"})
LOSSES_NEEDING_TRUE = frozenset({"bce", "iun"})


def _hp(hp: Any, name: str) -> float:
    """One hyperparameter from ``hp`` as a float, with a clear error when it is missing."""
    if not hasattr(hp, name):
        raise ValueError(f"loss hyperparameters: missing attribute {name!r} "
                         f"(needs alpha, beta, beta_pos, beta_neg, gamma_pos, gamma_neg, "
                         f"gamma_unknown, warmup_epoch)")
    return float(getattr(hp, name))


def _check_range(name: str, tensor: Tensor, low: float, high: float, shape) -> Tensor:
    """Shape check now; return a 0-dim bool tensor 'all values in [low, high]' (checked later,
    all at once). NaN fails the range test."""
    if not isinstance(tensor, Tensor):
        raise ValueError(f"compute_loss: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.shape != shape:
        raise ValueError(f"compute_loss: {name} has shape {tuple(tensor.shape)}, "
                         f"preds has {tuple(shape)}")
    if tensor.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=tensor.device)
    low_value, high_value = torch.aminmax(tensor.detach())
    return (low_value >= low) & (high_value <= high)


def _warmed_up(after_warmup):
    """VLPL's losses: plain EM while epoch <= warmup_epoch (the default 0 never warms up)."""
    def coefficients(observed, hp, epoch, pseudo, true):
        if epoch <= _hp(hp, "warmup_epoch"):
            return losses.em_coefficients(observed, _hp(hp, "alpha"))
        return after_warmup(observed, hp, epoch, pseudo, true)
    return coefficients


# Loss name -> (observed, hp, epoch, pseudo, true) -> coefficients, or None where the loss is
# not of ``combine``'s form (EM_PL_ASL after its warm-up: ``losses.em_pl_asl_matrix``).
_COEFFICIENTS = {
    "bce": lambda observed, hp, epoch, pseudo, true: losses.bce_coefficients(true),
    "an": lambda observed, hp, epoch, pseudo, true: losses.an_coefficients(observed),
    "iun": lambda observed, hp, epoch, pseudo, true: losses.iun_coefficients(observed, true),
    "EM": lambda observed, hp, epoch, pseudo, true: losses.em_coefficients(observed, _hp(hp, "alpha")),
    "EM_APL": lambda observed, hp, epoch, pseudo, true: losses.em_apl_coefficients(observed, _hp(hp, "alpha"),
                                                                                  _hp(hp, "beta")),
    "EM_PL": _warmed_up(lambda observed, hp, epoch, pseudo, true: losses.em_pl_coefficients(
        observed, pseudo, _hp(hp, "alpha"), _hp(hp, "beta_pos"), _hp(hp, "beta_neg"))),
    "EM_PL_ASL": _warmed_up(lambda observed, hp, epoch, pseudo, true: None),
    "an_ls": lambda observed, hp, epoch, pseudo, true: losses.an_ls_coefficients(observed, _hp(hp, "ls_coef")),
    "wan": lambda observed, hp, epoch, pseudo, true: losses.wan_coefficients(observed),
    "epr": lambda observed, hp, epoch, pseudo, true: losses.epr_coefficients(observed),  # plus _REGULARISERS["epr"]
}

# What compute_loss adds to sum(L) / (B*K) (``loss_coefficients`` gives L's coefficients only).
_REGULARISERS = {
    "epr": lambda preds, hp: losses.expected_positive_regulariser(preds, _hp(hp, "expected_num_pos")),
}


def _check_name(name: str) -> None:
    if name not in _COEFFICIENTS:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(_COEFFICIENTS)}")


def loss_coefficients(name: str, observed: Tensor, hp: Any, *, epoch: int = 1,
                      pseudo: Tensor | None = None, true: Tensor | None = None) -> losses.Coefficients | None:
    """``losses.combine``'s (on_pos, on_neg, on_entropy) for loss ``name``, or None where the loss
    is not of that form (EM_PL_ASL after its warm-up). No input validation (see ``compute_loss``)."""
    _check_name(name)
    return _COEFFICIENTS[name](observed, hp, epoch, pseudo, true)


def loss_matrix(name: str, preds: Tensor, observed: Tensor, hp: Any, *, epoch: int = 1,
                pseudo: Tensor | None = None, true: Tensor | None = None) -> Tensor:
    """The B x K loss matrix of loss ``name`` (no input validation; see ``compute_loss``)."""
    coefficients = loss_coefficients(name, observed, hp, epoch=epoch, pseudo=pseudo, true=true)
    if coefficients is not None:
        return losses.combine(preds, *coefficients)
    return losses.em_pl_asl_matrix(preds, observed, pseudo, _hp(hp, "gamma_pos"), _hp(hp, "gamma_neg"),
                                   _hp(hp, "gamma_unknown"))


def compute_loss(name: str, preds: Tensor, observed: Tensor, hp: Any, *, epoch: int = 1,
                 pseudo: Tensor | None = None, true: Tensor | None = None) -> Tensor:
    """Scalar batch loss sum(L) / (B*K) of loss ``name`` (plus its regulariser, ``_REGULARISERS``:
    epr's), after validating the inputs.

    ValueError when: the name is unknown (the message lists the known ones); a tensor is not
    B x K like ``preds``; preds leave [0, 1] or observed leaves [-1, 1] (NaN included);
    pseudo (EM_PL, EM_PL_ASL; required in every epoch so a missing one fails at the first
    batch, not after the warm-up) or true (bce, iun) is missing or out of range.
    """
    _check_name(name)
    if not isinstance(preds, Tensor) or preds.dim() != 2:
        raise ValueError(f"compute_loss: preds must be a B x K torch.Tensor, got "
                         f"{tuple(preds.shape) if isinstance(preds, Tensor) else type(preds).__name__}")
    checks = {"preds must lie in [0, 1] (sigmoid probabilities, no NaN)":
              _check_range("preds", preds, 0.0, 1.0, preds.shape),
              "observed labels must lie in [-1, 1]":
              _check_range("observed", observed, -1.0, 1.0, preds.shape)}
    if name in LOSSES_NEEDING_PSEUDO:
        if pseudo is None:
            raise ValueError(f"loss {name!r} needs pseudo-labels (pseudo=B x K in {{-1, 0, 1}})")
        checks["pseudo-labels must lie in [-1, 1]"] = _check_range("pseudo", pseudo, -1.0, 1.0, preds.shape)
    if name in LOSSES_NEEDING_TRUE:
        if true is None:
            raise ValueError(f"loss {name!r} needs the clean labels (true=B x K 0/1)")
        checks["true labels must lie in [0, 1]"] = _check_range("true", true, 0.0, 1.0, preds.shape)
    if not bool(torch.stack(list(checks.values())).all()):
        failed = [message for message, ok in checks.items() if not bool(ok)]
        raise ValueError(f"compute_loss ({name}): {'; '.join(failed)}")
    loss = losses.mean_loss(loss_matrix(name, preds, observed, hp, epoch=epoch, pseudo=pseudo, true=true))
    return loss + _REGULARISERS[name](preds, hp) if name in _REGULARISERS else loss
