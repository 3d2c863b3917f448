"""VLPL: train a multi-label classifier from single positive labels plus CLIP pseudo-labels.

    python main_clip.py -d pascal -l EM_PL            # VLPL on VOC 2012, ResNet-50 at 448 px
    python main_clip.py --demo                        # the whole pipeline on tiny synthetic data

A run reads the formatted benchmark files under ``--data-root`` (see ``data/<name>/README.md``),
trains for ``--epochs`` epochs and writes ``<output-dir>/<run-name>/``: ``config.json``,
``log.txt``, ``metrics.jsonl``, ``summary.json``, ``last.pt`` and ``best.pt``.

The frozen CLIP teacher runs once per training image before training; its embeddings are
cached next to the data, and the pseudo-labels (temperature, threshold, partial) are computed
from them. Each epoch: a train phase, a val phase, and a test phase only when val mAP
improves (the reported test mAP is that of the best val epoch, as in the original code).

Reading order: the flags and their per-dataset defaults (``get_args_parser``,
``resolve_config``); the checks made before anything is written (``prepare_run_dir``,
``_setup``); one optimisation step (``train_step``; ``head_train_step`` and ``train_head_epoch``
for the head alone on cached features) and evaluation (``predict``); then ``Run``,
which owns the model, the label state (APL), the caches, the stages (end to end on images, or
the head on cached features for ``--train-mode``), the checkpoints and the epoch loop.
Under torchrun, ``Distributed`` shards the data and gathers predictions; nothing else changes.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import datasets
import losses
import models
from fileio import atomic_torch_save, atomic_write_json
from instrumentation import RunLogger

# DESIGN section 5. Per dataset: (lr, alpha); EM_APL overrides: (batch, lr, alpha, beta, warmup).
DATASET_DEFAULTS = {
    "pascal": dict(lr=1e-5, alpha=0.2),
    "coco": dict(lr=1e-5, alpha=0.1),
    "nuswide": dict(lr=1e-5, alpha=0.1),
    "cub": dict(lr=1e-4, alpha=0.01),
}
APL_DEFAULTS = {
    "pascal": dict(bsize=8, lr=1e-5, alpha=0.2, beta=0.02, warmup_epoch=5),
    "coco": dict(bsize=16, lr=1e-5, alpha=0.1, beta=0.9, warmup_epoch=5),
    "nuswide": dict(bsize=16, lr=1e-5, alpha=0.1, beta=0.2, warmup_epoch=4),
    "cub": dict(bsize=8, lr=1e-4, alpha=0.01, beta=0.4, warmup_epoch=3),
}
COMMON_DEFAULTS = dict(bsize=8, warmup_epoch=0)

# Settings that may change when a run is resumed without changing what it computes.
RESUMABLE_CHANGES = {"resume", "epochs", "num_workers", "gpu", "test_every_epoch", "amp"}


class RunError(Exception):
    """A problem the user can fix (bad flag, missing file); shown as one line, exit code 2."""


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun launch (rank 0 of 1 without one)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm statistics) on every rank: after training, each rank's
        running statistics saw its own batches last; evaluation and checkpoints use rank 0's."""
        if self.enabled:
            for buffer in module.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def sum(self, values: list[float]) -> list[float]:
        """Elementwise sum over ranks."""
        if not self.enabled:
            return [float(v) for v in values]
        total = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(total)
        return total.tolist()

    def gather_rows(self, indices: np.ndarray, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        """Every rank's (indices, arrays) concatenated, on every rank, with rows repeated by a
        sampler's padding dropped (first occurrence kept) and sorted by index."""
        if self.enabled:
            parts: list = [None] * self.world_size
            torch.distributed.all_gather_object(parts, (indices, *arrays))
            indices = np.concatenate([part[0] for part in parts])
            arrays = tuple(np.concatenate([part[i + 1] for part in parts]) for i in range(len(arrays)))
        unique, first = np.unique(indices, return_index=True)
        return (unique, *(array[first] for array in arrays))


def init_distributed() -> Distributed:
    """A torchrun launch (WORLD_SIZE > 1): join the process group, nccl on CUDA, gloo on the CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return Distributed(torch.distributed.get_rank(), world_size, local_rank)


@dataclass
class LossHyperparams:
    alpha: float
    beta: float
    beta_pos: float
    beta_neg: float
    gamma_pos: float
    gamma_neg: float
    gamma_unknown: float
    warmup_epoch: int


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="VLPL training (single positive multi-label learning with CLIP pseudo-labels)",
                                add_help=add_help)
    p.add_argument("-d", "--dataset", default="pascal", choices=sorted(datasets.DATASETS), help="benchmark to train on")
    p.add_argument("-l", "--loss", default="EM_PL", choices=losses.LOSS_NAMES, help="training loss (EM_PL is VLPL)")
    p.add_argument("-g", "--gpu", type=int, default=0, help="CUDA device index; without CUDA the run uses the CPU")
    p.add_argument("-m", "--model", default="resnet50", choices=models.BACKBONES, help="trainable backbone")
    p.add_argument("-t", "--temp", type=float, default=0.01, help="softmax temperature of the CLIP similarities")
    p.add_argument("-th", "--threshold", type=float, default=0.3, help="similarity above which a class becomes a positive pseudo-label")
    p.add_argument("-p", "--partial", type=float, default=0.0, help="fraction of classes (lowest similarity) that become negative pseudo-labels")
    p.add_argument("-s", "--seed", type=int, default=0, help="torch seed (the literature averages 0, 1 and 8)")

    g = p.add_argument_group("loss hyperparameters (defaults per dataset, DESIGN section 5)")
    g.add_argument("--alpha", type=float, default=None, help="weight of the entropy term on unobserved labels")
    g.add_argument("--beta", type=float, default=None, help="EM_APL weight of the soft negative labels")
    g.add_argument("--beta-pos", type=float, default=0.7, help="EM_PL weight of positive pseudo-labels")
    g.add_argument("--beta-neg", type=float, default=0.0, help="EM_PL weight of negative pseudo-labels")
    g.add_argument("--gamma-pos", type=float, default=2.0, help="EM_PL_ASL focusing power on positives")
    g.add_argument("--gamma-neg", type=float, default=4.0, help="EM_PL_ASL focusing power on negative pseudo-labels")
    g.add_argument("--gamma-unknown", type=float, default=4.0, help="EM_PL_ASL focusing power on the entropy term")
    g.add_argument("--warmup-epoch", type=int, default=None, help="epochs of plain EM before pseudo-labels (EM_PL) or APL (EM_APL) start")
    g.add_argument("--neg-proportion", type=float, default=0.9, help="EM_APL share of unobserved labels turned into soft negatives")

    g = p.add_argument_group("data")
    g.add_argument("--data-root", default="data", help="folder holding one sub-folder per dataset")
    g.add_argument("--text-features", default=None, help="K x D .npy of class text features (default: the dataset's file in its folder)")
    g.add_argument("--cache-dir", default=None, help="where the teacher-embedding and feature caches go (default: <data-root>/<dataset>/cache)")
    g.add_argument("--val-frac", type=float, default=0.2, help="share of the official train set held out for validation")
    g.add_argument("--split-seed", type=int, default=1200, help="seed of the train/val split")
    g.add_argument("--subsample-seed", type=int, default=999, help="seed of the train/val subsampling")
    g.add_argument("--train-frac", type=float, default=1.0, help="fraction of the train split kept")
    g.add_argument("--val-frac-keep", type=float, default=1.0, help="fraction of the val split kept")
    g.add_argument("--val-labels", choices=("clean", "observed"), default="clean", help="labels that score the val split for model selection")
    g.add_argument("--image-size", type=int, default=None, help="input size override (default: the backbone's, 448 or 336)")
    g.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="data loader worker processes")

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=10, help="training epochs")
    g.add_argument("--bsize", type=int, default=None, help="batch size (default 8; EM_APL per dataset)")
    g.add_argument("--lr", type=float, default=None, help="Adam learning rate (default per dataset)")
    g.add_argument("--pseudo-labels", choices=("cached", "online"), default="cached",
                   help="cached: teacher once per image before training; online: teacher on every augmented batch (original)")
    g.add_argument("--test-every-epoch", action="store_true", help="run the test phase every epoch, not only on a new best")
    g.add_argument("--train-mode", choices=("end_to_end", "linear_fixed_features", "linear_init"), default="end_to_end",
                   help="end_to_end; linear_fixed_features: only the head, on cached frozen features; "
                        "linear_init: --head-epochs of that, then --epochs end to end from the best head")
    g.add_argument("--head-epochs", type=int, default=25, help="linear_init: head-only epochs before fine-tuning (Cole et al.: 25)")
    g.add_argument("--head-lr", type=float, default=1e-4, help="learning rate of head-only epochs (frozen-feature modes)")
    g.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                   help="mixed precision for forward passes (fp16 with a gradient scaler, CUDA only)")

    g = p.add_argument_group("weights and outputs")
    g.add_argument("--backbone-weights", default=None, help="local weights file for resnet50 / convnext backbones")
    g.add_argument("--clip-weights", default=None, help="local CLIP ViT-L/14-336 weights (OpenAI .pt or state dict)")
    g.add_argument("--tiny-models", action="store_true", help="tiny randomly initialised models of the same classes (tests, demo)")
    g.add_argument("--output-dir", default="results", help="folder that receives one sub-folder per run")
    g.add_argument("--run-name", default=None, help="run folder name (default <dataset>_<model>_<loss>_seed<seed>)")
    g.add_argument("--resume", action="store_true", help="continue the run in the run folder from its last.pt")
    g.add_argument("--demo", action="store_true", help="build a tiny synthetic VOC-layout dataset and train tiny models on it")
    return p


def resolve_config(args: argparse.Namespace) -> dict:
    """Fill the per-dataset defaults; the result is what config.json records."""
    config = dict(vars(args))
    table = APL_DEFAULTS[args.dataset] if args.loss == "EM_APL" else {**COMMON_DEFAULTS, **DATASET_DEFAULTS[args.dataset], "beta": APL_DEFAULTS[args.dataset]["beta"]}
    for key, value in table.items():
        if config.get(key) is None:
            config[key] = value
    if config["image_size"] is None:
        config["image_size"] = models.input_size(args.model, tiny=args.tiny_models)
    if config["run_name"] is None:
        config["run_name"] = f"{args.dataset}_{args.model}_{args.loss}_seed{args.seed}"
    info = datasets.get_dataset_info(args.dataset)
    if config["text_features"] is None:
        config["text_features"] = str(datasets.dataset_dir(args.data_root, args.dataset) / info.text_feature_file)
    if config["cache_dir"] is None:
        config["cache_dir"] = str(datasets.dataset_dir(args.data_root, args.dataset) / "cache")
    config.pop("demo")
    _check_values(config)
    return config


def _check_values(config: dict) -> None:
    positive = ["epochs", "bsize", "lr", "temp", "image_size", "head_epochs", "head_lr"]
    for key in positive:
        if not config[key] > 0:
            raise RunError(f"--{key.replace('_', '-')} must be positive, got {config[key]}")
    if not 0.0 <= config["partial"] < 1.0:
        raise RunError(f"-p/--partial must be in [0, 1), got {config['partial']}")
    if config["num_workers"] < 0:
        raise RunError(f"--num-workers must be >= 0, got {config['num_workers']}")
    if config["pseudo_labels"] == "online" and config["train_mode"] != "end_to_end":
        raise RunError("--pseudo-labels online recomputes pseudo-labels on augmented images: it needs --train-mode end_to_end")
    if config["loss"] == "EM_APL" and config["warmup_epoch"] >= config["epochs"]:
        raise RunError(f"EM_APL needs --warmup-epoch ({config['warmup_epoch']}) below --epochs ({config['epochs']})")


def select_device(gpu: int, dist: Distributed = Distributed()) -> torch.device:
    if not torch.cuda.is_available():
        if dist.is_main:
            print(f"CUDA is not available: ignoring -g {gpu} and running on the CPU")
        return torch.device("cpu")
    if dist.enabled:
        return torch.device("cuda", dist.local_rank)  # torchrun: one process per device
    if not 0 <= gpu < torch.cuda.device_count():
        raise RunError(f"-g {gpu}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", gpu)


def prepare_run_dir(config: dict) -> Path:
    """Refuse to overwrite a run unless resuming; on resume, refuse a changed configuration."""
    run_dir = Path(config["output_dir"]) / config["run_name"]
    if config["resume"]:
        if not (run_dir / "last.pt").is_file():
            raise RunError(f"--resume: {run_dir / 'last.pt'} does not exist; start the run without --resume")
        saved = json.loads((run_dir / "config.json").read_text())
        changed = sorted(k for k in set(saved) | set(config)
                         if k not in RESUMABLE_CHANGES and saved.get(k) != config.get(k))
        if changed:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in changed)
            raise RunError(f"--resume with a different configuration ({details}); use the original flags or a new --run-name")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise RunError(f"run folder {run_dir} already exists: pass --resume to continue it or choose another --run-name")
    return run_dir


def make_loader(dataset, batch_size: int, num_workers: int, sampler=None) -> DataLoader | datasets.FeatureBatches:
    """Loader in ``sampler``'s order (the train phase's AugmentationSampler; a rank's share of
    the indices under torchrun), else in dataset order. Cached features are already in memory:
    they are batched in place, without worker processes."""
    if isinstance(dataset, datasets.FeatureDataset):
        return datasets.FeatureBatches(dataset, batch_size, sampler)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0)


def autocast(amp: str, device: torch.device):
    """Mixed precision for the forward passes (``--amp``); the loss is always computed in float32."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp])


