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
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
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
RESUMABLE_CHANGES = {"resume", "epochs", "num_workers", "gpu", "test_every_epoch"}


class RunError(Exception):
    """A problem the user can fix (bad flag, missing file); shown as one line, exit code 2."""


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
    g.add_argument("--cache-dir", default=None, help="where the teacher embedding cache goes (default: <data-root>/<dataset>/cache)")
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
    positive = ["epochs", "bsize", "lr", "temp", "image_size"]
    for key in positive:
        if not config[key] > 0:
            raise RunError(f"--{key.replace('_', '-')} must be positive, got {config[key]}")
    if not 0.0 <= config["partial"] < 1.0:
        raise RunError(f"-p/--partial must be in [0, 1), got {config['partial']}")
    if config["num_workers"] < 0:
        raise RunError(f"--num-workers must be >= 0, got {config['num_workers']}")
    if config["loss"] == "EM_APL" and config["warmup_epoch"] >= config["epochs"]:
        raise RunError(f"EM_APL needs --warmup-epoch ({config['warmup_epoch']}) below --epochs ({config['epochs']})")


def select_device(gpu: int) -> torch.device:
    if not torch.cuda.is_available():
        print(f"CUDA is not available: ignoring -g {gpu} and running on the CPU")
        return torch.device("cpu")
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


def make_loader(dataset, batch_size: int, shuffle: bool, num_workers: int, seed: int | None = None) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      generator=generator, pin_memory=torch.cuda.is_available(),
                      persistent_workers=False, drop_last=False)


