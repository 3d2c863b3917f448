"""The teacher's input as VLPL published it (``--teacher-view original``), the repaired
``clip`` view, both flips cached, and cached pseudo-labels equal to online ones batch by batch."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import caches
import datasets
import engine
import config as config_module
import main_clip
import methods
import teacher as teacher_module
from conftest import demo_args
from methods.vlpl import EMPL


def random_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("width,height", [(500, 333), (97, 211), (448, 448), (1023, 17)])
@pytest.mark.parametrize("flip", [False, True])
def test_original_view_is_the_published_pipeline(width, height, flip):
    """The original code's batch (torchvision transforms on the PIL image: Resize 448, flip,
    ToTensor, ImageNet Normalize) resized on the tensor to 336 without antialiasing."""
    image = random_image(width, height, seed=width + height)
    student = T.Compose([T.Resize((448, 448)), T.RandomHorizontalFlip(p=1.0 if flip else 0.0), T.ToTensor(),
                         T.Normalize(datasets.IMAGENET_MEAN, datasets.IMAGENET_STD)])
    expected = T.Resize((336, 336), interpolation=T.InterpolationMode.BILINEAR, antialias=False)(
        student(image)[None])[0]
    ours = teacher_module.teacher_input(image, flip, "original")
    assert ours.shape == (3, 336, 336) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    if flip:  # a flip is a flip of the whole input (to rounding: interpolation is not exactly mirror-symmetric)
        torch.testing.assert_close(ours, torch.flip(teacher_module.teacher_input(image, False, "original"), dims=[2]),
                                   rtol=0, atol=1e-3)


@pytest.mark.parametrize("flip", [False, True])
def test_clip_view_is_clip_normalisation_and_a_direct_resize(flip):
    image = random_image(301, 157, seed=3)
    expected = T.Compose([T.RandomHorizontalFlip(p=1.0 if flip else 0.0), T.Resize((336, 336)), T.ToTensor(),
                          T.Normalize(datasets.CLIP_MEAN, datasets.CLIP_STD)])(image)
    torch.testing.assert_close(teacher_module.teacher_input(image, flip, "clip"), expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="unknown teacher view 'imagenet'"):
        teacher_module.teacher_input(image, flip, "imagenet")


def test_both_flips_are_cached_and_a_view_never_reads_another_views_cache(tmp_path, tiny_teacher):
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        random_image(40 + 7 * i, 30 + 3 * i, seed=i).save(paths[-1])
    cache_file, messages = tmp_path / "teacher.npz", []

    def embed(view: str) -> np.ndarray:
        encoder = tiny_teacher.encoder(view)
        return caches.cached_embeddings(encoder.encode, encoder.key, paths, encoder.image_size, encoder.mean,
                                        encoder.std, cache_file, batch_size=2, log=messages.append,
                                        views=encoder.views)
    original = embed("original")
    assert original.shape == (5, 2, tiny_teacher.embed_dim)
    for index in (0, 4):
        image = Image.open(paths[index]).convert("RGB")
        for flip in (False, True):
            direct = tiny_teacher.clip_model.encode_image(
                teacher_module.teacher_input(image, flip, "original", size=tiny_teacher.input_size)[None])
            np.testing.assert_allclose(original[index, int(flip)], direct[0].detach().numpy(), rtol=1e-4, atol=1e-5)
    clip = embed("clip")
    assert "was made for other inputs" in messages[-2] and not np.allclose(clip, original)
    np.testing.assert_array_equal(embed("clip"), clip)
    assert messages[-1].endswith(f"using cached embeddings {cache_file}")


class RecordingEMPL(EMPL):
    """EM_PL that records the pseudo-labels of every training batch it sees."""
    name = "recording_EM_PL"
    seen: list = []

    def loss(self, inputs, epoch):
        RecordingEMPL.seen.append((epoch, inputs.index.clone(), inputs.pseudo.clone()))
        return super().loss(inputs, epoch)


def test_cached_pseudo_labels_equal_online_ones_for_every_flipped_batch(demo_root, tmp_path, monkeypatch):
    monkeypatch.setitem(methods.REGISTRY, RecordingEMPL.name, RecordingEMPL)
    batches = {}
    for mode in ("cached", "online"):
        RecordingEMPL.seen = []
        summary = main_clip.main(demo_args(demo_root, tmp_path, "-l", RecordingEMPL.name, "--pseudo-labels", mode,
                                           "--run-name", mode, "-p", "0.1"))
        batches[mode] = (RecordingEMPL.seen, summary)
    (cached, cached_summary), (online, online_summary) = batches["cached"], batches["online"]
    assert len(cached) == len(online) == 16  # 2 epochs x 8 batches
    for (epoch_c, index_c, pseudo_c), (epoch_o, index_o, pseudo_o) in zip(cached, online, strict=True):
        assert epoch_c == epoch_o and torch.equal(index_c, index_o)
        assert torch.equal(pseudo_c, pseudo_o)
    assert cached_summary["best_test_map"] == online_summary["best_test_map"]
    # The run drew flips, and they matter: some image's pseudo-labels differ between its flips.
    trainer = engine.Trainer(config_module.resolve_config(demo_args(demo_root, tmp_path / "t", "-l", "EM_PL")),
                             tmp_path / "t" / "run", main_clip.setup(config_module.resolve_config(
                                 demo_args(demo_root, tmp_path / "t", "-l", "EM_PL"))))
    trainer.make_pseudo_labels()
    labels = trainer.labels
    assert not torch.equal(labels.pseudo, labels.pseudo_flipped)
    flips = torch.zeros(8, dtype=torch.bool)
    flips[::2] = True
    rows = torch.arange(8)
    expected = torch.where(flips[:, None], labels.pseudo_flipped[rows], labels.pseudo[rows])
    assert torch.equal(labels.batch_pseudo(rows, flips), expected)


def test_a_clip_tower_student_sees_the_teacher_view(demo_root, tmp_path):
    for view in ("original", "clip"):
        config = config_module.resolve_config(demo_args(demo_root, tmp_path / view, "-m", "clip_vision", "-l", "an",
                                                    "--teacher-view", view))
        trainer = engine.Trainer(config, tmp_path / view / "run", main_clip.setup(config))
        stage = trainer.build_stage(engine.END_TO_END, 1)
        dataset = stage.loaders["train"].dataset
        item = dataset[(5, True)]
        image = Image.open(dataset.image_paths[5]).convert("RGB")
        expected = teacher_module.teacher_input(image, True, view, size=config["image_size"])
        assert item["flip"] is True and torch.equal(item["image"], expected)
