"""VLPL and the single-positive methods: train a multi-label classifier from single positive labels.

    python main_clip.py -d pascal -l EM_PL            # VLPL on VOC 2012, ResNet-50 at 448 px
    python main_clip.py --demo                        # the whole pipeline on tiny synthetic data

A run reads the formatted benchmark files under ``--data-root`` (see ``data/<name>/README.md``),
trains for ``--epochs`` epochs and writes ``<output-dir>/<run-name>/``: ``config.json``,
``log.txt``, ``metrics.jsonl``, ``summary.json``, ``last.pt`` and ``best.pt``.

This module is the command line: the flags (``get_args_parser``; each method's own flags come
from the ``methods`` registry), the resolved configuration with the method's per-dataset
defaults and protocol (``resolve_config``), the checks made before anything is written
(``prepare_run_dir``, ``setup``), and ``main(args)``. The run itself is ``engine.Trainer``.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch

import checkpoint
import datasets
import engine
import fileio
import methods
import models
import pseudo_labels
import rundir
import saved_run
import teacher as teacher_module
from distributed import Distributed, init_distributed
from errors import RunError, exit_code
from fileio import atomic_write_json

RESUMABLE_CHANGES = rundir.RESUMABLE_CHANGES


def _method_help() -> str:
    return "; ".join(f"{name}: {method.description}" for name, method in methods.REGISTRY.items())


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="VLPL and the single-positive multi-label methods",
                                add_help=add_help)
    p.add_argument("-d", "--dataset", default="pascal", choices=sorted(datasets.DATASETS), help="benchmark to train on")
    p.add_argument("-l", "--loss", default="EM_PL", choices=list(methods.REGISTRY),
                   help=f"single-positive method (EM_PL is VLPL). {_method_help()}")
    p.add_argument("-g", "--gpu", type=int, default=0, help="CUDA device index; without CUDA the run uses the CPU")
    p.add_argument("-m", "--model", default="resnet50", choices=models.BACKBONES, help="trainable backbone")
    p.add_argument("--head", default="linear", choices=list(models.HEADS),
                   help="classifier head: " + "; ".join(f"{name}: {head.description}" for name, head in models.HEADS.items()))
    p.add_argument("-t", "--temp", type=float, default=0.01, help="softmax temperature of the CLIP similarities")
    p.add_argument("-th", "--threshold", type=float, default=0.3, help="similarity above which a class becomes a positive pseudo-label")
    p.add_argument("-p", "--partial", type=float, default=0.0, help="fraction of classes (lowest similarity) that become negative pseudo-labels")
    p.add_argument("-s", "--seed", type=int, default=0, help="torch seed (the literature averages 0, 1 and 8)")
    p.add_argument("--teacher-view", choices=list(teacher_module.TEACHER_VIEWS), default="original",
                   help="the teacher's input: original (as published: the student's 448 px ImageNet-normalised "
                        "image resized on the tensor to the teacher's 336 or 224) or clip (CLIP normalisation, "
                        "direct resize; moves the numbers); a CLIP-tower student sees the same view")
    p.add_argument("--teacher", choices=list(models.TEACHERS), default=None,
                   help="the CLIP teacher, whose tower clip_vision copies (per method; VLPL: "
                        f"{models.DEFAULT_TEACHER}): "
                        + "; ".join(f"{name}: open_clip {spec.open_clip_name} with OpenAI's weights, {spec.description}"
                                    for name, spec in models.TEACHERS.items()))
    methods.add_hyperparameter_arguments(p)

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
    g.add_argument("--image-size", type=int, default=None,
                   help="input size override (default: the backbone's, 448; clip_vision: the teacher's, 336 or 224)")
    g.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="data loader worker processes")

    g = p.add_argument_group("training (defaults: the method's published protocol per dataset)")
    g.add_argument("--epochs", type=int, default=None, help="training epochs (of each stage; VLPL: 10)")
    g.add_argument("--bsize", type=int, default=None, help="batch size (VLPL: 8; EM_APL per dataset)")
    g.add_argument("--lr", type=float, default=None, help="learning rate of the backbone (per method and dataset)")
    g.add_argument("--optimizer", choices=sorted(engine.OPTIMIZERS), default=None,
                   help="optimizer (VLPL: adam; sgd has momentum 0.9)")
    g.add_argument("--weight-decay", type=float, default=None, help="weight decay of the optimizer (VLPL: 0)")
    g.add_argument("--head-lr-mult", type=float, default=None, help="the head's learning rate as a multiple of --lr (VLPL: 1)")
    g.add_argument("--patience", type=int, default=None,
                   help="stop a stage after this many epochs without a new best val mAP (0: never; VLPL: 0)")
    g.add_argument("--max-drop", type=float, default=None,
                   help="stop a stage when val mAP falls more than this many points below its best (0: never; VLPL: 0)")
    g.add_argument("--pseudo-labels", choices=("cached", "online"), default="cached",
                   help="cached: teacher once per image and flip before training; online: teacher on every augmented batch (original)")
    g.add_argument("--test-every-epoch", action="store_true", help="run the test phase every epoch, not only on a new best")
    g.add_argument("--train-mode", choices=sorted(engine.TRAIN_MODES), default="end_to_end",
                   help="end_to_end; linear_fixed_features: only the head, on cached frozen features; "
                        "linear_init: --head-epochs of that, then --epochs end to end from the best head")
    g.add_argument("--model-selection", choices=("final_stage", "all_stages"), default="final_stage",
                   help="the epochs that compete for best.pt and the reported test mAP: those of the final stage "
                        "(Cole et al.'s linear_init reports its fine-tuning stage) or of every stage")
    g.add_argument("--head-epochs", type=int, default=25, help="linear_init: head-only epochs before fine-tuning (Cole et al.: 25)")
    g.add_argument("--head-lr", type=float, default=None,
                   help="learning rate of head-only epochs (frozen-feature modes; per method, VLPL: 1e-4)")
    g.add_argument("--head-bsize", type=int, default=None,
                   help="global batch of head-only epochs (frozen-feature modes; per method, else --bsize)")
    g.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                   help="mixed precision for forward passes (fp16 with a gradient scaler, CUDA only)")
    g.add_argument("--sync-bn", action="store_true",
                   help="under torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm), as "
                        "one process computes them; without it each process normalises over its own share")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels (torch.use_deterministic_algorithms, cuBLAS workspace :4096:8): on "
                        "CUDA a resumed run then repeats the uninterrupted one exactly; slower")

    g = p.add_argument_group("weights and outputs")
    g.add_argument("--backbone-weights", default=None, help="local weights file for resnet50 / convnext backbones")
    g.add_argument("--clip-weights", default=None,
                   help="local weights of the --teacher CLIP (OpenAI .pt, a state dict, or a Hugging Face transformers folder)")
    g.add_argument("--tiny-models", action="store_true", help="tiny randomly initialised models of the same classes (tests, demo)")
    g.add_argument("--output-dir", default="results", help="folder that receives one sub-folder per run")
    g.add_argument("--run-name", default=None, help="run folder name (default <dataset>_<model>_<loss>_seed<seed>)")
    g.add_argument("--resume", action="store_true", help="continue the run in the run folder from its last.pt")
    g.add_argument("--config", default=None, metavar="CONFIG_JSON",
                   help="start a new run from a run's config.json; flags set to other than their defaults override it "
                        "(needs a new --run-name)")
    g.add_argument("--demo", action="store_true", help="build a tiny synthetic VOC-layout dataset and train tiny models on it")
    return p


# What a saved configuration never carries over: the run's name, and what to do with it.
_NOT_CARRIED = {"resume", "config", "run_name"}
_LOCATION = rundir.LOCATION_SETTINGS


def _flag_defaults() -> dict:
    return {action.dest: action.default for action in get_args_parser()._actions
            if action.option_strings and action.dest != "help"}


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# What config.json holds for a flag of each argparse type (None: argparse's default, the text
# itself). A type of its own (methods.base.on_off, methods.gr.FloatList) says it: accepts, json_form.
_JSON_FORMS = {int: (_is_integer, "an integer"), float: (_is_number, "a number"),
               str: (lambda value: isinstance(value, str), "a string")}
_JSON_FORMS[None] = _JSON_FORMS[str]
_SWITCH_FORM = (lambda value: isinstance(value, bool), "true or false")     # a store_true flag


def _saved_value_problem(action: argparse.Action, value) -> str | None:
    """What a config.json value lacks that the flag's own values have (None: nothing): the
    checks argparse makes of the flag's text, made of the JSON value."""
    if value is None and action.default is None:
        return None     # as when the flag is left out: the method's or the run's default
    if action.choices is not None:
        return None if isinstance(value, str) and value in action.choices else \
            f"expected one of {', '.join(action.choices)}"
    if isinstance(action, argparse._StoreTrueAction):
        accepts, form = _SWITCH_FORM
    elif action.type in _JSON_FORMS:
        accepts, form = _JSON_FORMS[action.type]
    else:
        accepts, form = action.type.accepts, action.type.json_form
    return None if accepts(value) else f"expected {form}"


