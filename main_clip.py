"""VLPL and the single-positive methods: train a multi-label classifier from single positive labels.

    python main_clip.py -d pascal -l EM_PL            # VLPL on VOC 2012, ResNet-50 at 448 px
    python main_clip.py --demo                        # the whole pipeline on tiny synthetic data

A run reads the formatted benchmark files under ``--data-root`` (see ``data/<name>/README.md``),
trains for ``--epochs`` epochs and writes ``<output-dir>/<run-name>/``: ``config.json``,
``log.txt``, ``metrics.jsonl``, ``summary.json``, ``last.pt`` and ``best.pt``.

This module is the run, top to bottom: ``main(args)`` resolves the configuration (``config.py``:
the flags, the method's per-dataset defaults and protocol, a saved configuration read back),
checks everything that can fail on user input before anything is written (``prepare_run_dir``,
``setup``), checks the run folder again under its lock, and hands over to ``engine.Trainer``.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import shlex
import sys
import time
from pathlib import Path

import torch

import checkpoint
import config as config_module
import datasets
import engine
import fileio
import methods
import models
import pseudo_labels
import rundir
import teacher as teacher_module
from distributed import Distributed, init_distributed
from errors import RunError, exit_code
from config import get_args_parser  # the flags: python main_clip.py --help
from fileio import atomic_write_json

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
        changed = _changes_from_the_saved_run(config, run_dir)
        if changed:  # --resume would be refused: say what differs instead
            raise RunError(f"run folder {run_dir} holds a run of another configuration ({', '.join(changed)}); "
                           f"choose another --run-name, or give its settings and --resume to continue it")
        raise RunError(f"run folder {run_dir} already exists: pass --resume to continue it or choose another --run-name")
    results = rundir.result_files(run_dir)
    if results and not rundir.is_started(run_dir):
        raise RunError(f"run folder {run_dir} holds a run's results ({', '.join(results)}) but no {rundir.LAST} to "
                       f"continue from; they are kept: choose another --run-name")
    if config["resume"]:
        saved = config_module.read_saved_config(run_dir / "config.json", "--resume:")
        changed = rundir.changed_settings(saved, config)  # read_saved_config completed the older settings
        if changed:
            raise RunError(f"--resume with a different configuration ({', '.join(changed)}); use the original flags "
                           f"or a new --run-name")
    elif rundir.foreign_files(run_dir):
        raise RunError(f"run folder {run_dir} holds files that are not a run's ({', '.join(rundir.foreign_files(run_dir)[:3])}); "
                       f"choose another --run-name")


def _changes_from_the_saved_run(config: dict, run_dir: Path) -> list[str]:
    """How ``config`` differs from the configuration of the run in ``run_dir`` (what a --resume
    with these flags would refuse)."""
    try:
        saved = config_module.read_saved_config(run_dir / "config.json", "the run folder's")
    except RunError:
        return []  # no readable configuration to compare with: the folder is refused all the same
    return rundir.changed_settings(saved, config)


def read_resume_state(config: dict, run_dir: Path) -> dict:
    """last.pt, verified, and written for this run's configuration (one line naming it otherwise)."""
    state = checkpoint.load_checkpoint(run_dir / rundir.LAST)
    saved = state.get("config")
    changed = (rundir.changed_settings(config_module.as_recorded_now(saved), config) if isinstance(saved, dict)
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
    defaults = dict(dataset="pascal", method="EM_PL", model="resnet50", tiny_models=True, epochs=8,
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
        args = config_module.apply_saved_config(args, given)
    if args.resume:
        args = config_module.apply_resumed_config(args, given)
    try:
        config = config_module.resolve_config(args)
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
            saved = config_module.read_saved_config(run_dir / "config.json", "--resume:") if started else {}
            notes = [f"resume with {k} {saved[k]!r} -> {config[k]!r}" for k in sorted(rundir.RESUMABLE_CHANGES & set(saved))
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
        print(demo_next_steps(run_dir, Path(config["output_dir"])))
    return summary


def demo_next_steps(run_dir: Path, output_dir: Path) -> str:
    """Where the demo's run is, and the commands that read it."""
    commands = [f"python evaluate.py {shlex.quote(str(run_dir))}                  # its best.pt on the test split",
                f"python instrumentation.py {shlex.quote(str(output_dir))}            # every run, the paper's table",
                f"python instrumentation.py {shlex.quote(str(output_dir))} --plot {shlex.quote(str(output_dir / 'plots'))}"
                f"   # its curves as PNGs"]
    return f"run folder: {run_dir}\nnext:\n  " + "\n  ".join(commands)


def next_step(config: dict, run_dir: Path) -> str:
    """What to run after an interruption: resume a started run, or run the same command again."""
    if rundir.is_started(run_dir):
        return f"{run_dir / rundir.LAST} holds the last finished epoch; continue with: {resume_command(config)}"
    return f"no epoch finished; start again with: {resume_command(config)}"


DEMO_NOTICE = ("DEMO: tiny randomly initialised models on synthetic data. Its mAP shows that the pipeline "
               "works end to end; it is not a benchmark result.")


def setup(config: dict, dist: Distributed = Distributed()) -> engine.Setup:
    """Everything that can fail on user input, before any output or long work."""
    method = methods.get_method(config["method"])
    backbone = models.backbone_spec(config["model"])
    if method.needs_spatial_features and not backbone.spatial_output:
        raise RunError(f"-l {config['method']} needs spatial features, which -m {config['model']} does not give; "
                       f"choose a convolutional backbone")
    head = models.HEADS[config["head"]]
    if head.spatial and not backbone.spatial_output:
        raise RunError(f"--head {config['head']} reads a feature map, which -m {config['model']} does not give; "
                       f"choose a convolutional backbone")
    if head.spatial and config["train_mode"] != "end_to_end":
        raise RunError(f"--head {config['head']} reads feature maps, which are not cached: it needs --train-mode "
                       f"end_to_end")
    if dist.enabled and not method.runs_distributed:
        raise RunError(f"-l {config['method']} keeps per-process trainable state that torchrun would not synchronise; "
                       f"run it in one process")
    needs_teacher = method.needs_pseudo_labels or backbone.copies_clip_tower
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
    # Missing data is reported before missing weights: the data is what a newcomer makes first.
    models.check_weights_available(config["model"], backbone_weights=config["backbone_weights"],
                                   clip_weights=config["clip_weights"], need_teacher=needs_teacher,
                                   tiny=config["tiny_models"], teacher=config["teacher"])
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


def cli(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    given = config_module.given_flags(parser, argv)
    if args.demo:
        args = demo_args(args, given)
    return exit_code(functools.partial(main, given=given), args)


if __name__ == "__main__":
    sys.exit(cli())