def train_step(net, optimizer, scaler, inputs, loss_of, amp_context) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step: forward under autocast, float32 loss, scaled backward, step, scaler update.

    ``loss_of(preds)`` gives the scalar loss of the batch's probabilities. Returns (preds, loss).
    """
    with amp_context:
        logits = net(inputs)
    preds = torch.sigmoid(logits.float())
    loss = loss_of(preds)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss ({loss.item()})")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return preds, loss


@torch.no_grad()
def head_train_step(head: torch.nn.Linear, optimizer, features: torch.Tensor, coefficients: losses.Coefficients,
                    preds_out: torch.Tensor | None = None) -> torch.Tensor:
    """One Adam step of a linear head on a batch of cached features, for a loss of
    ``losses.combine``'s form (the batch's rows of its coefficients), with the gradient written
    out instead of autograd's; returns the batch's predictions (into ``preds_out`` if given).

    A head-only step is a few microseconds of arithmetic: autograd's bookkeeping would be most of
    it. Weights, gradients and predictions equal ``train_step``'s to float precision
    (tests/test_train_modes.py). The loss value is left to the caller (``train_head_epoch``).
    """
    preds = torch.sigmoid(torch.addmm(head.bias, features, head.weight.t()), out=preds_out)
    grad_logits = losses.combine_logit_gradient(preds, *coefficients) / max(preds.numel(), 1)
    for param in (head.weight, head.bias):
        if param.grad is None:
            param.grad = torch.empty_like(param)
    torch.mm(grad_logits.t(), features, out=head.weight.grad)
    torch.sum(grad_logits, dim=0, out=head.bias.grad)
    optimizer.step()
    return preds


@torch.no_grad()
def train_head_epoch(head: torch.nn.Linear, optimizer, features: torch.Tensor, coefficients: losses.Coefficients,
                     batch_size: int, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch of ``head_train_step`` over ``features`` and their ``coefficients`` rows, already
    in the epoch's order, in batches of ``batch_size``. Returns (predictions, per-row loss sums).

    The batch losses are computed after the epoch, from the predictions each step made (what a
    per-step loss would have seen), in one vectorised pass: sum(L_b) / (B*K) per batch b.
    ``progress(done)`` is called after each step (a progress bar).
    """
    preds = torch.empty(len(features), head.out_features, dtype=features.dtype, device=features.device)
    # A step's matrices are too small to share between CPU threads: waking a second one costs more
    # than it saves, and on a shared machine it waits for a busy core. One thread for the loop.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for start in range(0, len(features), batch_size):
            rows = slice(start, start + batch_size)
            head_train_step(head, optimizer, features[rows], losses.coefficient_rows(coefficients, rows), preds[rows])
            if progress is not None:
                progress(1)
    finally:
        torch.set_num_threads(threads)
    return preds, losses.combine(preds, *coefficients).sum(dim=1, dtype=torch.float64)


