"""Large loss (LL-R, LL-Ct, LL-Cp; Kim et al. 2022): ``losses.large_loss`` against a plain
per-entry implementation of the authors' rule (values, gradients, ties), the clean-rate schedule,
LL-Cp's permanent corrections through the label state and across ``--resume``, the end-to-end
runs on the demo data, and the published protocol as the per-dataset defaults."""
from __future__ import annotations

import json
import math

import pytest
import torch

import datasets
import losses
import config as config_module
import main_clip
import methods
from conftest import demo_args
from labels import LabelState
from methods.large_loss import DELTA_REL, clean_rate

SCHEMES = ("LL-R", "LL-Ct", "LL-Cp")
RUN_FILES = ("config.json", "log.txt", "metrics.jsonl", "summary.json", "last.pt", "best.pt")


def bce(z: torch.Tensor, t: float) -> torch.Tensor:
    """-t*log(sigmoid(z)) - (1-t)*log(1-sigmoid(z)) = log(1 + e^z) - t*z (smooth at z = 0; the
    logits here are small enough for e^z)."""
    return torch.log1p(torch.exp(z)) - z * t


def reference_large_loss(logits, observed, scheme, rate, delta_rel):
    """The description, entry by entry: assume-negative BCE; from the clean rate's first drop, v is
    the k-th largest loss among the entries (observed ones counting 0); every entry whose masked
    loss is not below v is rejected (0) or taken against the opposite of its 0/1 target; the
    entries strictly above v are LL-Cp's permanent corrections."""
    batch, classes = logits.shape
    target = [[max(float(observed[i, j]), 0.0) for j in range(classes)] for i in range(batch)]
    entry = [[bce(logits[i, j], target[i][j]) for j in range(classes)] for i in range(batch)]
    if rate == 1:
        return torch.stack([e for row in entry for e in row]).sum() / (batch * classes), None
    share = delta_rel if scheme == "LL-Cp" else 1 - rate
    k = min(math.ceil(batch * classes * share), batch * classes)
    masked = [[float(entry[i][j].detach()) if observed[i, j] == 0 else 0.0 for j in range(classes)] for i in range(batch)]
    v = sorted((m for row in masked for m in row), reverse=True)[k - 1]
    total, corrected = 0.0 * logits.sum(), torch.zeros(batch, classes, dtype=torch.bool)  # 0, with a gradient
    for i in range(batch):
        for j in range(classes):
            if masked[i][j] >= v:
                if scheme != "LL-R":
                    total = total + bce(logits[i, j], 0.0 if target[i][j] else 1.0)
            else:
                total = total + entry[i][j]
            corrected[i, j] = masked[i][j] > v
    return total / (batch * classes), corrected


def random_batch(seed: int, batch: int = 6, classes: int = 5, tied: bool = False):
    """Logits (float64), observed labels with one positive per row and a few observed negatives.
    ``tied``: logits from a handful of values, so many entries share a loss."""
    generator = torch.Generator().manual_seed(seed)
    if tied:
        logits = torch.randint(-2, 3, (batch, classes), generator=generator).double() * 0.75
    else:
        logits = 2 * torch.randn(batch, classes, generator=generator, dtype=torch.float64)
    observed = torch.zeros(batch, classes, dtype=torch.float64)
    observed[torch.arange(batch), torch.randint(classes, (batch,), generator=generator)] = 1.0
    negative = (torch.rand(batch, classes, generator=generator) < 0.1) & (observed == 0)
    return logits, torch.where(negative, -1.0, observed)


CASES = [(seed, tied, rate, delta) for seed, tied in ((0, False), (1, True), (2, True), (3, False))
         for rate, delta in ((1.0, 0.2), (0.9, 0.1), (0.6, 0.2), (0.3, 0.37), (0.0, 0.5), (-0.4, 1.0))]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("seed,tied,rate,delta", CASES)
def test_large_loss_equals_the_plain_rule_values_gradients_and_corrections(scheme, seed, tied, rate, delta):
    logits, observed = random_batch(seed, tied=tied)
    ours_logits = logits.clone().requires_grad_(True)
    ours, corrected = losses.large_loss(ours_logits, observed, scheme=scheme, clean_rate=rate, delta_rel=delta)
    ours.backward()
    reference_logits = logits.clone().requires_grad_(True)
    reference, reference_corrected = reference_large_loss(reference_logits, observed, scheme, rate, delta)
    reference.backward()
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours_logits.grad, reference_logits.grad, rtol=1e-10, atol=1e-14)
    if rate == 1:
        assert corrected is None and reference_corrected is None
    else:
        assert corrected.dtype == torch.bool and torch.equal(corrected, reference_corrected)
        assert not corrected[observed != 0].any()