def _check_saved_values(saved: dict, path: Path, what: str) -> None:
    """Each saved value as the flags' own checks would take it, and no other method's settings:
    a hand-edited value is refused before any work, as the flag would be."""
    actions = {action.dest: action for action in get_args_parser()._actions if action.dest in saved}
    for key, value in saved.items():
        problem = _saved_value_problem(actions[key], value)
        if problem:
            raise RunError(f"{what} {path}: {'/'.join(actions[key].option_strings)} {json.dumps(value)}: {problem}")
    own = {h.name for h in methods.REGISTRY[saved["loss"]].hyperparameters}
    for name, (hyperparameter, users) in methods.all_hyperparameters().items():
        # resolve_config never records them: such a value would be dropped without a word.
        if name not in own and saved.get(name) is not None:
            raise RunError(f"{what} {path}: {hyperparameter.flag} is a setting of {', '.join(users)}, "
                           f"not of -l {saved['loss']}")


def read_saved_config(path: Path, what: str) -> dict:
    """A run's config.json, checked: one line naming the file when it cannot be used."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RunError(f"{what} {path}: cannot read a run configuration ({error})") from error
    if not isinstance(saved, dict) or "loss" not in saved or "dataset" not in saved:
        raise RunError(f"{what} {path}: not a run's config.json (no loss / dataset)")
    unknown = sorted(set(saved) - set(_flag_defaults()))
    if unknown:
        raise RunError(f"{what} {path}: settings this version does not know ({', '.join(unknown)}): "
                       f"a config.json from an incompatible version")
    if not isinstance(saved["loss"], str) or saved["loss"] not in methods.REGISTRY:
        raise RunError(f"{what} {path}: method {saved['loss']!r} is not one this version knows "
                       f"({', '.join(methods.REGISTRY)})")
    _check_saved_values(saved, path, what)
    return saved_run.as_recorded_now(saved)


def _with_saved(args: argparse.Namespace, saved: dict, given: set[str] | None,
                not_carried: set[str] = _NOT_CARRIED) -> argparse.Namespace:
    """``args`` with the saved settings wherever a flag was not ``given`` (None: wherever a flag
    was left at its default); the saved method's own settings only when the method stays the same."""
    if given is None:
        given = {dest for dest, default in _flag_defaults().items() if getattr(args, dest) != default}
    method = methods.get_method(args.loss if "loss" in given else saved["loss"])
    other_methods = set(methods.all_hyperparameters()) - {h.name for h in method.hyperparameters}
    args = argparse.Namespace(**vars(args))
    for key, value in saved.items():
        if key not in given and key not in other_methods and key not in not_carried:
            setattr(args, key, value)
    return args


