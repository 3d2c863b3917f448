"""The demo chain: make_demo_data -> format_pascal -> generate_observed_labels -> load_benchmark."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import datasets
from preproc import format_pascal, generate_observed_labels, make_demo_data

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.slow  # a subprocess or a whole pipeline
def test_demo_chain_command_line(tmp_path):
    demo = tmp_path / "DEMO"
    steps = [("preproc/make_demo_data.py", "--out", str(demo / "pascal"), "--num-train", "30",
              "--num-val", "12", "--seed", "3"),
             ("preproc/format_pascal.py", "--load-path", str(demo / "pascal"),
              "--save-path", str(demo / "pascal")),
             ("preproc/generate_observed_labels.py", "--dataset", "pascal",
              "--data-root", str(demo))]
    outputs = []
    for step in steps:
        result = run_script(*step)
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout)
    assert "train: 30 images, 20 classes" in outputs[1]
    assert f"--dataset pascal --data-root {demo}" in outputs[1]     # the next-step hint
    assert "train: 30 images, 1.00 observed positives" in outputs[2]
    splits = datasets.load_benchmark(demo, "pascal")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 6, 12)
    assert splits.image_dir == demo / "pascal" / "VOCdevkit" / "VOC2012" / "JPEGImages"

    # A user error ends with a one-line message and a non-zero exit, not a traceback.
    result = run_script("preproc/format_pascal.py", "--load-path", str(tmp_path / "nowhere"),
                        "--save-path", str(tmp_path / "out"))
    assert result.returncode != 0
    assert result.stderr.startswith("error: missing folder") and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_demo_data_files_and_labels(tmp_path):
    root = tmp_path / "pascal"
    ids = make_demo_data.make_demo_data(root, num_train=40, num_val=10, seed=5, image_size=48)
    assert ids["train"][0] == "2008_000001" and len(ids["val"]) == 10
    voc = root / "VOCdevkit" / "VOC2012"
    main_dir = voc / "ImageSets" / "Main"
    assert sorted(p.name for p in main_dir.iterdir()) == sorted(
        f"{c}_{phase}.txt" for c in datasets.VOC_CLASSES for phase in ("train", "val"))
    lines = (main_dir / "aeroplane_train.txt").read_text().splitlines()
    assert [line.split()[0] for line in lines] == ids["train"]     # every image, every file
    all_lines = [line for p in main_dir.iterdir() for line in p.read_text().splitlines()]
    assert all(line.endswith((" -1", "  1", "  0")) for line in all_lines)
    assert any(line.endswith("  0") for line in all_lines)         # some 'difficult' labels
    image = Image.open(voc / "JPEGImages" / "2008_000001.jpg")
    assert image.format == "JPEG" and image.size == (48, 48) and image.mode == "RGB"

    format_pascal.format_pascal(root, root)
    generate_observed_labels.generate(tmp_path, "pascal")
    train = datasets.load_formatted(tmp_path, "pascal", "train")
    positives = train.labels.sum(axis=1)
    assert positives.min() >= 1 and positives.max() <= 3
    assert np.all((train.labels_obs == 1).sum(axis=1) == 1)
    assert train.labels.sum(axis=0).min() >= 1                     # every class occurs
    assert len(train) == 40                                        # every image has a positive


def test_demo_data_deterministic(tmp_path):
    make_demo_data.make_demo_data(tmp_path / "a", 12, 4, seed=7, image_size=40)
    make_demo_data.make_demo_data(tmp_path / "b", 12, 4, seed=7, image_size=40)
    make_demo_data.make_demo_data(tmp_path / "c", 12, 4, seed=8, image_size=40)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*")
                   if p.is_file())
    assert len(files) == 16 + 40
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert any((tmp_path / "a" / rel).read_bytes() != (tmp_path / "c" / rel).read_bytes()
               for rel in files)


def test_demo_glyphs_distinct_and_bad_arguments(tmp_path):
    assert len(set(make_demo_data.GLYPHS)) == len(datasets.VOC_CLASSES)
    with pytest.raises(ValueError, match="--image-size"):
        make_demo_data.make_demo_data(tmp_path, 10, 5, 0, image_size=8)
    assert not any(tmp_path.iterdir())