@pytest.mark.parametrize("seed,tied,rate,delta", [case for case in CASES if case[2] != 1])
def test_ll_cp_with_permanent_ties_makes_every_modified_entry_permanent(seed, tied, rate, delta):
    """--permanent-ties on: BoostLU's correction_idx, every entry whose masked loss is not below the
    k-th largest (ties and a zero threshold included); the loss is the same as without it."""
    logits, observed = random_batch(seed, tied=tied)
    loss, corrected = losses.large_loss(logits, observed, scheme="LL-Cp", clean_rate=rate, delta_rel=delta,
                                        permanent_ties=True)
    reference, strict = reference_large_loss(logits, observed, "LL-Cp", rate, delta)
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=1e-14)
    k = min(math.ceil(logits.numel() * delta), logits.numel())
    masked = [float(bce(logits[i, j], max(float(observed[i, j]), 0.0))) if observed[i, j] == 0 else 0.0
              for i in range(logits.shape[0]) for j in range(logits.shape[1])]
    v = sorted(masked, reverse=True)[k - 1]
    assert corrected.flatten().tolist() == [m >= v for m in masked] and int(corrected.sum()) >= k
    assert strict.flatten().tolist() == [m > v for m in masked]   # off: LargeLossMatters' rule


def test_the_cases_reach_ties_the_zero_threshold_and_the_cap():
    """The random cases above cover what the rule is particular about: ties at the k-th loss (more
    than k entries modified), a k-th loss of 0 (every entry modified, observed positives too) and
    k above B*K (capped)."""
    seen = set()
    for seed, tied, rate, delta in CASES:
        if rate == 1:
            continue
        logits, observed = random_batch(seed, tied=tied)
        k = math.ceil(logits.numel() * (1 - rate))
        matrix = torch.nn.functional.binary_cross_entropy_with_logits(logits, observed.clamp(min=0), reduction="none")
        masked = (observed == 0) * matrix
        v = masked.flatten().sort(descending=True).values[min(k, logits.numel()) - 1]
        rejected, corrected = losses.large_loss(logits, observed, scheme="LL-R", clean_rate=rate, delta_rel=delta)
        assert int(corrected.sum()) == int((masked > v).sum()) < int((masked >= v).sum())
        if int((masked >= v).sum()) > k and v > 0:
            seen.add("tie")
        if v == 0:
            seen.add("zero threshold")
            assert float(rejected) == 0.0  # LL-R rejected every entry, observed positives included
        if k > logits.numel():
            seen.add("cap")
    assert seen == {"tie", "zero threshold", "cap"}


