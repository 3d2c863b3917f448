"""Frozen-feature training modes, their feature cache, and mixed precision."""
from __future__ import annotations

import contextlib
import json

import pytest
import torch

import datasets
import engine
import losses
import config as config_module
import main_clip
import methods
import models
import reference_losses
from conftest import demo_args


def args_for(demo_root, out, *extra):
    return demo_args(demo_root, out, "-l", "an", *extra)


def make_run(demo_root, out, *extra) -> engine.Trainer:
    config = config_module.resolve_config(args_for(demo_root, out, *extra))
    run_dir = main_clip.prepare_run_dir(config)
    run_dir.mkdir(parents=True)
    return engine.Trainer(config, run_dir, main_clip.setup(config))


@pytest.mark.parametrize("backbone", ["resnet50", "clip_vision"])
def test_frozen_features_give_the_end_to_end_head_outputs(demo_root, tmp_path, backbone):
    run = make_run(demo_root, tmp_path, "-m", backbone, "--train-mode", "linear_fixed_features",
                   "--cache-dir", str(tmp_path / "cache"))
    features = run.backbone_features()
    bench = run.benchmark
    mean, std = models.backbone_spec(backbone).mean, models.backbone_spec(backbone).std
    images = datasets.MultiLabelDataset([bench.image_dir / p for p in bench.val.images[:12]], bench.val.labels_obs[:12],
                                        bench.val.labels[:12], run.config["image_size"], train=False, mean=mean, std=std,
                                        view=run.student_view())  # a CLIP-tower student sees the teacher's view
    batch = next(iter(engine.make_loader(images, 12, 0)))
    run.model.eval()
    with torch.no_grad():
        end_to_end = run.model(batch["image"])
        from_cache = run.model.head(torch.from_numpy(features["val"][:12]))
    torch.testing.assert_close(from_cache, end_to_end, rtol=1e-4, atol=1e-5)
    assert features["train"].shape == (len(bench.train.images), run.model.feature_dim)
    assert features["test"].shape[0] == len(bench.test.images)


def test_clip_vision_features_reuse_the_teacher_cache(demo_root, tmp_path):
    cache = tmp_path / "cache"
    run = make_run(demo_root, tmp_path, "-m", "clip_vision", "-l", "EM_PL", "--train-mode", "linear_fixed_features",
                   "--cache-dir", str(cache))
    run.make_pseudo_labels()
    teacher_files = sorted(p.name for p in cache.iterdir())
    run.backbone_features()
    files = sorted(p.name for p in cache.iterdir())
    assert len(teacher_files) == 1 and teacher_files[0].startswith("teacher-") and teacher_files[0].endswith("-train.npz")
    # The train features are the teacher's cached (un-flipped) embeddings; only the test set (the
    # official val split, un-flipped only) is embedded anew, by the teacher: no backbone pass.
    added = sorted(set(files) - set(teacher_files))
    assert len(added) == 1 and added[0].startswith("teacher-original-") and added[0].endswith("-val.npz")


def test_feature_cache_hits_misses_and_rebuilds(demo_root, tmp_path):
    cache = tmp_path / "cache"
    run = make_run(demo_root, tmp_path / "a", "--train-mode", "linear_fixed_features", "--cache-dir", str(cache))
    first = run.backbone_features()
    files = sorted(cache.iterdir())
    assert [p.name.split("-")[-1] for p in files] == ["train.npz", "val.npz"]
    stamps = [p.stat().st_mtime_ns for p in files]

    again = make_run(demo_root, tmp_path / "b", "--train-mode", "linear_fixed_features", "--cache-dir", str(cache))
    hits = []
    again.model.features = lambda x: hits.append(x) or torch.zeros(len(x), again.model.feature_dim)
    second = again.backbone_features()
    assert hits == [] and [p.stat().st_mtime_ns for p in files] == stamps
    assert all((first[k] == second[k]).all() for k in first)

    other_weights = make_run(demo_root, tmp_path / "c", "--train-mode", "linear_fixed_features", "--cache-dir", str(cache),
                             "-s", "5")
    other_weights.backbone_features()
    assert len(list(cache.iterdir())) == 4  # different weights: a different key, new files

    files[0].write_bytes(files[0].read_bytes()[:100])  # truncated
    rebuilt = make_run(demo_root, tmp_path / "d", "--train-mode", "linear_fixed_features", "--cache-dir", str(cache))
    assert (rebuilt.backbone_features()["train"] == first["train"]).all()
    [run_dir] = (tmp_path / "d").glob("pascal_resnet50_an_seed0_tiny_*")  # the default run name
    assert "recomputing" in (run_dir / "log.txt").read_text()


