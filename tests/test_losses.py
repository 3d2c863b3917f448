"""losses.py's formulas, reached by loss name through the tests' reference dispatch
(reference_losses.py), against an independent per-entry computation of the docs/DESIGN.md §3 formulas."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import losses
import reference_losses

HP = SimpleNamespace(alpha=0.2, beta=0.4, beta_pos=0.7, beta_neg=0.3, gamma_pos=2.0, gamma_neg=4.0,
                     gamma_unknown=4.0, warmup_epoch=2)


def nl(x: float) -> float:
    return -math.log(x + 1e-5)


def entropy(p: float) -> float:
    return p * nl(p) + (1 - p) * nl(1 - p)


def reference_entry(name, p, o, q, t, hp, epoch) -> float:
    """One entry of L, written straight from the docs/DESIGN.md §3 table (first matching rule, read as the
    docs/DESIGN.md describes disjoint cases)."""
    if name == "bce":
        return nl(p) if t == 1 else nl(1 - p)
    if name == "an":
        return nl(p) if o == 1 else (nl(1 - p) if o == 0 else 0.0)
    if name == "iun":
        if t == 0:
            return nl(1 - p)
        return nl(p) if o == 1 else 0.0
    warm = name in ("EM_PL", "EM_PL_ASL") and epoch <= hp.warmup_epoch
    if name == "EM" or warm:
        return nl(p) if o == 1 else (-hp.alpha * entropy(p) if o == 0 else 0.0)
    if name == "EM_APL":
        if o == 1:
            return nl(p)
        if o == 0:
            return -hp.alpha * entropy(p)
        s = -o
        return hp.beta * (s * nl(p) + (1 - s) * nl(1 - p))
    f = q if o == 0 else o
    if name == "EM_PL":
        if o == 1:
            return nl(p)
        if f == 0:
            return -hp.alpha * entropy(p)
        if o == 0 and q == 1:
            return hp.beta_pos * (0.9 * nl(p) + 0.1 * nl(1 - p))
        if o == 0 and q == -1:
            return hp.beta_neg * (0.1 * nl(p) + 0.9 * nl(1 - p))
        return 0.0
    if name == "EM_PL_ASL":
        if o == 1 or (o == 0 and q == 1):
            return (1 - p) ** hp.gamma_pos * nl(p)
        if f == 0:
            return -((1 - p) ** hp.gamma_unknown) * entropy(p)
        if o == 0 and q == -1:
            return p ** hp.gamma_neg * nl(1 - p)
        return 0.0
    raise AssertionError(name)


def reference_loss(name, preds, observed, pseudo, true, hp, epoch) -> float:
    batch_size, num_classes = preds.shape
    total = 0.0
    for i in range(batch_size):
        for j in range(num_classes):
            total += reference_entry(name, float(preds[i, j]), float(observed[i, j]), float(pseudo[i, j]),
                                     float(true[i, j]), hp, epoch)
    return total / (batch_size * num_classes)


def random_batch(seed: int, batch_size: int = 8, num_classes: int = 12, soft_negatives: bool = False):
    rng = np.random.default_rng(seed)
    preds = rng.random((batch_size, num_classes))
    preds[0, :3] = [0.0, 1.0, 0.5]  # the boundaries, where nl's epsilon matters
    true = (rng.random((batch_size, num_classes)) < 0.3).astype(np.float64)
    observed = rng.choice([-1.0, 0.0, 1.0], size=(batch_size, num_classes), p=[0.2, 0.6, 0.2])
    if soft_negatives:
        soft = rng.random((batch_size, num_classes)) < 0.3
        observed[soft] = -rng.uniform(0.01, 0.99, size=int(soft.sum()))
    pseudo = rng.choice([-1.0, 0.0, 1.0], size=(batch_size, num_classes))
    return [torch.tensor(x, dtype=torch.float64) for x in (preds, observed, pseudo, true)]


def consistent_true(observed: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Observed positives are true positives in real data (iun's two rules never overlap then)."""
    return torch.where(observed == 1, torch.ones_like(true), true)


@pytest.mark.parametrize("name", reference_losses.LOSS_NAMES)
@pytest.mark.parametrize("epoch", [1, 2, 3, 10])
@pytest.mark.parametrize("soft_negatives", [False, True])
def test_loss_matches_elementwise_reference(name, epoch, soft_negatives):
    for seed in range(3):
        preds, observed, pseudo, true = random_batch(seed + 10 * epoch, soft_negatives=soft_negatives)
        true = consistent_true(observed, true)
        got = reference_losses.compute_loss(name, preds, observed, HP, epoch=epoch, pseudo=pseudo, true=true)
        expected = reference_loss(name, preds, observed, pseudo, true, HP, epoch)
        assert got.dim() == 0
        assert abs(float(got) - expected) < 1e-6, (name, epoch, seed)


