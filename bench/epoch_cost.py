"""Benchmark: cost of one training epoch, the original design against ours (issue 6).

Run from the repository root (CPU; several minutes on 2 cores with the defaults):
    python bench/epoch_cost.py [--num-train 16 --num-val 4 --num-test 20 --batch-size 8 --epochs 1]
On a GPU (both designs on CUDA; more images, since a GPU epoch of 16 is too short to time):
    python bench/epoch_cost.py --device cuda --num-train 256 --num-val 64 --num-test 320 --num-workers 8

The default split sizes keep VOC 2012's proportions (train 4574 : val 1143 : test 5823).

The real architectures at random init (``pretrained=False``: nothing is read or downloaded):
the trainable backbone (``-m``, default torchvision ResNet-50 at 448 px) and the frozen teacher
(open_clip ViT-L-14-336-quickgelu at 336 px), on a small synthetic dataset made by the demo chain
(``preproc/make_demo_data`` -> ``format_pascal`` -> ``generate_observed_labels``) in a temporary
folder, with the EM_PL loss and pascal's hyperparameters. Both designs run through the training
engine's own ``Trainer`` (same model init, same loaders, same train step, same logger):

(a) original design: the teacher runs on every train batch (``--pseudo-labels online``: the
    pseudo-labels are recomputed on the augmented batch) and also on every val and test batch
    (made and discarded, as the original did); the test phase runs every epoch.
(b) ours: the teacher runs once per official train image before training (the engine's cached
    embeddings, timed as the one-time cache cost); per epoch a train and a val phase without
    the teacher; the test phase only when val mAP improves (epoch 1 always does, so the
    measured epoch includes it).

Printed: seconds per epoch and phase for each design, the per-epoch ratio with and without
our test phase, the one-time cache cost, projected totals over ``--project-epochs`` epochs
(ours under an assumed number of new-best epochs, ``--test-epochs``, and in the worst case
where every epoch is a new best), and a linear extrapolation to VOC 2012's split sizes.
Saving best.pt / last.pt is left out of both (the same in both designs).

The machine may be shared: the script also prints the ratios in process CPU seconds and how many
cores other processes kept busy while it measured (wall times are only trustworthy near 0).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

import datasets  # noqa: E402
import engine  # noqa: E402
import config as config_module  # noqa: E402
import main_clip  # noqa: E402
import models  # noqa: E402
import teacher as teacher_module  # noqa: E402
from bench.timing import Meter, require_at_least_one, run_in_work_dir  # noqa: E402
from preproc import format_pascal, generate_observed_labels, make_demo_data  # noqa: E402

DATASET = "pascal"
LOSS = "EM_PL"
# VOC 2012 sizes: official train 5717 images split 80/20 (seed 1200) into train and val; the
# official val set (5823 images) is the test set.
VOC_SIZES = {"train": 4574, "val": 1143, "test": 5823}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Epoch cost: original design (teacher on every batch, test every "
                                            "epoch) vs ours (cached teacher, test on a new best).")
    p.add_argument("--num-train", type=int, default=16, help="train images")
    p.add_argument("--num-val", type=int, default=4, help="val images (held out of the official train set)")
    p.add_argument("--num-test", type=int, default=20, help="test images (the official val set)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size of every phase (the method's is 8)")
    p.add_argument("--epochs", type=int, default=1, help="measured epochs per design (per-epoch figures are means)")
    p.add_argument("--project-epochs", type=int, default=10, help="epochs of the projected run totals")
    p.add_argument("--test-epochs", type=int, default=5,
                   help="assumed number of those epochs with a new best val mAP (ours tests only then)")
    p.add_argument("-m", "--model", default="resnet50", choices=models.BACKBONES, help="trainable backbone")
    p.add_argument("--num-workers", type=int, default=0, help="data loader workers (0: load in the main process)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where both designs run")
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"), help="main_clip's --amp for both designs")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--image-px", type=int, default=500, help="side of the synthetic JPEGs (VOC images are ~500 px)")
    p.add_argument("--tiny", action="store_true", help="tiny random models instead of the real ones (smoke test)")
    p.add_argument("--work-dir", default=None, help="folder for the data and run files (default: a temporary one)")
    return p


def check_args(args: argparse.Namespace) -> None:
    require_at_least_one(args, "num_train", "num_val", "num_test", "batch_size", "epochs", "project_epochs")
    if args.num_train + args.num_val < 5:
        raise SystemExit("error: --num-train + --num-val must be at least 5 (the demo data's minimum)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: torch sees no CUDA device here; use --device cpu")
    if not 0 <= args.test_epochs <= args.project_epochs:
        raise SystemExit("error: --test-epochs must lie in [0, --project-epochs]")


def make_data(root: Path, args: argparse.Namespace) -> float:
    """The demo chain into ``root``/pascal; returns the val fraction that holds out --num-val images."""
    folder = root / DATASET
    make_demo_data.make_demo_data(folder, num_train=args.num_train + args.num_val, num_val=args.num_test,
                                  image_size=args.image_px)
    format_pascal.format_pascal(folder, folder)
    generate_observed_labels.generate(root, DATASET)
    return args.num_val / (args.num_train + args.num_val)


def run_config(args: argparse.Namespace, root: Path, val_frac: float, design: str, weights: Path | None) -> dict:
    """main_clip's resolved configuration for one design."""
    argv = ["-d", DATASET, "-l", LOSS, "-m", args.model, "--data-root", str(root / "data"),
            "--output-dir", str(root / "results"), "--run-name", design, "--epochs", str(args.project_epochs),
            "--bsize", str(args.batch_size), "--num-workers", str(args.num_workers), "--val-frac", repr(val_frac),
            "--cache-dir", str(root / "cache"), "--amp", args.amp]
    if weights is not None:
        argv += ["--backbone-weights", str(weights)]
    if args.tiny:
        argv += ["--tiny-models"]
    if design == "original":
        argv += ["--pseudo-labels", "online", "--test-every-epoch"]
    return config_module.resolve_config(main_clip.get_args_parser().parse_args(argv))


