"""preproc/make_text_features.py: K x D float32 unit rows from the registry's class names."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import datasets
import models
import teacher as teacher_module
from preproc import make_text_features as mtf

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def teacher(tiny_teacher) -> teacher_module.Teacher:
    return tiny_teacher


def args(*argv: str):
    return mtf.get_args_parser().parse_args(list(argv))


def test_make_text_features_pure_function(teacher):
    names = ("dog", "cat", "dining table")
    label_only = mtf.make_text_features(teacher, names, None)
    prompted = mtf.make_text_features(teacher, names, "a photo of a {}.")
    for features in (label_only, prompted):
        assert features.shape == (3, teacher.embed_dim) and features.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(label_only, prompted)
    np.testing.assert_allclose(prompted, teacher.encode_text(["a photo of a dog.", "a photo of a cat.",
                                                              "a photo of a dining table."]).numpy())


def test_prompt_defaults_follow_the_registry_file_name():
    assert mtf.resolve_prompt(datasets.get_dataset_info("pascal"), False, None) is None
    assert mtf.resolve_prompt(datasets.get_dataset_info("coco"), False, None) is None
    assert mtf.resolve_prompt(datasets.get_dataset_info("cub"), False, None) == mtf.DEFAULT_PROMPT
    assert mtf.resolve_prompt(datasets.get_dataset_info("nuswide"), False, None) == mtf.DEFAULT_PROMPT
    assert mtf.resolve_prompt(datasets.get_dataset_info("cub"), True, None) is None
    assert mtf.resolve_prompt(datasets.get_dataset_info("pascal"), False, "a {} here") == "a {} here"
    with pytest.raises(ValueError, match="--prompt"):
        mtf.resolve_prompt(datasets.get_dataset_info("pascal"), False, "no placeholder")
    with pytest.raises(SystemExit):
        args("--dataset", "pascal", "--label-only", "--prompt", "a {}")


@pytest.mark.parametrize("name", sorted(datasets.DATASETS))
def test_main_writes_the_registry_file(tmp_path, teacher, name):
    info = datasets.get_dataset_info(name)
    out = mtf.main(args("--dataset", name, "--data-root", str(tmp_path), "--tiny"))
    assert out == tmp_path / name / info.text_feature_file
    features = np.load(out)
    assert features.shape == (info.num_classes, teacher.embed_dim) and features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)
    # What main_clip.py loads for the tiny teacher: shapes match, values as written.
    loaded = teacher_module.load_text_features(out, info.num_classes, teacher.embed_dim, dataset=name)
    torch.testing.assert_close(loaded, torch.from_numpy(features))
    assert [p.name for p in out.parent.iterdir()] == [out.name]   # written atomically


def test_existing_file_needs_force(tmp_path):
    out = tmp_path / "published.npy"
    np.save(out, np.ones((20, 768), np.float32))
    with pytest.raises(ValueError, match="--force"):
        mtf.main(args("--dataset", "pascal", "--out", str(out), "--tiny"))
    assert np.load(out).shape == (20, 768)
    mtf.main(args("--dataset", "pascal", "--out", str(out), "--tiny", "--force", "--label-only"))
    assert np.load(out).shape == (20, models.TINY_CLIP_CONFIG["embed_dim"])


def test_clip_weights_file_is_used(tmp_path, teacher):
    clip = models.load_clip(tiny=True)
    with torch.no_grad():
        clip.text_projection.mul_(-1.0)
    weights = tmp_path / "clip.pt"
    torch.save(clip.state_dict(), weights)
    out = mtf.main(args("--dataset", "pascal", "--out", str(tmp_path / "f.npy"), "--tiny",
                        "--clip-weights", str(weights)))
    reference = mtf.make_text_features(teacher, datasets.get_dataset_info("pascal").class_names, None)
    np.testing.assert_allclose(np.load(out), -reference, rtol=1e-5, atol=1e-6)


def test_offline_without_clip_weights_stops_before_work(tmp_path):
    with pytest.raises(models.WeightsUnavailableError, match="--clip-weights"):
        mtf.main(args("--dataset", "pascal", "--out", str(tmp_path / "f.npy")))
    assert not (tmp_path / "f.npy").exists()


@pytest.mark.slow  # a subprocess or a whole pipeline
def test_runs_as_a_script(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    out = tmp_path / "voc.npy"
    done = subprocess.run([sys.executable, "preproc/make_text_features.py", "--dataset", "pascal",
                           "--tiny", "--out", str(out)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "20 x 64" in done.stdout
    assert np.load(out).shape == (20, 64)
    failed = subprocess.run([sys.executable, "preproc/make_text_features.py", "--dataset", "pascal",
                             "--out", str(out)], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode != 0 and failed.stderr.startswith("error: ")
    assert "--force" in failed.stderr