@pytest.mark.parametrize("name", reference_losses.LOSS_NAMES)
def test_float32_close_to_float64(name):
    preds, observed, pseudo, true = random_batch(5, soft_negatives=True)
    true = consistent_true(observed, true)
    got64 = reference_losses.compute_loss(name, preds, observed, HP, epoch=5, pseudo=pseudo, true=true)
    got32 = reference_losses.compute_loss(name, preds.float(), observed.float(), HP, epoch=5,
                                          pseudo=pseudo.float(), true=true.float())
    assert got32.dtype == torch.float32
    assert abs(float(got32) - float(got64)) < 1e-5


def test_warmup_boundary_is_inclusive():
    preds, observed, pseudo, true = random_batch(1)
    hp = SimpleNamespace(**{**vars(HP), "warmup_epoch": 3})
    em = reference_losses.compute_loss("EM", preds, observed, hp)
    for name in reference_losses.LOSSES_NEEDING_PSEUDO:
        assert float(reference_losses.compute_loss(name, preds, observed, hp, epoch=3, pseudo=pseudo)) == float(em)
        assert float(reference_losses.compute_loss(name, preds, observed, hp, epoch=4, pseudo=pseudo)) != float(em)


def test_beta_neg_zero_gives_zero_loss_on_negative_pseudo_labels():
    hp = SimpleNamespace(**{**vars(HP), "beta_neg": 0.0, "warmup_epoch": 0})
    preds = torch.tensor([[0.3, 0.9]])
    observed = torch.zeros(1, 2)
    pseudo = torch.tensor([[-1.0, -1.0]])
    assert float(reference_losses.compute_loss("EM_PL", preds, observed, hp, pseudo=pseudo)) == 0.0


def test_em_apl_soft_negative_value():
    preds = torch.tensor([[0.2]], dtype=torch.float64)
    observed = torch.tensor([[-0.25]], dtype=torch.float64)
    got = float(reference_losses.compute_loss("EM_APL", preds, observed, HP))
    assert got == pytest.approx(HP.beta * (0.25 * nl(0.2) + 0.75 * nl(0.8)), abs=1e-12)


@pytest.mark.parametrize("name", reference_losses.LOSS_NAMES)
@pytest.mark.parametrize("gammas", [(2.0, 4.0, 4.0), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)])
def test_gradients_finite_at_zero_and_one(name, gammas):
    hp = SimpleNamespace(**{**vars(HP), "gamma_pos": gammas[0], "gamma_neg": gammas[1],
                            "gamma_unknown": gammas[2], "warmup_epoch": 0})
    # Every combination of p in {0, 1} with every observed / pseudo / true value.
    values_p, values_o, values_q, values_t = [0.0, 1.0], [-1.0, -0.5, 0.0, 1.0], [-1.0, 0.0, 1.0], [0.0, 1.0]
    grid = np.array(np.meshgrid(values_p, values_o, values_q, values_t)).reshape(4, -1)
    for dtype in (torch.float32, torch.float64):
        preds = torch.tensor(grid[0], dtype=dtype).reshape(1, -1).requires_grad_(True)
        observed, pseudo, true = (torch.tensor(row, dtype=dtype).reshape(1, -1) for row in grid[1:])
        loss = reference_losses.compute_loss(name, preds, observed, hp, epoch=1, pseudo=pseudo, true=true)
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(preds.grad).all(), (name, gammas, dtype)


def test_gradient_flows_through_sigmoid_at_saturation():
    logits = torch.tensor([[-40.0, 40.0, 0.0]], requires_grad=True)
    preds = torch.sigmoid(logits)
    observed = torch.tensor([[1.0, 0.0, 0.0]])
    pseudo = torch.tensor([[0.0, 1.0, -1.0]])
    reference_losses.compute_loss("EM_PL_ASL", preds, observed, HP, epoch=5, pseudo=pseudo).backward()
    assert torch.isfinite(logits.grad).all()


def test_unknown_name_lists_known_names():
    preds, observed, _, _ = random_batch(0)
    with pytest.raises(ValueError, match="known losses: bce, an, iun, EM, EM_APL, EM_PL, EM_PL_ASL"):
        reference_losses.compute_loss("focal", preds, observed, HP)


@pytest.mark.parametrize("name", sorted(reference_losses.LOSSES_NEEDING_PSEUDO))
def test_missing_pseudo_raises_even_during_warmup(name):
    preds, observed, _, _ = random_batch(0)
    with pytest.raises(ValueError, match="pseudo"):
        reference_losses.compute_loss(name, preds, observed, HP, epoch=1)