@torch.no_grad()
def predict(net, loader, device, desc: str, amp: str = "none",
            dist: Distributed = Distributed()) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities for a whole split in index order, gathered from every rank: (N x K scores, N indices)."""
    net.eval()
    scores, indices = [], []
    for batch in tqdm(loader, desc=desc, mininterval=3.0, leave=False, dynamic_ncols=True, disable=not dist.is_main):
        with autocast(amp, device):
            logits = net(batch["image"].to(device, non_blocking=True))
        scores.append(torch.sigmoid(logits.float()).cpu())
        indices.append(torch.as_tensor(batch["index"]))
    indices, scores = dist.gather_rows(torch.cat(indices).numpy(), torch.cat(scores).numpy())
    if len(indices) != len(loader.dataset):
        raise RuntimeError(f"{desc}: predictions for {len(indices)} of {len(loader.dataset)} images")
    return scores, indices


def evaluate(phase: str, epoch: int, net, loader, device, logger: RunLogger, amp: str = "none",
             dist: Distributed = Distributed()) -> dict:
    dataset = loader.dataset
    logger.begin_phase(phase, epoch, len(dataset), dataset.clean.shape[1])
    scores, indices = predict(net, loader, device, desc=f"epoch {epoch} {phase}", amp=amp, dist=dist)
    logger.record_batch(indices, scores, dataset.clean[indices], dataset.observed[indices])
    return logger.end_phase()


def apl_update(train_observed: torch.Tensor, scores: torch.Tensor, unobserved_at_start: torch.Tensor,
               neg_proportion: float, epochs_after_warmup: int) -> None:
    """APL (Zhou et al. 2022): per class, the lowest-scored still-unobserved entries become soft negatives -p."""
    per_class = (neg_proportion * unobserved_at_start.double() / epochs_after_warmup).floor().long()
    for c in range(train_observed.shape[1]):
        candidates = (train_observed[:, c] == 0).nonzero().squeeze(1)
        take = min(int(per_class[c]), len(candidates))
        if take == 0:
            continue
        lowest = candidates[torch.argsort(scores[candidates, c], stable=True)[:take]]
        train_observed[lowest, c] = -scores[lowest, c]


def run_demo_data(data_root: Path) -> None:
    """Synthetic VOC-layout data, formatted, with observed labels and tiny-teacher text features."""
    from preproc import format_pascal, generate_observed_labels, make_demo_data, make_text_features

    pascal = data_root / "pascal"
    if (pascal / "formatted_val_labels_obs.npy").is_file():
        print(f"demo data already prepared in {pascal}")
        return
    make_demo_data.main(make_demo_data.get_args_parser().parse_args(["--out", str(pascal)]))
    format_pascal.main(format_pascal.get_args_parser().parse_args(["--load-path", str(pascal), "--save-path", str(pascal)]))
    generate_observed_labels.main(generate_observed_labels.get_args_parser().parse_args(
        ["--dataset", "pascal", "--data-root", str(data_root)]))
    make_text_features.main(make_text_features.get_args_parser().parse_args(
        ["--dataset", "pascal", "--data-root", str(data_root), "--tiny"]))


def demo_args(args: argparse.Namespace, argv_given: set[str]) -> argparse.Namespace:
    """The demo's settings, where the user did not set them."""
    defaults = dict(dataset="pascal", loss="EM_PL", model="resnet50", tiny_models=True, epochs=8,
                    lr=1e-3, bsize=16, num_workers=0, data_root=str(Path(args.output_dir) / "demo-data"),
                    run_name="demo_" + time.strftime("%Y%m%d-%H%M%S"))
    for key, value in defaults.items():
        if key not in argv_given:
            setattr(args, key, value)
    return args


