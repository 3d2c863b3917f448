"""Benchmark: the data path against the networks' own time (issue 26), per phase, today's path
(every epoch decodes and resizes the JPEGs) against the image cache (--image-cache uint8).

Run from the repository root (CPU: about 37 minutes on 2 cores with the defaults, most of it the
ViT-L teacher's passes; --tiny, a smoke test of the same code: 16 s):
    python bench/data_path.py
On a GPU (one command; at least 2,000 COCO-sized training images, as the issue asks):
    python bench/data_path.py --device cuda --num-train 2000 --num-val 200 --num-test 200 --num-workers 8 \
        --batch-size 32 --amp bf16 --gpu-decode

The real architectures at random init (nothing read or downloaded): the student (``-m``, default
ResNet-50 at 448 px, channels_last as the Trainer trains it) and the frozen teacher (open_clip
ViT-L-14-336-quickgelu), through the training engine's own ``Trainer`` (EM_PL, pascal's
hyperparameters), on synthetic COCO-sized JPEGs (``--image-width`` x ``--image-height``, every
fourth one upright, quality 90, about 150 kB each) in the demo data's VOC layout.

Per path and phase it prints:
  loader img/s  the phase's loader alone (its workers decode or read the cache; nothing else runs),
                over --loader-passes passes after one that starts its workers
  floor s       the network alone: the phase's step on one batch already on the device, repeated
                (``--repeats``), times the phase's number of batches (the student's train step;
                its eval forward for val + test; the teacher's forward on both flips)
  full s        the phase as a run does it (``Trainer.train_phase``, ``engine.evaluate``, the
                teacher's one-time cached pass ``Trainer.make_pseudo_labels``)
  full/floor    what the issue's goal reads: at most 1.2 for the student epoch and the teacher pass
The cached path also reports its one-time build (every official image decoded and resized once)
and whether its inputs equal today's (they must, to the bit). ``--gpu-decode``: the GPU JPEG
decoding candidate (torchvision.io.decode_jpeg on the device, antialiased bilinear resize on the
tensor) where ``datasets.gpu_decode_unavailable`` finds it usable: its decode throughput and how far
its inputs are from today's (on a CPU the same tensor recipe runs on the CPU, to measure that
difference). Each path builds its own caches (separate --cache-dir), so the teacher pass runs in both.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import config as config_module  # noqa: E402
import datasets  # noqa: E402
import engine  # noqa: E402
import main_clip  # noqa: E402
import models  # noqa: E402
import teacher as teacher_module  # noqa: E402
from bench.epoch_cost import device_name, random_backbone_file  # noqa: E402
from bench.timing import Meter, require_at_least_one, run_in_work_dir  # noqa: E402
from fileio import atomic_write  # noqa: E402
from preproc import format_pascal, generate_observed_labels, make_demo_data  # noqa: E402

DATASET = "pascal"
METHOD = "EM_PL"
PATHS = ("decode", "cache")          # --image-cache off, uint8
GOAL = 1.2                           # the bound on full / floor


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Data path against the networks' own time: today's decoding loaders "
                                            "vs the uint8 image cache (--image-cache uint8).")
    p.add_argument("--num-train", type=int, default=24, help="train images")
    p.add_argument("--num-val", type=int, default=8, help="val images (held out of the official train set)")
    p.add_argument("--num-test", type=int, default=8, help="test images (the official val set)")
    p.add_argument("--batch-size", type=int, default=8, help="--bsize of the run (VLPL: 8)")
    p.add_argument("--num-workers", type=int, default=2, help="data loader workers (the run's --num-workers)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the networks run")
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"), help="the run's --amp")
    p.add_argument("-m", "--model", default="resnet50", choices=models.BACKBONES, help="trainable backbone")
    p.add_argument("--image-width", type=int, default=640, help="width of the synthetic JPEGs (COCO: 640)")
    p.add_argument("--image-height", type=int, default=480, help="height of the synthetic JPEGs (COCO: 480)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of each network-only step (after one untimed)")
    p.add_argument("--loader-passes", type=int, default=2,
                   help="timed passes of each loader alone (after one untimed that starts its workers)")
    p.add_argument("--gpu-decode", action="store_true", help="also measure GPU JPEG decoding (the candidate)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--tiny", action="store_true", help="tiny random models instead of the real ones (smoke test)")
    p.add_argument("--work-dir", default=None, help="folder for the data, caches and run files (default: temporary)")
    return p


def check_args(args: argparse.Namespace) -> None:
    require_at_least_one(args, "num_train", "num_val", "num_test", "batch_size", "repeats", "loader_passes",
                         "image_width", "image_height")
    if args.num_workers < 0:
        raise SystemExit("error: --num-workers must be >= 0")
    if args.num_train + args.num_val < 5:
        raise SystemExit("error: --num-train + --num-val must be at least 5 (the demo data's minimum)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: torch sees no CUDA device here; use --device cpu")


def synthetic_photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth colour field with texture and a few blocks: JPEG-compresses like a photo (about
    150 kB at 640 x 480, quality 90), unlike pure noise or flat colour."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3)
    field = np.stack([127 + 90 * np.sin(x / rng.uniform(40, 120) + y / rng.uniform(60, 200) + p) for p in phase], -1)
    for _ in range(6):
        x0, y0 = rng.integers(0, width - 8), rng.integers(0, height - 8)
        field[y0:y0 + rng.integers(8, height // 2), x0:x0 + rng.integers(8, width // 2)] = rng.uniform(0, 255, 3)
    field += rng.normal(0, 14, field.shape)
    return Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))


def make_data(root: Path, args: argparse.Namespace) -> float:
    """The demo chain's layout and labels in ``root``/pascal, its images replaced by COCO-sized
    synthetic photos; returns the val fraction that holds out --num-val images."""
    folder = root / DATASET
    make_demo_data.make_demo_data(folder, num_train=args.num_train + args.num_val, num_val=args.num_test,
                                  image_size=32)
    rng = np.random.default_rng(0)
    for number, path in enumerate(sorted(folder.rglob("JPEGImages/*.jpg"))):
        width, height = ((args.image_height, args.image_width) if number % 4 == 3
                         else (args.image_width, args.image_height))
        photo = synthetic_photo(rng, width, height)
        atomic_write(path, lambda handle: photo.save(handle, format="JPEG", quality=90))
    format_pascal.format_pascal(folder, folder)
    generate_observed_labels.generate(root, DATASET)
    return args.num_val / (args.num_train + args.num_val)


def run_config(args: argparse.Namespace, root: Path, val_frac: float, path: str, weights: Path | None) -> dict:
    argv = ["-d", DATASET, "-l", METHOD, "-m", args.model, "--data-root", str(root / "data"),
            "--output-dir", str(root / "results"), "--run-name", path, "--epochs", "1",
            "--bsize", str(args.batch_size), "--num-workers", str(args.num_workers), "--val-frac", repr(val_frac),
            "--cache-dir", str(root / f"cache-{path}"), "--amp", args.amp,
            "--image-cache", "uint8" if path == "cache" else "off"]
    if weights is not None:
        argv += ["--backbone-weights", str(weights)]
    if args.tiny:
        argv += ["--tiny-models"]
    return config_module.resolve_config(main_clip.get_args_parser().parse_args(argv))


def loader_rate(loaders: list, meter: Meter, name: str, passes: int) -> float:
    """Images per second of ``loaders`` alone (their batches are not looked at), over ``passes``
    passes after an untimed one (which starts their persistent workers, as a run's first epoch
    does, and reads the files once)."""
    def one_pass() -> int:
        return sum(len(batch["image"] if isinstance(batch, dict) else batch[0]) for loader in loaders for batch in loader)
    one_pass()
    count = 0
    with meter.measure(name):
        for _ in range(passes):
            count += one_pass()
    return count / meter.wall[name][-1]


def repeated(step, repeats: int, meter: Meter, name: str) -> float:
    """Seconds of one ``step()``: one untimed call, then the mean of ``repeats`` timed ones."""
    step()
    for _ in range(repeats):
        with meter.measure(name, others=False):
            step()
    return float(np.mean(meter.wall[name][-repeats:]))


def first_batch_on_device(loader, device: torch.device, channels_last: bool) -> dict:
    batch = next(iter(loader))
    images = batch["image"].to(device)
    return {"image": images.contiguous(memory_format=torch.channels_last) if channels_last else images,
            "index": torch.as_tensor(batch["index"])}


def teacher_pass(run: engine.Trainer, args: argparse.Namespace, meter: Meter, path: str) -> dict:
    """The teacher's one-time cached pass: its loader alone, its forward alone, the pass itself."""
    encoder = run.teacher_encoder()
    image_paths = [str(run.benchmark.image_dir / p) for p in datasets.load_formatted(
        run.config["data_root"], DATASET, "train").images]
    batch_size = max(run.config["bsize"], 32)           # what Trainer gives OfficialSetCache
    dataset = datasets.ImageListDataset(image_paths, encoder.image_size, encoder.mean, encoder.std, views=encoder.views,
                                        resized=run.encoder_images("train", encoder))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=args.num_workers,
                                         pin_memory=run.device.type == "cuda", persistent_workers=args.num_workers > 0)
    rate = loader_rate([loader], meter, f"{path} teacher loader", args.loader_passes)
    views = next(iter(loader))[0]
    flat = views.flatten(0, 1).to(run.device)
    with torch.no_grad():
        step = repeated(lambda: encoder.encode(flat), args.repeats, meter, f"{path} teacher forward")
    floor = step * len(image_paths) / len(views)    # the batch may hold fewer images than batch_size
    with meter.measure(f"{path} teacher pass"):
        run.make_pseudo_labels()
    return {"loader_rate": rate, "step_s": step, "floor": floor, "full": meter.wall[f"{path} teacher pass"][-1],
            "images": len(image_paths)}


