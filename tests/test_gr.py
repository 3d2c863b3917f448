"""GR loss (IJCAI 2024) in AEVLP's form (ICCV 2025): ``losses.gpr_loss`` against a plain per-entry
implementation of the formulas (values and gradients, with and without pseudo-labels, over the
epochs of the schedules), the schedules' epoch counting, ``-l GR`` end to end on the demo data and
across an interrupted run, its flags and AEVLP's per-dataset settings as the defaults."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

import losses
import config as config_module
import main_clip
import methods
import rundir
from conftest import demo_args, run_once_and_resumed
from labels import LabelState
from methods.gr import AEVLP_CONFIGS, GR

VOC = AEVLP_CONFIGS["pascal"]


def settings(dataset: str = "pascal", use_pl: bool = True, **changes) -> SimpleNamespace:
    config = AEVLP_CONFIGS[dataset]
    names = ("k_schedule", "v_schedule", "q2", "q3", "lam1", "lam2", "rho", "reg", "expected_num_pos")
    return SimpleNamespace(**{**{name: config[name] for name in names}, "use_pl": use_pl, **changes})


def nl(x):
    return -torch.log(x + 1e-7)


def reference_gpr_loss(logits, observed, pseudo, hp, epoch, num_epochs):
    """The formulas, one entry at a time: the weights K and V are plain floats (no gradient)."""
    w0, w_t, b0, b_t = hp.k_schedule
    mu0, sigma0, mu_t, sigma_t = hp.v_schedule
    k_step, v_step = (epoch - 1) / num_epochs, epoch / num_epochs
    w, b = w0 + k_step * (w_t - w0), b0 + k_step * (b_t - b0)
    mu, sigma = mu0 + v_step * (mu_t - mu0), sigma0 + v_step * (sigma_t - sigma0)
    batch, classes = logits.shape
    total = 0.0 * logits.sum()
    probabilities = []
    for i in range(batch):
        for j in range(classes):
            p = 1 / (1 + torch.exp(-logits[i, j]))
            probabilities.append(p)
            fixed = float(p.detach())
            k_weight = 1 / (1 + math.exp(-(w * fixed + b)))
            v_weight = math.exp(-0.5 * ((fixed - mu) / sigma) ** 2)
            o = float(observed[i, j])
            q = float(pseudo[i, j]) if hp.use_pl else 0.0
            f = q if o == 0 else o
            if o == 1:
                total = total + nl(p)
            elif hp.use_pl and o == 0 and q == 1:
                clamped = min(max(v_weight, 1 - hp.lam1), 1 - hp.lam2)
                total = total + (1 - clamped) * (hp.rho * nl(p) + (1 - hp.rho) * nl(1 - p))
            elif f == 0:
                total = total + v_weight * (k_weight * (1 - p ** hp.q2) / hp.q2
                                            + (1 - k_weight) * (1 - (1 - p) ** hp.q3) / hp.q3)
            elif hp.use_pl and f == -1:
                total = total + v_weight * nl(1 - p)
    predicted_positives = sum(probabilities) / batch
    return total / (batch * classes) + hp.reg * (predicted_positives - hp.expected_num_pos) ** 2 / classes ** 2


def random_batch(seed: int, batch: int = 6, classes: int = 7):
    """float64 logits; one observed positive per row and a few observed negatives; pseudo-labels
    in {-1, 0, 1} everywhere (also on observed entries, where they must not count)."""
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(batch, classes, generator=generator, dtype=torch.float64)
    observed = torch.zeros(batch, classes, dtype=torch.float64)
    observed[torch.arange(batch), torch.randint(classes, (batch,), generator=generator)] = 1.0
    negative = (torch.rand(batch, classes, generator=generator) < 0.15) & (observed == 0)
    observed = torch.where(negative, -1.0, observed)
    pseudo = torch.randint(-1, 2, (batch, classes), generator=generator).double()
    return logits, observed, pseudo


HP_CASES = {
    "voc": settings("pascal"),
    "cub": settings("cub"),                                     # q3 = 1.5, lam (0.8, 0.2), reg 0.01
    "coco_no_pl": settings("coco", use_pl=False),
    "cub_no_pl": settings("cub", use_pl=False),
    "reversed_lam": settings("pascal", lam1=0.2, lam2=0.8),      # max before min: every weight 1 - lam2
    "odd": settings("pascal", k_schedule=(-1.0, 3.0, 0.5, -4.0), v_schedule=(0.2, 0.3, 0.9, 1.5), q2=0.5,
                    q3=0.7, rho=0.6, reg=0.3, expected_num_pos=2.5),
}
EPOCHS = [(1, 8), (2, 8), (5, 8), (8, 8), (1, 1), (3, 10), (10, 10)]


@pytest.mark.parametrize("case", list(HP_CASES))
@pytest.mark.parametrize("epoch,num_epochs", EPOCHS)
@pytest.mark.parametrize("seed", [0, 1])
def test_gpr_loss_equals_the_formulas_values_and_gradients(case, epoch, num_epochs, seed):
    hp = HP_CASES[case]
    logits, observed, pseudo = random_batch(seed)
    ours_logits = logits.clone().requires_grad_(True)
    ours = losses.gpr_loss(ours_logits, observed, pseudo if hp.use_pl else None, hp, epoch=epoch,
                           num_epochs=num_epochs)
    ours.backward()
    reference_logits = logits.clone().requires_grad_(True)
    reference = reference_gpr_loss(reference_logits, observed, pseudo, hp, epoch, num_epochs)
    reference.backward()
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours_logits.grad, reference_logits.grad, rtol=1e-9, atol=1e-12)


def test_the_cases_reach_every_rule_and_every_side_of_the_clamp():
    """The batches above hold all five kinds of entries, and the pseudo-positive weights V fall
    below 1 - lam1, between, and above 1 - lam2 (so the clamp is tested on both sides)."""
    kinds, sides = set(), set()
    hp = HP_CASES["voc"]
    for seed in (0, 1):
        logits, observed, pseudo = random_batch(seed)
        final = torch.where(observed == 0, pseudo, observed)
        kinds |= {"positive"} if (observed == 1).any() else set()
        kinds |= {"unknown"} if (final == 0).any() else set()
        kinds |= {"pseudo positive"} if ((observed == 0) & (pseudo == 1)).any() else set()
        kinds |= {"pseudo negative"} if ((observed == 0) & (pseudo == -1)).any() else set()
        kinds |= {"observed negative"} if (observed == -1).any() else set()
        for epoch, num_epochs in EPOCHS:
            _, _, mu, sigma = losses.gpr_schedule(hp.k_schedule, hp.v_schedule, epoch, num_epochs)
            v = torch.exp(-0.5 * ((torch.sigmoid(logits) - mu) / sigma) ** 2)[(observed == 0) & (pseudo == 1)]
            sides |= {"below"} if (v < 1 - hp.lam1).any() else set()
            sides |= {"between"} if ((v > 1 - hp.lam1) & (v < 1 - hp.lam2)).any() else set()
            sides |= {"above"} if (v > 1 - hp.lam2).any() else set()
    assert kinds == {"positive", "unknown", "pseudo positive", "pseudo negative", "observed negative"}
    assert sides == {"below", "between", "above"}


def test_the_schedules_count_k_from_epoch_minus_one_and_v_from_epoch():
    k_schedule, v_schedule = VOC["k_schedule"], VOC["v_schedule"]   # (0, 2, -2, -2), (0.5, 2, 0.8, 0.5)
    assert losses.gpr_schedule(k_schedule, v_schedule, 1, 8) == (0.0, -2.0, 0.5 + 0.3 / 8, 2.0 - 1.5 / 8)
    w, b, mu, sigma = losses.gpr_schedule(k_schedule, v_schedule, 8, 8)
    assert (w, b) == (2.0 * 7 / 8, -2.0) and (mu, sigma) == pytest.approx((0.8, 0.5), abs=1e-15)
    # K never reaches its targets; V reaches them at the last epoch, whatever the number of epochs.
    for num_epochs in (1, 3, 10):
        w, b, mu, sigma = losses.gpr_schedule((0.0, 10.0, -2.0, -8.0), v_schedule, num_epochs, num_epochs)
        assert w == pytest.approx(10.0 * (num_epochs - 1) / num_epochs) and (mu, sigma) == pytest.approx((0.8, 0.5))


def test_no_pseudo_labels_means_no_loss_on_observed_negatives_and_the_gr_loss_with_reg_zero():
    logits, observed, _ = random_batch(3)
    logits.requires_grad_(True)
    hp = settings("pascal", use_pl=False, reg=0.0)
    loss = losses.gpr_loss(logits, observed, None, hp, epoch=3, num_epochs=8)
    loss.backward()
    assert torch.all(logits.grad[observed == -1] == 0) and torch.all(logits.grad[observed != -1] != 0)
    with pytest.raises(ValueError, match="use_pl needs pseudo-labels"):
        losses.gpr_loss(logits, observed, None, settings("pascal"), epoch=1, num_epochs=8)


def test_each_rule_sees_only_its_own_entries_saturated_predictions_keep_finite_gradients():
    """float32 predictions of exactly 0 and 1: a rule computed on another rule's entry (p^0.01 at
    p = 0 has an infinite derivative) would turn the gradient into NaN. (An unobserved entry at
    p = 0 exactly has that derivative in its own rule, in the authors' formula too.)"""
    logits = torch.tensor([[-200.0, 40.0, 0.3, -1.0], [40.0, -200.0, 40.0, 0.5]], requires_grad=True)
    observed = torch.tensor([[1.0, -1.0, 0.0, 0.0], [1.0, -1.0, 0.0, 0.0]])
    pseudo = torch.tensor([[0.0, 0.0, 1.0, -1.0], [0.0, 0.0, 0.0, 1.0]])
    for use_pl in (True, False):
        logits.grad = None
        hp = settings("pascal", use_pl=use_pl)
        loss = losses.gpr_loss(logits, observed, pseudo if use_pl else None, hp, epoch=2, num_epochs=8)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_the_method_is_gpr_loss_without_pseudo_labels_over_the_stage_epochs():
    logits, observed, pseudo = random_batch(5, batch=4, classes=20)
    labels = LabelState(torch.zeros(10, 20), torch.ones(10, 20))
    config = GR.defaults("pascal")
    method = GR.from_config(config, labels, stage_epochs=8)
    assert method.label_coefficients(labels.observed, None, labels.clean, 1) is None  # no head-only fast path
    inputs = methods.LossInputs(logits, torch.sigmoid(logits), torch.arange(4), observed, pseudo, torch.ones(4, 20))
    for epoch in (1, 4, 8):
        expected = losses.gpr_loss(logits, observed, None, settings("pascal", use_pl=False), epoch=epoch,
                                   num_epochs=8)
        torch.testing.assert_close(method.loss(inputs, epoch), expected, rtol=0, atol=0)
    other = GR.from_config(config, labels, stage_epochs=2).loss(inputs, 1)
    assert not torch.equal(other, method.loss(inputs, 1))  # the schedule runs over the stage's epochs
    assert not GR.needs_pseudo_labels


# AEVLP's configs (configs/pascal.json, coco.json, configs/nuswide.json, configs/cub.json) and its
# train.py's protocol, as (epochs, bsize, k_schedule, q3, reg, expected_num_pos).
PUBLISHED = {
    "pascal": (8, 8, [0, 2, -2, -2], 1.0, 0.05, 1.5),
    "coco": (8, 16, [0, 10, -2, -8], 1.0, 0.001, 2.9),
    "nuswide": (10, 16, [0, 10, -2, -8], 1.0, 0.001, 1.9),
    "cub": (10, 8, [0, 10, -2, -8], 1.5, 0.01, 31.4),
}


@pytest.mark.parametrize("dataset", list(PUBLISHED))
def test_aevlp_settings_are_each_datasets_default(dataset):
    parser = main_clip.get_args_parser()
    config = config_module.resolve_config(parser.parse_args(["-l", "GR", "-d", dataset, "--tiny-models"]))
    epochs, bsize, k_schedule, q3, reg, expected_num_pos = PUBLISHED[dataset]
    expected = dict(epochs=epochs, bsize=bsize, lr=1e-5, optimizer="adam", weight_decay=0.0, head_lr_mult=10.0,
                    patience=2, max_drop=2.0, k_schedule=k_schedule, v_schedule=[0.5, 2, 0.8, 0.5], q2=0.01, q3=q3,
                    reg=reg, expected_num_pos=expected_num_pos)
    assert {key: config[key] for key in expected} == expected
    assert "lam1" not in config and "rho" not in config  # pseudo-label weights: not GR's settings
    config = config_module.resolve_config(parser.parse_args(["-l", "GR", "-d", dataset, "--tiny-models", "--q2", "0.5",
                                                         "--k-schedule=-1,2,3,4", "--v-schedule", "0.1,1,0.9,2",
                                                         "--reg", "0", "--epochs", "3"]))
    assert (config["q2"], config["k_schedule"], config["v_schedule"], config["reg"], config["epochs"]) == \
        (0.5, [-1.0, 2.0, 3.0, 4.0], [0.1, 1.0, 0.9, 2.0], 0.0, 3)
    assert GR.defaults(dataset)["k_schedule"] is not GR.defaults(dataset)["k_schedule"]  # a fresh list each time


def test_gr_flags_are_checked_and_belong_to_gr():
    parser = main_clip.get_args_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["-l", "GR", "--k-schedule", "1,2,3"])
    with pytest.raises(SystemExit):
        parser.parse_args(["-l", "GR", "--v-schedule", "a,b,c,d"])
    with pytest.raises(main_clip.RunError, match="--k-schedule is a setting of GR, AEVLP, not of -l an"):
        config_module.resolve_config(parser.parse_args(["-l", "an", "--k-schedule", "0,1,2,3"]))
    for bad, message in ((["--q2", "0"], "--q2 must be > 0"), (["--q3", "-1"], "--q3 must be >= 0.0"),
                         (["--v-schedule", "0.5,0,0.8,0.5"], "sigma0 and sigmaT must be > 0"),
                         (["--reg", "-0.1"], "--reg must be >= 0.0"),
                         (["--k-schedule", "0,inf,1,1"], "--k-schedule must be 4 finite numbers")):
        with pytest.raises(main_clip.RunError, match=message):
            config_module.resolve_config(parser.parse_args(["-l", "GR", "--tiny-models", *bad]))
    _, users = methods.all_hyperparameters()["expected_num_pos"]
    assert users == ["epr", "role", "GR", "AEVLP"]


