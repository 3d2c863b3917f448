"""The loss family of docs/DESIGN.md §3, as pure tensor functions.

Every loss but EM_PL_ASL is ``combine(preds, on_pos, on_neg, on_entropy)``, the B x K loss
matrix L of its docs/DESIGN.md §3 row (entries a loss does not mention are 0), with coefficient matrices
that depend on the labels only (``*_coefficients``); ``em_pl_asl_matrix`` gives EM_PL_ASL's L;
``mean_loss`` is the batch loss ``sum(L) / (B * K)``. Which loss a run uses, with its warm-up, is
its method's business (``methods/``). Where masks of one loss overlap, later rules win, in the
order the original code assigned them (e.g. for ``iun`` "true label 0" after "observed 1").

Inputs: ``preds`` are probabilities (sigmoid already applied), ``observed`` is in [-1, 1]
(+1 observed positive, 0 unobserved, -1 observed negative, values in (-1, 0) APL soft
negatives), ``pseudo`` is in {-1, 0, 1}, ``true`` is the clean 0/1 label matrix.

Gradients: ``nl(x) = -log(x + 1e-5)`` keeps every log term's derivative finite at p = 0 and
p = 1; the entropy and the focal weights ``(1-p)^gamma``, ``p^gamma`` are finite there too for
gamma = 0 or gamma >= 1 (the defaults are 2 and 4). A gamma in (0, 1) has an infinite
derivative where p is exactly 0 or 1, as the formula itself does.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

LOG_EPSILON = 1e-5
# Label smoothing of the pseudo-label terms of EM_PL (docs/DESIGN.md §3: 0.9 / 0.1), as in the original.
PSEUDO_SMOOTHING = 0.1


def neg_log(x: Tensor) -> Tensor:
    """nl(x) = -log(x + 1e-5): finite value and derivative at x = 0."""
    return -torch.log(x + LOG_EPSILON)


def entropy(preds: Tensor) -> Tensor:
    """H(p) = p*nl(p) + (1-p)*nl(1-p), elementwise."""
    return preds * neg_log(preds) + (1.0 - preds) * neg_log(1.0 - preds)


def combine(preds: Tensor, on_pos: Tensor | float, on_neg: Tensor | float, on_entropy: Tensor | float) -> Tensor:
    """L = on_pos*nl(p) + on_neg*nl(1-p) + on_entropy*H(p), with coefficients that depend on the
    labels only.

    Every loss of the family except EM_PL_ASL has this form; writing it once takes each log
    once per batch and keeps the autograd graph short (it runs once per training step).
    """
    nl_pos, nl_neg = neg_log(preds), neg_log(1.0 - preds)
    loss = on_pos * nl_pos + on_neg * nl_neg
    if isinstance(on_entropy, Tensor) or on_entropy != 0:
        loss = loss + on_entropy * (preds * nl_pos + (1.0 - preds) * nl_neg)
    return loss


def combine_logit_gradient(preds: Tensor, on_pos: Tensor | float, on_neg: Tensor | float,
                           on_entropy: Tensor | float) -> Tensor:
    """dL/dz, elementwise, of ``combine``'s L where preds = sigmoid(z): what autograd gives through
    ``torch.sigmoid`` and ``combine``, written out for a training step without autograd.

    With q = 1 - p and e the log epsilon, nl'(x) = -1/(x + e) and H = p*nl(p) + q*nl(q):
    dL/dp = -on_pos/(p+e) + on_neg/(q+e) + on_entropy*(nl(p) - p/(p+e) - nl(q) + q/(q+e)),
    and dp/dz = p*q.
    """
    q = 1.0 - preds
    inv_pos, inv_neg = 1.0 / (preds + LOG_EPSILON), 1.0 / (q + LOG_EPSILON)
    grad = on_neg * inv_neg - on_pos * inv_pos
    if isinstance(on_entropy, Tensor) or on_entropy != 0:
        grad = grad + on_entropy * (neg_log(preds) - neg_log(q) - preds * inv_pos + q * inv_neg)
    return grad * (preds * q)


Coefficients = tuple[Tensor | float, Tensor | float, Tensor | float]


def _where(mask: Tensor, value: Tensor | float, otherwise: Tensor | float = 0.0) -> Tensor:
    """A coefficient matrix: ``value`` where ``mask``, else ``otherwise`` (labels only, no gradient)."""
    return torch.where(mask, value, otherwise)


def bce_coefficients(true: Tensor) -> Coefficients:
    """Oracle BCE on clean labels: nl(p) where true = 1, nl(1-p) where true = 0."""
    return _where(true == 1, 1.0), _where(true == 0, 1.0), 0.0


def an_coefficients(observed: Tensor) -> Coefficients:
    """Assume negative: nl(p) where o = 1, nl(1-p) where o = 0."""
    return _where(observed == 1, 1.0), _where(observed == 0, 1.0), 0.0


def iun_coefficients(observed: Tensor, true: Tensor) -> Coefficients:
    """Oracle baseline: nl(p) where o = 1, nl(1-p) where the true label is 0 (which wins)."""
    true_negative = true == 0
    return _where((observed == 1) & ~true_negative, 1.0), _where(true_negative, 1.0), 0.0


def em_coefficients(observed: Tensor, alpha: float) -> Coefficients:
    """Entropy maximisation: nl(p) where o = 1, -alpha*H(p) where o = 0."""
    return _where(observed == 1, 1.0), 0.0, _where(observed == 0, -alpha)


def em_apl_coefficients(observed: Tensor, alpha: float, beta: float) -> Coefficients:
    """EM plus APL soft negatives: where o < 0, s = -o, beta*(s*nl(p) + (1-s)*nl(1-p))."""
    soft = observed < 0
    on_pos = torch.where(soft, beta * -observed, _where(observed == 1, 1.0))
    on_neg = torch.where(soft, beta * (1.0 + observed), torch.zeros_like(observed))
    return on_pos, on_neg, _where(observed == 0, -alpha)


def em_pl_coefficients(observed: Tensor, pseudo: Tensor, alpha: float, beta_pos: float,
                       beta_neg: float) -> Coefficients:
    """VLPL after warm-up, with f = q where o = 0 else o.

    nl(p) where o = 1; -alpha*H(p) where f = 0; beta_pos*(0.9*nl(p) + 0.1*nl(1-p)) where o = 0
    and q = +1; beta_neg*(0.1*nl(p) + 0.9*nl(1-p)) where o = 0 and q = -1. (f = 0 exactly
    where o = 0 and q = 0, so the four cases are disjoint.)
    """
    unobserved = observed == 0
    pseudo_pos, pseudo_neg = unobserved & (pseudo == 1), unobserved & (pseudo == -1)
    keep, smooth = 1.0 - PSEUDO_SMOOTHING, PSEUDO_SMOOTHING
    on_pos = _where(observed == 1, 1.0, _where(pseudo_pos, beta_pos * keep, _where(pseudo_neg, beta_neg * smooth)))
    on_neg = _where(pseudo_pos, beta_pos * smooth, _where(pseudo_neg, beta_neg * keep))
    return on_pos, on_neg, _where(unobserved & (pseudo == 0), -alpha)


def em_pl_asl_matrix(preds: Tensor, observed: Tensor, pseudo: Tensor, gamma_pos: float,
                     gamma_neg: float, gamma_unknown: float) -> Tensor:
    """Asymmetric focal VLPL after warm-up, with f = q where o = 0 else o.

    (1-p)^gamma_pos*nl(p) where o = 1 or (o = 0, q = +1); -(1-p)^gamma_unknown*H(p) where f = 0;
    p^gamma_neg*nl(1-p) where (o = 0, q = -1).
    """
    unobserved = observed == 0
    final = torch.where(unobserved, pseudo, observed)
    nl_pos, nl_neg = neg_log(preds), neg_log(1.0 - preds)
    pos_term = torch.pow(1.0 - preds, gamma_pos) * nl_pos
    loss = torch.where(observed == 1, pos_term, torch.zeros_like(preds))
    unknown_term = -torch.pow(1.0 - preds, gamma_unknown) * (preds * nl_pos + (1.0 - preds) * nl_neg)
    loss = torch.where(final == 0, unknown_term, loss)
    loss = torch.where(unobserved & (pseudo == 1), pos_term, loss)
    neg_term = torch.pow(preds, gamma_neg) * nl_neg
    return torch.where(unobserved & (pseudo == -1), neg_term, loss)


def coefficient_rows(coefficients: Coefficients, index: Tensor | slice) -> Coefficients:
    """The rows ``index`` of coefficients computed for a whole label matrix (scalars stay scalars)."""
    return tuple(c[index] if isinstance(c, Tensor) else c for c in coefficients)


def mean_loss(matrix: Tensor) -> Tensor:
    """The batch loss sum(L) / (B*K) of a B x K loss matrix."""
    batch_size, num_classes = matrix.shape
    return matrix.sum() / max(batch_size * num_classes, 1)


# -- Large loss (Kim et al., CVPR 2022) -----------------------------------------------------------

LARGE_LOSS_SCHEMES = ("LL-R", "LL-Ct", "LL-Cp")


def large_loss(logits: Tensor, observed: Tensor, *, scheme: str, clean_rate: float,
               delta_rel: float, permanent_ties: bool = False) -> tuple[Tensor, Tensor | None]:
    """Large-loss rejection (LL-R) or correction (LL-Ct, LL-Cp) of assume-negative BCE, as the
    authors' ``compute_batch_loss`` (snucml/LargeLossMatters, losses.py) chooses the entries.

    L = BCE-with-logits(z, max(o, 0)) elementwise (unobserved and observed-negative entries are
    negatives). With clean_rate = 1 (epoch 1) L is kept and ``corrected`` is None. Otherwise
    k = ceil(B*K*delta_rel) for LL-Cp, ceil(B*K*(1 - clean_rate)) for LL-R and LL-Ct (capped at
    B*K: the authors' ``topk`` raises beyond; k <= 0 modifies nothing); u = [o = 0] * L, the
    loss of unobserved entries and 0 elsewhere; v = the k-th largest entry of u. Every entry with
    u >= v (``not u < v``, ties with v included, so possibly more than k) is rejected (LL-R: 0)
    or corrected (LL-Ct, LL-Cp: BCE against not(max(o, 0)), i.e. 1 on unobserved entries). When
    v = 0 (k reaches the unobserved entries of positive loss) that is every entry, observed
    positives too (corrected against 0), as in the authors' code.

    Returns (mean of the B x K matrix, ``corrected``): the B x K mask u > v (strict: without
    v's own entry and its ties) of the authors' ``correction_idx``, whose observed labels LL-Cp
    sets to 1 permanently; it is computed with this scheme's k. With ``permanent_ties`` it is
    u >= v, the modified entries themselves, as BoostLU's code (youngwk/BridgeGapExplanationPAMC,
    losses.py) takes its ``correction_idx``.
    """
    if scheme not in LARGE_LOSS_SCHEMES:
        raise ValueError(f"unknown large-loss scheme {scheme!r}; choose one of: {', '.join(LARGE_LOSS_SCHEMES)}")
    functional = torch.nn.functional
    target = observed.clamp(min=0).to(logits.dtype)
    loss_matrix = functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if clean_rate == 1:
        return loss_matrix.mean(), None
    entries = logits.numel()
    k = min(math.ceil(entries * (delta_rel if scheme == "LL-Cp" else 1 - clean_rate)), entries)
    if k <= 0:
        return loss_matrix.mean(), None
    unobserved_loss = (observed == 0) * loss_matrix.detach()
    threshold = torch.topk(unobserved_loss.flatten(), k).values[-1]
    modified = ~(unobserved_loss < threshold)
    if scheme == "LL-R":
        replacement = torch.zeros_like(loss_matrix)
    else:
        replacement = functional.binary_cross_entropy_with_logits(logits, torch.logical_not(target).to(logits.dtype),
                                                                  reduction="none")
    final = torch.where(modified, replacement, loss_matrix)
    return final.mean(), modified if permanent_ties else unobserved_loss > threshold


# -- Cole et al. 2021 ("Multi-Label Learning from Single Positive Labels"; elijahcole/single-positive-
# multi-label, losses.py): an_ls, wan and epr as coefficients; ROLE's two-sided loss is role_loss.


def _indicator(mask: Tensor, like: Tensor) -> Tensor:
    """1.0 where ``mask``, else 0.0, in ``like``'s dtype (a coefficient times it keeps its float64 value)."""
    return mask.to(like.dtype)


def an_ls_coefficients(observed: Tensor, ls_coef: float) -> Coefficients:
    """Assume negative with label smoothing (their ``loss_an_ls``), with s = ls_coef:
    (1-s)*nl(p) + s*nl(1-p) where o = 1; (1-s)*nl(1-p) + s*nl(p) where o = 0."""
    positive, unobserved = _indicator(observed == 1, observed), _indicator(observed == 0, observed)
    on_pos = positive * (1.0 - ls_coef) + unobserved * ls_coef
    on_neg = positive * ls_coef + unobserved * (1.0 - ls_coef)
    return on_pos, on_neg, 0.0


def wan_coefficients(observed: Tensor) -> Coefficients:
    """Weak assume negative (their ``loss_wan``): nl(p) where o = 1, nl(1-p) / (K-1) where o = 0."""
    num_classes = observed.shape[-1]
    if num_classes < 2:
        raise ValueError(f"wan divides the unobserved terms by K - 1: it needs at least 2 classes, got {num_classes}")
    return _indicator(observed == 1, observed), _indicator(observed == 0, observed) / (num_classes - 1), 0.0


def epr_coefficients(observed: Tensor) -> Coefficients:
    """The loss matrix of EPR (their ``loss_epr``): nl(p) where o = 1, nothing elsewhere; the
    batch loss adds ``expected_positive_regulariser``."""
    return _indicator(observed == 1, observed), 0.0, 0.0


def one_process_batch(rows: Tensor) -> Tensor:
    """The batch's rows when one process holds the whole batch (``LossInputs.global_batch``)."""
    return rows


def expected_positive_regulariser(preds: Tensor, expected_num_pos: float) -> Tensor:
    """Their ``expected_positive_regularizer(preds, k, norm='2') / K**2``: the squared gap between
    the batch's mean number of predicted positives (sum over classes, mean over images) and the
    expected number k, divided by K^2."""
    return (preds.sum(1).mean(0) - expected_num_pos) ** 2 / preds.shape[1] ** 2


def role_loss(preds: Tensor, estimated: Tensor, observed: Tensor, expected_num_pos: float) -> Tensor:
    """ROLE's batch loss (their ``loss_role`` through ``compute_batch_loss``), from the classifier's
    probabilities p and the label estimator's estimates e of the batch's rows (both B x K):

    sum(0.5 * (A + E)) / (B*K) + 0.5 * (R(p) + R(e)), with
    A = [o = 1]*nl(p) + e'*nl(p) + (1-e')*nl(1-p)   (the classifier's side, e' = e detached),
    E = [o = 1]*nl(e) + p'*nl(e) + (1-p')*nl(1-e)   (the estimator's side, p' = p detached),
    R = ``expected_positive_regulariser``. So the classifier's gradient comes from A and R(p) only,
    the estimator's from E and R(e) only.
    """
    if estimated.shape != preds.shape or observed.shape != preds.shape:
        raise ValueError(f"role_loss: preds {tuple(preds.shape)}, estimated {tuple(estimated.shape)} and observed "
                         f"{tuple(observed.shape)} must have one B x K shape")
    positive = _indicator(observed == 1, preds)
    estimated_fixed, preds_fixed = estimated.detach(), preds.detach()
    classifier = (positive + estimated_fixed) * neg_log(preds) + (1.0 - estimated_fixed) * neg_log(1.0 - preds)
    estimator = (positive + preds_fixed) * neg_log(estimated) + (1.0 - preds_fixed) * neg_log(1.0 - estimated)
    regulariser = expected_positive_regulariser(preds, expected_num_pos) \
        + expected_positive_regulariser(estimated, expected_num_pos)
    return mean_loss(0.5 * (classifier + estimator)) + 0.5 * regulariser


# -- GR loss (IJCAI 2024; yan4xi1/GRLoss) and AEVLP's GPR loss (ICCV 2025; Fsoft-AIC/AEVLP) --------

# Their own log epsilon (losses.py of both repositories), not this module's LOG_EPSILON.
GPR_LOG_EPSILON = 1e-7


def gpr_schedule(k_schedule, v_schedule, epoch: int, num_epochs: int) -> tuple[float, float, float, float]:
    """(w, b, mu, sigma) at ``epoch`` (1-based) of ``num_epochs``, as their train.py moves them
    (their ``linear_init`` n = 0): linear from (w0, b0) towards (wT, bT) counting from epoch - 1, so
    epoch 1 has w0, b0 and the targets are never reached; from (mu0, sigma0) to (muT, sigmaT)
    counting from epoch, so epoch 1 is already one step on and the last epoch has muT, sigmaT.
    ``k_schedule`` = (w0, wT, b0, bT), ``v_schedule`` = (mu0, sigma0, muT, sigmaT)."""
    w_0, w_max, b_0, b_max = k_schedule
    mu_0, sigma_0, mu_max, sigma_max = v_schedule
    w = w_0 + (w_max - w_0) * max(epoch - 1, 0) / num_epochs
    b = b_0 + (b_max - b_0) * max(epoch - 1, 0) / num_epochs
    mu = mu_0 + (mu_max - mu_0) * max(epoch, 0) / num_epochs
    sigma = sigma_0 + (sigma_max - sigma_0) * max(epoch, 0) / num_epochs
    return w, b, mu, sigma


def gpr_loss(logits: Tensor, observed: Tensor, pseudo: Tensor | None, hp: Any, *, epoch: int,
             num_epochs: int, global_batch: Callable[[Tensor], Tensor] = one_process_batch) -> Tensor:
    """AEVLP's ``GPR_loss`` (with ``hp.use_pl`` false: the GR loss plus AEVLP's regulariser).

    p = sigmoid(z); K = 1 / (1 + exp(-(w*p' + b))) and V = exp(-((p' - mu) / sigma)^2 / 2) of the
    detached p', with (w, b, mu, sigma) = ``gpr_schedule``; nl(x) = -log(x + 1e-7);
    L1(p) = (1 - p^q2) / q2, L2(p) = (1 - (1-p)^q3) / q3; f = q where o = 0 else o (q = 0 without
    pseudo-labels). Entries, later rules winning:
      nl(p)                               where o = 1;
      V * (K*L1(p) + (1-K)*L2(p))          where f = 0;
      with ``use_pl``: (1 - V') * (rho*nl(p) + (1-rho)*nl(1-p)) where o = 0 and q = 1, with
      V' = min(max(V, 1 - lam1), 1 - lam2); V * nl(1-p) where f = -1 (observed negatives too).
    Other entries are 0 (observed negatives without ``use_pl``). The loss is the mean of the B x K
    matrix plus ``reg * expected_positive_regulariser(p, expected_num_pos)``, p of the whole batch
    (``global_batch``: under torchrun every process's rows).

    Each rule is computed on its own entries only (the others see p = 1/2), so an entry's value
    and gradient are those of its rule alone, as with their masked assignments.
    """
    preds = torch.sigmoid(logits)
    detached = preds.detach()
    w, b, mu, sigma = gpr_schedule(hp.k_schedule, hp.v_schedule, epoch, num_epochs)
    k_weight = 1 / (1 + torch.exp(-(w * detached + b)))
    v_weight = torch.exp(-0.5 * ((detached - mu) / sigma) ** 2)
    use_pl = bool(hp.use_pl)
    if use_pl and pseudo is None:
        raise ValueError("gpr_loss: use_pl needs pseudo-labels (pseudo = B x K in {-1, 0, 1})")
    final = torch.where(observed == 0, pseudo, observed) if use_pl else observed

    def on(mask: Tensor) -> Tensor:
        return torch.where(mask, preds, 0.5)

    def nl(x: Tensor) -> Tensor:
        return -torch.log(x + GPR_LOG_EPSILON)

    q2, q3 = float(hp.q2), float(hp.q3)
    loss = torch.zeros_like(preds)
    positive = observed == 1
    loss = torch.where(positive, nl(on(positive)), loss)
    unknown = final == 0
    p = on(unknown)
    robust_1, robust_2 = (1 - torch.pow(p, q2)) / q2, (1 - torch.pow(1 - p, q3)) / q3
    loss = torch.where(unknown, v_weight * (k_weight * robust_1 + (1 - k_weight) * robust_2), loss)
    if use_pl:
        pseudo_positive = (observed == 0) & (pseudo == 1)
        clamped = torch.where(v_weight > 1 - hp.lam1, v_weight, 1 - hp.lam1)
        clamped = torch.where(clamped < 1 - hp.lam2, clamped, 1 - hp.lam2)
        p = on(pseudo_positive)
        loss = torch.where(pseudo_positive, (1 - clamped) * (hp.rho * nl(p) + (1 - hp.rho) * nl(1 - p)), loss)
        negative = final == -1
        loss = torch.where(negative, v_weight * nl(1 - on(negative)), loss)
    return loss.mean() + hp.reg * expected_positive_regulariser(global_batch(preds), hp.expected_num_pos)