def main(args: argparse.Namespace) -> dict:
    """One training run; returns the summary dict. Raises RunError for fixable user errors."""
    if args.demo:
        print(DEMO_NOTICE)
        run_demo_data(Path(args.data_root))
    dist = init_distributed()
    try:
        config = resolve_config(args)
        run_dir = prepare_run_dir(config)
        setup = _setup(config, dist)
    except (ValueError, FileNotFoundError) as error:
        raise RunError(str(error)) from error
    dist.barrier()  # every rank has checked the run folder before rank 0 writes to it
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = Run(config, run_dir, setup).train()
    if args.demo:
        print(DEMO_NOTICE)
    return summary


DEMO_NOTICE = ("DEMO: tiny randomly initialised models on synthetic data. Its mAP shows that the pipeline "
               "works end to end; it is not a benchmark result.")


@dataclass
class Setup:
    device: torch.device
    benchmark: datasets.BenchmarkSplits
    teacher: models.Teacher | None
    text_features: torch.Tensor | None
    dist: Distributed = Distributed()


def _setup(config: dict, dist: Distributed = Distributed()) -> Setup:
    """Everything that can fail on user input, before any output or long work."""
    needs_pseudo = config["loss"] in losses.LOSSES_NEEDING_PSEUDO
    needs_teacher = needs_pseudo or config["model"] == "clip_vision"
    models.check_weights_available(config["model"], backbone_weights=config["backbone_weights"],
                                   clip_weights=config["clip_weights"], need_teacher=needs_teacher,
                                   tiny=config["tiny_models"])
    device = select_device(config["gpu"], dist)
    if config["bsize"] % dist.world_size:
        raise RunError(f"--bsize {config['bsize']} is the global batch: it must be a multiple of the "
                       f"{dist.world_size} processes")
    if config["amp"] == "fp16" and device.type != "cuda":
        raise RunError("--amp fp16 needs a CUDA device; on the CPU use --amp bf16 or --amp none")
    benchmark = datasets.load_benchmark(
        config["data_root"], config["dataset"], val_frac=config["val_frac"], split_seed=config["split_seed"],
        subsample_seed=config["subsample_seed"], train_frac=config["train_frac"], val_frac_keep=config["val_frac_keep"])
    teacher = text_features = None
    if needs_teacher:
        teacher = models.build_teacher(config["clip_weights"], tiny=config["tiny_models"])
    if needs_pseudo:
        text_features = models.load_text_features(config["text_features"], benchmark.info.num_classes,
                                                  teacher.embed_dim, dataset=config["dataset"])
    return Setup(device, benchmark, teacher, text_features, dist)


