"""Benchmark: AEVLP's per-step CLIP teacher against our both-flips view cache (``damp``).

AEVLP (Tran et al., ICCV 2025) makes its pseudo-labels (DAMP) every training step by running
CLIP ViT-B/16 at 224 px on the whole image and on each tile of a g x g grid (1 + g^2 views),
each view flipped at random. Everything in those forwards is fixed except one flip per view, so
this code base embeds every view in both flips once per training image (2 (1 + g^2) embeddings)
and each step only picks the drawn flips' rows, computes cosine similarities and DAMP.

Run from the repository root (CPU; with the defaults about 2 minutes on 2 quiet cores, where the
ViT-B/16 forward takes ~0.28 s per view, and about 4 when other processes share them):
    python bench/aevlp_cost.py [--num-images 8 --width 500 --height 375 --batch-size 4 --grid 4
                                --num-classes 20 --epochs 1 --project-epochs 8 --repeats 20]
Smoke test (tiny random CLIP, seconds; the figures mean nothing):
    python bench/aevlp_cost.py --tiny --num-images 2 --batch-size 2 --width 64 --height 48 --grid 2

The real teacher architecture at random init (``--teacher ViT-B-16``: open_clip
``ViT-B-16-quickgelu`` through ``models.load_clip(pretrained=False)``: nothing is read or
downloaded; ``build_vit_b16``), float32 on the CPU, wrapped by ``teacher.build_teacher``, on ``--num-images`` synthetic JPEGs drawn as the demo
data's images (``preproc/make_demo_data.render_image``), resized to ``--width`` x ``--height``
(VOC-like ~500 x 375), written to a temporary folder. K random unit text features; a random
observed positive per image; DAMP with ``DAMP_SETTINGS['pascal']`` (its grid replaced by ``--grid``).
The per-view flips of every epoch are drawn once (seeded) and fed to both designs:

(a) AEVLP: per batch, decode each image (``datasets.open_rgb``), build its views as AEVLP's
    dataset does (``damp.aevlp_views``: crop, PIL bilinear resize to 224, flip, normalise), run
    the CLIP image tower on the B x (1+g^2) views, cosine similarities, DAMP; the kept
    pseudo-label matrix is updated as AEVLP does (``current`` written back). Timed per part.
(b) ours: the one-time cache through the cache API itself (``caches.cached_embeddings`` with
    ``damp.aevlp_encoder(teacher, g)`` into a temporary .npz: decode, both flips of every view,
    forward, write), then per epoch: ``damp.pick_flips`` on the cached rows, cosine similarities,
    DAMP, the same update. (b)'s epoch takes milliseconds, so it is timed as the median of
    ``--repeats`` passes over the same measured epochs (the mean and max are printed too).

Printed: (a)'s seconds per epoch and per image, split into decode, view building, CLIP forward
and similarities + DAMP; (b)'s one-time cache (seconds, per image, in AEVLP epochs of CLIP
forward) and per-epoch seconds; the per-epoch speed-up (a)/(b), also without the decoding (the
student's pipeline decodes the image anyway in both designs); projected totals over
``--project-epochs`` (AEVLP trains VOC for 8) and the break-even epoch count; the same ratios in
process CPU seconds and how many cores other processes kept busy (wall times are only
trustworthy near 0); a check that (a) and (b) give identical pseudo-labels for the same flips
("pseudo-labels identical: yes", asserted; with the largest similarity difference: the cache's
forwards batch 2 (1+g^2) views per image, AEVLP's 1+g^2, which can change float rounding, absorbed
when the encoder rounds its outputs to float16); a linear extrapolation to COCO's
official train set (82,081 images) of the cache and of (a)'s epoch on this machine, and the
COCO cache's size on disk (82,081 x 34 x 512, float32 and float16).
``main`` returns the figures as a dict (see ``RESULT_KEYS``).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import caches  # noqa: E402
import datasets  # noqa: E402
import models  # noqa: E402
import teacher as teacher_module  # noqa: E402
from bench.timing import Meter, require_at_least_one, run_in_work_dir  # noqa: E402
from preproc import make_demo_data  # noqa: E402
from pseudo_labels import damp  # noqa: E402

VIT_B16 = models.teacher_spec("ViT-B-16").open_clip_name   # AEVLP's teacher, 224 px
SETTINGS = "pascal"                 # DAMP_SETTINGS entry used (its grid_size replaced by --grid)
COCO_TRAIN_IMAGES = 82_081          # COCO 2014 official train set
COCO_GRID = damp.DAMP_SETTINGS["coco"].grid_size
VIT_B16_DIM = models.teacher_spec("ViT-B-16").embed_dim
A_PARTS = ("decode", "views", "forward", "damp")
RESULT_KEYS = frozenset({
    "sizes", "cache_method", "a_per_epoch", "a_cpu_per_epoch", "a_per_image", "cache_s", "cache_cpu_s",
    "cache_in_a_epochs", "b_per_epoch", "b_cpu_per_epoch", "speedup_per_epoch", "speedup_without_decode",
    "speedup_cpu", "projected", "break_even_epochs", "coco", "pseudo_labels_identical",
    "max_similarity_diff", "other_cores"})


def build_vit_b16(tiny: bool) -> torch.nn.Module:
    """AEVLP's CLIP (``--teacher ViT-B-16``) at random init, float32, eval mode (tiny: the
    project's tiny CLIP)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return models.load_clip(teacher="ViT-B-16", tiny=tiny, pretrained=False)