def random_backbone_file(model: str, num_classes: int, path: Path) -> Path | None:
    """The random-init backbone written as a --backbone-weights file, so main_clip builds the real
    architecture without a download (None for clip_vision, which copies the teacher's tower)."""
    if model == "clip_vision":
        return None
    torch.manual_seed(0)
    torch.save(models.build_model(model, num_classes, pretrained=False).backbone.state_dict(), path)
    return path


@torch.no_grad()
def evaluate_with_teacher(phase: str, epoch: int, run: engine.Trainer, stage: engine.Stage, loader) -> dict:
    """engine.evaluate plus what the original did on val and test batches: the teacher embeds the
    batch and pseudo-labels are made from it (and not used)."""
    config, device, logger = run.config, run.device, run.logger
    text_features = run.setup.text_features.to(device)
    stage.net.eval()
    logger.begin_phase(phase, epoch, len(loader.dataset), run.num_classes)
    for batch in loader:
        embeddings = run.teacher.embed(batch["teacher_image"].to(device, non_blocking=True))
        teacher_module.pseudo_labels_from_embeddings(embeddings, text_features, config["temp"], config["threshold"],
                                                     config["partial"])
        with engine.autocast(config["amp"], device):
            logits = stage.net(batch["image"].to(device, non_blocking=True))
        logger.record_batch(batch["index"], torch.sigmoid(logits.float()).cpu(), batch["clean"], batch["observed"])
    return logger.end_phase()


def teacher_view_loaders(run: engine.Trainer) -> dict:
    """Val and test loaders whose items also carry the teacher's view (original design)."""
    config, bench = run.config, run.benchmark
    spec = models.backbone_spec(config["model"])
    view = run.teacher.view(config["teacher_view"])
    loaders = {}
    for phase, split in (("val", bench.val), ("test", bench.test)):
        dataset = datasets.MultiLabelDataset([bench.image_dir / p for p in split.images], split.labels_obs,
                                             split.labels, config["image_size"], train=False, mean=spec.mean, std=spec.std,
                                             view=run.student_view(), teacher_view=view)
        loaders[phase] = engine.make_loader(dataset, config["bsize"], config["num_workers"])
    return loaders


def timed_epochs(run: engine.Trainer, design: str, epochs: int, meter: Meter) -> None:
    """Measure each phase of ``epochs`` epochs into ``meter``, following Trainer.run_epoch (checkpoint
    writes left out: the same in both designs)."""
    stage = run.build_stage(engine.END_TO_END, epochs)
    original = design == "original"
    eval_loaders = teacher_view_loaders(run) if original else stage.loaders
    for epoch in range(1, epochs + 1):
        epoch_seed = run.config["seed"] * 100_003 + epoch
        torch.manual_seed(epoch_seed)
        stage.generator.manual_seed(epoch_seed)
        with meter.measure("train"):
            run.train_phase(epoch, stage)

        def phase(name: str) -> dict:
            with meter.measure(name):
                if original:
                    return evaluate_with_teacher(name, epoch, run, stage, eval_loaders[name])
                return engine.evaluate(name, epoch, stage.net, eval_loaders[name], run.device, run.logger,
                                          run.config["amp"])

        val = phase("val")
        new_best = run.logger.update_best(epoch, val["clean"]["map"])
        if new_best or run.config["test_every_epoch"]:
            test = phase("test")
            if new_best:
                run.logger.set_best_test(test)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def warm_up(teacher: teacher_module.Teacher, model: str, tiny: bool, num_classes: int, batch: int,
            device: torch.device) -> None:
    """One untimed teacher forward and one student forward/backward, so neither design pays for
    first-call allocations (or, on CUDA, for kernel selection)."""
    teacher.to(device)
    teacher.embed(torch.zeros(1, 3, teacher.input_size, teacher.input_size, device=device))
    student = models.build_model(model, num_classes, tiny=tiny, pretrained=False,
                                 clip_model=teacher.clip_model if model == "clip_vision" else None).to(device)
    size = student.input_size
    if models.backbone_spec(model).convolutional:  # the layout the Trainer trains in
        student = student.to(memory_format=torch.channels_last)
    student(torch.zeros(min(batch, 2), 3, size, size, device=device)).sum().backward()


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    check_args(args)
    return run_in_work_dir(args, "epoch_cost-", _run)