def student_phases(run: engine.Trainer, args: argparse.Namespace, meter: Meter, path: str) -> dict:
    """The train epoch and the eval phases (val + test): loaders alone, network alone, as a run."""
    config, device = run.config, run.device
    stage = run.build_stage(engine.END_TO_END, 1)
    channels_last = run.backbone.convolutional
    loaders = stage.loaders
    stage.generator.manual_seed(0)
    train_rate = loader_rate([loaders["train"]], meter, f"{path} train loader", args.loader_passes)
    eval_images = len(loaders["val"].dataset) + len(loaders["test"].dataset)
    eval_rate = loader_rate([loaders["val"], loaders["test"]], meter, f"{path} eval loader", args.loader_passes)

    batch = first_batch_on_device(loaders["train"], device, channels_last)
    observed = run.labels.observed[batch["index"]].to(device)
    amp_context = engine.autocast(config["amp"], device)
    loss_of = lambda logits, preds: torch.nn.functional.binary_cross_entropy_with_logits(  # noqa: E731
        logits, (observed == 1).float())
    stage.net.train()
    train_step = repeated(lambda: engine.train_step(stage.train_net, stage.optimizer, run.scaler, batch["image"],
                                                    loss_of, amp_context), args.repeats, meter, f"{path} train step")
    eval_batch = first_batch_on_device(loaders["val"], device, channels_last)
    stage.net.eval()

    @torch.no_grad()
    def eval_step():
        with engine.autocast(config["amp"], device):
            stage.net(eval_batch["image"])
    eval_step_s = repeated(eval_step, args.repeats, meter, f"{path} eval step")
    train_floor = train_step * len(loaders["train"].dataset) / len(batch["index"])
    eval_floor = eval_step_s * eval_images / len(eval_batch["index"])

    stage.generator.manual_seed(1)
    with meter.measure(f"{path} train epoch"):
        run.train_phase(1, stage)
    with meter.measure(f"{path} eval phases"):
        for name in ("val", "test"):
            engine.evaluate(name, 1, stage.net, loaders[name], device, run.logger, config["amp"])
    return {"train": {"loader_rate": train_rate, "step_s": train_step, "floor": train_floor,
                      "full": meter.wall[f"{path} train epoch"][-1], "images": len(loaders["train"].dataset)},
            "eval": {"loader_rate": eval_rate, "step_s": eval_step_s, "floor": eval_floor,
                     "full": meter.wall[f"{path} eval phases"][-1], "images": eval_images}}