def apply_saved_config(args: argparse.Namespace, given: set[str] | None = None) -> argparse.Namespace:
    """``--config FILE``: a new run with the saved run's settings, the ``given`` flags overriding
    them (None: those set to other than their defaults)."""
    path = Path(args.config)
    saved = read_saved_config(path, "--config")
    if args.run_name is None:
        raise RunError(f"--config {path} starts a new run: give it a new --run-name")
    return _with_saved(args, saved, given)


def default_run_name(args: argparse.Namespace) -> str:
    return f"{args.dataset}_{args.model}_{args.loss}_seed{args.seed}"


def apply_resumed_config(args: argparse.Namespace, given: set[str] | None = None) -> argparse.Namespace:
    """``--resume``: the run continues as its config.json says, the ``given`` flags (None: those
    set to other than their defaults) overriding it (``prepare_run_dir`` refuses those that change
    what it computes)."""
    run_dir = rundir.run_dir_for(args.output_dir, args.run_name or default_run_name(args))
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise RunError(f"--resume: {run_dir} holds no run (no config.json); start the run without --resume")
    # The folder is where the command line says it is now (it may have been moved or renamed).
    return _with_saved(args, read_saved_config(config_file, "--resume:"), given, _NOT_CARRIED | _LOCATION)


def resolve_config(args: argparse.Namespace) -> dict:
    """The method's per-dataset defaults and protocol where the user set nothing; the result is
    what config.json records (the chosen method's settings only)."""
    method = methods.get_method(args.loss)
    config = dict(vars(args))
    config.pop("demo")
    own = {hyperparameter.name for hyperparameter in method.hyperparameters}
    for name, (hyperparameter, users) in methods.all_hyperparameters().items():
        if name not in own and config.pop(name) is not None:
            raise RunError(f"{hyperparameter.flag} is a setting of {', '.join(users)}, not of -l {args.loss}")
    for key, value in method.defaults(args.dataset).items():
        if config.get(key) is None:
            config[key] = value
    if config["image_size"] is None:
        config["image_size"] = models.input_size(args.model, tiny=args.tiny_models, teacher=config["teacher"])
    if config["run_name"] is None:
        config["run_name"] = default_run_name(args)
    info = datasets.get_dataset_info(args.dataset)
    if config["text_features"] is None:
        config["text_features"] = str(datasets.dataset_dir(args.data_root, args.dataset)
                                      / teacher_module.text_features_file(info, config["teacher"]))
    if config["cache_dir"] is None:
        config["cache_dir"] = str(datasets.dataset_dir(args.data_root, args.dataset) / "cache")
    _check_values(config)
    try:
        method.check_config(config)
        if method.needs_pseudo_labels:
            pseudo_labels.RULES[method.pseudo_label_rule].check_config(config)
    except ValueError as error:
        raise RunError(str(error)) from error
    return config


