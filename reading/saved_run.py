"""A finished (or interrupted) run folder, read back: its configuration, a checkpoint's model,
and the data settings it was trained with. Used by ``evaluate.py`` and ``predict.py``.

``load_run(run_dir, checkpoint)`` rebuilds the model from ``config.json`` with random weights
(``models.build_model(..., pretrained=False)``: nothing is read or downloaded but the run's own
checkpoint) and loads ``best.pt`` or ``last.pt`` into it (``checkpoint.load_checkpoint``:
``weights_only=True``, checksum verified), after checking that the checkpoint was trained with
the folder's configuration (``check_trained_with``: a ``best.pt`` copied in from another run is
refused, not scored as this run's). Every problem a user can fix (not a run folder, no such
checkpoint, another run's checkpoint, a config or checkpoint this version cannot read) is a
``RunError`` naming it, raised before anything is written.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import checkpoint as checkpoint_module
import config as config_module
import datasets
import engine
import methods
import models
import rundir
import teacher
from errors import RunError, exit_code
from instrumentation import CONFIG_FILE, SUMMARY_FILE
from reading.summarize import read_json

CHECKPOINTS = ("best", "last")
# What rebuilding the model and its data needs from config.json: a config without one of
# these was written by a version of main_clip.py this code cannot reproduce.
REQUIRED_CONFIG = {
    "dataset": str, "model": str, "method": str, "tiny_models": bool, "image_size": int, "bsize": int,
    "data_root": str, "val_frac": float, "split_seed": int, "subsample_seed": int, "train_frac": float,
    "val_frac_keep": float,
}


@dataclass
class SavedRun:
    run_dir: Path
    config: dict
    checkpoint: str               # "best" or "last"
    epoch: int | None             # the checkpoint's epoch
    model: models.Classifier      # in eval mode, on ``device``
    device: torch.device
    info: datasets.DatasetInfo
    spec: models.BackboneSpec

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.info.class_names

    @property
    def view(self) -> datasets.ImageView | None:
        """The network's input when it is not the backbone's own resize and normalisation: a
        student that copies the CLIP tower sees the teacher's view (--teacher-view) at its own
        size, as engine.Trainer.student_view gives it. Runs from before --teacher-view existed
        saw the plain transform (None)."""
        if "teacher_view" not in self.config:
            return None
        return teacher.student_view(self.spec, self.config["teacher_view"], self.config["image_size"])

    def dataset(self, paths, observed_labels: np.ndarray, clean_labels: np.ndarray) -> datasets.MultiLabelDataset:
        """The images as the run evaluated them (no flip), with their labels."""
        return datasets.MultiLabelDataset(paths, observed_labels, clean_labels, self.config["image_size"], train=False,
                                          mean=self.spec.mean, std=self.spec.std, view=self.view)

    def amp(self) -> str:
        """The run's --amp where this device can run it (fp16 needs CUDA), else none."""
        amp = self.config.get("amp", "none")
        return "none" if amp == "fp16" and self.device.type != "cuda" else amp

    def predict(self, dataset, batch_size: int | None, num_workers: int, desc: str) -> np.ndarray:
        """N x K probabilities of ``dataset`` (items with "image" and "index") in its order."""
        loader = engine.make_loader(dataset, batch_size or self.config["bsize"], num_workers)
        scores, indices = engine.predict(self.model, loader, self.device, desc, amp=self.amp())
        ordered = np.empty_like(scores)
        ordered[indices] = scores
        return ordered


def read_config(run_dir: str | Path) -> dict:
    """config.json of a run folder, checked for what rebuilding the run needs; RunError otherwise."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir} is not a folder (expected a run folder such as results/<run name>)")
    config, problem = read_json(run_dir / CONFIG_FILE)
    if config is None:
        what = "is not a run folder" if problem == f"no {CONFIG_FILE}" else "has an unusable run configuration"
        raise RunError(f"{run_dir} {what}: {problem}")
    config = rundir.renamed_settings(config)  # older versions recorded the method as "loss"
    missing = [key for key in REQUIRED_CONFIG if key not in config]
    wrong = [f"{key}={config[key]!r}" for key, kind in REQUIRED_CONFIG.items()
             if key in config and not _has_type(config[key], kind)]
    if missing or wrong:
        details = "; ".join(part for part in (missing and "lacks " + ", ".join(missing),
                                              wrong and "has unexpected values " + ", ".join(wrong)) if part)
        raise RunError(f"{run_dir / CONFIG_FILE} {details}: it comes from an incompatible version of main_clip.py")
    if config["dataset"] not in datasets.DATASETS:
        raise RunError(f"{run_dir / CONFIG_FILE} names dataset {config['dataset']!r}, unknown to this version "
                       f"(known: {', '.join(datasets.DATASETS)})")
    if config["model"] not in models.MODELS:
        raise RunError(f"{run_dir / CONFIG_FILE} names model {config['model']!r}, unknown to this version "
                       f"(known: {', '.join(models.MODELS)})")
    teacher_name = run_teacher(config)
    if not isinstance(teacher_name, str) or teacher_name not in models.TEACHERS:
        raise RunError(f"{run_dir / CONFIG_FILE} names teacher {teacher_name!r}, unknown to this version "
                       f"(known: {', '.join(models.TEACHERS)})")
    return config


def run_teacher(config: dict) -> str:
    """The run's --teacher; runs from before the flag had the default teacher."""
    return config.get("teacher", models.DEFAULT_TEACHER)


