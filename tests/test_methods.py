"""The Method interface and its registry: each method's loss equals its formula (through the
tests' reference dispatch ``reference_losses.compute_loss``, itself checked against plain formulas
in test_losses.py), label changes go through ``LabelState``, stages count their own epochs, early
stopping, and a new method plugs in through the registry alone."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

import datasets
import engine
import losses
import config as config_module
import main_clip
import methods
import reference_losses
from conftest import demo_args
from labels import LabelState
from methods.entropy import apl_update

HP = dict(alpha=0.3, beta=0.4, beta_pos=0.7, beta_neg=0.25, gamma_pos=2.0, gamma_neg=4.0, gamma_unknown=3.0,
          warmup_epoch=2, neg_proportion=0.9)


def random_labels(seed: int, batch: int = 7, classes: int = 6):
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(batch, classes, generator=generator, dtype=torch.float64)
    observed = torch.zeros(batch, classes, dtype=torch.float64)
    observed[torch.arange(batch), torch.randint(classes, (batch,), generator=generator)] = 1.0
    soft = torch.rand(batch, classes, generator=generator) < 0.2
    observed = torch.where(soft & (observed == 0), -torch.rand(batch, classes, generator=generator,
                                                               dtype=torch.float64), observed)
    pseudo = torch.randint(-1, 2, (batch, classes), generator=generator).double()
    clean = ((observed == 1) | (torch.rand(batch, classes, generator=generator) < 0.3)).double()
    return logits, observed, pseudo, clean


# The seven losses of docs/DESIGN.md §3, reachable through reference_losses.compute_loss; the methods
# added since have their formulas tested in their own files (test_large_loss.py, test_cole.py).
SEVEN = [name for name in methods.REGISTRY if name in reference_losses.LOSS_NAMES]


@pytest.mark.parametrize("name", SEVEN)
@pytest.mark.parametrize("epoch", [1, 3])
def test_method_loss_equals_its_formula_values_and_gradients(name, epoch):
    method_class = methods.REGISTRY[name]
    logits, observed, pseudo, clean = random_labels(seed=len(name) * 10 + epoch)
    config = {h.name: HP[h.name] for h in method_class.hyperparameters}
    method = method_class.from_config(config, LabelState(observed, clean), stage_epochs=5)
    ours_logits = logits.clone().requires_grad_(True)
    inputs = methods.LossInputs(ours_logits, torch.sigmoid(ours_logits), torch.arange(len(logits)), observed,
                                pseudo, clean)
    ours = method.loss(inputs, epoch)
    ours.backward()
    reference_logits = logits.clone().requires_grad_(True)
    reference = reference_losses.compute_loss(name, torch.sigmoid(reference_logits), observed,
                                              SimpleNamespace(**HP), epoch=epoch, pseudo=pseudo, true=clean)
    reference.backward()
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_logits.grad, reference_logits.grad, rtol=1e-10, atol=1e-12)
    assert ours_logits.grad.abs().sum() > 0
    coefficients = method.label_coefficients(observed, pseudo, clean, epoch)
    if coefficients is not None:  # the head-only path's form gives the same loss
        as_combine = losses.mean_loss(losses.combine(torch.sigmoid(logits), *coefficients))
        torch.testing.assert_close(as_combine, reference.detach(), rtol=1e-12, atol=1e-12)


def test_only_the_vlpl_asl_loss_lacks_the_coefficient_form_after_warm_up():
    logits, observed, pseudo, clean = random_labels(seed=0)
    without = {name for name, method_class in methods.REGISTRY.items() if name in SEVEN
               if method_class.from_config({h.name: HP[h.name] for h in method_class.hyperparameters},
                                           LabelState(observed, clean), 5)
               .label_coefficients(observed, pseudo, clean, epoch=HP["warmup_epoch"] + 1) is None}
    assert without == {"EM_PL_ASL"}


def test_the_command_line_comes_from_the_registry(tmp_path):
    parser = main_clip.get_args_parser()
    loss_action = next(a for a in parser._actions if a.dest == "method")
    assert list(loss_action.choices) == list(methods.REGISTRY)
    flags = {option for action in parser._actions for option in action.option_strings}
    for name, (hyperparameter, users) in methods.all_hyperparameters().items():
        assert hyperparameter.flag in flags and users
    config = config_module.resolve_config(parser.parse_args(["-l", "an", "--tiny-models"]))
    assert "alpha" not in config and "beta" not in config  # only the chosen method's settings
    config = config_module.resolve_config(parser.parse_args(["-l", "EM_APL", "-d", "coco", "--tiny-models"]))
    assert (config["bsize"], config["beta"], config["warmup_epoch"], config["alpha"]) == (16, 0.9, 5, 0.1)
    assert (config["optimizer"], config["head_lr_mult"], config["patience"], config["max_drop"]) == ("adam", 1.0, 0, 0.0)
    with pytest.raises(main_clip.RunError, match="--beta is a setting of EM_APL, not of -l EM"):
        config_module.resolve_config(parser.parse_args(["-l", "EM", "--beta", "0.3"]))
    with pytest.raises(main_clip.RunError, match="--alpha must be >= 0.0"):
        config_module.resolve_config(parser.parse_args(["-l", "EM", "--alpha", "-1"]))
    with pytest.raises(main_clip.RunError, match="--beta-pos must be a finite number"):
        config_module.resolve_config(parser.parse_args(["-l", "EM_PL", "--beta-pos", "nan"]))


def test_apl_turns_the_lowest_scores_into_soft_negatives_through_the_label_state():
    observed = torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 0, 0], [0, 1, 0]])
    scores = torch.tensor([[0.9, 0.2, 0.3], [0.1, 0.5, 0.8], [0.4, 0.05, 0.6], [0.3, 0.7, 0.2]])
    labels = LabelState(observed, torch.zeros_like(observed))
    method = methods.REGISTRY["EM_APL"].from_config(dict(HP, warmup_epoch=1, neg_proportion=0.9), labels,
                                                    stage_epochs=2)
    method.end_epoch(0, lambda: pytest.fail("APL must not predict before its warm-up ends"))
    assert torch.equal(labels.observed, observed)
    method.end_epoch(1, lambda: scores)
    # int(0.9 * 3 unobserved / (2 - 1)) = 2 entries per class, the lowest-scored unobserved ones
    expected = torch.tensor([[1.0, -0.2, -0.3], [-0.1, 0, 1], [0, -0.05, 0], [-0.3, 1, -0.2]])
    torch.testing.assert_close(labels.observed, expected)
    rows, cols, values = apl_update(labels.observed, scores, labels.unobserved_at_start(), 0.9, 1)
    assert rows.tolist() == [2, 1, 2] and cols.tolist() == [0, 1, 2]  # the last unobserved entry of each
    torch.testing.assert_close(values, torch.tensor([-0.4, -0.5, -0.6]))


def test_label_state_changes_restart_and_round_trip():
    observed = torch.tensor([[1.0, 0, 0], [0, 1, 0]])
    labels = LabelState(observed, torch.ones(2, 3))
    labels.update_observed(torch.tensor([0, 1]), torch.tensor([2, 0]), torch.tensor([-0.5, 1.0]))
    changed = labels.observed.clone()
    assert changed.tolist() == [[1.0, 0, -0.5], [1.0, 1, 0]]
    assert labels.unobserved_at_start().tolist() == [1, 1, 2]
    saved = labels.state_dict()
    labels.restart()
    assert torch.equal(labels.observed, observed)
    labels.load_state_dict(saved)
    assert torch.equal(labels.observed, changed)
    labels.update_observed(torch.tensor([0]), torch.tensor([1]), torch.tensor([-2.0]))
    with pytest.raises(main_clip.RunError, match="observed training labels outside"):
        labels.check()
    with pytest.raises(ValueError, match="checkpoint labels"):
        labels.load_state_dict({"observed": torch.zeros(3, 3)})


def test_early_stopping_rules():
    patience = engine.EarlyStopping(patience=2)
    assert [patience.update(v) for v in (1.0, 2.0, 1.5)] == [None, None, None]
    assert "2 epoch(s) without a new best" in patience.update(2.0)  # equal is not better
    assert patience.stopped
    drop = engine.EarlyStopping(max_drop=3.0)
    assert [drop.update(v) for v in (50.0, 48.0, 47.0)] == [None, None, None]
    assert "more than 3.0 below the best 50.000" in drop.update(46.9)
    never = engine.EarlyStopping()
    assert all(never.update(v) is None for v in (5.0, 1.0, float("nan"), 0.0)) and not never.stopped
    restored = engine.EarlyStopping(patience=2)
    restored.load_state_dict(patience.state_dict())
    assert restored.state_dict() == {"best": 2.0, "since_best": 2, "stopped": True}


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_patience_stops_the_run_and_resume_keeps_it_stopped(demo_root, tmp_path):
    # A head whose learning rate is too small to move the val mAP: no epoch after the first is better.
    common = ("-l", "an", "--train-mode", "linear_fixed_features", "--head-lr", "1e-12", "--epochs", "5",
              "--patience", "2", "--run-name", "stop")
    summary = main_clip.main(demo_args(demo_root, tmp_path, *common))
    assert summary["epochs_run"] == 3 and summary["best_epoch"] == 1
    assert "early stop of the head stage after epoch 3" in (tmp_path / "stop" / "log.txt").read_text()
    lines = (tmp_path / "stop" / "metrics.jsonl").read_text()
    again = main_clip.main(demo_args(demo_root, tmp_path, *common, "--resume"))
    assert again == summary and (tmp_path / "stop" / "metrics.jsonl").read_text() == lines


def test_linear_init_counts_apl_epochs_within_each_stage(demo_root, tmp_path):
    """The head stage and the fine-tuning stage each run APL's schedule on their own epochs and
    from the benchmark's labels; counting the run's epochs fired APL in every head epoch."""
    main_clip.main(demo_args(demo_root, tmp_path, "-l", "EM_APL", "--train-mode", "linear_init", "--head-epochs", "3",
                             "--epochs", "3", "--warmup-epoch", "1", "--neg-proportion", "0.5", "--run-name", "li"))
    state = torch.load(tmp_path / "li" / "last.pt", map_location="cpu", weights_only=True)
    assert state["stage"] == "end_to_end" and state["epoch"] == 6
    unobserved = (datasets.load_benchmark(demo_root, "pascal").train.labels_obs == 0).sum(0)
    # Stage epochs 1, 2, 3 are past the warm-up (epoch >= 1): 3 x int(0.5 * U_c / (3 - 1)) per class.
    expected = [min(int(u), 3 * math.floor(0.5 * int(u) / 2)) for u in unobserved]
    soft_negatives = (state["labels"]["observed"] < 0).sum(0).tolist()
    assert soft_negatives == expected and all(n < u for n, u in zip(soft_negatives, unobserved))


class ScaledAssumeNegative(methods.Method):
    """A method defined outside the package: assume-negative times a learnable scale (an extra
    parameter with its own learning-rate multiplier), counting its steps in its state."""
    name = "toy_scaled_an"
    description = "test: assume negative times a learnable scale"
    hyperparameters = (methods.Hyperparameter("toy_scale_init", float, "initial scale", default=2.0, minimum=0.0),)

    def __init__(self, hp, labels, stage_epochs):
        super().__init__(hp, labels, stage_epochs)
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(hp.toy_scale_init)))
        self.steps = 0

    def parameter_groups(self):
        return [([self.log_scale], 10.0)]

    def loss(self, inputs, epoch):
        self.steps += 1
        an = losses.mean_loss(losses.combine(inputs.preds, *losses.an_coefficients(inputs.observed)))
        return an * torch.exp(self.log_scale)

    def state_dict(self):
        return {"log_scale": self.log_scale.detach().clone(), "steps": self.steps}

    def load_state_dict(self, state):
        self.log_scale.data.copy_(state["log_scale"])
        self.steps = state["steps"]


def test_a_new_method_plugs_in_through_the_registry_and_resumes_exactly(demo_root, tmp_path, monkeypatch):
    monkeypatch.setitem(methods.REGISTRY, ScaledAssumeNegative.name, ScaledAssumeNegative)
    # On cached features (the general autograd loop, since the loss has no coefficient form): fast.
    common = ("-l", "toy_scaled_an", "--toy-scale-init", "3", "--train-mode", "linear_fixed_features",
              "--head-lr", "1e-2")
    once = main_clip.main(demo_args(demo_root, tmp_path, *common, "--run-name", "once"))
    main_clip.main(demo_args(demo_root, tmp_path, *common, "--run-name", "split", "--epochs", "1"))
    resumed = main_clip.main(demo_args(demo_root, tmp_path, *common, "--run-name", "split", "--resume"))
    assert resumed == once
    states = [torch.load(tmp_path / name / "last.pt", map_location="cpu", weights_only=True)["method"]
              for name in ("once", "split")]
    assert states[0]["steps"] == states[1]["steps"] == 16  # 2 epochs x 8 batches of the 128 train images
    assert torch.equal(states[0]["log_scale"], states[1]["log_scale"])
    assert not math.isclose(float(states[0]["log_scale"]), math.log(3.0))
    config = json.loads((tmp_path / "once" / "config.json").read_text())
    assert config["toy_scale_init"] == 3.0 and config["method"] == "toy_scaled_an"