def _check_values(config: dict) -> None:
    for key, value in config.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise RunError(f"--{key.replace('_', '-')} must be a finite number, got {value}")
    positive = ["epochs", "bsize", "lr", "temp", "image_size", "head_epochs", "head_lr", "head_lr_mult"]
    if config["head_bsize"] is not None:
        positive.append("head_bsize")
    for key in positive:
        if not config[key] > 0:
            raise RunError(f"--{key.replace('_', '-')} must be positive, got {config[key]}")
    for key in ("patience", "max_drop", "num_workers", "weight_decay"):
        if not config[key] >= 0:
            raise RunError(f"--{key.replace('_', '-')} must be >= 0, got {config[key]}")
    if not 0.0 <= config["partial"] < 1.0:
        raise RunError(f"-p/--partial must be in [0, 1), got {config['partial']}")
    if not 0.0 < config["threshold"] <= 1.0:
        raise RunError(f"-th/--threshold must be in (0, 1] (a softmax probability), got {config['threshold']}")
    if config["pseudo_labels"] == "online" and config["train_mode"] != "end_to_end":
        raise RunError("--pseudo-labels online recomputes pseudo-labels on augmented images: it needs --train-mode end_to_end")


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
    """The run folder, checked before any long work (``check_run_dir``); checked again under its
    lock, where no other run can change it, before anything is written."""
    run_dir = rundir.run_dir_for(config["output_dir"], config["run_name"])
    check_run_dir(config, run_dir)
    return run_dir