def input_difference(runs: dict[str, engine.Trainer], count: int = 8) -> dict:
    """Largest absolute difference between the two paths' inputs (train items, both flips; and the
    teacher's views), over the first ``count`` training images: 0.0 means identical to the bit."""
    largest = {"student": 0.0, "teacher": 0.0}
    sets = {path: datasets.MultiLabelDataset(
        [run.benchmark.image_dir / p for p in run.benchmark.train.images], run.benchmark.train.labels_obs,
        run.benchmark.train.labels, run.config["image_size"], train=True, mean=run.backbone.mean, std=run.backbone.std,
        view=run.student_view(), teacher_view=run.teacher.view(run.config["teacher_view"]),
        resized=run.resized_images("train", run.teacher.view(run.config["teacher_view"])))
        for path, run in runs.items()}
    for index in range(min(count, len(sets["decode"]))):
        for flip in (False, True):
            a, b = sets["decode"][index, flip], sets["cache"][index, flip]
            largest["student"] = max(largest["student"], float((a["image"] - b["image"]).abs().max()))
            largest["teacher"] = max(largest["teacher"], float((a["teacher_image"] - b["teacher_image"]).abs().max()))
    return largest


def gpu_decode_candidate(run: engine.Trainer, args: argparse.Namespace, meter: Meter) -> dict:
    """GPU JPEG decoding (``datasets.decode_resize_jpegs``): decode + resize throughput in the main
    process (files read ahead of time), and its inputs against today's (normalised units)."""
    device = run.device
    reason = datasets.gpu_decode_unavailable(device)
    where = device if reason is None else torch.device("cpu")
    bench = run.benchmark
    paths = [bench.image_dir / p for p in bench.train.images]
    size, mean, std = run.config["image_size"], run.backbone.mean, run.backbone.std
    import torchvision
    datas = [torchvision.io.read_file(str(p)) for p in paths]
    batch = args.batch_size
    decode = lambda: [datasets.decode_resize_jpegs(datas[i:i + batch], size, where)  # noqa: E731
                      for i in range(0, len(datas), batch)]
    decode()
    with meter.measure("gpu decode"):
        decode()
    rate = len(datas) / meter.wall["gpu decode"][-1]
    today = datasets.MultiLabelDataset(paths, bench.train.labels_obs, bench.train.labels, size, train=False,
                                       mean=mean, std=std)
    diffs, pixel = [], []
    for index in range(min(16, len(paths))):
        resized = datasets.decode_resize_jpegs([datas[index]], size, where)[0].cpu()
        tensor = torchvision.transforms.functional.normalize(resized.float().div(255), list(mean), list(std))
        diffs.append((tensor - today[index]["image"]).abs())
        pixel.append((resized.int() - torch.from_numpy(np.array(datasets.resize_step(size)(
            datasets.open_rgb(paths[index])))).permute(2, 0, 1).int()).abs())
    diffs, pixel = torch.stack(diffs), torch.stack(pixel)
    return {"available": reason is None, "reason": reason, "device": str(where), "rate": rate,
            "max_abs": float(diffs.max()), "mean_abs": float(diffs.mean()),
            "pixel_max": int(pixel.max()), "pixel_mean": float(pixel.float().mean()),
            "pixels_differing": float((pixel > 0).float().mean())}


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    check_args(args)
    return run_in_work_dir(args, "data_path-", _run)