# ----------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="AEVLP's per-step CLIP teacher vs our both-flips view cache.")
    p.add_argument("--num-images", type=int, default=8, help="synthetic training images")
    p.add_argument("--width", type=int, default=500, help="image width in pixels (VOC images are ~500 x 375)")
    p.add_argument("--height", type=int, default=375, help="image height in pixels")
    p.add_argument("--batch-size", type=int, default=4, help="images per step (and per cache batch)")
    p.add_argument("--grid", type=int, default=damp.DAMP_SETTINGS[SETTINGS].grid_size,
                   help="g: g x g tiles, 1 + g^2 views per image (AEVLP: 4; CUB: 5)")
    p.add_argument("--num-classes", type=int, default=20, help="K text features (VOC: 20)")
    p.add_argument("--epochs", type=int, default=1, help="measured epochs per design (per-epoch figures are means)")
    p.add_argument("--repeats", type=int, default=20, help="passes of (b)'s measured epochs (milliseconds each)")
    p.add_argument("--project-epochs", type=int, default=8, help="epochs of the projected totals (AEVLP's VOC: 8)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="images, flips, labels and text features")
    p.add_argument("--tiny", action="store_true", help="a tiny random CLIP instead of ViT-B/16 (smoke test)")
    p.add_argument("--work-dir", default=None, help="folder for the images and the cache (default: a temporary one)")
    return p


def check_args(args: argparse.Namespace) -> None:
    require_at_least_one(args, "num_images", "batch_size", "grid", "num_classes", "epochs", "repeats", "project_epochs")
    if args.width < args.grid or args.height < args.grid:
        raise SystemExit(f"error: a {args.width} x {args.height} image is too small for a "
                         f"{args.grid} x {args.grid} grid")
    if damp.DAMP_SETTINGS[SETTINGS].top_k > args.num_classes:
        raise SystemExit(f"error: --num-classes must be at least DAMP's top_k ({damp.DAMP_SETTINGS[SETTINGS].top_k})")


def make_images(folder: Path, args: argparse.Namespace) -> list[Path]:
    """Demo-data images (glyphs on noise) at --width x --height, as JPEGs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(args.seed)
    paths = []
    for i in range(args.num_images):
        image, _, _ = make_demo_data.render_image(rng, max(args.width, args.height, 32))
        path = folder / f"{i:06d}.jpg"
        image.resize((args.width, args.height), Image.Resampling.BILINEAR).save(
            path, format="JPEG", quality=make_demo_data.JPEG_QUALITY)
        paths.append(path)
    return paths


def batches(num_images: int, batch_size: int) -> list[torch.Tensor]:
    """The image indices of each step (in order: the draws, not the order, are what matter here)."""
    return [torch.arange(i, min(i + batch_size, num_images)) for i in range(0, num_images, batch_size)]


def draw_flips(epochs: int, num_images: int, num_views: int, seed: int) -> list[torch.Tensor]:
    """Per epoch, N x (1+g^2) independent fair flips (AEVLP's RandomHorizontalFlip per view)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(num_images, num_views, generator=generator) < 0.5 for _ in range(epochs)]


# ----------------------------------------------------------------------------------------------
# The two designs
# ----------------------------------------------------------------------------------------------

class Problem(NamedTuple):
    """What both designs are given (a NamedTuple: tests load this script without registering it
    in sys.modules, which a dataclass would need)."""
    paths: list[Path]
    steps: list[torch.Tensor]          # image indices per step
    flips: list[torch.Tensor]          # per epoch: N x V
    observed: torch.Tensor             # N x K, one positive per row
    text_features: torch.Tensor        # K x D, unit rows
    damp_kwargs: dict
    view_size: int


def damp_step(problem: Problem, embeddings: torch.Tensor, index: torch.Tensor, kept: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """A step's similarities and DAMP pseudo-labels from its B x V x D view embeddings; the
    pseudo-labels are written into ``kept`` (AEVLP's pseudo_label_matrix), as AEVLP does."""
    sims = damp.cosine_similarities(embeddings, problem.text_features)
    _, current = damp.damp_pseudo_labels(sims, problem.observed[index], kept[index], **problem.damp_kwargs)
    kept[index] = current.float()
    return current, sims


def aevlp_epochs(problem: Problem, encode, meter: Meter) -> tuple[torch.Tensor, torch.Tensor]:
    """(a): every epoch's steps with the teacher run on the views (``encode``: the CLIP image tower
    as the cache runs it, ``aevlp_encoder(...).encode``, so both designs embed alike); returns
    (current pseudo-labels of every step of every epoch, in order; their similarities)."""
    grid = problem.damp_kwargs["grid_size"]
    kept = torch.zeros(problem.observed.shape)
    steps = []
    for flips in problem.flips:
        for index in problem.steps:
            with meter.measure("decode", others=False):
                images = [datasets.open_rgb(problem.paths[i]) for i in index.tolist()]
            with meter.measure("views", others=False):
                views = torch.cat([damp.aevlp_views(image, flips[i].tolist(), grid_size=grid, size=problem.view_size)
                                   for image, i in zip(images, index.tolist())])
            with meter.measure("forward", others=False), torch.no_grad():
                embeddings = encode(views).float().reshape(len(index), -1, problem.text_features.shape[1])
            with meter.measure("damp", others=False):
                steps.append(damp_step(problem, embeddings, index, kept))
    return torch.cat([current for current, _ in steps]), torch.cat([sims for _, sims in steps])


def cached_epochs(problem: Problem, cached: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(b): every epoch's steps from the cached rows (N x 2V x D); same returns as ``aevlp_epochs``."""
    kept = torch.zeros(problem.observed.shape)
    steps = [damp_step(problem, damp.pick_flips(cached[index], flips[index]), index, kept)
             for flips in problem.flips for index in problem.steps]
    return torch.cat([current for current, _ in steps]), torch.cat([sims for _, sims in steps])


def warm_up(teacher: teacher_module.Teacher, problem: Problem) -> None:
    """One untimed forward and DAMP, so neither design pays for first-call allocations."""
    with torch.no_grad():
        teacher.clip_model.encode_image(torch.zeros(2, 3, problem.view_size, problem.view_size))
    views = problem.damp_kwargs["grid_size"] ** 2 + 1
    damp.damp_pseudo_labels(torch.rand(1, views, len(problem.text_features)), problem.observed[:1],
                            torch.zeros(1, len(problem.text_features)), **problem.damp_kwargs)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    check_args(args)
    return run_in_work_dir(args, "aevlp_cost-", _run)


def _run(args: argparse.Namespace, root: Path) -> dict:
    load_at_start = os.getloadavg()[0]
    paths = make_images(root / "images", args)
    num_views = damp.num_views(args.grid)

    start = time.perf_counter()
    teacher = teacher_module.build_teacher(clip_model=build_vit_b16(args.tiny), teacher="ViT-B-16")
    build_s = time.perf_counter() - start
    generator = torch.Generator().manual_seed(args.seed)
    text_features = torch.nn.functional.normalize(
        torch.randn(args.num_classes, teacher.embed_dim, generator=generator), dim=-1)
    observed = torch.nn.functional.one_hot(torch.randint(args.num_classes, (args.num_images,), generator=generator),
                                           args.num_classes).float()
    damp_kwargs = {**dataclasses.asdict(damp.DAMP_SETTINGS[SETTINGS]), "grid_size": args.grid}
    problem = Problem(paths, batches(args.num_images, args.batch_size),
                      draw_flips(args.epochs, args.num_images, num_views, args.seed + 1), observed, text_features,
                      damp_kwargs, teacher.input_size)
    warm_up(teacher, problem)

    # (b) the one-time cache, through the cache API (decode, 2V views, forward, .npz write).
    meter_b, meter_a = Meter(), Meter()
    encoder = damp.aevlp_encoder(teacher, args.grid)
    messages: list[str] = []
    # The stored dtype, where this version of caches/damp has one (float16 for AEVLP's views).
    cache_dtype = encoder.dtype
    dtype_argument = {"dtype": cache_dtype}
    with meter_b.measure("cache"), torch.no_grad():
        cached = caches.cached_embeddings(encoder.encode, encoder.key, [str(p) for p in paths], encoder.image_size,
                                          encoder.mean, encoder.std, root / "cache" / "aevlp.npz",
                                          batch_size=args.batch_size, log=messages.append, views=encoder.views,
                                          **dtype_argument)
    assert cached.shape == (args.num_images, 2 * num_views, teacher.embed_dim), cached.shape
    cache_bytes = (root / "cache" / "aevlp.npz").stat().st_size
    stored_dtype = str(cached.dtype)
    cached = torch.from_numpy(cached)
    cache_s, cache_cpu = meter_b.total("cache")

    # (b) per epoch, --repeats passes over the measured epochs.
    # The median pass: on a shared machine a pass of milliseconds now and then takes 100+ ms (torch's
    # CPU threads wait for a descheduled peer), which would dominate a mean.
    passes_wall, passes_cpu = [], []
    with meter_b.measure("all epochs"):
        for _ in range(args.repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            b_current, b_sims = cached_epochs(problem, cached)
            passes_wall.append((time.perf_counter() - wall) / args.epochs)
            passes_cpu.append((time.process_time() - cpu) / args.epochs)
    b_epoch, b_cpu_epoch = float(np.median(passes_wall)), float(np.median(passes_cpu))
    b_epoch_mean, b_epoch_max = float(np.mean(passes_wall)), float(np.max(passes_wall))

    # (a) AEVLP: the teacher on every step.
    with meter_a.measure("all epochs"):
        a_current, a_sims = aevlp_epochs(problem, encoder.encode, meter_a)
    a_parts = {part: meter_a.total(part)[0] / args.epochs for part in A_PARTS}
    a_cpu_parts = {part: meter_a.total(part)[1] / args.epochs for part in A_PARTS}
    a_epoch, a_cpu_epoch = sum(a_parts.values()), sum(a_cpu_parts.values())
    a_no_decode = a_epoch - a_parts["decode"]

    identical = bool(torch.equal(a_current, b_current))
    max_diff = float((a_sims - b_sims).abs().max())
    assert identical, (f"(a) and (b) pseudo-labels differ for the same flips ({int((a_current != b_current).sum())} "
                       f"entries; largest similarity difference {max_diff:.2e})")

    n = args.project_epochs
    projected = {"epochs": n, "a": n * a_epoch, "b": cache_s + n * b_epoch}
    break_even = cache_s / (a_epoch - b_epoch) if a_epoch > b_epoch else float("inf")
    per_image = {part: seconds / args.num_images for part, seconds in a_parts.items()}
    coco_views = 2 * damp.num_views(COCO_GRID)
    coco = {"images": COCO_TRAIN_IMAGES, "grid": args.grid,
            "cache_hours": cache_s / args.num_images * COCO_TRAIN_IMAGES / 3600,
            "a_epoch_hours": a_epoch / args.num_images * COCO_TRAIN_IMAGES / 3600,
            "cache_gb_float32": COCO_TRAIN_IMAGES * coco_views * VIT_B16_DIM * 4 / 1e9,
            "cache_gb_float16": COCO_TRAIN_IMAGES * coco_views * VIT_B16_DIM * 2 / 1e9}
    result = {
        "sizes": {"images": args.num_images, "batch": args.batch_size, "grid": args.grid, "views": num_views,
                  "classes": args.num_classes, "steps_per_epoch": len(problem.steps), "epochs": args.epochs},
        "cache_method": "caches.cached_embeddings(damp.aevlp_encoder(teacher, g)) into a temporary .npz",
        "a_per_epoch": {**a_parts, "total": a_epoch}, "a_cpu_per_epoch": {**a_cpu_parts, "total": a_cpu_epoch},
        "a_per_image": {**per_image, "total": a_epoch / args.num_images},
        "cache_s": cache_s, "cache_cpu_s": cache_cpu, "cache_in_a_epochs": cache_s / a_parts["forward"],
        "b_per_epoch": b_epoch, "b_cpu_per_epoch": b_cpu_epoch,
        "speedup_per_epoch": a_epoch / b_epoch, "speedup_without_decode": a_no_decode / b_epoch,
        "speedup_cpu": a_cpu_epoch / b_cpu_epoch if b_cpu_epoch > 0 else float("inf"),
        "projected": projected, "break_even_epochs": break_even, "coco": coco,
        "pseudo_labels_identical": identical, "max_similarity_diff": max_diff,
        "other_cores": {"a": meter_a.other_cores(), "b": meter_b.other_cores()},
    }
    assert set(result) == RESULT_KEYS

    arch = "tiny CLIP [TINY: smoke test only, figures mean nothing]" if args.tiny else f"open_clip {VIT_B16}"
    ms = 1e3
    lines = [
        f"AEVLP teacher cost on the CPU ({torch.get_num_threads()} threads, torch {torch.__version__}), "
        f"{arch} at {teacher.input_size} px, random init, float32 (built in {build_s:.1f} s)",
        f"  {args.num_images} synthetic {args.width} x {args.height} JPEGs, batch {args.batch_size}, "
        f"g = {args.grid} ({num_views} views per image), K = {args.num_classes}, DAMP_SETTINGS['{SETTINGS}'], "
        f"{args.epochs} measured epoch(s), {len(problem.steps)} steps each",
        "",
        f"(a) AEVLP, teacher on every step      {'s/epoch':>9} {'s/image':>9}",
    ]
    names = {"decode": "decode JPEG", "views": f"build {num_views} views (aevlp_views)",
             "forward": f"CLIP forward, B x {num_views} views", "damp": "cosine sims + DAMP"}
    for part in A_PARTS:
        lines.append(f"    {names[part]:<34}{a_parts[part]:9.3f} {per_image[part]:9.4f}")
    lines += [
        f"    {'total':<34}{a_epoch:9.3f} {a_epoch / args.num_images:9.4f}",
        "(b) ours, cached views",
        f"    one-time cache of both flips ({2 * num_views} views per image; cached_embeddings, incl. decode,",
        f"      view building and .npz write): {cache_s:.2f} s = {cache_s / args.num_images:.3f} s/image "
        f"= {cache_s / a_parts['forward']:.2f} of (a)'s epochs of CLIP forward ({cache_bytes / 1e3:.0f} kB "
        f"{stored_dtype} file)",
        f"    per epoch (pick_flips, cosine sims, DAMP; median of {args.repeats} passes): {b_epoch * ms:.2f} ms "
        f"= {b_epoch / args.num_images * ms:.3f} ms/image (mean {b_epoch_mean * ms:.2f}, "
        f"max {b_epoch_max * ms:.2f} ms)",
        "",
        f"per-epoch speed-up (a)/(b): {a_epoch / b_epoch:,.0f}x ({a_no_decode / b_epoch:,.0f}x leaving out "
        f"the decoding, which the student's pipeline does in both designs)",
        f"projected {n}-epoch totals (AEVLP trains VOC for 8): (a) {n} x {a_epoch:.2f} = {projected['a']:.1f} s; "
        f"(b) {cache_s:.2f} + {n} x {b_epoch * ms:.2f} ms = {projected['b']:.1f} s "
        f"-> {projected['a'] / projected['b']:.1f}x",
        f"break-even: the cache pays for itself after {break_even:.2f} epochs "
        f"({math.ceil(break_even) if math.isfinite(break_even) else 'never'} whole epochs)",
        f"process CPU seconds: (a) {a_cpu_epoch:.2f} per epoch, (b) {b_cpu_epoch * ms:.2f} ms per epoch "
        f"-> {result['speedup_cpu']:,.0f}x; cache {cache_cpu:.2f} = {cache_cpu / a_cpu_parts['forward']:.2f} of "
        f"(a)'s epochs of CLIP forward",
        f"other processes kept busy on average {meter_a.other_cores():.2f} of {os.cpu_count()} cores while (a) was "
        f"measured, {meter_b.other_cores():.2f} while (b) was (0 on a quiet machine; 1-minute load average at "
        f"start / end {load_at_start:.1f} / {os.getloadavg()[0]:.1f})",
        f"pseudo-labels identical: {'yes' if identical else 'NO'} ({a_current.numel()} entries over "
        f"{args.epochs} epoch(s), {int(a_current.sum())} positive; largest cosine-similarity difference "
        f"{max_diff:.1e}{'' if max_diff == 0 else ': float rounding, the forwards run at other batch shapes'})",
        "",
        f"linear extrapolation to COCO's official train set ({COCO_TRAIN_IMAGES:,} images) on this machine "
        f"(g = {args.grid}{'' if args.grid == COCO_GRID else f'; COCO uses g = {COCO_GRID}'}):",
        f"  one-time cache {coco['cache_hours']:.1f} h; AEVLP's teacher work {coco['a_epoch_hours']:.1f} h per epoch",
        f"  cache size (N x {coco_views} x {VIT_B16_DIM}): {coco['cache_gb_float32']:.2f} GB at float32, "
        f"{coco['cache_gb_float16']:.2f} GB at float16",
    ]
    print("\n".join(lines), flush=True)
    return result


if __name__ == "__main__":
    main()