def test_the_authors_comparisons_on_a_small_batch():
    # One row, no ties: losses of the unobserved entries in decreasing order 3, 2, 1 (logits l give
    # BCE against 0 = softplus(l)); the observed positive and the observed negative never count.
    logits = torch.tensor([[5.0, 3.0, 2.0, 1.0, 4.0]], dtype=torch.float64)
    observed = torch.tensor([[1.0, 0.0, 0.0, 0.0, -1.0]], dtype=torch.float64)
    # k = ceil(5 * 0.4) = 2: the two largest unobserved losses are rejected; only the one strictly
    # above the 2nd largest is a correction (the authors' '>' against their '<').
    loss, corrected = losses.large_loss(logits, observed, scheme="LL-R", clean_rate=0.6, delta_rel=0.1)
    plain = torch.nn.functional.softplus(torch.tensor([-5.0, 3.0, 2.0, 1.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(loss, (plain[0] + plain[3] + plain[4]) / 5)
    assert corrected.tolist() == [[False, True, False, False, False]]
    # LL-Ct: the same entries taken against label 1; LL-Cp: k = ceil(5 * 0.1) = 1 whatever the clean
    # rate, and no correction at all (nothing lies strictly above the largest loss).
    loss, _ = losses.large_loss(logits, observed, scheme="LL-Ct", clean_rate=0.6, delta_rel=0.1)
    against_one = torch.nn.functional.softplus(-torch.tensor([3.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(loss, (plain[0] + plain[3] + plain[4] + against_one.sum()) / 5)
    loss, corrected = losses.large_loss(logits, observed, scheme="LL-Cp", clean_rate=0.6, delta_rel=0.1)
    torch.testing.assert_close(loss, (plain[0] + plain[2] + plain[3] + plain[4] + against_one[0]) / 5)
    assert not corrected.any()
    # BoostLU's code: the one entry at the k-th largest loss is corrected for good.
    _, corrected = losses.large_loss(logits, observed, scheme="LL-Cp", clean_rate=0.6, delta_rel=0.1,
                                     permanent_ties=True)
    assert corrected.tolist() == [[False, True, False, False, False]]
    with pytest.raises(ValueError, match="unknown large-loss scheme"):
        losses.large_loss(logits, observed, scheme="LL-X", clean_rate=0.6, delta_rel=0.1)


def test_the_clean_rate_drops_after_every_epoch_of_the_stage_as_the_authors_subtract():
    assert clean_rate(1, 0.4) == 1.0
    for delta in (0.002, 0.1, 0.2, 0.4):
        rate = 1.0
        for epoch in range(1, 12):
            assert clean_rate(epoch, delta) == rate  # bit for bit: k is a ceiling of it
            rate -= delta
    assert clean_rate(6, 0.2) != 0.0 and abs(clean_rate(6, 0.2)) < 1e-15  # the float arithmetic is kept


@pytest.mark.parametrize("scheme", SCHEMES)
def test_methods_use_the_loss_and_only_ll_cp_writes_its_corrections(scheme):
    logits, observed = random_batch(7, batch=8, classes=6, tied=True)
    index = torch.tensor([3, 9, 1, 4, 0, 7, 2, 5])
    all_observed = torch.zeros(10, 6, dtype=torch.float64)
    all_observed[index] = observed
    labels = LabelState(all_observed, torch.ones(10, 6))
    method = methods.REGISTRY[scheme].from_config({"delta_rel": 0.2, "permanent_ties": False}, labels,
                                                  stage_epochs=10)
    assert method.label_coefficients(labels.observed, None, labels.clean, 2) is None  # no head-only fast path
    inputs = methods.LossInputs(logits, torch.sigmoid(logits), index, observed, None, torch.ones_like(observed))
    first = method.loss(inputs, 1)
    torch.testing.assert_close(first, torch.nn.functional.binary_cross_entropy_with_logits(logits, observed.clamp(min=0)))
    assert torch.equal(labels.observed, all_observed.float())  # epoch 1 changes nothing
    third = method.loss(inputs, 3)
    expected, corrected = losses.large_loss(logits, observed, scheme=scheme, clean_rate=clean_rate(3, 0.2),
                                            delta_rel=0.2)
    torch.testing.assert_close(third, expected, rtol=0, atol=0)
    after = all_observed.float().clone()
    if scheme == "LL-Cp":
        assert corrected.any()
        rows, cols = corrected.nonzero(as_tuple=True)
        after[index[rows], cols] = 1.0
    assert torch.equal(labels.observed, after)


def test_delta_rel_is_one_flag_shared_by_the_three_methods():
    hyperparameter, users = methods.all_hyperparameters()["delta_rel"]
    assert hyperparameter is DELTA_REL and users == list(SCHEMES)
    assert all(methods.REGISTRY[name].hyperparameters[0] is DELTA_REL for name in SCHEMES)
    assert "percent" in DELTA_REL.help and "fraction" in DELTA_REL.help


def test_permanent_ties_is_ll_cps_switch_off_by_default():
    parser = main_clip.get_args_parser()
    assert methods.all_hyperparameters()["permanent_ties"][1] == ["LL-Cp"]
    assert config_module.resolve_config(parser.parse_args(["-l", "LL-Cp", "--tiny-models"]))["permanent_ties"] is False
    config = config_module.resolve_config(parser.parse_args(["-l", "LL-Cp", "--tiny-models", "--permanent-ties", "on"]))
    assert config["permanent_ties"] is True
    with pytest.raises(main_clip.RunError, match="--permanent-ties is a setting of LL-Cp, not of -l LL-Ct"):
        config_module.resolve_config(parser.parse_args(["-l", "LL-Ct", "--permanent-ties", "on"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["-l", "LL-Cp", "--permanent-ties", "yes"])


# Kim et al.'s protocol (snucml/LargeLossMatters config.py, train.py and issue #4); delta_rel is
# issue #4's value as passed to their --delta_rel, divided by 100 as their config.py does.
PUBLISHED = {
    "pascal": (dict(optimizer="sgd", weight_decay=1e-3, lr=5e-3), (0.002, 0.002, 0.001)),
    "coco": (dict(optimizer="adam", weight_decay=0.0, lr=1e-5), (0.004, 0.002, 0.002)),
    "nuswide": (dict(optimizer="adam", weight_decay=0.0, lr=1e-5), (0.004, 0.002, 0.002)),
    "cub": (dict(optimizer="adam", weight_decay=0.0, lr=7.5e-5), (0.004, 0.004, 0.002)),
}


@pytest.mark.parametrize("dataset", list(PUBLISHED))
def test_the_published_protocol_is_each_datasets_default(dataset):
    parser = main_clip.get_args_parser()
    protocol, deltas = PUBLISHED[dataset]
    for scheme, delta in zip(SCHEMES, deltas):
        config = config_module.resolve_config(parser.parse_args(["-l", scheme, "-d", dataset, "--tiny-models"]))
        expected = dict(protocol, epochs=10, bsize=16, head_lr_mult=10.0, patience=0, max_drop=3.0, delta_rel=delta)
        assert {key: config[key] for key in expected} == expected
    config = config_module.resolve_config(parser.parse_args(["-l", "LL-Ct", "-d", dataset, "--tiny-models",
                                                         "--delta-rel", "0.3", "--lr", "1e-4"]))
    assert (config["delta_rel"], config["lr"]) == (0.3, 1e-4)


def test_delta_rel_is_checked_and_belongs_to_the_large_loss_methods():
    parser = main_clip.get_args_parser()
    assert "delta_rel" not in config_module.resolve_config(parser.parse_args(["-l", "an", "--tiny-models"]))
    with pytest.raises(main_clip.RunError, match="--delta-rel is a setting of LL-R, LL-Ct, LL-Cp, not of -l an"):
        config_module.resolve_config(parser.parse_args(["-l", "an", "--delta-rel", "0.1"]))
    with pytest.raises(main_clip.RunError, match="--delta-rel must be <= 1.0"):
        config_module.resolve_config(parser.parse_args(["-l", "LL-R", "--delta-rel", "20"]))
    with pytest.raises(main_clip.RunError, match="--delta-rel must be >= 0.0"):
        config_module.resolve_config(parser.parse_args(["-l", "LL-Cp", "--delta-rel", "-0.1"]))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_each_method_trains_end_to_end_on_the_demo_data(demo_root, tmp_path, scheme):
    summary = main_clip.main(demo_args(demo_root, tmp_path, "-l", scheme, "--delta-rel", "0.1", "--run-name", "run"))
    run = tmp_path / "run"
    assert all((run / name).is_file() for name in RUN_FILES)
    config = json.loads((run / "config.json").read_text())
    assert (config["method"], config["delta_rel"], config["optimizer"], config["head_lr_mult"], config["max_drop"]) == \
        (scheme, 0.1, "sgd", 10.0, 3.0)
    assert summary["epochs_run"] == 2 and math.isfinite(summary["best_val_map"])
    train = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["phase"] == "train"]
    assert len(train) == 2 and all(math.isfinite(record["loss"]) for record in train)
    observed = torch.load(run / "last.pt", map_location="cpu", weights_only=True)["labels"]["observed"]
    initial = torch.as_tensor(datasets.load_benchmark(demo_root, "pascal").train.labels_obs).float()
    # Epoch 2 corrects ceil(16 * 20 * 0.1) = 32 entries per batch, less ties; only LL-Cp keeps them.
    changed = observed != initial
    if scheme == "LL-Cp":
        assert changed.any() and bool((observed[changed] == 1).all()) and bool((initial[changed] == 0).all())
    else:
        assert not changed.any()


def test_ll_cp_corrections_survive_resume_exactly(demo_root, tmp_path):
    common = ("-l", "LL-Cp", "--delta-rel", "0.05")
    once = main_clip.main(demo_args(demo_root, tmp_path, *common, "--run-name", "once"))
    main_clip.main(demo_args(demo_root, tmp_path, *common, "--run-name", "split", "--epochs", "1"))
    resumed = main_clip.main(demo_args(demo_root, tmp_path, *common, "--run-name", "split", "--resume",
                                       "--epochs", "2"))
    assert resumed == once
    states = [torch.load(tmp_path / name / "last.pt", map_location="cpu", weights_only=True)
              for name in ("once", "split")]
    initial = torch.as_tensor(datasets.load_benchmark(demo_root, "pascal").train.labels_obs).float()
    assert torch.equal(states[0]["labels"]["observed"], states[1]["labels"]["observed"])
    assert int((states[0]["labels"]["observed"] != initial).sum()) > 0
    assert states[0]["epoch"] == states[1]["epoch"] == 2