def _run(args: argparse.Namespace, root: Path) -> dict:
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    load_at_start = os.getloadavg()[0]
    val_frac = make_data(root / "data", args)
    benchmark = datasets.load_benchmark(root / "data", DATASET, val_frac=val_frac)
    num_classes = benchmark.info.num_classes
    sizes = {"train": len(benchmark.train), "val": len(benchmark.val), "test": len(benchmark.test)}

    start = time.perf_counter()
    teacher = teacher_module.build_teacher(tiny=args.tiny, pretrained=False)
    build_s = time.perf_counter() - start
    text_features = torch.nn.functional.normalize(
        torch.randn(num_classes, teacher.embed_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    setup = engine.Setup(device, benchmark, teacher, text_features)
    weights = None if args.tiny else random_backbone_file(args.model, num_classes, root / "backbone-random.pth")
    warm_up(teacher, args.model, args.tiny, num_classes, args.batch_size, device)

    runs = {}
    for design in ("ours", "original"):
        config = run_config(args, root, val_frac, design, weights)
        runs[design] = engine.Trainer(config, root / "results" / design, setup)
        runs[design].logger.echo = False  # this script prints its own table

    # (b) ours: the one-time cache pass, then the epochs.
    ours = runs["ours"]
    meters = {"ours": Meter(device), "original": Meter(device)}
    with meters["ours"].measure("cache"):
        ours.make_pseudo_labels()
    cache_s, cache_cpu = meters["ours"].wall["cache"][0], meters["ours"].cpu["cache"][0]
    cached_images = len(ours.cache.embeddings("train", ours.teacher_encoder()))  # kept in memory by the pass
    timed_epochs(ours, "ours", args.epochs, meters["ours"])
    # (a) the original design.
    timed_epochs(runs["original"], "original", args.epochs, meters["original"])

    per_epoch = {d: {p: mean(m.wall[p]) for p in ("train", "val", "test")} for d, m in meters.items()}
    cpu_epoch = {d: {p: mean(m.cpu[p]) for p in ("train", "val", "test")} for d, m in meters.items()}
    cpu_orig = sum(cpu_epoch["original"].values())
    cpu_ours_no_test = cpu_epoch["ours"]["train"] + cpu_epoch["ours"]["val"]
    orig = per_epoch["original"]
    orig_epoch = orig["train"] + orig["val"] + orig["test"]
    ours_p = per_epoch["ours"]
    ours_no_test = ours_p["train"] + ours_p["val"]
    ours_with_test = ours_no_test + ours_p["test"]
    n, t = args.project_epochs, args.test_epochs
    totals = {"original": n * orig_epoch,
              "ours_assumed": cache_s + n * ours_no_test + t * ours_p["test"],
              "ours_worst": cache_s + n * ours_with_test}

    input_size = models.input_size(args.model, tiny=args.tiny)
    lines = [
        f"epoch cost on {device_name(device)} ({torch.get_num_threads()} CPU threads, torch {torch.__version__}, "
        f"--amp {args.amp}), random init, "
        f"nothing loaded{' [TINY MODELS: smoke test only]' if args.tiny else ''}",
        f"  student -m {args.model} at {input_size} px; teacher "
        f"{'tiny CLIP' if args.tiny else models.CLIP_MODEL_NAME} at {teacher.input_size} px "
        f"(built in {build_s:.1f} s); loss {LOSS}",
        f"  data: {sizes['train']} train / {sizes['val']} val / {sizes['test']} test synthetic {args.image_px} px "
        f"JPEGs, batch {args.batch_size}, num_workers {args.num_workers}, {args.epochs} measured epoch(s) per design",
        "",
        f"seconds per epoch                        {'train':>8} {'val':>8} {'test':>8} {'epoch':>8}",
        f"(a) original: teacher on every batch,    {orig['train']:8.1f} {orig['val']:8.1f} {orig['test']:8.1f} "
        f"{orig_epoch:8.1f}",
        "    test every epoch",
        f"(b) ours: cached teacher,                {ours_p['train']:8.1f} {ours_p['val']:8.1f} {ours_p['test']:8.1f} "
        f"{ours_with_test:8.1f}   (epoch with a test)",
        f"    test only on a new best              {ours_p['train']:8.1f} {ours_p['val']:8.1f} {'-':>8} "
        f"{ours_no_test:8.1f}   (epoch without)",
        f"(b) one-time teacher cache: {cache_s:.1f} s for {cached_images} images (the whole official train set = "
        f"train + val; {cache_s / cached_images:.2f} s/image)",
        "",
        f"per-epoch speed-up (a)/(b): {orig_epoch / ours_no_test:.1f}x on an epoch without a test, "
        f"{orig_epoch / ours_with_test:.1f}x on an epoch with one (worst case)",
        f"projected {n}-epoch totals (s):",
        f"  (a) original:  {n} x {orig_epoch:.1f} = {totals['original']:.1f}",
        f"  (b) ours, assuming {t} of {n} epochs are a new best (test): {cache_s:.1f} + {n} x {ours_no_test:.1f} + "
        f"{t} x {ours_p['test']:.1f} = {totals['ours_assumed']:.1f}  "
        f"({totals['original'] / totals['ours_assumed']:.1f}x faster)",
        f"  (b) ours, worst case (every epoch a new best): {cache_s:.1f} + {n} x {ours_with_test:.1f} = "
        f"{totals['ours_worst']:.1f}  ({totals['original'] / totals['ours_worst']:.1f}x faster)",
    ]
    # Linear extrapolation of the per-image costs to VOC 2012's split sizes.
    per_image = {d: {p: per_epoch[d][p] / sizes[p] for p in sizes} for d in per_epoch}
    voc_orig = sum(per_image["original"][p] * VOC_SIZES[p] for p in VOC_SIZES)
    voc_ours = sum(per_image["ours"][p] * VOC_SIZES[p] for p in ("train", "val"))
    voc_test = per_image["ours"]["test"] * VOC_SIZES["test"]
    voc_cache = cache_s / cached_images * (VOC_SIZES["train"] + VOC_SIZES["val"])
    lines += [
        f"linear extrapolation to VOC 2012 ({VOC_SIZES['train']} / {VOC_SIZES['val']} / {VOC_SIZES['test']} images) "
        f"on this machine, hours:",
        f"  per epoch: (a) {voc_orig / 3600:.1f}; (b) {voc_ours / 3600:.1f} without a test, "
        f"{(voc_ours + voc_test) / 3600:.1f} with one -> {voc_orig / voc_ours:.1f}x / "
        f"{voc_orig / (voc_ours + voc_test):.1f}x",
        f"  {n} epochs: (a) {n * voc_orig / 3600:.1f}; (b) cache {voc_cache / 3600:.1f} + epochs: "
        f"{(voc_cache + n * voc_ours + t * voc_test) / 3600:.1f} ({t} tests), "
        f"{(voc_cache + n * (voc_ours + voc_test)) / 3600:.1f} (worst case)",
    ]
    speedup = orig_epoch / ours_with_test
    lines.append(f"the same ratios in process CPU seconds (less sensitive to other load on the machine): "
                 f"{cpu_orig / cpu_ours_no_test:.1f}x / {cpu_orig / (cpu_ours_no_test + cpu_epoch['ours']['test']):.1f}x"
                 f" (epoch CPU s: (a) {cpu_orig:.1f}, (b) {cpu_ours_no_test + cpu_epoch['ours']['test']:.1f}; "
                 f"cache {cache_cpu:.1f})")
    lines.append(f"other processes kept busy on average {meters['ours'].other_cores():.2f} of {os.cpu_count()} cores "
                 f"while (b) was measured, {meters['original'].other_cores():.2f} while (a) was (0 on a quiet "
                 f"machine; 1-minute load average at start / end {load_at_start:.1f} / {os.getloadavg()[0]:.1f})")
    verdict = lambda ratio: f"{ratio:.1f}x {'PASS' if ratio >= 4 else 'FAIL'}"  # noqa: E731
    lines.append(f"acceptance (ours >= 4x faster per epoch): epoch without a test {verdict(orig_epoch / ours_no_test)}"
                 f"; epoch with one (worst case) {verdict(speedup)}")
    print("\n".join(lines), flush=True)
    return {"per_epoch": per_epoch, "cpu_per_epoch": cpu_epoch, "cache_s": cache_s, "cache_cpu_s": cache_cpu,
            "cached_images": cached_images, "totals": totals, "speedup_worst": speedup,
            "speedup_no_test": orig_epoch / ours_no_test, "sizes": sizes,
            "other_cores": {d: m.other_cores() for d, m in meters.items()}}


if __name__ == "__main__":
    main()