def _has_type(value, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def read_summary(run_dir: Path) -> dict | None:
    summary, _ = read_json(Path(run_dir) / SUMMARY_FILE)
    return summary


def load_run(run_dir: str | Path, checkpoint: str = "best", device: str | None = None) -> SavedRun:
    """The run's model with the weights of ``checkpoint`` ("best" or "last"), in eval mode."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    if checkpoint not in CHECKPOINTS:
        raise RunError(f"--checkpoint must be one of {', '.join(CHECKPOINTS)}, got {checkpoint!r}")
    path = run_dir / f"{checkpoint}.pt"
    if not path.is_file():
        hint = (" (the run has not finished an epoch with a new best val mAP)" if checkpoint == "best"
                else " (the run stopped before its first epoch)")
        raise RunError(f"{run_dir} has no {path.name}{hint}")
    state = checkpoint_module.load_checkpoint(path)  # weights_only=True, checksum verified
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise RunError(f"{path} holds no model weights (expected a dict with a 'model' state dict)")
    check_trained_with(path, state.get("config"), config)

    info = datasets.get_dataset_info(config["dataset"])
    spec = models.backbone_spec(config["model"])
    if spec.method_built:   # a method's own model (DualCoOp's), built by its method with random weights
        method = methods.get_method(config["method"])
        model = method.build_model(config_module.as_recorded_now(config), info.num_classes, pretrained=False)
    else:
        # A CLIP-tower student has its teacher's architecture (input size, width).
        clip_model = (models.load_clip(teacher=run_teacher(config), tiny=config["tiny_models"], pretrained=False)
                      if spec.copies_clip_tower else None)
        model = models.build_model(config["model"], info.num_classes, tiny=config["tiny_models"], pretrained=False,
                                   clip_model=clip_model, head=config.get("head", "linear"))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        summary = str(error).splitlines()[0]
        raise RunError(f"{path} does not fit the model {CONFIG_FILE} describes ({summary}); it comes from an "
                       f"incompatible version of main_clip.py") from error
    torch_device = pick_device(device)
    model = model.to(torch_device).eval()
    if spec.convolutional:
        model = model.to(memory_format=torch.channels_last)  # as the run evaluated: the same numbers
    epoch = state.get("epoch")
    return SavedRun(run_dir, config, checkpoint, epoch if isinstance(epoch, int) else None, model, torch_device,
                    info, spec)


def check_trained_with(path: Path, saved_config, config: dict) -> None:
    """RunError (one line) unless the checkpoint at ``path``, which records ``saved_config``, was
    trained with the run folder's ``config``: another run's best.pt copied into the folder (another
    image size, head, method, dataset) would otherwise be scored as this run's."""
    config_path = path.parent / CONFIG_FILE
    if not isinstance(saved_config, dict):
        raise RunError(f"{path} records no training configuration, so it cannot be checked against {config_path}; "
                       f"score only checkpoints that this version's main_clip.py wrote")
    try:
        # config.json is the JSON form of the dict the checkpoint holds (a tuple there is a list here).
        saved_config = json.loads(json.dumps(saved_config))
    except (TypeError, ValueError) as error:
        raise RunError(f"{path} records a training configuration that is not a run's settings ({error})") from error
    changed = configuration_differences(saved_config, config)
    if changed:
        raise RunError(f"{path} was trained with another configuration than {config_path} ({', '.join(changed)}); "
                       f"score a checkpoint in the run folder that trained it, or put this run's own {path.name} back")


def configuration_differences(saved: dict, config: dict) -> list[str]:
    """Each compared setting on which the two differ, as "key: saved vs config", in key order."""
    return rundir.changed_settings(config_module.as_recorded_now(saved), config_module.as_recorded_now(config),
                                  joiner=" vs ")


def load_benchmark(config: dict, data_root: str | Path | None = None,
                   check_images: bool = True) -> datasets.BenchmarkSplits:
    """The run's splits, drawn with its own split and subsampling settings (``data_root``
    overrides the run's --data-root, e.g. when the data has moved)."""
    try:
        return datasets.load_benchmark(
            data_root if data_root is not None else config["data_root"], config["dataset"],
            val_frac=config["val_frac"], split_seed=config["split_seed"], subsample_seed=config["subsample_seed"],
            train_frac=config["train_frac"], val_frac_keep=config["val_frac_keep"], check_images=check_images)
    except (FileNotFoundError, ValueError) as error:
        raise RunError(f"the run's data: {error} (a moved dataset: pass --data-root)") from error


def pick_device(device: str | None) -> torch.device:
    """``device`` ("cpu", "cuda", "cuda:1"); None: the first CUDA device if there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError as error:
        raise RunError(f"--device {device!r} is not a device name (cpu, cuda, cuda:1, ...)") from error
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise RunError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return chosen


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """RUN_DIR and the options evaluate.py and predict.py share."""
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder (results/<run name>)")
    parser.add_argument("--checkpoint", choices=CHECKPOINTS, default="best",
                        help="best.pt (the best epoch by val mAP) or last.pt (the last finished epoch)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when available)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per forward pass (default: the run's --bsize)")
    parser.add_argument("--num-workers", type=int, default=0, help="data loader worker processes")


def check_common_arguments(args: argparse.Namespace) -> None:
    if args.batch_size is not None and args.batch_size < 1:
        raise RunError(f"--batch-size must be positive, got {args.batch_size}")
    if args.num_workers < 0:
        raise RunError(f"--num-workers must be >= 0, got {args.num_workers}")


def run_cli(parser: argparse.ArgumentParser, main: Callable[[argparse.Namespace], object],
            argv: list[str] | None = None) -> int:
    """Parse ``argv``, run ``main``; a RunError is one line on stderr and exit code 2."""
    return exit_code(main, parser.parse_args(argv))
