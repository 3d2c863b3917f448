"""The training run: stages, the epoch loop, and the train / eval steps (docs/DESIGN.md §3, §6, §7).

Reading order: the steps (``train_step``; ``head_train_step`` and ``train_head_epoch`` for the
head alone on cached features) and evaluation (``predict``, ``evaluate``); ``EarlyStopping``;
then ``Trainer``, one run: it builds the model, the label state (``labels.LabelState``) and the
teacher's pseudo-labels, and runs the stages of ``--train-mode`` (``stage_schedule``) epoch by
epoch. Each stage has its own ``methods.Method`` instance, optimizer, loaders and early stopping,
and counts its epochs from 1; ``checkpoint.CheckpointSaver`` writes ``last.pt`` / ``best.pt``.
Under torchrun, ``distributed.Distributed`` shards the data and gathers predictions.
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import augment
import datasets
import fileio
import losses
import methods
import models
import pseudo_labels
import teacher as teacher_module
from caches import Encoder, OfficialImageCache, OfficialSetCache, ResizedImages
from checkpoint import BEST, CheckpointSaver
from distributed import Distributed
from errors import RunError
from instrumentation import RunLogger
from labels import LabelState

HEAD, END_TO_END = "head", "end_to_end"


@dataclass
class Setup:
    """What a run needs from outside, each part checked before any output is written."""
    device: torch.device
    benchmark: datasets.BenchmarkSplits
    teacher: teacher_module.Teacher | None
    text_features: torch.Tensor | None
    dist: Distributed = Distributed()


# -- steps ---------------------------------------------------------------------------------------

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


def use_deterministic_algorithms() -> None:
    """``--deterministic``: kernels that give the same result on every run, so that on CUDA a
    resumed run repeats the uninterrupted one (on the CPU the kernels this code uses already do).
    cuBLAS reads its workspace setting when it starts, so it is set before any CUDA work; an
    operation without a deterministic kernel warns instead of stopping the run."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def train_step(net, optimizer, scaler, inputs, loss_of, amp_context) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step: forward under autocast, float32 loss, scaled backward, step, scaler update.

    ``loss_of(logits, preds)`` gives the scalar loss of the batch's float32 logits and their
    sigmoid. Returns (preds, loss).
    """
    with amp_context:
        logits = net(inputs)
    logits = logits.float()
    preds = torch.sigmoid(logits)
    loss = loss_of(logits, preds)
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
    """One step of a linear head on a batch of cached features, for a loss of ``losses.combine``'s
    form (the batch's rows of its coefficients), with the gradient written out instead of
    autograd's; returns the batch's predictions (into ``preds_out`` if given).

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
    """Score a split: the phase's metrics line and record (``RunLogger.end_phase``)."""
    dataset = loader.dataset
    logger.begin_phase(phase, epoch, len(dataset), dataset.clean.shape[1])
    scores, indices = predict(net, loader, device, desc=f"epoch {epoch} {phase}", amp=amp, dist=dist)
    logger.record_batch(indices, scores, dataset.clean[indices], dataset.observed[indices])
    return logger.end_phase()


def non_finite_loss(what: str, epoch: int, batch_number: int) -> RunError:
    return RunError(f"{what} at epoch {epoch}, batch {batch_number}; last.pt keeps the state after epoch {epoch - 1}")


# -- early stopping and stages ----------------------------------------------------------------

class EarlyStopping:
    """The literature's stopping rules, within one stage: ``patience`` epochs without a new best
    val mAP, or val mAP more than ``max_drop`` points below the stage's best (0: rule off)."""

    def __init__(self, patience: int = 0, max_drop: float = 0.0):
        self.patience, self.max_drop = patience, max_drop
        self.best: float | None = None
        self.since_best = 0
        self.stopped = False

    def update(self, val_map: float) -> str | None:
        """Take one epoch's val mAP; the reason when the stage should stop now, else None."""
        if not math.isnan(val_map) and (self.best is None or val_map > self.best):
            self.best, self.since_best = val_map, 0
            return None
        self.since_best += 1
        if self.patience and self.since_best >= self.patience:
            self.stopped = True
            return f"{self.since_best} epoch(s) without a new best val mAP (--patience {self.patience})"
        if self.max_drop and self.best is not None and not self.best - val_map <= self.max_drop:
            self.stopped = True
            return f"val mAP {val_map:.3f} is more than {self.max_drop} below the best {self.best:.3f} (--max-drop)"
        return None

    def state_dict(self) -> dict:
        return {"best": self.best, "since_best": self.since_best, "stopped": self.stopped}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.since_best, self.stopped = state["best"], state["since_best"], state["stopped"]


# --train-mode: its stages, in order, with their number of epochs.
TRAIN_MODES: dict[str, Callable[[dict], list[tuple[str, int]]]] = {
    "end_to_end": lambda config: [(END_TO_END, config["epochs"])],
    "linear_fixed_features": lambda config: [(HEAD, config["epochs"])],
    "linear_init": lambda config: [(HEAD, config["head_epochs"]), (END_TO_END, config["epochs"])],
}


def stage_schedule(config: dict) -> list[tuple[str, int, int]]:
    """(stage name, its epochs, the run's epoch number of its first epoch) for each stage."""
    schedule, first = [], 1
    for name, epochs in TRAIN_MODES[config["train_mode"]](config):
        schedule.append((name, epochs, first))
        first += epochs
    return schedule


def total_epochs(config: dict) -> int:
    return sum(epochs for _, epochs, _ in stage_schedule(config))


# Optimizers by --optimizer: (parameter groups, each with its lr; weight decay) -> optimizer.
OPTIMIZERS: dict[str, Callable[[list[dict], float], torch.optim.Optimizer]] = {
    # fused: one kernel per step instead of a handful of ops per parameter (CPU and CUDA).
    "adam": lambda groups, weight_decay: torch.optim.Adam(groups, weight_decay=weight_decay, fused=True),
    # Momentum 0.9: the single-positive literature's SGD (Kim et al. 2022 on VOC).
    "sgd": lambda groups, weight_decay: torch.optim.SGD(groups, momentum=0.9, weight_decay=weight_decay),
}


def _cosine(epoch: int, epochs: int, warmup_epochs: int) -> float:
    """Dassl's cosine after its constant warm-up (WARMUP_RECOUNT): CosineAnnealingLR(T_max = the
    stage's epochs), started when the warm-up ends, so the first epoch after it is at the full rate."""
    return (1.0 + math.cos(math.pi * (epoch - warmup_epochs - 1) / epochs)) / 2.0


# --lr-schedule: (epoch in the stage, the stage's epochs, warm-up epochs) -> factor of each group's
# learning rate, for the epochs after the warm-up.
LR_SCHEDULES: dict[str, Callable[[int, int, int], float]] = {
    "constant": lambda epoch, epochs, warmup_epochs: 1.0,
    "cosine": _cosine,
}


class LRSchedule:
    """``--lr-schedule``, ``--lr-warmup-epochs``, ``--lr-warmup-lr`` over one stage: each
    parameter group's learning rate for the stage's epoch e, set before the epoch's steps (DualCoOp
    steps its scheduler once per epoch). The first W epochs run at the warm-up rate (times the
    group's multiplier relative to the stage's rate: ``--head-lr-mult``, a method's groups), then
    every group at its own rate times ``LR_SCHEDULES[name](e, epochs, W)``. A function of the
    epoch alone, so a resumed stage repeats the rates of the stage in one go; its state in
    ``last.pt`` records the base rates and the last epoch set. The constant schedule without a
    warm-up never touches the optimizer (every run before the setting existed)."""

    def __init__(self, optimizer: torch.optim.Optimizer, name: str, epochs: int, warmup_epochs: int,
                 warmup_lr: float, stage_lr: float):
        if name not in LR_SCHEDULES:
            raise ValueError(f"unknown --lr-schedule {name!r}; choose one of: {', '.join(LR_SCHEDULES)}")
        self.optimizer, self.name, self.epochs = optimizer, name, epochs
        self.warmup_epochs, self.warmup_lr, self.stage_lr = warmup_epochs, warmup_lr, stage_lr
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.epoch = 0

    @property
    def active(self) -> bool:
        return self.name != "constant" or self.warmup_epochs > 0

    def rates(self, epoch: int) -> list[float]:
        """Each group's learning rate in the stage's epoch ``epoch`` (1-based)."""
        if epoch <= self.warmup_epochs:
            return [self.warmup_lr * base / self.stage_lr for base in self.base_lrs]
        factor = LR_SCHEDULES[self.name](epoch, self.epochs, self.warmup_epochs)
        return [base * factor for base in self.base_lrs]

    def start_epoch(self, epoch: int) -> list[float] | None:
        """Set the groups' rates for ``epoch``; the rates, or None where the schedule is off."""
        self.epoch = epoch
        if not self.active:
            return None
        rates = self.rates(epoch)
        for group, rate in zip(self.optimizer.param_groups, rates):
            group["lr"] = rate
        return rates

    def state_dict(self) -> dict:
        return {"name": self.name, "base_lrs": list(self.base_lrs), "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.base_lrs, self.epoch = list(state["base_lrs"]), state["epoch"]


@dataclass
class Stage:
    """What one kind of epoch trains: the whole model on images, or the head on cached features."""
    name: str                      # HEAD or END_TO_END
    epochs: int
    first_epoch: int               # the run's epoch number of the stage's epoch 1
    net: torch.nn.Module           # maps a batch's "image" entry to logits
    train_net: torch.nn.Module     # net, wrapped in DistributedDataParallel under torchrun
    optimizer: torch.optim.Optimizer
    generator: torch.Generator     # reseeded every epoch: shuffle order and flips
    loaders: dict                  # "train", "val", "test" and, for methods that ask, "train_eval"
    method: methods.Method
    batch_size: int                # the global training batch (--bsize; head stages: --head-bsize)
    stopping: EarlyStopping = field(default_factory=EarlyStopping)
    lr_schedule: LRSchedule | None = None    # None: the optimizer's rates stay as built

    def epoch_in_stage(self, epoch: int) -> int:
        return epoch - self.first_epoch + 1


class Trainer:
    """One training run: the model, its labels, its stages, its checkpoints."""

    def __init__(self, config: dict, run_dir: Path, setup: Setup, model: models.Classifier | None = None,
                 resume_state: dict | None = None):
        """``resume_state``: last.pt as already read and verified (``config["resume"]``; None reads it)."""
        self.config, self.run_dir, self.setup = config, run_dir, setup
        self.resume_state = resume_state
        self.device, self.benchmark, self.teacher, self.dist = setup.device, setup.benchmark, setup.teacher, setup.dist
        self.method_class = methods.get_method(config["method"])
        self.num_classes = self.benchmark.info.num_classes
        self.backbone = models.backbone_spec(config["model"])
        if self.dist.is_main:
            self.logger = RunLogger(run_dir, resume=config["resume"])
        else:
            # Other ranks keep the same bookkeeping (their metrics are computed from the same
            # gathered predictions, so they reach the same decisions) but write nothing of the run's.
            self._scratch = tempfile.TemporaryDirectory(prefix=f"vlpl-rank{self.dist.rank}-")
            self.logger = RunLogger(Path(self._scratch.name), resume=False, echo=False)
        self.saver = CheckpointSaver(run_dir, self.logger, self.dist)
        self.cache = OfficialSetCache(config["data_root"], config["dataset"], self.benchmark.image_dir,
                                      Path(config["cache_dir"]), batch_size=max(config["bsize"], 32),
                                      num_workers=config["num_workers"], device=self.device, log=self.logger.log,
                                      dist=self.dist, image_source=self.encoder_images)
        # --image-cache uint8: every official image decoded and resized once, read by every epoch.
        self.images = (OfficialImageCache(config["data_root"], config["dataset"], self.benchmark.image_dir,
                                          Path(config["cache_dir"]), config["num_workers"], self.logger.log, self.dist)
                       if config.get("image_cache", "off") == "uint8" else None)
        self.labels = LabelState(self.benchmark.train.labels_obs, self.benchmark.train.labels)
        # The method's pseudo-label rule (pseudo_labels.RULES), when it needs pseudo-labels.
        self.pseudo_labels: pseudo_labels.PseudoLabelRule | None = None
        if setup.text_features is not None:
            self.pseudo_labels = pseudo_labels.RULES[self.method_class.pseudo_label_rule](self.rule_context())

        torch.manual_seed(config["seed"])
        if model is None:
            model = self.method_class.build_model(config, self.num_classes)   # a method's own model, or None
        if model is None:
            clip_model = self.teacher.clip_model if self.teacher is not None else None
            model = models.build_model(config["model"], self.num_classes, backbone_weights=config["backbone_weights"],
                                       clip_model=clip_model, tiny=config["tiny_models"], head=config["head"])
        self.model = model.to(self.device)
        if config["sync_bn"]:
            self.model = self.dist.sync_batchnorm(self.model)
        if self.backbone.convolutional:
            # channels_last: the faster layout for convolutions, with cuDNN and with oneDNN on CPUs
            # (1.26x per ResNet-50 training step on a 2-core CPU, bench/channels_last.py).
            self.model = self.model.to(memory_format=torch.channels_last)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config["amp"] == "fp16")

    @property
    def online(self) -> bool:
        """The teacher runs on every training batch (its work is not cached)."""
        return self.pseudo_labels is not None and self.pseudo_labels.online

    # -- teacher and feature caches ------------------------------------------------------------
    def rule_context(self) -> pseudo_labels.RuleContext:
        """What the pseudo-label rule may use of this run."""
        return pseudo_labels.RuleContext(
            config=self.config, text_features=self.setup.text_features, teacher=self.teacher,
            encoder=self.teacher_encoder, cache=self.cache, benchmark=self.benchmark, labels=self.labels,
            device=self.device, log=self.logger.log)

    def teacher_encoder(self, flips: bool = True) -> Encoder:
        self.teacher.to(self.device)
        return self.teacher.encoder(self.config["teacher_view"], flips)

    def student_view(self) -> datasets.ImageView | None:
        """The student's input when it is not the backbone's own resize and normalisation: a
        backbone that copies the teacher's tower sees the teacher's view (at its own size), as
        the original fed its CLIP student the teacher's tensor."""
        return teacher_module.student_view(self.backbone, self.config["teacher_view"], self.config["image_size"])

    def student_source_size(self) -> int | None:
        """The side of the resize the student's input starts with (None: not a known recipe)."""
        view = self.student_view()
        return self.config["image_size"] if view is None else teacher_module.view_source_size(view)

    def resized_images(self, split: str, teacher_view: datasets.ImageView | None = None) -> ResizedImages | None:
        """The image cache's rows of the 'train', 'val' or 'test' split (--image-cache uint8), when the
        student's input and the teacher's view (if any) start with one same resize, so that the rows
        give them exactly (``teacher.view_source_size``); else None: the images are decoded."""
        if self.images is None:
            return None
        sizes = {self.student_source_size()}
        if teacher_view is not None:
            sizes.add(teacher_module.view_source_size(teacher_view))
        if len(sizes) != 1 or None in sizes:
            why = ("a view that does not start with a known resize" if None in sizes else
                   f"inputs that start with resizes to {' and '.join(str(size) for size in sorted(sizes))} px")
            self.logger.log(f"image cache: not used for the {split} split ({why}); its images are decoded every epoch")
            return None
        phase, rows = {"train": ("train", self.benchmark.train_indices), "val": ("train", self.benchmark.val_indices),
                       "test": ("val", None)}[split]
        images = self.images.images(phase, sizes.pop())
        return images if images is None or rows is None else images.subset(rows)

    def encoder_images(self, phase: str, encoder: Encoder) -> ResizedImages | None:
        """The image cache's rows that give ``encoder``'s inputs exactly, for a one-time pass over an
        official split (``OfficialSetCache.image_source``): only at the size the epochs read, so that
        no file is made for one pass."""
        if self.images is None:
            return None
        size = encoder.image_size if encoder.views is None else teacher_module.view_source_size(encoder.views)
        if size is None or size != self.student_source_size():
            return None
        return self.images.images(phase, size)

    def make_pseudo_labels(self) -> None:
        """The teacher's one-time work for the method's pseudo-labels (its rule's ``prepare``)."""
        self.pseudo_labels.prepare()

    def backbone_features(self) -> dict[str, np.ndarray]:
        """Frozen backbone features of the train / val / test images (eval transform, cached).

        A backbone that starts as the teacher's tower, at the teacher's input size, has the
        teacher's own embeddings as features, so one cached pass feeds both (after VLPL's rule has
        read the train embeddings, the cache returns them from memory). Nothing reads these files
        after the head's features are made, so the cache does not keep them."""
        config, bench = self.config, self.benchmark
        if self.backbone.copies_clip_tower and config["image_size"] == self.teacher.input_size:
            # As is: features have no flips.
            official_train = self.cache.embeddings("train", self.teacher_encoder(), keep=False)[:, 0]
            official_val = self.cache.embeddings("val", self.teacher_encoder(flips=False), keep=False)[:, 0]
            self.teacher.cpu()  # its work is cached: free the accelerator's memory for training
        else:
            self.model.eval()
            key = {"backbone": config["model"], "weights": models.weights_fingerprint(self.model.backbone),
                   "output": "pooled features"}
            view = self.student_view()
            if view is not None:
                key["view"] = config["teacher_view"]
            encoder = Encoder(self.model.features, key, config["model"], config["image_size"],
                              self.backbone.mean, self.backbone.std,
                              views=None if view is None else teacher_module.Flips(view, (False,)))
            # One view per image: N x 1 x D with a view recipe, N x D without.
            official_train, official_val = (
                self.cache.embeddings(phase, encoder, keep=False).reshape(-1, self.model.feature_dim)
                for phase in ("train", "val"))
        return {"train": official_train[bench.train_indices], "val": official_train[bench.val_indices],
                "test": official_val}

    # -- stages ----------------------------------------------------------------------------------
    def build_stage(self, name: str, epochs: int, first_epoch: int = 1,
                    features: dict[str, np.ndarray] | None = None) -> Stage:
        """A stage's loaders, optimizer, method and early stopping; the labels start over.
        ``features`` (train / val / test) skips the feature cache."""
        config, bench = self.config, self.benchmark
        splits = {"train": bench.train, "val": bench.val, "test": bench.test}
        augmentation = augment.get_augmentation(config.get("augmentation", augment.DEFAULT_AUGMENTATION))
        if name == HEAD:
            features = features if features is not None else self.backbone_features()
            phase_sets = {phase: datasets.FeatureDataset(features[phase], split.labels_obs, split.labels)
                          for phase, split in splits.items()}
            phase_sets["train_eval"] = phase_sets["train"]
            net, eval_batch = self.model.head, max(config["bsize"], 1024)
            batch_size = config["head_bsize"] or config["bsize"]   # None: --bsize
            groups = [{"params": list(net.parameters()), "lr": config["head_lr"]}]
        else:
            teacher_view = self.pseudo_labels.teacher_view() if self.pseudo_labels is not None else None
            student_view = self.student_view()

            def image_set(split_name: str, train: bool, view=None):
                split = getattr(bench, split_name)
                return datasets.MultiLabelDataset([bench.image_dir / p for p in split.images], split.labels_obs,
                                                  split.labels, config["image_size"], train=train,
                                                  mean=self.backbone.mean, std=self.backbone.std, view=student_view,
                                                  teacher_view=view, resized=self.resized_images(split_name, view),
                                                  augmentation=augmentation if train else datasets.NO_AUGMENTATION)
            phase_sets = {"train": image_set("train", True, teacher_view), "val": image_set("val", False),
                          "test": image_set("test", False)}
            if self.method_class.uses_train_predictions:
                phase_sets["train_eval"] = image_set("train", False)
            net, eval_batch = self.model, config["bsize"]
            batch_size = config["bsize"]
            # Frozen parameters (a method's own model: DualCoOp's CLIP) stay out of the optimizer.
            groups = [{"params": [p for p in self.model.backbone.parameters() if p.requires_grad], "lr": config["lr"]},
                      {"params": [p for p in self.model.head.parameters() if p.requires_grad],
                       "lr": config["lr"] * config["head_lr_mult"]}]
        self.labels.restart()
        if self.pseudo_labels is not None:
            self.pseudo_labels.restart()
        method = self.method_class.from_config(config, self.labels, epochs).to(self.device)
        base_lr = groups[0]["lr"]
        groups += [{"params": params, "lr": base_lr * multiplier} for params, multiplier in method.parameter_groups()]
        generator, dist = torch.Generator(), self.dist
        loaders = {phase: make_loader(ds, eval_batch, config["num_workers"],
                                      sampler=range(dist.rank, len(ds), dist.world_size))
                   for phase, ds in phase_sets.items()}
        train_sampler = datasets.AugmentationSampler(
            len(phase_sets["train"]), generator, rank=dist.rank, world_size=dist.world_size,
            num_view_flips=self.pseudo_labels.num_view_flips if self.pseudo_labels is not None else 0,
            seeds=name == END_TO_END and augmentation.transform is not None)
        loaders["train"] = make_loader(phase_sets["train"], batch_size // dist.world_size, config["num_workers"],
                                       sampler=train_sampler)
        optimizer = OPTIMIZERS[config["optimizer"]](groups, config["weight_decay"])
        schedule = LRSchedule(optimizer, config.get("lr_schedule", "constant"), epochs,
                              config.get("lr_warmup_epochs", 0), config.get("lr_warmup_lr", 1e-5), base_lr)
        train_net = net
        if dist.enabled:
            train_net = torch.nn.parallel.DistributedDataParallel(
                net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return Stage(name, epochs, first_epoch, net, train_net, optimizer, generator, loaders, method, batch_size,
                     EarlyStopping(config["patience"], config["max_drop"]), schedule)

    # -- checkpoints -----------------------------------------------------------------------------
    def save_last(self, epoch: int, stage: Stage | None) -> None:
        self.saver.save_last(dict(
            model=self.model.state_dict(), epoch=epoch, logger=self.logger.state_dict(), config=self.config,
            scaler=self.scaler.state_dict(), stage=stage.name if stage else None,
            optimizer=stage.optimizer.state_dict() if stage else None,
            labels=self.labels.state_dict() if stage else None,
            pseudo_labels=self.pseudo_labels.state_dict() if stage and self.pseudo_labels is not None else None,
            method=stage.method.state_dict() if stage else None,
            early_stopping=stage.stopping.state_dict() if stage else None,
            lr_schedule=stage.lr_schedule.state_dict() if stage and stage.lr_schedule else None))

    def restore(self) -> dict:
        state = self.resume_state if self.resume_state is not None else self.saver.load_last()
        self.model.load_state_dict(state["model"])
        self.logger.load_state_dict(state["logger"])
        self.scaler.load_state_dict(state["scaler"])
        self.logger.log(f"resumed from {self.saver.last_path} after epoch {state['epoch']}")
        return state

    def start_from_best(self, name: str, epochs: int, first: int, last_epoch: int) -> Stage:
        """A later stage, started from the best epoch so far: its weights and its method state
        (best.pt), then the new stage written to last.pt at once, so that a resume takes the
        hand-over from last.pt even after this stage's epochs have replaced best.pt."""
        best = self.saver.load_best()
        if best.get("epoch") != self.logger.best_epoch:
            raise RunError(f"{self.run_dir / BEST} holds epoch {best.get('epoch')}, but {self.saver.last_path} "
                           f"records epoch {self.logger.best_epoch} as the best: best.pt is not this run's; restore "
                           f"it from a copy or start the run again under another --run-name")
        self.model.load_state_dict(best["model"])
        self.logger.log(f"{name} stage starts from the best epoch so far (epoch {best['epoch']})")
        stage = self.build_stage(name, epochs, first)
        if "method" in best:
            stage.method.start_from_previous_stage(best["method"])
        else:
            self.logger.log(f"{self.run_dir / BEST} holds no method state (an older version wrote it): "
                            f"the {name} stage's method starts afresh")
        if self.config["model_selection"] == "final_stage":
            self.logger.restart_selection()
            self.logger.log(f"model selection: the best epoch of the {name} stage is reported "
                            f"(--model-selection final_stage)")
        self.save_last(last_epoch, stage)
        return stage

    def restore_stage(self, stage: Stage, state: dict) -> None:
        stage.optimizer.load_state_dict(state["optimizer"])
        self.labels.load_state_dict(state["labels"])
        if self.pseudo_labels is not None and state.get("pseudo_labels"):
            self.pseudo_labels.load_state_dict(state["pseudo_labels"])
        stage.method.load_state_dict(state["method"])
        stage.stopping.load_state_dict(state["early_stopping"])
        if stage.lr_schedule is not None and state.get("lr_schedule"):   # older last.pt: none (constant rates)
            stage.lr_schedule.load_state_dict(state["lr_schedule"])

    # -- the loop --------------------------------------------------------------------------------
    def fit(self) -> dict:
        config, logger = self.config, self.logger
        bench = self.benchmark
        logger.log(f"run folder: {self.run_dir}")
        logger.log(f"dataset {config['dataset']}: train {len(bench.train.images)}, val {len(bench.val.images)}, "
                   f"test {len(bench.test.images)} images, {self.num_classes} classes; device {self.device}; "
                   f"train mode {config['train_mode']}")
        without_positives = self.classes_without_positives()
        for split, names in without_positives.items():
            if names:
                logger.log(f"note: {len(names)} of {self.num_classes} classes have no positive in {split} "
                           f"({', '.join(names)}): each counts in its mAP as AP 0, as in the original code bases")
        fileio.check_writable(self.run_dir, self.saver.bytes_needed(self.model), "--output-dir",
                              needed_for="last.pt and best.pt")
        saved = self.restore() if config["resume"] else None
        last_epoch = saved["epoch"] if saved else 0
        if saved is None:
            self.save_last(0, None)  # from here on the folder is a started run: --resume continues it
        epoch = last_epoch + 1
        try:
            if self.pseudo_labels is not None:
                self.make_pseudo_labels()
            if self.teacher is not None and not self.online:
                self.teacher.cpu()  # its work is cached: free the accelerator's memory for training
            for name, epochs, first in stage_schedule(config):
                # last.pt names the stage in progress (a later stage's is written as it starts).
                resumed_here = saved is not None and saved["stage"] == name
                if last_epoch >= first + epochs - 1 or (resumed_here and saved["early_stopping"]["stopped"]):
                    continue  # finished, or stopped early, before the resume
                if resumed_here:
                    stage = self.build_stage(name, epochs, first)
                    self.restore_stage(stage, saved)
                elif first > 1:
                    stage = self.start_from_best(name, epochs, first, last_epoch)
                else:
                    stage = self.build_stage(name, epochs, first)
                for epoch in range(max(first, last_epoch + 1), first + epochs):
                    self.run_epoch(epoch, stage)
                    self.save_last(epoch, stage)
                    last_epoch = epoch
                    if stage.stopping.stopped:
                        break
        except KeyboardInterrupt:
            logger.log(f"interrupted during epoch {epoch}; {self.saver.last_path} holds the state after epoch "
                       f"{epoch - 1}")
            logger.close()
            raise
        report = self.pseudo_labels.report if self.pseudo_labels is not None else None
        summary = logger.finish(config, extra={"pseudo_labels": report, "train_mode": config["train_mode"],
                                               "world_size": self.dist.world_size,
                                               "best_stage": self.stage_of(logger.best_epoch),
                                               "model_selection": config["model_selection"],
                                               "classes_without_positives": without_positives})
        logger.close()
        return summary

    def classes_without_positives(self) -> dict[str, list[str]]:
        """Per split, the classes without a (clean) positive, each AP 0 in that split's mAP; with
        --val-labels observed, also those without an observed positive in val ("val_observed")."""
        bench = self.benchmark
        found = {split: bench.classes_without_positives(split) for split in ("train", "val", "test")}
        if self.config["val_labels"] == "observed":
            found["val_observed"] = bench.classes_without_positives("val", observed=True)
        return found

    def stage_of(self, epoch: int | None) -> str | None:
        """The name of the stage that ran ``epoch`` (None for None)."""
        if epoch is None:
            return None
        return next(name for name, epochs, first in stage_schedule(self.config) if first <= epoch < first + epochs)

    def run_epoch(self, epoch: int, stage: Stage) -> None:
        config, logger = self.config, self.logger
        # Every epoch's randomness derives from (seed, epoch), so a resumed run repeats it exactly.
        epoch_seed = config["seed"] * 100_003 + epoch
        torch.manual_seed(epoch_seed + 1_000_003 * self.dist.rank)  # dropout etc.: different per rank
        stage.generator.manual_seed(epoch_seed)  # data order and flips: the same on every rank
        what = "head on cached features" if stage.name == HEAD else "end to end"
        rates = stage.lr_schedule.start_epoch(stage.epoch_in_stage(epoch)) if stage.lr_schedule else None
        if rates is not None:   # each distinct rate of the groups that have parameters
            shown = dict.fromkeys(rate for rate, group in zip(rates, stage.optimizer.param_groups) if group["params"])
            what += f"; learning rate {', '.join(f'{rate:.4g}' for rate in shown)}"
        logger.log(f"Epoch {epoch}/{total_epochs(config)} ({what})")
        self.train_phase(epoch, stage)
        self.dist.broadcast_buffers(self.model)
        val = evaluate("val", epoch, stage.net, stage.loaders["val"], self.device, logger, config["amp"], self.dist)
        val_map = val["clean" if config["val_labels"] == "clean" else "observed"]["map"]
        new_best = self.saver.update_best(epoch, val_map, self.model, config, stage.method.state_dict)
        if new_best or config["test_every_epoch"]:
            test = evaluate("test", epoch, stage.net, stage.loaders["test"], self.device, logger, config["amp"],
                            self.dist)
            if new_best:
                logger.set_best_test(test)
        stage.method.end_epoch(stage.epoch_in_stage(epoch), lambda: self.train_predictions(epoch, stage))
        self.labels.sync(self.dist)
        if self.pseudo_labels is not None:
            self.pseudo_labels.sync(self.dist)
            self.pseudo_labels.end_epoch(stage.epoch_in_stage(epoch))
        reason = stage.stopping.update(val_map)
        if reason:
            logger.log(f"early stop of the {stage.name} stage after epoch {epoch}: {reason}")

    def train_predictions(self, epoch: int, stage: Stage) -> torch.Tensor:
        """N x K probabilities of the train split in eval mode, in row order (methods' end_epoch)."""
        scores, indices = predict(stage.net, stage.loaders["train_eval"], self.device, f"epoch {epoch} train (eval)",
                                  self.config["amp"], self.dist)
        ordered = torch.empty(len(indices), self.num_classes)
        ordered[torch.from_numpy(indices)] = torch.from_numpy(scores)
        return ordered

    def train_phase(self, epoch: int, stage: Stage) -> None:
        config, device, logger, labels = self.config, self.device, self.logger, self.labels
        loader = stage.loaders["train"]
        stage.net.train()
        if stage.name == HEAD:
            self.model.backbone.eval()
        logger.begin_phase("train", epoch, len(loader.dataset), self.num_classes)
        labels.check()
        bar = tqdm(total=len(loader), desc=f"epoch {epoch} train", mininterval=3.0, dynamic_ncols=True,
                   disable=not self.dist.is_main)
        coefficients = None
        # The head alone, in float32 and one process, with a loss of losses.combine's form: its
        # steps can skip autograd and the loader (labels change only between epochs).
        if stage.name == HEAD and config["amp"] == "none" and not self.dist.enabled:
            pseudo = labels.pseudo.to(device) if labels.pseudo is not None else None
            coefficients = stage.method.label_coefficients(labels.observed.to(device), pseudo, labels.clean.to(device),
                                                           stage.epoch_in_stage(epoch))
        if coefficients is not None:
            indices, scores, loss_sum, seen = self.train_head_batches(epoch, stage, coefficients, bar)
        else:
            indices, scores, loss_sum, seen = self.train_batches(epoch, stage, bar)
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
        loader, batch_size = stage.loaders["train"], stage.batch_size
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

    def train_batches(self, epoch: int, stage: Stage, bar) -> tuple[torch.Tensor, torch.Tensor, float, int]:
        """The train phase's steps, a loader batch at a time (train_step): (indices, predictions,
        sum of batch loss x batch size, rows seen)."""
        config, device, labels, method = self.config, self.device, self.labels, stage.method
        stage_epoch = stage.epoch_in_stage(epoch)
        amp_context = autocast(config["amp"], device)
        channels_last = stage.name == END_TO_END and self.backbone.convolutional
        running, seen = 0.0, 0
        seen_indices, seen_preds = [], []
        for batch_number, batch in enumerate(stage.loaders["train"], start=1):
            index = torch.as_tensor(batch["index"])
            inputs = batch["image"].to(device, non_blocking=True)
            if channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            observed, clean = labels.observed[index].to(device), labels.clean[index].to(device)
            pseudo = self.pseudo_labels.batch(index, batch, observed) if self.pseudo_labels is not None else None

            def loss_of(logits, preds):
                return method.loss(methods.LossInputs(logits, preds, index.to(device), observed, pseudo, clean,
                                                      self.dist.global_batch), stage_epoch)
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