def check_run_dir(config: dict, run_dir: Path) -> None:
    """A new run never goes into a started one, one holding results (a finished run whose last.pt
    is gone keeps them) or one holding other files; a resumed run keeps what it computes."""
    if not config["resume"] and rundir.is_started(run_dir):
        raise RunError(f"run folder {run_dir} already exists: pass --resume to continue it or choose another --run-name")
    results = rundir.result_files(run_dir)
    if results and not rundir.is_started(run_dir):
        raise RunError(f"run folder {run_dir} holds a run's results ({', '.join(results)}) but no {rundir.LAST} to "
                       f"continue from; they are kept: choose another --run-name")
    if config["resume"]:
        saved = read_saved_config(run_dir / "config.json", "--resume:")
        changed = rundir.changed_settings(saved, config)  # read_saved_config completed the older settings
        if changed:
            raise RunError(f"--resume with a different configuration ({', '.join(changed)}); use the original flags "
                           f"or a new --run-name")
    elif rundir.foreign_files(run_dir):
        raise RunError(f"run folder {run_dir} holds files that are not a run's ({', '.join(rundir.foreign_files(run_dir)[:3])}); "
                       f"choose another --run-name")


def read_resume_state(config: dict, run_dir: Path) -> dict:
    """last.pt, verified, and written for this run's configuration (one line naming it otherwise)."""
    state = checkpoint.load_checkpoint(run_dir / rundir.LAST)
    saved = state.get("config")
    changed = (rundir.changed_settings(saved_run.as_recorded_now(saved), config) if isinstance(saved, dict)
               else ["no configuration in it"])
    if changed:
        raise RunError(f"{run_dir / rundir.LAST} was written by another run than {run_dir / 'config.json'} "
                       f"({', '.join(changed)}); restore it from a copy, or start the run again under another --run-name")
    return state


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


def main(args: argparse.Namespace, given: set[str] | None = None) -> dict:
    """One training run; returns the summary dict. Raises RunError for fixable user errors.
    ``given``: the flags set on the command line (``given_flags``), which override a saved
    configuration (``--config``, ``--resume``) even when equal to their defaults; None counts a
    flag as given when it differs from its default."""
    if args.demo:
        print(DEMO_NOTICE)
        run_demo_data(Path(args.data_root))
    dist = init_distributed()
    if args.config is not None:
        args = apply_saved_config(args, given)
    if args.resume:
        args = apply_resumed_config(args, given)
    try:
        config = resolve_config(args)
        if config["deterministic"]:
            engine.use_deterministic_algorithms()
        run_dir = prepare_run_dir(config)
        run_setup = setup(config, dist)
    except (ValueError, FileNotFoundError) as error:
        raise RunError(str(error)) from error
    dist.barrier()  # every rank has checked the run folder before rank 0 writes to it
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    with rundir.RunFolderLock(run_dir) if dist.is_main else contextlib.nullcontext():
        dist.barrier()  # rank 0 holds the lock: the folder is as every rank now sees it
        try:
            # Another run may have started or finished in the folder since the first check.
            check_run_dir(config, run_dir)
            started = rundir.is_started(run_dir)
            resume_state = read_resume_state(config, run_dir) if config["resume"] and started else None
        except RunError:
            if created and dist.is_main and not any(run_dir.iterdir()):
                run_dir.rmdir()
            raise
        dist.barrier()  # every rank has looked before rank 0 clears anything
        if dist.is_main:
            fileio.check_writable(run_dir, 2**20, "--output-dir")
        notes = []
        if dist.is_main:
            saved = read_saved_config(run_dir / "config.json", "--resume:") if started else {}
            notes = [f"resume with {k} {saved[k]!r} -> {config[k]!r}" for k in sorted(RESUMABLE_CHANGES & set(saved))
                     if saved[k] != config[k] and k != "resume"]
            removed = rundir.remove_temp_files(run_dir) if started else rundir.clear_unstarted(run_dir)
            if removed:
                notes.append(f"removed what an unfinished run left: {', '.join(removed)}")
        if config["resume"] and not started:
            config["resume"] = False
            notes.append("--resume: the run stopped before its first checkpoint; starting it from the beginning")
        if dist.is_main:
            atomic_write_json(run_dir / "config.json", config)
        try:
            trainer = engine.Trainer(config, run_dir, run_setup, resume_state=resume_state)
            for note in notes:
                trainer.logger.log(note)
            summary = trainer.fit()
        except KeyboardInterrupt:
            if dist.is_main:
                print(f"interrupted; {next_step(config, run_dir)}", file=sys.stderr, flush=True)
            raise
        except datasets.UnreadableImageError as error:
            # Found only when an epoch reads the image: once it is replaced the run can go on.
            raise RunError(f"{error}; once it is replaced, {next_step(config, run_dir)}") from error
        except checkpoint.CheckpointWriteError as error:
            raise RunError(f"{error}; then {next_step(config, run_dir)}") from error
    if args.demo:
        print(DEMO_NOTICE)
    return summary