@torch.no_grad()
def predict(model, loader, device, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities for a whole split, in dataset order: (N x K scores, N indices)."""
    model.eval()
    scores, indices = [], []
    for batch in tqdm(loader, desc=desc, mininterval=3.0, leave=False):
        scores.append(torch.sigmoid(model(batch["image"].to(device))).cpu())
        indices.append(batch["index"])
    return torch.cat(scores).numpy(), torch.cat(indices).numpy()


def evaluate(phase: str, epoch: int, model, loader, device, logger: RunLogger) -> dict:
    dataset = loader.dataset
    logger.begin_phase(phase, epoch, len(dataset), dataset.clean.shape[1])
    scores, indices = predict(model, loader, device, desc=f"epoch {epoch} {phase}")
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
    defaults = dict(dataset="pascal", loss="EM_PL", model="resnet50", tiny_models=True, epochs=4,
                    lr=1e-3, bsize=16, num_workers=0, data_root=str(Path(args.output_dir) / "demo-data"),
                    run_name="demo_" + time.strftime("%Y%m%d-%H%M%S"))
    for key, value in defaults.items():
        if key not in argv_given:
            setattr(args, key, value)
    return args


def main(args: argparse.Namespace) -> dict:
    """One training run; returns the summary dict. Raises RunError for fixable user errors."""
    if args.demo:
        print("DEMO: tiny randomly initialised models on synthetic data. The mAP it prints shows the "
              "pipeline works end to end; it is not a benchmark result.")
        run_demo_data(Path(args.data_root))
    try:
        config = resolve_config(args)
        run_dir = prepare_run_dir(config)
        setup = _setup(config)
    except (ValueError, FileNotFoundError) as error:
        raise RunError(str(error)) from error
    return _train(config, run_dir, setup)


@dataclass
class Setup:
    device: torch.device
    benchmark: datasets.BenchmarkSplits
    teacher: models.Teacher | None
    text_features: torch.Tensor | None


def _setup(config: dict) -> Setup:
    """Everything that can fail on user input, before any output or long work."""
    needs_pseudo = config["loss"] in losses.LOSSES_NEEDING_PSEUDO
    needs_teacher = needs_pseudo or config["model"] == "clip_vision"
    models.check_weights_available(config["model"], backbone_weights=config["backbone_weights"],
                                   clip_weights=config["clip_weights"], need_teacher=needs_teacher,
                                   tiny=config["tiny_models"])
    device = select_device(config["gpu"])
    benchmark = datasets.load_benchmark(
        config["data_root"], config["dataset"], val_frac=config["val_frac"], split_seed=config["split_seed"],
        subsample_seed=config["subsample_seed"], train_frac=config["train_frac"], val_frac_keep=config["val_frac_keep"])
    teacher = text_features = None
    if needs_teacher:
        teacher = models.build_teacher(config["clip_weights"], tiny=config["tiny_models"])
    if needs_pseudo:
        text_features = models.load_text_features(config["text_features"], benchmark.info.num_classes, teacher.embed_dim)
    return Setup(device, benchmark, teacher, text_features)


def _phase_dataset(split: datasets.FormattedData, image_dir: Path, config: dict, train: bool, teacher=None):
    teacher_view = (teacher.input_size, teacher.mean, teacher.std) if teacher is not None else None
    return datasets.MultiLabelDataset([image_dir / p for p in split.images], split.labels_obs, split.labels,
                                      config["image_size"], train=train, teacher_view=teacher_view)


def _train(config: dict, run_dir: Path, setup: Setup) -> dict:
    device, benchmark, teacher = setup.device, setup.benchmark, setup.teacher
    num_classes = benchmark.info.num_classes
    hp = LossHyperparams(**{k: config[k] for k in LossHyperparams.__dataclass_fields__})
    online = config["pseudo_labels"] == "online" and setup.text_features is not None

    run_dir.mkdir(parents=True, exist_ok=True)
    logger = RunLogger(run_dir, resume=config["resume"])
    if not config["resume"]:
        atomic_write_json(run_dir / "config.json", config)
    logger.log(f"run folder: {run_dir}")
    logger.log(f"dataset {config['dataset']}: train {len(benchmark.train.images)}, val {len(benchmark.val.images)}, "
               f"test {len(benchmark.test.images)} images, {num_classes} classes; device {device}")

    train_set = _phase_dataset(benchmark.train, benchmark.image_dir, config, train=True, teacher=teacher if online else None)
    val_set = _phase_dataset(benchmark.val, benchmark.image_dir, config, train=False)
    test_set = _phase_dataset(benchmark.test, benchmark.image_dir, config, train=False)
    eval_loader = lambda ds: make_loader(ds, config["bsize"], False, config["num_workers"])  # noqa: E731
    val_loader, test_loader = eval_loader(val_set), eval_loader(test_set)

    pseudo_train, report = None, None
    text_features = setup.text_features.to(device) if setup.text_features is not None else None
    if text_features is not None:
        embeddings = teacher_train_embeddings(config, benchmark, teacher, device)
        pseudo_train, _ = models.pseudo_labels_from_embeddings(
            torch.from_numpy(embeddings).to(device), text_features, config["temp"], config["threshold"], config["partial"])
        pseudo_train = pseudo_train.cpu()
        report = models.pseudo_label_report(pseudo_train, benchmark.train.labels)
        logger.log("pseudo-labels (cached teacher, vs clean train labels): " + ", ".join(f"{k} {v:.4g}" for k, v in report.items()))
        if teacher is not None and online:
            teacher.to(device)

    torch.manual_seed(config["seed"])
    model = models.build_model(config["model"], num_classes, backbone_weights=config["backbone_weights"],
                               clip_model=teacher.clip_model if teacher is not None else None,
                               tiny=config["tiny_models"]).to(device)
    if teacher is not None and not online:
        teacher.cpu()  # its work is cached; free the accelerator's memory for training
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
    train_observed = torch.tensor(benchmark.train.labels_obs, dtype=torch.float32)
    unobserved_at_start = (train_observed == 0).sum(0)
    start_epoch = 1
    if config["resume"]:
        state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        train_observed = state["train_observed"]
        logger.load_state_dict(state["logger"])
        start_epoch = state["epoch"] + 1
        logger.log(f"resumed from {run_dir / 'last.pt'} after epoch {state['epoch']}")

    def save_last(epoch: int) -> None:
        atomic_torch_save(run_dir / "last.pt", dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                                                    epoch=epoch, train_observed=train_observed,
                                                    logger=logger.state_dict(), config=config))

    if not (run_dir / "last.pt").exists():
        save_last(0)
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, config["epochs"] + 1):
            # Every epoch's randomness derives from (seed, epoch), so a resumed run repeats it exactly.
            epoch_seed = config["seed"] * 100_003 + epoch
            torch.manual_seed(epoch_seed)
            logger.log(f"Epoch {epoch}/{config['epochs']}")
            train_loader = make_loader(train_set, config["bsize"], True, config["num_workers"], seed=epoch_seed)
            train_one_epoch(epoch, model, optimizer, train_loader, train_observed, pseudo_train, teacher if online else None,
                            text_features, config, hp, device, logger)
            val_result = evaluate("val", epoch, model, val_loader, device, logger)
            val_map = val_result["clean" if config["val_labels"] == "clean" else "observed"]["map"]
            new_best = logger.update_best(epoch, val_map)
            if new_best:
                atomic_torch_save(run_dir / "best.pt", dict(model=model.state_dict(), epoch=epoch, val_map=val_map, config=config))
            if new_best or config["test_every_epoch"]:
                test_result = evaluate("test", epoch, model, test_loader, device, logger)
                if new_best:
                    logger.set_best_test(test_result)
            if config["loss"] == "EM_APL" and epoch >= config["warmup_epoch"]:
                train_eval_loader = make_loader(_phase_dataset(benchmark.train, benchmark.image_dir, config, train=False),
                                                config["bsize"], False, config["num_workers"])
                scores, indices = predict(model, train_eval_loader, device, desc=f"epoch {epoch} APL")
                ordered = torch.empty(len(indices), num_classes)
                ordered[torch.from_numpy(indices)] = torch.from_numpy(scores)
                apl_update(train_observed, ordered, unobserved_at_start, config["neg_proportion"],
                           config["epochs"] - config["warmup_epoch"])
            save_last(epoch)
    except KeyboardInterrupt:
        logger.log(f"interrupted during epoch {epoch}; {run_dir / 'last.pt'} holds the state after epoch {epoch - 1}.")
        logger.log("resume with: " + resume_command(config))
        logger.close()
        raise
    summary = logger.finish(config, extra={"pseudo_labels": report})
    logger.close()
    return summary


def teacher_train_embeddings(config: dict, benchmark: datasets.BenchmarkSplits, teacher: models.Teacher,
                             device: torch.device) -> np.ndarray:
    """The teacher's embeddings of the train split's images, computed once and cached.

    The cache covers the whole official train set, so the same file serves every split seed.
    """
    all_train = datasets.load_formatted(config["data_root"], config["dataset"], "train")
    cache_file = Path(config["cache_dir"]) / f"teacher-{teacher.fingerprint[:16]}-train.npz"
    teacher.to(device)
    embeddings = models.cached_embeddings(
        teacher.embed, {"teacher": teacher.fingerprint}, [str(benchmark.image_dir / p) for p in all_train.images],
        teacher.input_size, teacher.mean, teacher.std, cache_file, batch_size=max(config["bsize"], 32),
        num_workers=config["num_workers"], device=device, desc="teacher embeddings")
    return embeddings[benchmark.train_indices]


def train_one_epoch(epoch, model, optimizer, loader, train_observed, pseudo_train, online_teacher, text_features,
                    config, hp, device, logger) -> None:
    model.train()
    dataset = loader.dataset
    logger.begin_phase("train", epoch, len(dataset), dataset.clean.shape[1])
    running, seen = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch} train", mininterval=3.0, dynamic_ncols=True)
    for batch_number, batch in enumerate(bar, start=1):
        index = batch["index"]
        images = batch["image"].to(device, non_blocking=True)
        observed = train_observed[index].to(device)
        true = batch["clean"].to(device)
        pseudo = None
        if online_teacher is not None:
            embeddings = online_teacher.embed(batch["teacher_image"].to(device))
            pseudo, _ = models.pseudo_labels_from_embeddings(embeddings, text_features, config["temp"],
                                                             config["threshold"], config["partial"])
        elif pseudo_train is not None:
            pseudo = pseudo_train[index].to(device)
        preds = torch.sigmoid(model(images))
        loss = losses.compute_loss(config["loss"], preds, observed, hp, epoch=epoch, pseudo=pseudo, true=true)
        if not torch.isfinite(loss):
            raise RunError(f"non-finite loss ({loss.item()}) at epoch {epoch}, batch {batch_number}; "
                           f"last.pt keeps the state after epoch {epoch - 1}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running += loss.item() * len(index)
        seen += len(index)
        bar.set_postfix(loss=f"{running / seen:.4f}", refresh=False)
        logger.record_batch(index, preds.detach(), batch["clean"], batch["observed"], loss.item())
    logger.end_phase()


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