def head_epochs(config: dict) -> int:
    """How many of the run's first epochs train only the head on cached features."""
    return {"end_to_end": 0, "linear_fixed_features": config["epochs"],
            "linear_init": config["head_epochs"]}[config["train_mode"]]


def total_epochs(config: dict) -> int:
    return config["epochs"] + (config["head_epochs"] if config["train_mode"] == "linear_init" else 0)


def convolutional(backbone: str) -> bool:
    return backbone != "clip_vision"


def input_normalization(backbone: str) -> tuple[tuple, tuple]:
    """CLIP's own statistics for the CLIP tower, ImageNet's for the others."""
    if backbone == "clip_vision":
        return datasets.CLIP_MEAN, datasets.CLIP_STD
    return datasets.IMAGENET_MEAN, datasets.IMAGENET_STD


@dataclass
class Stage:
    """What one kind of epoch trains: the whole model on images, or the head on cached features."""
    name: str                      # "end_to_end" or "head"
    net: torch.nn.Module           # maps a batch's "image" entry to logits
    train_net: torch.nn.Module     # net, wrapped in DistributedDataParallel under torchrun
    optimizer: torch.optim.Optimizer
    generator: torch.Generator     # reseeded every epoch: shuffle order and flips
    loaders: dict                  # "train", "val", "test", "train_eval" (APL's un-augmented pass)