def _run(args: argparse.Namespace, root: Path) -> dict:
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    load_at_start = os.getloadavg()[0]
    val_frac = make_data(root / "data", args)
    benchmark = datasets.load_benchmark(root / "data", DATASET, val_frac=val_frac)
    num_classes = benchmark.info.num_classes
    teacher = teacher_module.build_teacher(tiny=args.tiny, pretrained=False)
    text_features = torch.nn.functional.normalize(
        torch.randn(num_classes, teacher.embed_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    setup = engine.Setup(device, benchmark, teacher, text_features)
    weights = None if args.tiny else random_backbone_file(args.model, num_classes, root / "backbone-random.pth")
    meter = Meter(device)
    runs, results = {}, {}
    for path in PATHS:
        runs[path] = engine.Trainer(run_config(args, root, val_frac, path, weights), root / "results" / path, setup)
        runs[path].logger.echo = False
    build = None
    for path in PATHS:
        run = runs[path]
        if path == "cache":   # the one-time build, timed on its own (the teacher pass would start it)
            size = run.student_source_size()
            with meter.measure("image cache build"):
                for phase in ("train", "val"):
                    run.images.images(phase, size)
            files = sorted((root / "cache-cache").glob("images-*.npy"))
            build = {"s": meter.wall["image cache build"][-1], "bytes": sum(f.stat().st_size for f in files),
                     "images": len(benchmark.train) + len(benchmark.val) + len(benchmark.test)}
        results[path] = {"teacher": teacher_pass(run, args, meter, path), **student_phases(run, args, meter, path)}
    difference = input_difference(runs)
    candidate = gpu_decode_candidate(runs["decode"], args, meter) if args.gpu_decode else None

    input_size = runs["decode"].config["image_size"]
    lines = [
        f"data path on {device_name(device)} ({torch.get_num_threads()} CPU threads, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, --amp {args.amp}), random init{' [TINY MODELS: smoke test only]' if args.tiny else ''}",
        f"  student -m {args.model} at {input_size} px, batch {args.batch_size}; teacher "
        f"{'tiny CLIP' if args.tiny else models.CLIP_MODEL_NAME} at {teacher.input_size} px; {METHOD}",
        f"  data: {len(benchmark.train)} train / {len(benchmark.val)} val / {len(benchmark.test)} test synthetic "
        f"{args.image_width} x {args.image_height} JPEGs; num_workers {args.num_workers}",
        "",
        f"{'phase':<14} {'path':<7} {'loader img/s':>12} {'step ms':>9} {'floor s':>9} {'full s':>9} {'full/floor':>10}",
    ]
    for phase, label in (("teacher", "teacher pass"), ("train", "train epoch"), ("eval", "val + test")):
        for path in PATHS:
            r = results[path][phase]
            lines.append(f"{label:<14} {path:<7} {r['loader_rate']:12.1f} {1000 * r['step_s']:9.1f} {r['floor']:9.2f} "
                         f"{r['full']:9.2f} {r['full'] / r['floor']:10.2f}")
    lines += [
        "",
        f"one-time image cache build: {build['s']:.2f} s for {build['images']} images "
        f"({build['images'] / build['s']:.1f} img/s), {build['bytes'] / 1e6:.1f} MB on disk",
        f"inputs, cache vs decode, largest absolute difference over {min(8, len(benchmark.train))} train images x "
        f"both flips: student {difference['student']:g}, teacher view {difference['teacher']:g} "
        f"({'identical to the bit' if not any(difference.values()) else 'NOT IDENTICAL'})",
        f"per-epoch speed-up of the cache: train {results['decode']['train']['full'] / results['cache']['train']['full']:.2f}x"
        f", val + test {results['decode']['eval']['full'] / results['cache']['eval']['full']:.2f}x; loader alone: train "
        f"{results['cache']['train']['loader_rate'] / results['decode']['train']['loader_rate']:.2f}x",
    ]
    if candidate is not None:
        where = ("on the GPU" if candidate["available"] else
                 f"unavailable ({candidate['reason']}): the same tensor recipe on the CPU")
        lines.append(f"GPU decode candidate {where}: {candidate['rate']:.1f} img/s decode + resize (files in memory, "
                     f"one process); vs today's inputs: max {candidate['max_abs']:.3f}, mean {candidate['mean_abs']:.4f} "
                     f"(normalised units); resized pixels: max {candidate['pixel_max']} of 255, mean "
                     f"{candidate['pixel_mean']:.2f}, {100 * candidate['pixels_differing']:.0f}% differ")
    verdict = {phase: results["cache"][phase]["full"] / results["cache"][phase]["floor"] for phase in ("teacher", "train")}
    lines.append(f"goal (full/floor <= {GOAL} with the cache): teacher pass {verdict['teacher']:.2f} "
                 f"{'PASS' if verdict['teacher'] <= GOAL else 'FAIL'}, train epoch {verdict['train']:.2f} "
                 f"{'PASS' if verdict['train'] <= GOAL else 'FAIL'}"
                 + ("" if device.type == "cuda" else " (the goal is for a GPU; on a CPU the networks set the pace "
                                                    "either way)"))
    lines.append(f"other processes kept busy on average {meter.other_cores():.2f} of {os.cpu_count()} cores while this "
                 f"measured (1-minute load average at start / end {load_at_start:.1f} / {os.getloadavg()[0]:.1f})")
    print("\n".join(lines), flush=True)
    return {"results": results, "build": build, "difference": difference, "gpu_decode": candidate,
            "sizes": {"train": len(benchmark.train), "val": len(benchmark.val), "test": len(benchmark.test)},
            "other_cores": meter.other_cores()}


if __name__ == "__main__":
    main()
