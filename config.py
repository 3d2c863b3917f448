"""The run's configuration: the flags, and how a run's settings are resolved and read back.

``get_args_parser`` holds every flag (each method's own flags come from the ``methods``
registry). ``resolve_config`` fills the method's per-dataset defaults and protocol where the user
set nothing and checks every value; the result is what config.json records. A saved
configuration (``--config FILE``, ``--resume``) is read by ``read_saved_config``, checked as its
flags would be, completed with the settings its version did not record yet
(``as_recorded_now``) and merged with the flags given on the command line (``given_flags``).
"""
from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import math
import os
from pathlib import Path

import augment
import caches
import datasets
import engine
import methods
import models
import pseudo_labels
import rundir
import teacher as teacher_module
from errors import RunError


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, with a mistake on the command line reported in one line (not the usage block)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (--help lists every flag)\n")


def name_in(names, what: str, aliases: dict[str, str] | None = None):
    """An argparse type for one of ``names`` (or an alias of one): a near miss (another case, a
    letter off) is refused with the name meant."""
    aliases = aliases or {}

    def parse(text: str) -> str:
        if text in names:
            return text
        if text in aliases:
            return aliases[text]
        known = {name.lower(): name for name in [*names, *aliases]}
        near = difflib.get_close_matches(text.lower(), list(known), n=1, cutoff=0.6)
        hint = f"did you mean {known[near[0]]}? " if near else ""
        raise argparse.ArgumentTypeError(f"unknown {what} {text!r}; {hint}(choose from {', '.join(names)})")
    parse.__name__ = what
    return parse


# -m when it is not given: a method that brings its own model (Method.own_model) runs that instead.
DEFAULT_MODEL = "resnet50"


