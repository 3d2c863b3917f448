"""Cole et al. 2021's methods (methods/cole.py): an_ls, wan, epr and ROLE against plain
implementations of their formulas (values, and gradients written out by hand), ROLE's label
estimates (initialisation, learning rate, checkpoints, --resume), runs on the demo data and the
per-dataset defaults."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import engine
import losses
import config as config_module
import main_clip
import methods
import reference_losses
from conftest import demo_args, run_once_and_resumed
from labels import LabelState
from methods.cole import ROLE, initial_label_logits

EPS = 1e-5
COLE = ("an_ls", "wan", "epr", "role")


def nl(x: float) -> float:
    return -math.log(x + EPS)


def random_batch(seed: int, batch: int = 6, classes: int = 9):
    """float64 probabilities (the boundaries 0 and 1 included) and observed labels in {-1, 0, 1}
    with one positive per row."""
    rng = np.random.default_rng(seed)
    preds = rng.random((batch, classes))
    preds[0, :2] = [0.0, 1.0]
    observed = rng.choice([-1.0, 0.0], size=(batch, classes), p=[0.15, 0.85])
    observed[np.arange(batch), rng.integers(classes, size=batch)] = 1.0
    return torch.tensor(preds), torch.tensor(observed)


# -- plain implementations: one entry at a time, and dL/dp written out ---------------------------

def plain_entry(name: str, p: float, o: float, classes: int, ls: float) -> float:
    if name == "an_ls":
        if o == 1:
            return (1 - ls) * nl(p) + ls * nl(1 - p)
        return (1 - ls) * nl(1 - p) + ls * nl(p) if o == 0 else 0.0
    if name == "wan":
        if o == 1:
            return nl(p)
        return nl(1 - p) / (classes - 1) if o == 0 else 0.0
    if name == "epr":
        return nl(p) if o == 1 else 0.0
    raise AssertionError(name)


def plain_entry_gradient(name: str, p: float, o: float, classes: int, ls: float) -> float:
    """d(entry)/dp, with d nl(x)/dx = -1/(x + eps)."""
    up, down = -1 / (p + EPS), 1 / (1 - p + EPS)  # d nl(p)/dp, d nl(1-p)/dp
    if name == "an_ls":
        if o == 1:
            return (1 - ls) * up + ls * down
        return (1 - ls) * down + ls * up if o == 0 else 0.0
    if name == "wan":
        if o == 1:
            return up
        return down / (classes - 1) if o == 0 else 0.0
    if name == "epr":
        return up if o == 1 else 0.0
    raise AssertionError(name)


def plain_regulariser(preds: np.ndarray, expected: float) -> tuple[float, float]:
    """(value, d value / d p_ij, the same for every entry) of (mean_i sum_j p_ij - k)^2 / K^2."""
    batch, classes = preds.shape
    gap = sum(sum(row) for row in preds) / batch - expected
    return gap ** 2 / classes ** 2, 2 * gap / (batch * classes ** 2)


def plain_loss_and_gradient(name: str, preds: torch.Tensor, observed: torch.Tensor, ls: float,
                            expected: float) -> tuple[float, np.ndarray]:
    p, o = preds.numpy(), observed.numpy()
    batch, classes = p.shape
    value = sum(plain_entry(name, p[i, j], o[i, j], classes, ls) for i in range(batch) for j in range(classes))
    gradient = np.array([[plain_entry_gradient(name, p[i, j], o[i, j], classes, ls) for j in range(classes)]
                         for i in range(batch)]) / (batch * classes)
    value /= batch * classes
    if name == "epr":
        reg, reg_gradient = plain_regulariser(p, expected)
        value, gradient = value + reg, gradient + reg_gradient
    return value, gradient


def plain_role(preds: np.ndarray, estimated: np.ndarray, observed: np.ndarray, expected: float):
    """Their loss_role, entry by entry: (value, dL/dp of the classifier's side, dL/de of the
    estimator's side), each side's gradient with the other side held fixed."""
    batch, classes = preds.shape
    total, grad_p, grad_e = 0.0, np.zeros_like(preds), np.zeros_like(preds)
    for i in range(batch):
        for j in range(classes):
            p, e, positive = preds[i, j], estimated[i, j], float(observed[i, j] == 1)
            classifier = positive * nl(p) + e * nl(p) + (1 - e) * nl(1 - p)
            estimator = positive * nl(e) + p * nl(e) + (1 - p) * nl(1 - e)
            total += 0.5 * (classifier + estimator)
            grad_p[i, j] = 0.5 * (-(positive + e) / (p + EPS) + (1 - e) / (1 - p + EPS))
            grad_e[i, j] = 0.5 * (-(positive + p) / (e + EPS) + (1 - p) / (1 - e + EPS))
    reg_p, reg_grad_p = plain_regulariser(preds, expected)
    reg_e, reg_grad_e = plain_regulariser(estimated, expected)
    scale = batch * classes
    return (total / scale + 0.5 * (reg_p + reg_e), grad_p / scale + 0.5 * reg_grad_p,
            grad_e / scale + 0.5 * reg_grad_e)


# -- the losses ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["an_ls", "wan", "epr"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compute_loss_equals_the_plain_formula_values_and_gradients(name, seed):
    preds, observed = random_batch(seed)
    hp = SimpleNamespace(ls_coef=0.15 + 0.05 * seed, expected_num_pos=1.0 + seed)
    expected_value, expected_gradient = plain_loss_and_gradient(name, preds, observed, hp.ls_coef,
                                                                hp.expected_num_pos)
    leaf = preds.clone().requires_grad_(True)
    value = reference_losses.compute_loss(name, leaf, observed, hp)
    value.backward()
    assert float(value.detach()) == pytest.approx(expected_value, rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(leaf.grad.numpy(), expected_gradient, rtol=1e-10, atol=1e-14)
    assert leaf.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["an_ls", "wan", "epr"])
def test_the_methods_give_compute_loss_and_the_coefficient_form_where_it_exists(name):
    preds, observed = random_batch(4)
    logits = torch.logit(preds.clamp(0.01, 0.99))
    config = {"ls_coef": 0.1, "expected_num_pos": 2.0}
    method_class = methods.REGISTRY[name]
    method = method_class.from_config({h.name: config[h.name] for h in method_class.hyperparameters},
                                      LabelState(observed, observed.clamp(min=0)), stage_epochs=3)
    ours = logits.clone().requires_grad_(True)
    loss = method.loss(methods.LossInputs(ours, torch.sigmoid(ours), torch.arange(len(ours)), observed, None,
                                          observed.clamp(min=0)), epoch=1)
    loss.backward()
    reference = logits.clone().requires_grad_(True)
    expected = reference_losses.compute_loss(name, torch.sigmoid(reference), observed, SimpleNamespace(**config))
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-10, atol=1e-14)
    coefficients = method.label_coefficients(observed, None, observed.clamp(min=0), epoch=1)
    if name == "epr":  # its regulariser is not of combine's form: the autograd step trains it
        assert coefficients is None
        return
    as_combine = losses.mean_loss(losses.combine(torch.sigmoid(logits), *coefficients))
    torch.testing.assert_close(as_combine, expected.detach(), rtol=1e-12, atol=1e-12)
    # The head-only fast path's written-out gradient is autograd's.
    written = losses.combine_logit_gradient(torch.sigmoid(logits), *coefficients) / logits.numel()
    torch.testing.assert_close(written, reference.grad, rtol=1e-10, atol=1e-14)


def test_an_ls_with_zero_smoothing_is_an_and_wan_weighs_negatives_by_one_over_k_minus_one():
    preds, observed = random_batch(7)
    an = reference_losses.compute_loss("an", preds, observed, None)
    assert float(reference_losses.compute_loss("an_ls", preds, observed, SimpleNamespace(ls_coef=0.0))) == pytest.approx(float(an))
    on_pos, on_neg, _ = losses.wan_coefficients(observed)
    assert set(on_neg[observed == 0].tolist()) == {1 / 8} and set(on_pos[observed == 1].tolist()) == {1.0}
    assert on_neg[observed == -1].abs().sum() == 0 and on_pos[observed != 1].abs().sum() == 0
    with pytest.raises(ValueError, match="at least 2 classes"):
        losses.wan_coefficients(torch.zeros(3, 1))
    with pytest.raises(ValueError, match="'expected_num_pos'"):
        reference_losses.compute_loss("epr", preds, observed, SimpleNamespace(ls_coef=0.1))
    with pytest.raises(ValueError, match="known losses: .*an_ls, wan, epr"):
        reference_losses.compute_loss("role", preds, observed, None)


def test_epr_regulariser_is_their_squared_gap_over_k_squared():
    preds = torch.tensor([[0.5, 0.25, 1.0, 0.0], [0.25, 0.25, 0.5, 0.0]], dtype=torch.float64)
    # rows sum to 1.75 and 1.0: mean 1.375; (1.375 - 2.9)^2 / 4^2
    assert float(losses.expected_positive_regulariser(preds, 2.9)) == pytest.approx((1.375 - 2.9) ** 2 / 16)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_role_loss_equals_the_plain_formula_with_each_side_detached(seed):
    preds, observed = random_batch(seed)
    rng = np.random.default_rng(100 + seed)
    estimated = torch.tensor(rng.random(preds.shape))
    estimated[1, :2] = torch.tensor([0.0, 1.0])
    expected_num_pos = 1.5 + seed
    value, grad_p, grad_e = plain_role(preds.numpy(), estimated.numpy(), observed.numpy(), expected_num_pos)
    p_leaf, e_leaf = preds.clone().requires_grad_(True), estimated.clone().requires_grad_(True)
    loss = losses.role_loss(p_leaf, e_leaf, observed, expected_num_pos)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(value, rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(p_leaf.grad.numpy(), grad_p, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(e_leaf.grad.numpy(), grad_e, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="one B x K shape"):
        losses.role_loss(preds, estimated[:, 1:], observed, expected_num_pos)


def test_role_method_trains_its_rows_of_the_estimates_through_the_sigmoid():
    """ROLE.loss reads the estimates of the batch's rows (inputs.index, in any order); the
    gradients reach the classifier's logits and those rows' estimate logits only."""
    generator = torch.Generator().manual_seed(3)
    observed = torch.zeros(10, 5)
    observed[torch.arange(10), torch.randint(5, (10,), generator=generator)] = 1.0
    method = ROLE.from_config({"expected_num_pos": 1.5, "seed": 4}, LabelState(observed, observed), stage_epochs=2)
    index = torch.tensor([7, 2, 9, 0])
    logits = torch.randn(4, 5, generator=generator, dtype=torch.float64).requires_grad_(True)
    preds = torch.sigmoid(logits)
    loss = method.loss(methods.LossInputs(logits, preds, index, observed[index], None, observed[index]), epoch=1)
    loss.backward()
    estimated = torch.sigmoid(method.label_logits.detach()[index]).double()
    value, grad_p, grad_e = plain_role(preds.detach().numpy(), estimated.numpy(), observed[index].numpy(), 1.5)
    assert float(loss.detach()) == pytest.approx(value, rel=1e-6)
    p, e = preds.detach().numpy(), estimated.numpy()
    np.testing.assert_allclose(logits.grad.numpy(), grad_p * p * (1 - p), rtol=1e-5, atol=1e-9)
    grad = method.label_logits.grad
    np.testing.assert_allclose(grad[index].numpy(), grad_e * e * (1 - e), rtol=1e-4, atol=1e-8)
    others = torch.ones(10, dtype=torch.bool)
    others[index] = False
    assert grad[others].abs().sum() == 0 and grad[index].abs().sum() > 0
    assert method.label_coefficients(observed, None, observed, epoch=1) is None


def test_role_initial_estimates_are_theirs_and_follow_the_seed():
    observed = torch.zeros(50, 8)
    observed[torch.arange(50), torch.arange(50) % 8] = 1.0
    observed[:5, 7] = torch.where(observed[:5, 7] == 1, 1.0, -1.0)
    labels = LabelState(observed, observed.clamp(min=0))
    method = ROLE.from_config({"expected_num_pos": 1.5, "seed": 1}, labels, stage_epochs=1)
    estimates = method.estimates()
    assert estimates.shape == (50, 8) and method.label_logits.dtype == torch.float32
    torch.testing.assert_close(estimates[observed == 1], torch.full(((observed == 1).sum(),), 0.995))
    torch.testing.assert_close(estimates[observed == -1], torch.full(((observed == -1).sum(),), 0.005))
    unobserved = estimates[observed == 0]
    assert unobserved.min() >= 0.4 - 1e-6 and unobserved.max() <= 0.6 + 1e-6
    assert unobserved.min() < 0.42 and unobserved.max() > 0.58  # uniform over logits in [-logit(0.6), logit(0.6)]
    again = ROLE.from_config({"expected_num_pos": 1.5, "seed": 1}, labels, stage_epochs=1)
    other = ROLE.from_config({"expected_num_pos": 1.5, "seed": 2}, labels, stage_epochs=1)
    assert torch.equal(again.label_logits, method.label_logits)
    assert not torch.equal(other.label_logits, method.label_logits)
    torch.testing.assert_close(initial_label_logits(observed, torch.Generator().manual_seed(1)),
                               method.label_logits.detach())
    assert method.parameter_groups() == [([method.label_logits], 10.0)]  # their P['lr_mult']
    state = method.state_dict()
    other.load_state_dict(state)
    assert torch.equal(other.label_logits, method.label_logits)
    with pytest.raises(ValueError, match="ROLE label estimates"):
        other.load_state_dict({"label_logits": torch.zeros(3, 8)})


# -- runs ------------------------------------------------------------------------------------------

RUN_FILES = ("config.json", "log.txt", "metrics.jsonl", "summary.json", "last.pt", "best.pt")


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("name", COLE)
def test_each_method_runs_on_cached_features_and_writes_the_run_files(demo_root, tmp_path, name):
    summary = main_clip.main(demo_args(demo_root, tmp_path, "-l", name, "--train-mode", "linear_fixed_features",
                                       "--head-lr", "1e-2", "--run-name", "r"))
    run_dir = tmp_path / "r"
    assert all((run_dir / f).is_file() for f in RUN_FILES)
    assert json.loads((run_dir / "summary.json").read_text()) == summary and summary["best_test_map"] > 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["method"] == name
    assert ("expected_num_pos" in config) == (name in ("epr", "role")) and ("ls_coef" in config) == (name == "an_ls")
    train = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["phase"] == "train"]
    assert len(train) == 2 and all(math.isfinite(r["loss"]) and r["loss"] != 0 for r in train)
    last = load(run_dir / "last.pt")
    if name == "role":
        # The estimates train at 10x the head's learning rate, from their initialisation.
        assert last["optimizer"]["param_groups"][-1]["lr"] == pytest.approx(10 * 1e-2)
        assert len(last["optimizer"]["param_groups"]) == 2 and last["method"]["label_logits"].shape == (128, 20)
        labels = torch.as_tensor(last["labels"]["observed"])
        initial = initial_label_logits(labels, torch.Generator().manual_seed(config["seed"]))
        assert not torch.equal(last["method"]["label_logits"], initial)
    else:
        assert last["method"] == {} and len(last["optimizer"]["param_groups"]) == 1


def test_role_end_to_end_and_linear_init(demo_root, tmp_path):
    main_clip.main(demo_args(demo_root, tmp_path, "-l", "role", "--epochs", "1", "--run-name", "e2e"))
    last = load(tmp_path / "e2e" / "last.pt")
    groups = last["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-3, 1e-2])  # backbone, head (x1), estimates (x10)
    main_clip.main(demo_args(demo_root, tmp_path, "-l", "role", "--train-mode", "linear_init", "--head-epochs", "1",
                             "--epochs", "1", "--head-lr", "1e-2", "--run-name", "li"))
    last = load(tmp_path / "li" / "last.pt")
    assert last["stage"] == "end_to_end" and last["epoch"] == 2
    assert last["optimizer"]["param_groups"][-1]["lr"] == pytest.approx(1e-2)  # 10x the fine-tuning lr 1e-3


def test_role_estimates_survive_resume_exactly(demo_root, tmp_path):
    common = ("-l", "role", "--train-mode", "linear_fixed_features", "--head-lr", "1e-2")
    once = main_clip.main(demo_args(demo_root, tmp_path, *common, "--run-name", "once"))
    main_clip.main(demo_args(demo_root, tmp_path, *common, "--run-name", "split", "--epochs", "1"))
    after_one = load(tmp_path / "split" / "last.pt")["method"]["label_logits"]
    resumed = main_clip.main(demo_args(demo_root, tmp_path, *common, "--run-name", "split", "--resume"))
    assert resumed == once
    states = [load(tmp_path / name / "last.pt") for name in ("once", "split")]
    assert states[0]["epoch"] == states[1]["epoch"] == 2
    assert torch.equal(states[0]["method"]["label_logits"], states[1]["method"]["label_logits"])
    assert not torch.equal(states[1]["method"]["label_logits"], after_one)  # the second epoch moved them


def their_handover(label_logits: torch.Tensor) -> np.ndarray:
    """Cole et al.'s hand-over between stages, as the estimates it hands on: the probabilities
    (get_estimated_labels) clipped to [1e-5, 1 - 1e-5] (inverse_sigmoid, before its logit)."""
    estimates = 1.0 / (1.0 + np.exp(-label_logits.double().numpy()))
    return np.maximum(np.minimum(estimates, 1 - 1e-5), 1e-5)


def estimates_of(label_logits: torch.Tensor) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-label_logits.double().numpy()))


def test_role_later_stage_starts_from_the_handed_on_estimates_as_their_code_does():
    generator = torch.Generator().manual_seed(3)
    observed = torch.zeros(40, 6)
    observed[torch.arange(40), torch.randint(0, 6, (40,), generator=generator)] = 1
    labels = LabelState(observed, observed, None)
    handed = 12 * torch.randn(40, 6, generator=generator)   # some far past the clip at logit(1 - 1e-5)
    role = ROLE(SimpleNamespace(expected_num_pos=1.5), labels, 5, seed=1)
    fresh = role.label_logits.detach().clone()
    role.start_from_previous_stage({"label_logits": handed})
    started = role.label_logits.detach()
    # Equal up to float32 rounding of the probabilities (their get_estimated_labels is float32 too).
    assert np.allclose(estimates_of(started), their_handover(handed), rtol=0, atol=2e-7)
    clipped = handed.abs() > 12
    assert clipped.any() and np.allclose(estimates_of(started)[clipped.numpy()],
                                         np.where(handed[clipped].numpy() > 0, 1 - 1e-5, 1e-5), rtol=0, atol=2e-7)
    assert not torch.equal(started, fresh)
    loss = role.loss(SimpleNamespace(preds=torch.rand(4, 6), index=torch.arange(4), observed=observed[:4]), 1)
    loss.backward()
    assert role.label_logits.grad is not None and role.label_logits.grad[:4].abs().sum() > 0


def test_role_fine_tuning_starts_from_the_head_stage_best_estimates(demo_root, tmp_path, monkeypatch):
    """linear_init: the fine-tuning stage's estimates are the head stage's at its best val epoch,
    handed on as Cole et al. hand them on; a run resumed between the stages does the same."""
    flags = ("-l", "role", "--train-mode", "linear_init", "--head-epochs", "3", "--epochs", "1",
             "--head-lr", "1e-2")
    after_epoch, handed = {}, []
    save_last, start = engine.Trainer.save_last, ROLE.start_from_previous_stage

    def record(trainer, epoch, stage):
        save_last(trainer, epoch, stage)
        if stage is not None:
            after_epoch[epoch] = stage.method.state_dict()["label_logits"]

    def spy(method, state):
        start(method, state)
        handed.append((state["label_logits"].clone(), method.label_logits.detach().cpu().clone()))
    monkeypatch.setattr(engine.Trainer, "save_last", record)
    monkeypatch.setattr(ROLE, "start_from_previous_stage", spy)
    main_clip.main(demo_args(demo_root, tmp_path, *flags, "--run-name", "li"))
    records = [json.loads(line) for line in (tmp_path / "li" / "metrics.jsonl").read_text().splitlines()]
    head_val = [r["clean"]["map"] for r in records if r["phase"] == "val" and r["epoch"] <= 3]
    best = 1 + int(np.argmax(head_val))      # the first of equal maxima, as best.pt keeps it
    (received, started), = handed
    assert torch.equal(received, after_epoch[best])
    assert np.allclose(estimates_of(started), their_handover(after_epoch[best]), rtol=0, atol=2e-7)
    assert best < 3, f"head-stage val mAP {head_val}: this check needs a best epoch before the last"


def test_role_resumed_between_the_stages_equals_the_run_in_one_go(demo_root, tmp_path, monkeypatch):
    flags = ("-l", "role", "--train-mode", "linear_init", "--head-epochs", "1", "--epochs", "1", "--head-lr", "1e-2")
    once, resumed = run_once_and_resumed(demo_root, tmp_path, monkeypatch, *flags)
    assert resumed == once
    states = [load(tmp_path / name / "last.pt") for name in ("once", "split")]
    assert states[0]["stage"] == "end_to_end"
    assert torch.equal(states[0]["method"]["label_logits"], states[1]["method"]["label_logits"])


# -- defaults --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset, expected_num_pos, lr", [("pascal", 1.5, 1e-5), ("coco", 2.9, 1e-5),
                                                           ("nuswide", 1.9, 1e-5), ("cub", 31.4, 1e-4)])
def test_per_dataset_defaults_resolve(dataset, expected_num_pos, lr):
    parser = main_clip.get_args_parser()
    for name in COLE:
        config = config_module.resolve_config(parser.parse_args(["-l", name, "-d", dataset, "--tiny-models"]))
        protocol = {key: config[key] for key in ("epochs", "bsize", "optimizer", "weight_decay", "head_lr_mult",
                                                 "patience", "max_drop", "lr")}
        assert protocol == dict(epochs=10, bsize=8, optimizer="adam", weight_decay=0.0, head_lr_mult=1.0, patience=0,
                                max_drop=0.0, lr=lr)
        assert config.get("expected_num_pos") == (expected_num_pos if name in ("epr", "role") else None)
        assert config.get("ls_coef") == (0.1 if name == "an_ls" else None)
        # Head-only epochs: their linear_init_params for an_ls and ROLE; the others use --bsize.
        their_head = {"an_ls": (1e-4, 16 if dataset == "nuswide" else 8),
                      "role": (1e-3, 8 if dataset == "cub" else 16)}.get(name, (1e-4, None))
        assert (config["head_lr"], config["head_bsize"]) == their_head
    config = config_module.resolve_config(parser.parse_args(["-l", "role", "-d", dataset, "--expected-num-pos", "4"]))
    assert config["expected_num_pos"] == 4.0


@pytest.mark.parametrize("argv, message", [
    (["-l", "role", "--ls-coef", "0.2"], "--ls-coef is a setting of an_ls, not of -l role"),
    (["-l", "wan", "--expected-num-pos", "2"], "--expected-num-pos is a setting of epr, role, GR, AEVLP, not of -l wan"),
    (["-l", "an_ls", "--ls-coef", "1.5"], "--ls-coef must be <= 1.0"),
    (["-l", "epr", "--expected-num-pos", "-1"], "--expected-num-pos must be >= 0.0"),
])
def test_flags_belong_to_their_methods_and_are_checked(argv, message):
    with pytest.raises(main_clip.RunError, match=message):
        config_module.resolve_config(main_clip.get_args_parser().parse_args(argv))
