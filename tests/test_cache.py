"""cached_embeddings: computed once, keyed by everything it depends on, rebuilt when invalid."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
import models
import teacher as teacher_module
import caches

SIZE = 16
MEAN, STD = datasets.CLIP_MEAN, datasets.CLIP_STD


@pytest.fixture
def image_paths(tmp_path) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(7):
        path = tmp_path / "images" / f"{i:03d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12 + i, 20, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


class CountingEncoder:
    """A fixed random linear map of the pooled image, counting the images it sees."""

    def __init__(self, dim: int = 5, seed: int = 0):
        self.weight = torch.randn(3 * 4 * 4, dim, generator=torch.Generator().manual_seed(seed))
        self.images_seen = 0
        self.grad_enabled = []

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.images_seen += len(images)
        self.grad_enabled.append(torch.is_grad_enabled())
        pooled = torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1)
        return pooled @ self.weight


def run(encoder, paths, cache_file, key=None, size=SIZE, mean=MEAN, std=STD, messages=None, **kw):
    return caches.cached_embeddings(encoder, key or {"teacher": "abc"}, paths, size, mean, std,
                                    cache_file, batch_size=3,
                                    log=messages.append if messages is not None else print, **kw)


def test_second_run_hits_the_cache(tmp_path, image_paths):
    cache_file = tmp_path / "cache" / "teacher-train.npz"
    encoder = CountingEncoder()
    first = run(encoder, image_paths, cache_file)
    assert first.shape == (7, 5) and first.dtype == np.float32
    assert encoder.images_seen == 7 and encoder.grad_enabled == [False] * 3
    assert cache_file.is_file()
    assert [p.name for p in cache_file.parent.iterdir()] == [cache_file.name]  # no temp files

    fresh = CountingEncoder()
    messages = []
    second = run(fresh, image_paths, cache_file, messages=messages)
    assert fresh.images_seen == 0
    np.testing.assert_array_equal(second, first)
    assert any("using cached" in m for m in messages)


def test_rows_follow_the_image_order(tmp_path, image_paths):
    encoder = CountingEncoder()
    embeddings = run(encoder, image_paths, tmp_path / "c.npz")
    for i, path in enumerate(image_paths):
        image, index = datasets.ImageListDataset([path], SIZE, MEAN, STD)[0]
        expected = encoder(image[None])[0].numpy()
        np.testing.assert_allclose(embeddings[i], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("change", ["fewer_images", "reordered", "renamed", "key", "size", "mean"])
def test_a_change_of_inputs_misses_the_cache(tmp_path, image_paths, change):
    cache_file = tmp_path / "c.npz"
    run(CountingEncoder(), image_paths, cache_file)
    paths, key, size, mean = list(image_paths), {"teacher": "abc"}, SIZE, MEAN
    if change == "fewer_images":
        paths = paths[:-1]
    elif change == "reordered":
        paths = paths[::-1]
    elif change == "renamed":
        renamed = Path(paths[0]).with_name("renamed.png")
        Path(paths[0]).rename(renamed)
        paths[0] = str(renamed)
    elif change == "key":
        key = {"teacher": "other weights"}
    elif change == "size":
        size = SIZE + 8
    else:
        mean = datasets.IMAGENET_MEAN
    encoder = CountingEncoder(seed=1)
    messages = []
    out = run(encoder, paths, cache_file, key=key, size=size, mean=mean, messages=messages)
    assert encoder.images_seen == len(paths)
    assert out.shape == (len(paths), 5)
    assert any("other inputs" in m for m in messages)
    # The rebuilt file now serves the new inputs.
    again = CountingEncoder(seed=1)
    np.testing.assert_array_equal(run(again, paths, cache_file, key=key, size=size, mean=mean), out)
    assert again.images_seen == 0


def test_teacher_weights_change_misses_the_cache(tmp_path, image_paths):
    clip = models.load_clip(tiny=True)
    teacher = teacher_module.build_teacher(clip_model=clip)
    cache_file = tmp_path / "teacher.npz"

    def embed(t):
        return caches.cached_embeddings(t.embed, {"teacher": t.fingerprint}, image_paths,
                                        t.input_size, datasets.CLIP_MEAN, datasets.CLIP_STD, cache_file, batch_size=4,
                                        log=lambda m: None)

    first = embed(teacher)
    assert first.shape == (7, teacher.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, rtol=1e-5)
    images = torch.stack([datasets.ImageListDataset(image_paths, teacher.input_size, datasets.CLIP_MEAN,
                                                    datasets.CLIP_STD)[i][0] for i in range(7)])
    np.testing.assert_allclose(first, teacher.embed(images).numpy(), rtol=1e-5, atol=1e-6)

    with torch.no_grad():
        clip.visual.proj.mul_(-1.0)
    changed = teacher_module.build_teacher(clip_model=clip)
    assert changed.fingerprint != teacher.fingerprint
    calls = []
    original_embed = changed.embed
    changed.embed = lambda x: (calls.append(len(x)), original_embed(x))[1]
    second = embed(changed)
    assert sum(calls) == 7
    np.testing.assert_allclose(second, -first, rtol=1e-5, atol=1e-6)


def test_truncated_cache_is_rebuilt(tmp_path, image_paths):
    cache_file = tmp_path / "c.npz"
    expected = run(CountingEncoder(), image_paths, cache_file)
    data = cache_file.read_bytes()
    cache_file.write_bytes(data[: len(data) // 2])
    encoder = CountingEncoder()
    messages = []
    out = run(encoder, image_paths, cache_file, messages=messages)
    assert encoder.images_seen == 7
    np.testing.assert_array_equal(out, expected)
    assert any("unreadable" in m and "recomputing" in m for m in messages)
    again = CountingEncoder()
    run(again, image_paths, cache_file)
    assert again.images_seen == 0


@pytest.mark.parametrize("foreign", ["npy", "garbage", "empty", "npz_without_key", "wrong_rows",
                                     "non_finite"])
def test_foreign_cache_file_is_rebuilt(tmp_path, image_paths, foreign):
    cache_file = tmp_path / "c.npz"
    key_hash = caches.cache_key_hash({"teacher": "abc"}, image_paths, SIZE, MEAN, STD)
    if foreign == "npy":
        with open(cache_file, "wb") as handle:
            np.save(handle, np.zeros((7, 5), np.float32))
    elif foreign == "garbage":
        cache_file.write_bytes(b"\x00garbage" * 100)
    elif foreign == "empty":
        cache_file.write_bytes(b"")
    elif foreign == "npz_without_key":
        np.savez(cache_file, embeddings=np.zeros((7, 5), np.float32))
    elif foreign == "wrong_rows":
        np.savez(cache_file, key=np.array(key_hash), embeddings=np.zeros((6, 5), np.float32))
    else:
        bad = np.zeros((7, 5), np.float32)
        bad[2, 1] = np.nan
        np.savez(cache_file, key=np.array(key_hash), embeddings=bad)
    encoder = CountingEncoder()
    messages = []
    out = run(encoder, image_paths, cache_file, messages=messages)
    assert encoder.images_seen == 7 and out.shape == (7, 5) and np.isfinite(out).all()
    assert any("recomputing" in m for m in messages)
    again = CountingEncoder()
    np.testing.assert_array_equal(run(again, image_paths, cache_file), out)
    assert again.images_seen == 0


def test_missing_image_fails_before_encoding(tmp_path, image_paths):
    encoder = CountingEncoder()
    with pytest.raises(FileNotFoundError, match="nope.png"):
        run(encoder, image_paths + [str(tmp_path / "nope.png")], tmp_path / "c.npz")
    assert encoder.images_seen == 0
    assert not (tmp_path / "c.npz").exists()


def test_non_finite_encoder_output_is_not_cached(tmp_path, image_paths):
    def broken(images):
        out = torch.zeros(len(images), 2)
        out[0, 0] = float("nan")
        return out

    with pytest.raises(ValueError, match="non-finite"):
        run(broken, image_paths, tmp_path / "c.npz")
    assert not (tmp_path / "c.npz").exists()
    with pytest.raises(ValueError, match="no images"):
        run(CountingEncoder(), [], tmp_path / "c.npz")


def test_pseudo_label_settings_need_no_teacher_pass(tmp_path, image_paths):
    """Temperature, threshold, partial and text features apply on top of the cached embeddings."""
    encoder = CountingEncoder(dim=6)
    embeddings = torch.from_numpy(run(encoder, image_paths, tmp_path / "c.npz"))
    embeddings = torch.nn.functional.normalize(embeddings, dim=1)
    text = torch.nn.functional.normalize(torch.randn(4, 6, generator=torch.Generator().manual_seed(3)),
                                         dim=1)
    results = {(t, th, p): teacher_module.pseudo_labels_from_embeddings(embeddings, text, t, th, p)[0]
               for t in (0.01, 1.0) for th in (0.1, 0.3) for p in (0.0, 0.5)}
    assert encoder.images_seen == 7
    assert len({tuple(q.flatten().tolist()) for q in results.values()}) > 1


def test_official_set_cache_keeps_what_it_read_in_memory(demo_root, tmp_path):
    """A second call for the same encoder and split returns the array the first one returned,
    without reading the file; ``keep=False`` keeps nothing (the next call reads the file)."""
    image_dir = datasets.dataset_dir(demo_root, "pascal") / datasets.get_dataset_info("pascal").image_root
    cache = caches.OfficialSetCache(str(demo_root), "pascal", image_dir, tmp_path / "cache", batch_size=8,
                                    num_workers=0, device=torch.device("cpu"), log=lambda message: None)
    encoder = CountingEncoder()
    spec = caches.Encoder(encoder, {"teacher": "abc"}, "teacher", SIZE, MEAN, STD)
    first = cache.embeddings("train", spec)
    seen = encoder.images_seen
    cache.cache_file("train", spec).unlink()        # reading it now would mean a new pass
    assert cache.embeddings("train", spec) is first and encoder.images_seen == seen
    other = caches.Encoder(CountingEncoder(seed=1), {"teacher": "other"}, "teacher", SIZE, MEAN, STD)
    assert not np.array_equal(cache.embeddings("train", other), first)

    once = cache.embeddings("val", spec, keep=False)
    seen = encoder.images_seen
    again = cache.embeddings("val", spec, keep=False)
    assert again is not once and encoder.images_seen == seen     # read from its file
    np.testing.assert_array_equal(again, once)