class Run:
    """One training run: the model, its label state, its stages, its checkpoints."""

    def __init__(self, config: dict, run_dir: Path, setup: Setup, model: models.Classifier | None = None):
        self.config, self.run_dir, self.setup = config, run_dir, setup
        self.device, self.benchmark, self.teacher = setup.device, setup.benchmark, setup.teacher
        self.hp = LossHyperparams(**{k: config[k] for k in LossHyperparams.__dataclass_fields__})
        self.online = config["pseudo_labels"] == "online" and setup.text_features is not None
        self.num_classes = self.benchmark.info.num_classes
        self.dist = setup.dist
        if self.dist.is_main:
            self.logger = RunLogger(run_dir, resume=config["resume"])
        else:
            # Other ranks keep the same bookkeeping (their metrics are computed from the same
            # gathered predictions, so they reach the same decisions) but write nothing of the run's.
            self._scratch = tempfile.TemporaryDirectory(prefix=f"vlpl-rank{self.dist.rank}-")
            self.logger = RunLogger(Path(self._scratch.name), resume=False, echo=False)
        self.teacher_embeddings: np.ndarray | None = None  # raw, whole official train set

        torch.manual_seed(config["seed"])
        if model is None:
            clip_model = self.teacher.clip_model if self.teacher is not None else None
            model = models.build_model(config["model"], self.num_classes, backbone_weights=config["backbone_weights"],
                                       clip_model=clip_model, tiny=config["tiny_models"])
        self.model = model.to(self.device)
        if convolutional(config["model"]):
            # channels_last: the faster layout for convolutions, with cuDNN and with oneDNN on CPUs
            # (1.26x per ResNet-50 training step on a 2-core CPU, bench/channels_last.py).
            self.model = self.model.to(memory_format=torch.channels_last)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config["amp"] == "fp16")
        self.train_observed = torch.tensor(self.benchmark.train.labels_obs, dtype=torch.float32)
        self.unobserved_at_start = (self.train_observed == 0).sum(0)
        self.pseudo_train: torch.Tensor | None = None
        self.pseudo_report: dict | None = None

    # -- teacher and feature caches ------------------------------------------------------------
    def official_embeddings(self, phase: str, encode, key: dict, prefix: str, image_size: int, mean, std) -> np.ndarray:
        """``encode`` outputs for every image of the official ``phase`` ('train' or 'val'), cached.

        Caching the whole official set lets one file serve every split seed and fraction."""
        formatted = datasets.load_formatted(self.config["data_root"], self.config["dataset"], phase)
        fingerprint = models.cache_key_hash(key, [], image_size, mean, std)[:16]
        return models.cached_embeddings(
            encode, key, [str(self.benchmark.image_dir / p) for p in formatted.images], image_size, mean, std,
            Path(self.config["cache_dir"]) / f"{prefix}-{fingerprint}-{phase}.npz",
            batch_size=max(self.config["bsize"], 32), num_workers=self.config["num_workers"], device=self.device,
            desc=f"{prefix} {phase}", log=self.logger.log, rank=self.dist.rank, world_size=self.dist.world_size,
            gather_rows=self.dist.gather_rows)

    def teacher_cache_args(self) -> tuple:
        teacher = self.teacher
        teacher.to(self.device)
        encode = lambda images: teacher.clip_model.encode_image(images).float()  # noqa: E731
        key = {"teacher": teacher.fingerprint, "output": "image embedding before L2 normalisation"}
        return encode, key, "teacher", teacher.input_size, teacher.mean, teacher.std

    def make_pseudo_labels(self) -> None:
        """The teacher runs once per official train image; pseudo-labels come from its cached embeddings."""
        if self.teacher_embeddings is None:
            self.teacher_embeddings = self.official_embeddings("train", *self.teacher_cache_args())
        embeddings = torch.from_numpy(self.teacher_embeddings[self.benchmark.train_indices]).to(self.device)
        pseudo, _ = models.pseudo_labels_from_embeddings(
            torch.nn.functional.normalize(embeddings, dim=-1), self.setup.text_features.to(self.device),
            self.config["temp"], self.config["threshold"], self.config["partial"])
        self.pseudo_train = pseudo.cpu()
        self.pseudo_report = models.pseudo_label_report(self.pseudo_train, self.benchmark.train.labels)
        self.logger.log("pseudo-labels (cached teacher, vs clean train labels): "
                        + ", ".join(f"{k} {v:.4g}" for k, v in self.pseudo_report.items()))

    def backbone_features(self) -> dict[str, np.ndarray]:
        """Frozen backbone features of the train / val / test images (eval transform, cached).

        For clip_vision at the teacher's input size these are the teacher's own embeddings
        (the backbone starts as a copy of its tower), so one cached pass feeds both."""
        config, bench = self.config, self.benchmark
        if config["model"] == "clip_vision" and config["image_size"] == self.teacher.input_size:
            args = self.teacher_cache_args()
            if self.teacher_embeddings is None:  # EM_PL already holds them; other losses read the cache
                self.teacher_embeddings = self.official_embeddings("train", *args)
            official_train, official_val = self.teacher_embeddings, self.official_embeddings("val", *args)
            self.teacher.cpu()  # its work is cached: free the accelerator's memory for training
        else:
            self.model.eval()
            mean, std = input_normalization(config["model"])
            key = {"backbone": config["model"], "weights": models.weights_fingerprint(self.model.backbone),
                   "output": "pooled features"}
            args = (self.model.features, key, config["model"], config["image_size"], mean, std)
            official_train, official_val = self.official_embeddings("train", *args), self.official_embeddings("val", *args)
        return {"train": official_train[bench.train_indices], "val": official_train[bench.val_indices],
                "test": official_val}

    # -- stages ----------------------------------------------------------------------------------
    def build_stage(self, name: str, features: dict[str, np.ndarray] | None = None) -> Stage:
        """The loaders and optimizer of a stage; ``features`` (train / val / test) skips the feature cache."""
        config, bench = self.config, self.benchmark
        splits = {"train": bench.train, "val": bench.val, "test": bench.test}
        if name == "head":
            features = features if features is not None else self.backbone_features()
            phase_sets = {phase: datasets.FeatureDataset(features[phase], split.labels_obs, split.labels)
                          for phase, split in splits.items()}
            phase_sets["train_eval"] = phase_sets["train"]
            net, lr, eval_batch = self.model.head, config["head_lr"], max(config["bsize"], 1024)
        else:
            mean, std = input_normalization(config["model"])
            teacher_view = (self.teacher.input_size, self.teacher.mean, self.teacher.std) if self.online else None

            def image_set(split, train: bool, view=None):
                return datasets.MultiLabelDataset([bench.image_dir / p for p in split.images], split.labels_obs,
                                                  split.labels, config["image_size"], train=train, mean=mean,
                                                  std=std, teacher_view=view)
            phase_sets = {"train": image_set(bench.train, True, teacher_view), "val": image_set(bench.val, False),
                          "test": image_set(bench.test, False)}
            if config["loss"] == "EM_APL":
                phase_sets["train_eval"] = image_set(bench.train, False)
            net, lr, eval_batch = self.model, config["lr"], config["bsize"]
        generator, dist = torch.Generator(), self.dist
        loaders = {phase: make_loader(ds, eval_batch, config["num_workers"],
                                      sampler=range(dist.rank, len(ds), dist.world_size))
                   for phase, ds in phase_sets.items()}
        train_sampler = datasets.AugmentationSampler(len(phase_sets["train"]), generator, rank=dist.rank,
                                                     world_size=dist.world_size)
        loaders["train"] = make_loader(phase_sets["train"], config["bsize"] // dist.world_size, config["num_workers"],
                                       sampler=train_sampler)
        # fused: one kernel per step instead of a handful of ops per parameter (CPU and CUDA).
        optimizer = torch.optim.Adam(net.parameters(), lr=lr, fused=True)
        train_net = net
        if dist.enabled:
            train_net = torch.nn.parallel.DistributedDataParallel(
                net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return Stage(name, net, train_net, optimizer, generator, loaders)

    # -- checkpoints -----------------------------------------------------------------------------
    def save_last(self, epoch: int, stage: Stage | None) -> None:
        if self.dist.is_main:
            self._save_last(epoch, stage)
        self.dist.barrier()  # nobody reads last.pt before it is whole

    def _save_last(self, epoch: int, stage: Stage | None) -> None:
        atomic_torch_save(self.run_dir / "last.pt", dict(
            model=self.model.state_dict(), epoch=epoch, train_observed=self.train_observed,
            logger=self.logger.state_dict(), config=self.config, scaler=self.scaler.state_dict(),
            stage=stage.name if stage else None, optimizer=stage.optimizer.state_dict() if stage else None))

    def save_best(self, epoch: int, val_map: float) -> None:
        if self.dist.is_main:
            atomic_torch_save(self.run_dir / "best.pt", dict(model=self.model.state_dict(), epoch=epoch,
                                                             val_map=val_map, config=self.config))
        self.dist.barrier()

    def restore(self) -> tuple[int, dict]:
        state = torch.load(self.run_dir / "last.pt", map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.train_observed = state["train_observed"]
        self.logger.load_state_dict(state["logger"])
        self.scaler.load_state_dict(state["scaler"])
        self.logger.log(f"resumed from {self.run_dir / 'last.pt'} after epoch {state['epoch']}")
        return state["epoch"], state

    # -- the loop --------------------------------------------------------------------------------
    def train(self) -> dict:
        config, logger = self.config, self.logger
        if not config["resume"] and self.dist.is_main:
            atomic_write_json(self.run_dir / "config.json", config)
        bench = self.benchmark
        logger.log(f"run folder: {self.run_dir}")
        logger.log(f"dataset {config['dataset']}: train {len(bench.train.images)}, val {len(bench.val.images)}, "
                   f"test {len(bench.test.images)} images, {self.num_classes} classes; device {self.device}; "
                   f"train mode {config['train_mode']}")
        if self.setup.text_features is not None:
            self.make_pseudo_labels()
        if self.teacher is not None and not self.online:
            self.teacher.cpu()  # its work is cached: free the accelerator's memory for training

        last_epoch, saved = self.restore() if config["resume"] else (0, None)
        if saved is None:
            self.save_last(0, None)
        stage: Stage | None = None
        epoch = last_epoch + 1
        try:
            for epoch in range(last_epoch + 1, total_epochs(config) + 1):
                name = "head" if epoch <= head_epochs(config) else "end_to_end"
                if stage is None or stage.name != name:
                    if name == "end_to_end" and epoch == head_epochs(config) + 1 and epoch > 1:
                        best = torch.load(self.run_dir / "best.pt", map_location="cpu", weights_only=True)
                        self.model.load_state_dict(best["model"])
                        logger.log(f"fine-tuning end to end from the best head (epoch {best['epoch']})")
                    stage = self.build_stage(name)
                    if saved is not None and saved["stage"] == name:
                        stage.optimizer.load_state_dict(saved["optimizer"])
                self.run_epoch(epoch, stage)
                self.save_last(epoch, stage)
        except KeyboardInterrupt:
            logger.log(f"interrupted during epoch {epoch}; {self.run_dir / 'last.pt'} holds the state after epoch {epoch - 1}.")
            logger.log("resume with: " + resume_command(config))
            logger.close()
            raise
        summary = logger.finish(config, extra={"pseudo_labels": self.pseudo_report, "train_mode": config["train_mode"],
                                               "world_size": self.dist.world_size})
        logger.close()
        return summary

    def run_epoch(self, epoch: int, stage: Stage) -> None:
        config, logger = self.config, self.logger
        # Every epoch's randomness derives from (seed, epoch), so a resumed run repeats it exactly.
        epoch_seed = config["seed"] * 100_003 + epoch
        torch.manual_seed(epoch_seed + 1_000_003 * self.dist.rank)  # dropout etc.: different per rank
        stage.generator.manual_seed(epoch_seed)  # data order and flips: the same on every rank
        what = "head on cached features" if stage.name == "head" else "end to end"
        logger.log(f"Epoch {epoch}/{total_epochs(config)} ({what})")
        self.train_phase(epoch, stage)
        self.dist.broadcast_buffers(self.model)
        val = evaluate("val", epoch, stage.net, stage.loaders["val"], self.device, logger, config["amp"], self.dist)
        val_map = val["clean" if config["val_labels"] == "clean" else "observed"]["map"]
        new_best = logger.update_best(epoch, val_map)
        if new_best:
            self.save_best(epoch, val_map)
        if new_best or config["test_every_epoch"]:
            test = evaluate("test", epoch, stage.net, stage.loaders["test"], self.device, logger, config["amp"], self.dist)
            if new_best:
                logger.set_best_test(test)
        if config["loss"] == "EM_APL" and epoch >= config["warmup_epoch"]:
            scores, indices = predict(stage.net, stage.loaders["train_eval"], self.device, f"epoch {epoch} APL",
                                      config["amp"], self.dist)
            ordered = torch.empty(len(indices), self.num_classes)
            ordered[torch.from_numpy(indices)] = torch.from_numpy(scores)
            apl_update(self.train_observed, ordered, self.unobserved_at_start, config["neg_proportion"],
                       config["epochs"] - config["warmup_epoch"])

    def check_labels(self) -> None:
        """The label matrices the loss reads, validated once per epoch instead of once per batch."""
        def within(name: str, tensor: torch.Tensor | None, low: float, high: float) -> None:
            if tensor is not None and not bool(((tensor >= low) & (tensor <= high)).all()):
                raise RunError(f"{name} outside [{low}, {high}]")
        within("observed training labels", self.train_observed, -1, 1)
        within("pseudo-labels", self.pseudo_train, -1, 1)

    def epoch_loss_coefficients(self, epoch: int, train_clean: torch.Tensor) -> losses.Coefficients | None:
        """The loss's label-only coefficients (``losses.loss_coefficients``) for the whole training
        set, or None (EM_PL_ASL, or online pseudo-labels, which change per batch).

        Labels change only between epochs (APL), so one computation serves every step of an epoch,
        each taking its batch's rows.
        """
        if self.online:
            return None
        pseudo = self.pseudo_train.to(self.device) if self.pseudo_train is not None else None
        return losses.loss_coefficients(self.config["loss"], self.train_observed.to(self.device), self.hp,
                                         epoch=epoch, pseudo=pseudo, true=train_clean.to(self.device))

    def train_phase(self, epoch: int, stage: Stage) -> None:
        config, device, logger = self.config, self.device, self.logger
        loader = stage.loaders["train"]
        stage.net.train()
        if stage.name == "head":
            self.model.backbone.eval()
        logger.begin_phase("train", epoch, len(loader.dataset), self.num_classes)
        self.check_labels()
        coefficients = self.epoch_loss_coefficients(epoch, loader.dataset.clean)
        bar = tqdm(total=len(loader), desc=f"epoch {epoch} train", mininterval=3.0, dynamic_ncols=True,
                   disable=not self.dist.is_main)
        # The head alone, in float32 and one process: its steps can skip autograd and the loader.
        head_only = stage.name == "head" and coefficients is not None and config["amp"] == "none" \
            and not self.dist.enabled
        steps = self.train_head_batches if head_only else self.train_batches
        indices, scores, loss_sum, seen = steps(epoch, stage, coefficients, bar)
        bar.close()
        indices, scores = self.dist.gather_rows(indices.numpy(), scores.numpy())
        loss_sum, count = self.dist.sum([loss_sum, seen])
        dataset = loader.dataset
        logger.record_batch(indices, scores, dataset.clean[indices], dataset.observed[indices], loss_sum / count)
        logger.end_phase()

    def train_head_batches(self, epoch: int, stage: Stage, coefficients: losses.Coefficients,
                           bar) -> tuple[torch.Tensor, torch.Tensor, float, int]:
        """``train_batches`` for the head on cached features: the epoch's rows in the sampler's
        order, straight from memory, through ``train_head_epoch``."""
        loader, batch_size = stage.loaders["train"], self.config["bsize"]
        order = loader.order()
        preds, row_losses = train_head_epoch(stage.net, stage.optimizer, loader.dataset.features[order].to(self.device),
                                             losses.coefficient_rows(coefficients, order.to(self.device)),
                                             batch_size, bar.update)
        batch_of_row = torch.arange(len(row_losses), device=row_losses.device) // batch_size
        batch_losses = torch.zeros(len(loader), dtype=row_losses.dtype, device=row_losses.device).index_add_(
            0, batch_of_row, row_losses) / self.num_classes  # sum(L_b) / K: batch b's loss x its size
        for batch_number, batch_loss in enumerate(batch_losses.tolist(), start=1):
            if not math.isfinite(batch_loss):
                raise non_finite_loss(f"non-finite loss ({batch_loss})", epoch, batch_number)
        return order, preds.cpu(), float(batch_losses.sum()), len(order)

    def train_batches(self, epoch: int, stage: Stage, coefficients: losses.Coefficients | None,
                      bar) -> tuple[torch.Tensor, torch.Tensor, float, int]:
        """The train phase's steps, a loader batch at a time (train_step): (indices, predictions,
        sum of batch loss x batch size, rows seen)."""
        config, device = self.config, self.device
        loader = stage.loaders["train"]
        amp_context = autocast(config["amp"], device)
        channels_last = stage.name == "end_to_end" and convolutional(config["model"])
        running, seen = 0.0, 0
        seen_indices, seen_preds = [], []
        for batch_number, batch in enumerate(loader, start=1):
            index = torch.as_tensor(batch["index"])
            inputs = batch["image"].to(device, non_blocking=True)
            if channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            if coefficients is not None:
                batch_coefficients = losses.coefficient_rows(coefficients, index.to(device, non_blocking=True))

                def loss_of(preds):
                    return losses.mean_loss(losses.combine(preds, *batch_coefficients))
            else:
                observed = self.train_observed[index].to(device)
                pseudo = self.pseudo_train[index].to(device) if self.pseudo_train is not None else None
                if self.online:
                    embeddings = self.teacher.embed(batch["teacher_image"].to(device, non_blocking=True))
                    pseudo, _ = models.pseudo_labels_from_embeddings(
                        embeddings, self.setup.text_features.to(device), config["temp"], config["threshold"],
                        config["partial"])
                true = loader.dataset.clean[index].to(device, non_blocking=True)

                def loss_of(preds):
                    # Label values were checked once (check_labels); preds come from a sigmoid.
                    return losses.compute_loss(config["loss"], preds, observed, self.hp, epoch=epoch,
                                               pseudo=pseudo, true=true, check_values=False)
            try:
                preds, loss = train_step(stage.train_net, stage.optimizer, self.scaler, inputs, loss_of, amp_context)
            except FloatingPointError as error:
                raise non_finite_loss(str(error), epoch, batch_number) from error
            running += loss.item() * len(index)
            seen += len(index)
            bar.update(1)
            bar.set_postfix(loss=f"{running / seen:.4f}", refresh=False)
            seen_indices.append(index)
            seen_preds.append(preds.detach().cpu())
        return torch.cat(seen_indices), torch.cat(seen_preds), running, seen


def non_finite_loss(what: str, epoch: int, batch_number: int) -> RunError:
    return RunError(f"{what} at epoch {epoch}, batch {batch_number}; last.pt keeps the state after epoch {epoch - 1}")


def resume_command(config: dict) -> str:
    """The command line that continues this run: every flag whose value differs from its default, plus --resume."""
    parts = ["python", "main_clip.py"]
    for action in get_args_parser()._actions:
        if not action.option_strings or action.dest not in config or action.dest == "resume":
            continue
        value = config[action.dest]
        if value == action.default:
            continue
        flag = action.option_strings[-1]
        parts += [flag] if isinstance(action, argparse._StoreTrueAction) else [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts + ["--resume"])


def given_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """Destinations the user set on the command line (so the demo only fills the others)."""
    quiet = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kwargs = dict(dest=action.dest, default=argparse.SUPPRESS)
            if isinstance(action, argparse._StoreTrueAction):
                kwargs["action"] = "store_true"
            else:
                kwargs.update(type=action.type, choices=action.choices)
            quiet.add_argument(*action.option_strings, **kwargs)
    return set(vars(quiet.parse_args(argv)))


def cli(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.demo:
        args = demo_args(args, given_flags(parser, argv))
    try:
        main(args)
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