def _method_help() -> str:
    return "; ".join(f"{name}: {method.description}" for name, method in methods.REGISTRY.items())


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = OneLineErrorParser(description="VLPL and the single-positive multi-label methods", add_help=add_help)
    p.add_argument("-d", "--dataset", default="pascal", choices=sorted(datasets.DATASETS),
                   type=name_in(sorted(datasets.DATASETS), "dataset"), help="benchmark to train on")
    p.add_argument("--method", "-l", "--loss", dest="method", default="EM_PL", choices=list(methods.REGISTRY),
                   type=name_in(list(methods.REGISTRY), "method", methods.ALIASES),
                   help=f"single-positive method (EM_PL is VLPL, also accepted as -l VLPL; -l / --loss: the "
                        f"original's spelling). {_method_help()}")
    p.add_argument("-g", "--gpu", type=int, default=0, help="CUDA device index; without CUDA the run uses the CPU")
    p.add_argument("-m", "--model", default=DEFAULT_MODEL, choices=models.MODELS,
                   type=name_in(models.MODELS, "backbone"),
                   help="trainable backbone (clip_prompts: DualCoOp's own model, which -l DualCoOp runs without -m)")
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
    g.add_argument("--image-cache", choices=caches.IMAGE_CACHE_MODES, default="off",
                   help="uint8: decode and resize every image once into a memory-mapped uint8 file under --cache-dir "
                        "(N x size x size x 3 bytes per split: COCO's train set at 448 px is 49 GB), which every epoch "
                        "reads instead of the JPEGs; the same inputs to the bit, so a resume may switch it; off: "
                        "decode every epoch")

    g = p.add_argument_group("training (defaults: the method's published protocol per dataset)")
    g.add_argument("--epochs", type=int, default=None, help="training epochs (of each stage; VLPL: 10)")
    g.add_argument("--bsize", type=int, default=None, help="batch size (VLPL: 8; EM_APL per dataset)")
    g.add_argument("--lr", type=float, default=None, help="learning rate of the backbone (per method and dataset)")
    g.add_argument("--optimizer", choices=sorted(engine.OPTIMIZERS), default=None,
                   help="optimizer (VLPL: adam; sgd has momentum 0.9)")
    g.add_argument("--weight-decay", type=float, default=None, help="weight decay of the optimizer (VLPL: 0)")
    g.add_argument("--lr-schedule", choices=sorted(engine.LR_SCHEDULES), default=None,
                   help="learning rate over a stage's epochs, set at the start of each epoch: constant, or cosine "
                        "(Dassl's CosineAnnealingLR over the stage's epochs, counted from the end of the warm-up) "
                        "(per method; VLPL: constant)")
    g.add_argument("--lr-warmup-epochs", type=int, default=None,
                   help="the stage's first N epochs run at --lr-warmup-lr, then the schedule starts (Dassl's constant "
                        "warm-up) (per method; VLPL: 0)")
    g.add_argument("--lr-warmup-lr", type=float, default=None,
                   help="learning rate of the warm-up epochs (times a group's multiplier, as --head-lr-mult) "
                        "(per method; 1e-5)")
    g.add_argument("--augmentation", choices=tuple(augment.AUGMENTATIONS), default=None,
                   help="random changes of each training image after its resize, drawn from the run's seed: "
                        + "; ".join(f"{name}: {entry.help}" for name, entry in augment.AUGMENTATIONS.items())
                        + " (per method; VLPL: flip; DualCoOp: cutout_randaugment)")
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
                   help="local weights of the --teacher CLIP (OpenAI .pt, a state dict, or a Hugging Face transformers "
                        "folder); -l DualCoOp: of its CLIP RN101 (RN101.pt)")
    g.add_argument("--tiny-models", action="store_true", help="tiny randomly initialised models of the same classes (tests, demo)")
    g.add_argument("--output-dir", default="results", help="folder that receives one sub-folder per run")
    g.add_argument("--run-name", default=None, help="run folder name (default <dataset>_<model>_<method>_seed<seed>[_tiny]_<hash of the other settings that "
                        "change the numbers>)")
    g.add_argument("--resume", action="store_true", help="continue the run in the run folder from its last.pt")
    g.add_argument("--config", default=None, metavar="CONFIG_JSON",
                   help="start a new run from a run's config.json; the flags given on the command line override it "
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
    own = {h.name for h in methods.REGISTRY[saved["method"]].hyperparameters}
    for name, (hyperparameter, users) in methods.all_hyperparameters().items():
        # resolve_config never records them: such a value would be dropped without a word.
        if name not in own and saved.get(name) is not None:
            raise RunError(f"{what} {path}: {hyperparameter.flag} is a setting of {', '.join(users)}, "
                           f"not of -l {saved['method']}")


def read_saved_config(path: Path, what: str) -> dict:
    """A run's config.json, checked: one line naming the file when it cannot be used."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RunError(f"{what} {path}: cannot read a run configuration ({error})") from error
    if isinstance(saved, dict):
        saved = rundir.renamed_settings(saved)
    if not isinstance(saved, dict) or "method" not in saved or "dataset" not in saved:
        raise RunError(f"{what} {path}: not a run's config.json (no method / dataset)")
    unknown = sorted(set(saved) - set(_flag_defaults()))
    if unknown:
        raise RunError(f"{what} {path}: settings this version does not know ({', '.join(unknown)}): "
                       f"a config.json from an incompatible version")
    if not isinstance(saved["method"], str) or saved["method"] not in methods.REGISTRY:
        raise RunError(f"{what} {path}: method {saved['method']!r} is not one this version knows "
                       f"({', '.join(methods.REGISTRY)})")
    _check_saved_values(saved, path, what)
    return as_recorded_now(saved)


def _with_saved(args: argparse.Namespace, saved: dict, given: set[str] | None,
                not_carried: set[str] = _NOT_CARRIED) -> argparse.Namespace:
    """``args`` with the saved settings wherever a flag was not ``given`` (None: wherever a flag
    was left at its default); the saved method's own settings only when the method stays the same."""
    if given is None:
        given = {dest for dest, default in _flag_defaults().items() if getattr(args, dest) != default}
    method = methods.get_method(args.method if "method" in given else saved["method"])
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


# Settings a default run name leaves out of its hash: where the run is, what a resume may change
# (the name must survive --resume --epochs N), and the seed, which the name spells out.
_NOT_IN_NAME_HASH = rundir.RESUMABLE_CHANGES | rundir.LOCATION_SETTINGS | {"seed", "cache_dir"}


# Settings added after the names had a hash, left out of it at the value every run had before them,
# so that a configuration keeps its default name (and --resume finds its folder).
_NEW_SETTINGS_AT_OLD_VALUES = dict(methods.base.ADDED_PROTOCOL_DEFAULTS)


def default_run_name(config: dict) -> str:
    """``<dataset>_<model>_<method>_seed<seed>[_tiny]_<hash>`` of a resolved configuration:
    readable, and unique per configuration (the hash covers every other setting that can change
    the numbers: --head, --teacher, --data-root, the method's hyperparameters...)."""
    settings = {key: value for key, value in config.items() if key not in _NOT_IN_NAME_HASH
                and not (key in _NEW_SETTINGS_AT_OLD_VALUES and value == _NEW_SETTINGS_AT_OLD_VALUES[key])}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    tiny = "_tiny" if config["tiny_models"] else ""
    return f"{legacy_run_name(config)}{tiny}_{digest}"


def legacy_run_name(config: dict) -> str:
    """The default run name of versions before the hash (their run folders still resume)."""
    return f"{config['dataset']}_{config['model']}_{config['method']}_seed{config['seed']}"


def _folder_to_resume(args: argparse.Namespace) -> str:
    """The default run name of these flags, or the older default name when only that folder exists."""
    config = resolve_config(argparse.Namespace(**{**vars(args), "run_name": None}))
    name = config["run_name"]
    if not (Path(args.output_dir) / name).exists() and (Path(args.output_dir) / legacy_run_name(config)).is_dir():
        return legacy_run_name(config)
    return name


def apply_resumed_config(args: argparse.Namespace, given: set[str] | None = None) -> argparse.Namespace:
    """``--resume``: the run continues as its config.json says, the ``given`` flags (None: those
    set to other than their defaults) overriding it (``prepare_run_dir`` refuses those that change
    what it computes)."""
    run_dir = rundir.run_dir_for(args.output_dir, args.run_name or _folder_to_resume(args))
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise RunError(f"--resume: {run_dir} holds no run (no config.json); start the run without --resume")
    # The folder is where the command line says it is now (it may have been moved or renamed).
    args = _with_saved(args, read_saved_config(config_file, "--resume:"), given, _NOT_CARRIED | _LOCATION)
    args.run_name = run_dir.name
    return args


def resolve_config(args: argparse.Namespace) -> dict:
    """The method's per-dataset defaults and protocol where the user set nothing; the result is
    what config.json records (the chosen method's settings only)."""
    method = methods.get_method(args.method)
    config = dict(vars(args))
    config.pop("demo")
    own = {hyperparameter.name for hyperparameter in method.hyperparameters}
    for name, (hyperparameter, users) in methods.all_hyperparameters().items():
        if name not in own and config.pop(name) is not None:
            raise RunError(f"{hyperparameter.flag} is a setting of {', '.join(users)}, not of -l {args.method}")
    try:
        defaults = method.defaults(args.dataset, given={key for key, value in config.items() if value is not None})
    except ValueError as error:  # a dataset without a published protocol for this method: the flags to give
        raise RunError(str(error)) from error
    for key, value in defaults.items():
        if config.get(key) is None:
            config[key] = value
    for key, value in methods.base.ADDED_PROTOCOL_DEFAULTS.items():   # where the method's table sets none
        if config.get(key) is None:
            config[key] = value
    _resolve_own_model(config, method)
    if config["image_size"] is None:
        config["image_size"] = models.input_size(args.model, tiny=args.tiny_models, teacher=config["teacher"])
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
    if config["run_name"] is None:
        config["run_name"] = default_run_name(config)
    return config


def _resolve_own_model(config: dict, method: type[methods.Method]) -> None:
    """A method that brings its own model runs it: -m left at its default means that model, and
    is recorded as it; another -m is refused, and so is such a model under another method."""
    if method.own_model is not None:
        if config["model"] not in (method.own_model, DEFAULT_MODEL):
            raise RunError(f"-l {method.name} runs its own model (-m {method.own_model}): leave -m out")
        config["model"] = method.own_model
    elif models.backbone_spec(config["model"]).method_built:
        owners = [name for name, other in methods.REGISTRY.items() if other.own_model == config["model"]]
        raise RunError(f"-m {config['model']} is the model of -l {', '.join(owners) or '?'}; -l {method.name} "
                       f"trains a backbone: choose one of {', '.join(models.BACKBONES)}")


def _check_values(config: dict) -> None:
    for key, value in config.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise RunError(f"--{key.replace('_', '-')} must be a finite number, got {value}")
    positive = ["epochs", "bsize", "lr", "temp", "image_size", "head_epochs", "head_lr", "head_lr_mult", "lr_warmup_lr"]
    if config["head_bsize"] is not None:
        positive.append("head_bsize")
    for key in positive:
        if not config[key] > 0:
            raise RunError(f"--{key.replace('_', '-')} must be positive, got {config[key]}")
    for key in ("patience", "max_drop", "num_workers", "weight_decay", "lr_warmup_epochs"):
        if not config[key] >= 0:
            raise RunError(f"--{key.replace('_', '-')} must be >= 0, got {config[key]}")
    if not 0.0 <= config["partial"] < 1.0:
        raise RunError(f"-p/--partial must be in [0, 1), got {config['partial']}")
    if not 0.0 < config["threshold"] <= 1.0:
        raise RunError(f"-th/--threshold must be in (0, 1] (a softmax probability), got {config['threshold']}")
    if config["pseudo_labels"] == "online" and config["train_mode"] != "end_to_end":
        raise RunError("--pseudo-labels online recomputes pseudo-labels on augmented images: it needs --train-mode end_to_end")
    if augment.get_augmentation(config["augmentation"]).transform is not None:
        if models.backbone_spec(config["model"]).copies_clip_tower:
            raise RunError(f"--augmentation {config['augmentation']} changes the backbone's own input; -m "
                           f"{config['model']} sees the teacher's view: choose --augmentation flip")
        if all(name != engine.END_TO_END for name, _ in engine.TRAIN_MODES[config["train_mode"]](config)):
            raise RunError(f"--augmentation {config['augmentation']} changes training images; --train-mode "
                           f"{config['train_mode']} trains on cached features: choose --augmentation flip")


def as_recorded_now(config: dict) -> dict:
    """``config`` with the settings its version did not record yet at the values that version ran
    with (``rundir.ADDED_SETTINGS``, and the switches its method gained since at the defaults that
    reproduce what it did before them): how a resume and the comparisons of checkpoints read it."""
    config = rundir.renamed_settings(config)
    name = config.get("method")
    method = methods.REGISTRY.get(name) if isinstance(name, str) else None
    gained = {h.name: h.default for h in method.hyperparameters if h.default is not None} if method else {}
    return {**gained, **rundir.with_added_settings(config)}


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