@pytest.mark.parametrize("mode", ["linear_fixed_features", "linear_init"])
def test_frozen_modes_run(demo_root, tmp_path, mode):
    summary = main_clip.main(args_for(demo_root, tmp_path, "--train-mode", mode, "--head-epochs", "2",
                                      "--head-lr", "1e-2", "--run-name", "r"))
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    epochs = {r["epoch"] for r in records if r["phase"] == "train"}
    assert epochs == ({1, 2} if mode == "linear_fixed_features" else {1, 2, 3, 4})
    assert summary["train_mode"] == mode and summary["best_test_map"] > 0
    log = (tmp_path / "r" / "log.txt").read_text()
    assert "(head on cached features)" in log
    assert ("end_to_end stage starts from the best epoch so far" in log) == (mode == "linear_init")


def test_linear_init_resume_across_the_stage_change(demo_root, tmp_path):
    common = ("--train-mode", "linear_init", "--head-epochs", "1", "--head-lr", "1e-2")
    once = main_clip.main(args_for(demo_root, tmp_path, *common, "--run-name", "once"))
    main_clip.main(args_for(demo_root, tmp_path, *common, "--run-name", "split", "--epochs", "1"))
    resumed = main_clip.main(args_for(demo_root, tmp_path, *common, "--run-name", "split", "--resume"))
    assert resumed == once


def test_bf16_autocast_runs_on_the_cpu(demo_root, tmp_path):
    summary = main_clip.main(args_for(demo_root, tmp_path, "--amp", "bf16", "--epochs", "1", "--run-name", "bf16"))
    assert summary["best_epoch"] == 1


def test_fp16_is_refused_on_the_cpu(demo_root, tmp_path, capsys):
    code = main_clip.cli(["-d", "pascal", "--data-root", str(demo_root), "--output-dir", str(tmp_path / "out"),
                          "--tiny-models", "--amp", "fp16"])
    assert code == 2 and "--amp fp16 needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


class RecordingScaler:
    """Stands in for torch.amp.GradScaler and records the order of the calls."""

    def __init__(self, calls):
        self.calls = calls

    def scale(self, loss):
        self.calls.append("scale")
        return loss * 1.0

    def step(self, optimizer):
        self.calls.append("step")
        optimizer.step()

    def update(self):
        self.calls.append("update")


def test_train_step_order_autocast_then_float32_loss_then_scaled_step():
    calls = []
    net = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)

    @contextlib.contextmanager
    def recording_autocast():
        calls.append("autocast on")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
        calls.append("autocast off")

    def loss_of(logits, preds):
        calls.append(f"loss {logits.dtype} {preds.dtype}")
        return preds.mean()

    before = net.weight.detach().clone()
    preds, loss = engine.train_step(net, optimizer, RecordingScaler(calls), torch.randn(5, 4), loss_of,
                                       recording_autocast())
    assert calls == ["autocast on", "autocast off", "loss torch.float32 torch.float32", "scale", "step", "update"]
    assert preds.dtype == torch.float32 and not torch.equal(before, net.weight)


def test_real_grad_scaler_steps_on_the_cpu():
    net = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    before = net.weight.detach().clone()
    engine.train_step(net, optimizer, scaler, torch.randn(5, 4), lambda logits, p: p.mean(), contextlib.nullcontext())
    assert not torch.equal(before, net.weight) and scaler.get_scale() == 2.0 ** 8