def next_step(config: dict, run_dir: Path) -> str:
    """What to run after an interruption: resume a started run, or run the same command again."""
    if rundir.is_started(run_dir):
        return f"{run_dir / rundir.LAST} holds the last finished epoch; continue with: {resume_command(config)}"
    return f"no epoch finished; start again with: {resume_command(config)}"


DEMO_NOTICE = ("DEMO: tiny randomly initialised models on synthetic data. Its mAP shows that the pipeline "
               "works end to end; it is not a benchmark result.")


def setup(config: dict, dist: Distributed = Distributed()) -> engine.Setup:
    """Everything that can fail on user input, before any output or long work."""
    method = methods.get_method(config["loss"])
    backbone = models.backbone_spec(config["model"])
    if method.needs_spatial_features and not backbone.spatial_output:
        raise RunError(f"-l {config['loss']} needs spatial features, which -m {config['model']} does not give; "
                       f"choose a convolutional backbone")
    head = models.HEADS[config["head"]]
    if head.spatial and not backbone.spatial_output:
        raise RunError(f"--head {config['head']} reads a feature map, which -m {config['model']} does not give; "
                       f"choose a convolutional backbone")
    if head.spatial and config["train_mode"] != "end_to_end":
        raise RunError(f"--head {config['head']} reads feature maps, which are not cached: it needs --train-mode "
                       f"end_to_end")
    if dist.enabled and not method.runs_distributed:
        raise RunError(f"-l {config['loss']} keeps per-process trainable state that torchrun would not synchronise; "
                       f"run it in one process")
    needs_teacher = method.needs_pseudo_labels or backbone.copies_clip_tower
    models.check_weights_available(config["model"], backbone_weights=config["backbone_weights"],
                                   clip_weights=config["clip_weights"], need_teacher=needs_teacher,
                                   tiny=config["tiny_models"], teacher=config["teacher"])
    device = select_device(config["gpu"], dist)
    for flag, batch in (("--bsize", config["bsize"]), ("--head-bsize", config["head_bsize"])):
        if batch is not None and batch % dist.world_size:
            raise RunError(f"{flag} {batch} is the global batch: it must be a multiple of the "
                           f"{dist.world_size} processes")
    if config["sync_bn"] and dist.enabled and device.type != "cuda":
        raise RunError("--sync-bn synchronises BatchNorm across CUDA devices (torch's SyncBatchNorm); under torchrun "
                       "on CPUs leave it out")
    if config["amp"] == "fp16" and device.type != "cuda":
        raise RunError("--amp fp16 needs a CUDA device; on the CPU use --amp bf16 or --amp none")
    benchmark = datasets.load_benchmark(
        config["data_root"], config["dataset"], val_frac=config["val_frac"], split_seed=config["split_seed"],
        subsample_seed=config["subsample_seed"], train_frac=config["train_frac"], val_frac_keep=config["val_frac_keep"])
    teacher = text_features = None
    if needs_teacher:
        teacher = teacher_module.build_teacher(config["clip_weights"], teacher=config["teacher"],
                                               tiny=config["tiny_models"])
    if method.needs_pseudo_labels:
        rule = pseudo_labels.RULES[method.pseudo_label_rule]
        text_features = rule.text_features(config, teacher, benchmark.info.num_classes)
    return engine.Setup(device, benchmark, teacher, text_features, dist)


def resume_command(config: dict) -> str:
    """The command line that continues this run (its config.json holds the rest)."""
    parts = ["python", "main_clip.py", "--output-dir", str(config["output_dir"]), "--run-name", config["run_name"],
             "--resume"]
    return " ".join(shlex.quote(p) for p in parts)


def given_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """Destinations the user set on the command line: the demo fills only the others, and they
    override a saved configuration."""
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
    given = given_flags(parser, argv)
    if args.demo:
        args = demo_args(args, given)
    return exit_code(functools.partial(main, given=given), args)


if __name__ == "__main__":
    sys.exit(cli())