@pytest.mark.parametrize("name", sorted(reference_losses.LOSSES_NEEDING_TRUE))
def test_missing_true_raises(name):
    preds, observed, _, _ = random_batch(0)
    with pytest.raises(ValueError, match="clean labels"):
        reference_losses.compute_loss(name, preds, observed, HP)


def test_shape_mismatch_raises():
    preds, observed, pseudo, true = random_batch(0)
    with pytest.raises(ValueError, match="observed has shape"):
        reference_losses.compute_loss("an", preds, observed[:, :-1], HP)
    with pytest.raises(ValueError, match="pseudo has shape"):
        reference_losses.compute_loss("EM_PL", preds, observed, HP, pseudo=pseudo[:-1])
    with pytest.raises(ValueError, match="true has shape"):
        reference_losses.compute_loss("bce", preds, observed, HP, true=true.T)
    with pytest.raises(ValueError, match="B x K"):
        reference_losses.compute_loss("an", preds[0], observed[0], HP)


def test_value_ranges_raise():
    preds, observed, pseudo, true = random_batch(0)
    with pytest.raises(ValueError, match=r"preds must lie in \[0, 1\]"):
        reference_losses.compute_loss("an", preds * 2.0, observed, HP)
    with pytest.raises(ValueError, match=r"preds must lie in \[0, 1\]"):
        reference_losses.compute_loss("an", torch.full_like(preds, float("nan")), observed, HP)
    with pytest.raises(ValueError, match=r"observed labels must lie in \[-1, 1\]"):
        reference_losses.compute_loss("EM", preds, observed - 1.0, HP)
    with pytest.raises(ValueError, match="pseudo-labels must lie"):
        reference_losses.compute_loss("EM_PL", preds, observed, HP, pseudo=pseudo * 2)
    with pytest.raises(ValueError, match="true labels must lie"):
        reference_losses.compute_loss("iun", preds, observed, HP, true=true - 1)


def test_missing_hyperparameter_is_named():
    preds, observed, _, _ = random_batch(0)
    with pytest.raises(ValueError, match="'alpha'"):
        reference_losses.compute_loss("EM", preds, observed, SimpleNamespace(beta=1.0))


COMBINE_FORM = [name for name in reference_losses.LOSS_NAMES if name != "EM_PL_ASL"]


@pytest.mark.parametrize("name", COMBINE_FORM + ["EM_PL_ASL"])
@pytest.mark.parametrize("epoch", [1, 5])
def test_coefficients_give_the_loss_matrix(name, epoch):
    preds, observed, pseudo, true = random_batch(7, soft_negatives=True)
    true = consistent_true(observed, true)
    coefficients = reference_losses.loss_coefficients(name, observed, HP, epoch=epoch, pseudo=pseudo, true=true)
    if name == "EM_PL_ASL" and epoch > HP.warmup_epoch:
        assert coefficients is None  # not of combine's form: reference_losses.loss_matrix takes its own path
        return
    got = losses.mean_loss(losses.combine(preds, *coefficients))
    assert abs(float(got) - reference_loss(name, preds, observed, pseudo, true, HP, epoch)) < 1e-6


def test_coefficient_rows_index_tensors_and_keep_scalars():
    preds, observed, pseudo, true = random_batch(8)
    on_pos, on_neg, on_entropy = losses.coefficient_rows(losses.an_coefficients(observed), torch.tensor([4, 1]))
    assert torch.equal(on_pos, (observed[[4, 1]] == 1).double()) and torch.equal(on_neg, (observed[[4, 1]] == 0).double())
    assert on_entropy == 0.0


@pytest.mark.parametrize("name", COMBINE_FORM)
def test_written_out_logit_gradient_equals_autograd(name):
    """combine_logit_gradient against autograd through sigmoid and combine, saturated logits included."""
    preds, observed, pseudo, true = random_batch(9, soft_negatives=name == "EM_APL")
    true = consistent_true(observed, true)
    logits = torch.logit(preds.clamp(0.02, 0.98)).requires_grad_()
    with torch.no_grad():
        logits[0, :4] = torch.tensor([-60.0, 60.0, 0.0, 8.0])  # saturated: p within 1e-26 of 0 and of 1
    coefficients = reference_losses.loss_coefficients(name, observed, HP, epoch=5, pseudo=pseudo, true=true)
    loss = losses.combine(torch.sigmoid(logits), *coefficients).sum()
    (expected,) = torch.autograd.grad(loss, logits)
    got = losses.combine_logit_gradient(torch.sigmoid(logits.detach()), *coefficients)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert got.abs().max() > 0