def test_non_finite_loss_names_epoch_and_batch(demo_root, tmp_path, monkeypatch):
    monkeypatch.setattr(losses, "mean_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(main_clip.RunError, match="epoch 1, batch 1"):
        main_clip.main(args_for(demo_root, tmp_path, "--run-name", "nan"))
    assert (tmp_path / "nan" / "last.pt").exists()


def test_written_out_head_step_equals_autograd_step():
    """head_train_step (no autograd) against train_step on the same head, data and Adam: the same
    predictions, gradients and weights over several steps, to float precision."""
    from types import SimpleNamespace
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(6, 40, 32, generator=generator)
    observed = (torch.rand(6, 40, 10, generator=generator) < 0.1).float()
    pseudo = torch.randint(-1, 2, (6, 40, 10), generator=generator).float()
    hp = SimpleNamespace(alpha=0.2, beta=0.4, beta_pos=0.7, beta_neg=0.3, gamma_pos=2.0, gamma_neg=4.0,
                         gamma_unknown=4.0, warmup_epoch=0)
    heads = [torch.nn.Linear(32, 10), torch.nn.Linear(32, 10)]
    heads[1].load_state_dict(heads[0].state_dict())
    optimizers = [torch.optim.Adam(head.parameters(), lr=1e-2, fused=True) for head in heads]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for step in range(6):
        coefficients = reference_losses.loss_coefficients("EM_PL", observed[step], hp, pseudo=pseudo[step])
        loss_of = lambda logits, preds: losses.mean_loss(losses.combine(preds, *coefficients))  # noqa: E731
        preds, loss = engine.train_step(heads[0], optimizers[0], scaler, features[step], loss_of,
                                           contextlib.nullcontext())
        written_preds = engine.head_train_step(heads[1], optimizers[1], features[step], coefficients)
        torch.testing.assert_close(written_preds, preds.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(heads[1].weight.grad, heads[0].weight.grad, rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(heads[1].bias.grad, heads[0].bias.grad, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(heads[1].state_dict(), heads[0].state_dict(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(heads[0].weight, torch.nn.Linear(32, 10).weight)


def test_head_run_equals_the_autograd_run(demo_root, tmp_path, monkeypatch):
    """A linear_fixed_features run with the written-out step ends with the same numbers as one
    whose every head step goes through autograd (train_step)."""
    common = ("-l", "EM_PL", "--train-mode", "linear_fixed_features", "--head-lr", "1e-2", "--epochs", "3")
    written = main_clip.main(args_for(demo_root, tmp_path, *common, "--run-name", "written"))

    def autograd_step(head, optimizer, features, coefficients, preds_out):
        loss_of = lambda logits, preds: losses.mean_loss(losses.combine(preds, *coefficients))  # noqa: E731
        with torch.enable_grad():
            preds, _ = engine.train_step(head, optimizer, torch.amp.GradScaler("cpu", enabled=False), features,
                                            loss_of, contextlib.nullcontext())
        preds_out.copy_(preds)
        steps.append(len(features))
        return preds_out
    steps = []
    monkeypatch.setattr(engine, "head_train_step", autograd_step)
    autograd = main_clip.main(args_for(demo_root, tmp_path, *common, "--run-name", "autograd"))
    assert written["best_epoch"] == autograd["best_epoch"]
    for key in ("best_val_map", "best_test_map"):
        assert written[key] == pytest.approx(autograd[key], abs=1e-3)
    assert written["best_test_map"] > 0

    def train_records(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["phase"] == "train"]
    written_train, autograd_train = train_records("written"), train_records("autograd")
    assert sum(steps) == sum(r["num_examples"] for r in autograd_train) and max(steps) == 16
    for a, b in zip(written_train, autograd_train, strict=True):
        # The epoch loss, computed after the epoch from each step's predictions, is the mean of the
        # per-step losses; the train mAP comes from the same predictions.
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["loss"] != 0
        assert a["clean"]["map"] == pytest.approx(b["clean"]["map"], abs=1e-3)


def test_head_path_names_the_first_non_finite_batch(demo_root, tmp_path):
    run = make_run(demo_root, tmp_path, "--train-mode", "linear_fixed_features")
    features = run.backbone_features()
    bad_row = 37
    features["train"][bad_row] = float("nan")
    stage = run.build_stage(engine.HEAD, run.config["epochs"], features=features)
    epoch = 1
    order, _ = datasets.AugmentationSampler(len(features["train"]), torch.Generator().manual_seed(
        run.config["seed"] * 100_003 + epoch)).draw()
    expected_batch = int((order == bad_row).nonzero()) // run.config["bsize"] + 1
    with pytest.raises(main_clip.RunError, match=f"non-finite loss \\(nan\\) at epoch 1, batch {expected_batch};"):
        run.run_epoch(epoch, stage)


def batch_sizes(total: int, batch: int) -> list[int]:
    return [min(batch, total - start) for start in range(0, total, batch)]


def test_head_epochs_train_at_the_head_batch(demo_root, tmp_path, monkeypatch):
    """--head-bsize sets the head-only epochs' batch, on the written-out path (an) and through
    autograd (ROLE, whose defaults are Cole et al.'s head batch); --bsize the fine-tuning batch."""
    head_steps, losses_seen = [], []
    head_step = engine.head_train_step
    monkeypatch.setattr(engine, "head_train_step", lambda head, optimizer, features, *rest: (
        head_steps.append(len(features)), head_step(head, optimizer, features, *rest))[1])
    common = ("--train-mode", "linear_init", "--head-epochs", "1", "--epochs", "1", "--head-lr", "1e-2")
    main_clip.main(args_for(demo_root, tmp_path, *common, "--head-bsize", "48", "--bsize", "16", "--run-name", "an"))
    num_train = len(torch.load(tmp_path / "an" / "last.pt", weights_only=True)["labels"]["observed"])
    assert head_steps == batch_sizes(num_train, 48)
    assert json.loads((tmp_path / "an" / "config.json").read_text())["head_bsize"] == 48

    role_loss = methods.get_method("role").loss
    monkeypatch.setattr(methods.get_method("role"), "loss",
                        lambda self, inputs, epoch: (losses_seen.append(len(inputs.preds)),
                                                     role_loss(self, inputs, epoch))[1])
    main_clip.main(demo_args(demo_root, tmp_path, "-l", "role", *common, "--bsize", "8", "--run-name", "role"))
    config = json.loads((tmp_path / "role" / "config.json").read_text())
    assert (config["head_bsize"], config["bsize"]) == (16, 8)   # their pascal head batch; the flag's batch
    assert losses_seen == batch_sizes(num_train, 16) + batch_sizes(num_train, 8)
