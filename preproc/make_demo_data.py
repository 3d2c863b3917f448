"""Write a small synthetic dataset in the raw PASCAL VOC 2012 layout (demo and test data).

Run from the repository root:
    python preproc/make_demo_data.py --out DEMO/pascal [--num-train 160] [--num-val 60]
        [--seed 0] [--image-size 64]
then format it like the real data:
    python preproc/format_pascal.py --load-path DEMO/pascal --save-path DEMO/pascal
    python preproc/generate_observed_labels.py --dataset pascal --data-root DEMO

Each of the 20 VOC classes is one glyph, a distinct (shape, colour) pair: 10 well-separated
colours, each used by two classes with different shapes (4 shapes in all). Colour is the cue a
small CNN picks up first, so it is the main one (in a trial, 10 colours x 2 shapes learned
clearly faster than 5 colours x 4 shapes). An image shows 1-3 glyphs of different classes,
large and on a noisy neutral background, so a small CNN learns it in a few epochs. Some images also hold a small extra glyph
whose class is marked 0 ('difficult'), as in the real ImageSets files. The same seed gives the
same files.
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import datasets  # noqa: E402
from preproc import run_script  # noqa: E402
from fileio import atomic_write, atomic_write_text  # noqa: E402

SHAPES = ("circle", "square", "triangle", "plus")
COLOURS = ((220, 30, 30), (30, 170, 40), (30, 70, 230), (240, 210, 20), (200, 40, 210),
           (30, 210, 210), (250, 130, 20), (250, 250, 250), (20, 20, 20), (120, 60, 20))
# Class k: colour k // 2 and shape k % 4, so the two classes of one colour differ in shape.
GLYPHS = tuple((SHAPES[k % len(SHAPES)], COLOURS[k // 2])
               for k in range(len(datasets.VOC_CLASSES)))
DIFFICULT_RATE = 0.1   # share of images with an extra small 'difficult' glyph
JPEG_QUALITY = 90


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write a synthetic VOC-layout demo dataset.")
    parser.add_argument("--out", required=True,
                        help="dataset folder to create, e.g. DEMO/pascal (VOCdevkit/ goes in it)")
    parser.add_argument("--num-train", type=int, default=160)
    parser.add_argument("--num-val", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    return parser


def draw_glyph(draw: ImageDraw.ImageDraw, class_index: int, box: tuple[int, int, int, int],
               colour: tuple[int, int, int] | None = None) -> None:
    """Draw class ``class_index``'s glyph filling ``box`` = (x0, y0, x1, y1)."""
    shape, glyph_colour = GLYPHS[class_index]
    colour = colour or glyph_colour
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)
    else:  # plus: two bars a third of the box thick
        third_w, third_h = (x1 - x0) / 3, (y1 - y0) / 3
        draw.rectangle((x0, y0 + third_h, x1, y1 - third_h), fill=colour)
        draw.rectangle((x0 + third_w, y0, x1 - third_w, y1), fill=colour)


def render_image(rng: np.random.RandomState, image_size: int
                 ) -> tuple[Image.Image, list[int], list[int]]:
    """One image with its present and its difficult class indices."""
    num_classes = len(GLYPHS)
    base = rng.randint(90, 166)
    noise = rng.normal(0.0, 12.0, size=(image_size, image_size, 3))
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    num_objects = int(rng.randint(1, 4))
    has_difficult = rng.rand() < DIFFICULT_RATE
    classes = [int(c) for c in rng.permutation(num_classes)[:num_objects + int(has_difficult)]]
    present, difficult = classes[:num_objects], classes[num_objects:]
    # One object per quadrant: glyphs never overlap, so every label is visible.
    cells = rng.permutation(4)[:len(classes)]
    half = image_size // 2
    for i, (class_index, cell) in enumerate(zip(classes, cells)):
        cell_x, cell_y = (cell % 2) * half, (cell // 2) * half
        if class_index in difficult:
            side = max(4, int(half * 0.25))
        else:
            side = int(half * rng.uniform(0.7, 0.95))
        x0 = cell_x + int(rng.randint(0, half - side + 1))
        y0 = cell_y + int(rng.randint(0, half - side + 1))
        draw_glyph(draw, class_index, (x0, y0, x0 + side - 1, y0 + side - 1))
    return image, present, difficult


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def make_demo_data(out_dir: str | Path, num_train: int = 160, num_val: int = 60, seed: int = 0,
                   image_size: int = 64) -> dict[str, list[str]]:
    """Write the demo dataset under ``out_dir``; returns the image ids of each phase."""
    for flag, value, minimum in (("--num-train", num_train, 5), ("--num-val", num_val, 1),
                                 ("--image-size", image_size, 32)):
        if value < minimum:
            raise ValueError(f"{flag} must be at least {minimum}, got {value}")
    root = Path(out_dir) / "VOCdevkit" / "VOC2012"
    rng = np.random.RandomState(seed)
    ids = {"train": [f"2008_{i + 1:06d}" for i in range(num_train)],
           "val": [f"2008_{num_train + i + 1:06d}" for i in range(num_val)]}
    # labels[phase][image id] = per-class label as written in the files (-1, 0 or 1)
    labels: dict[str, dict[str, list[int]]] = {"train": {}, "val": {}}
    for phase in datasets.PHASES:
        for image_id in ids[phase]:
            image, present, difficult = render_image(rng, image_size)
            row = [-1] * len(GLYPHS)
            for c in present:
                row[c] = 1
            for c in difficult:
                row[c] = 0
            labels[phase][image_id] = row
            data = _jpeg_bytes(image)
            atomic_write(root / "JPEGImages" / f"{image_id}.jpg",
                         lambda handle, data=data: handle.write(data))
    for phase in datasets.PHASES:
        for class_index, class_name in enumerate(datasets.VOC_CLASSES):
            # The real files' format: '<id> -1', '<id>  0', '<id>  1' (two spaces before 0/1).
            lines = [f"{image_id} {labels[phase][image_id][class_index]:2d}"
                     for image_id in sorted(ids[phase])]
            atomic_write_text(root / "ImageSets" / "Main" / f"{class_name}_{phase}.txt",
                              "\n".join(lines) + "\n")
    return ids


def main(args: argparse.Namespace) -> None:
    ids = make_demo_data(args.out, args.num_train, args.num_val, args.seed, args.image_size)
    print(f"wrote {len(ids['train'])} train and {len(ids['val'])} val images "
          f"({args.image_size} px) in the VOC 2012 layout to {args.out}")


if __name__ == "__main__":
    run_script(main, get_args_parser(),
               next_step=lambda args: f"next: python preproc/format_pascal.py --load-path {args.out} --save-path {args.out}")