def test_gr_trains_end_to_end_on_the_demo_data(demo_root, tmp_path):
    summary = main_clip.main(demo_args(demo_root, tmp_path, "-l", "GR", "--run-name", "g"))
    run = tmp_path / "g"
    assert all((run / name).is_file() for name in rundir.RUN_FILES)
    config = json.loads((run / "config.json").read_text())
    assert (config["method"], config["k_schedule"], config["q2"], config["head_lr_mult"], config["patience"]) == \
        ("GR", [0.0, 2.0, -2.0, -2.0], 0.01, 10.0, 2)
    assert summary["epochs_run"] == 2 and math.isfinite(summary["best_val_map"])
    train = [record for record in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if record["phase"] == "train"]
    assert len(train) == 2 and all(math.isfinite(record["loss"]) for record in train)


def test_gr_resumes_exactly_after_an_interruption(demo_root, tmp_path, monkeypatch):
    once, resumed = run_once_and_resumed(demo_root, tmp_path, monkeypatch, "-l", "GR", "--train-mode",
                                         "linear_fixed_features", "--head-lr", "1e-2")
    assert resumed == once and resumed["epochs_run"] == 2
    weights = [torch.load(tmp_path / name / "last.pt", map_location="cpu", weights_only=True)["model"]
               for name in ("once", "split")]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
