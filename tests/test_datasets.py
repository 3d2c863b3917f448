"""datasets.py: registry, formatted-file validation, benchmark loading, transforms, Datasets."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import datasets


# SHA-256 of each list joined by newlines, as the class-name constants of datasets.py gave them
# (commit 70bf5b6) before they moved into classnames/<dataset>.txt: (release names, readable names).
CLASS_NAME_DIGESTS = {
    "pascal": ("7d877f185c807bc51b4cfb4f4202fc0b4e1c6724b782ba245fe36f8d254f0ad7",
               "1f7cfbcbbf2ee17b625d243bc275f90a20ae53da5e69e3bf4f7619afa5c6873b"),
    "coco": ("d7654b26101572841ed1cd80aa03aa60e35f1b8acb4aea6906c4066886f16e07",
             "d7654b26101572841ed1cd80aa03aa60e35f1b8acb4aea6906c4066886f16e07"),
    "nuswide": ("454b648677332111743cef9d74eacca941c9df4c61bd2d2a273c7d466941d04b",
                "454b648677332111743cef9d74eacca941c9df4c61bd2d2a273c7d466941d04b"),
    "cub": ("c796938559f4ddfa613047dbbcb2c17a830f92d65e78c6160e124aa0b357d961",
            "858e5c53f633f744f5ea26045096e847cf8bcf1b7a34d8c6f8e4a5ccc621f9ad"),
}


def digest(names) -> str:
    return hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()


def test_registry():
    expected = {"pascal": 20, "coco": 80, "nuswide": 81, "cub": 312}
    assert list(datasets.DATASETS) == list(expected)  # the paper's column order
    assert datasets.PAPER_TITLES == {"pascal": "VOC", "coco": "COCO", "nuswide": "NUS", "cub": "CUB"}
    for name, k in expected.items():
        info = datasets.get_dataset_info(name)
        assert info.name == name and info.num_classes == k and len(info.release_names) == k
        assert len(set(info.class_names)) == k
        assert (digest(info.release_names), digest(info.class_names)) == CLASS_NAME_DIGESTS[name], name
        assert not Path(info.image_root).is_absolute()
        assert info.text_feature_file.endswith(".npy")
    pascal = datasets.DATASETS["pascal"]
    assert pascal.class_names[:3] == ("aeroplane", "bicycle", "bird")
    assert pascal.class_names[10] == "dining table" and pascal.class_names[19] == "tv monitor"
    assert pascal.release_names[10] == "diningtable" and datasets.VOC_CLASSES == pascal.release_names
    coco, nuswide, cub = (datasets.DATASETS[name] for name in ("coco", "nuswide", "cub"))
    assert coco.class_names[0] == "person" and coco.class_names[-1] == "toothbrush"
    assert coco.release_names == coco.class_names == datasets.COCO_CLASS_NAMES
    assert list(nuswide.class_names) == sorted(nuswide.class_names) == list(datasets.NUSWIDE_CLASS_NAMES)
    assert cub.release_names[0] == "has_bill_shape::curved_(up_or_down)"
    assert cub.release_names[149] == "has_bill_length::about_the_same_as_head"
    assert cub.release_names[-1] == "has_wing_pattern::multi-colored"
    assert datasets.CUB_ATTRIBUTE_KEYS == cub.release_names
    assert cub.class_names[0] == "curved (up or down) bill shape"
    with pytest.raises(ValueError, match="pascal, coco, nuswide, cub"):
        datasets.get_dataset_info("voc")
    assert datasets.dataset_dir("DEMO", "pascal") == Path("DEMO") / "pascal"


def test_class_name_files_are_read_and_checked(tmp_path):
    """A line is NAME or NAME<tab>READABLE NAME; a malformed line or a name given twice is named."""
    good = tmp_path / "good.txt"
    good.write_text("diningtable\tdining table\ncat\n", encoding="utf-8")
    assert datasets.read_class_names(good) == (("diningtable", "cat"), ("dining table", "cat"))
    for text, message in [("cat\n\ndog\n", "bad.txt:2"), ("a\tb\tc\n", "bad.txt:1"), ("cat \n", "bad.txt:1"),
                          ("cat\ndog\tcat\n", "given twice: cat")]:
        bad = tmp_path / "bad.txt"
        bad.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            datasets.read_class_names(bad)


# ---------------------------------------------------------------------------------------------
# Formatted files
# ---------------------------------------------------------------------------------------------

def write_formatted(root: Path, name: str, n_train: int = 30, n_val: int = 10, k: int = 20,
                    images: bool = True, seed: int = 0) -> dict:
    """Formatted files (and tiny image files) for ``name`` under ``root``; returns the arrays."""
    info = datasets.get_dataset_info(name)
    rng = np.random.RandomState(seed)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for phase, n in (("train", n_train), ("val", n_val)):
        names = np.array([f"{phase}_{i:03d}.jpg" for i in range(n)])
        labels = (rng.rand(n, k) < 0.2).astype(np.float64)
        labels[np.arange(n), rng.randint(0, k, n)] = 1
        obs = np.zeros_like(labels)
        obs[np.arange(n), labels.argmax(axis=1)] = 1
        np.save(folder / f"formatted_{phase}_images.npy", names)
        np.save(folder / f"formatted_{phase}_labels.npy", labels)
        np.save(folder / f"formatted_{phase}_labels_obs.npy", obs)
        arrays[phase] = (names, labels, obs)
        if images:
            image_dir = folder / info.image_root
            image_dir.mkdir(parents=True, exist_ok=True)
            for i, image_name in enumerate(names):
                colour = tuple(int(c) for c in rng.randint(0, 256, 3))
                image = Image.new("RGB", (24 + i % 5, 20), colour)
                image.paste((255, 255, 255), (0, 0, 8, 20))   # not mirror-symmetric
                image.save(image_dir / image_name)
    return arrays


def test_load_formatted_roundtrip_and_object_images(tmp_path):
    arrays = write_formatted(tmp_path, "pascal", images=False)
    data = datasets.load_formatted(tmp_path, "pascal", "train")
    names, labels, obs = arrays["train"]
    assert data.images.dtype.kind == "U" and data.images.tolist() == names.tolist()
    np.testing.assert_array_equal(data.labels, labels)
    np.testing.assert_array_equal(data.labels_obs, obs)
    # Files from other code bases may hold object arrays of str: never unpickled, the error
    # names the file and the conversion (tests/test_inputs_hardening.py converts one).
    np.save(tmp_path / "pascal" / "formatted_val_images.npy",
            np.array(list(arrays["val"][0]), dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="formatted_val_images.npy holds a pickled object array"):
        datasets.load_formatted(tmp_path, "pascal", "val")


def test_load_formatted_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"formatted_train_images.npy.*format_pascal.py"):
        datasets.load_formatted(tmp_path, "pascal", "train")
    with pytest.raises(FileNotFoundError, match=r"data/nuswide/README.md"):
        datasets.load_formatted(tmp_path, "nuswide", "train")
    arrays = write_formatted(tmp_path, "pascal", images=False)
    folder = tmp_path / "pascal"

    (folder / "formatted_train_labels_obs.npy").unlink()
    with pytest.raises(FileNotFoundError, match="generate_observed_labels.py --dataset pascal "
                                                f"--data-root {tmp_path}"):
        datasets.load_formatted(tmp_path, "pascal", "train")

    names, labels, obs = arrays["train"]
    np.save(folder / "formatted_train_labels_obs.npy", obs)
    np.save(folder / "formatted_train_images.npy", names[:-1])
    with pytest.raises(ValueError, match="formatted_train_labels.npy has 30 rows but "
                                         ".*formatted_train_images.npy lists 29"):
        datasets.load_formatted(tmp_path, "pascal", "train")

    np.save(folder / "formatted_train_images.npy", names)
    bad = labels.copy()
    bad[2, 3] = 0.5
    np.save(folder / "formatted_train_labels.npy", bad)
    with pytest.raises(ValueError, match="formatted_train_labels.npy: labels must be 0/1"):
        datasets.load_formatted(tmp_path, "pascal", "train")

    np.save(folder / "formatted_train_labels.npy", labels[:, :19])
    with pytest.raises(ValueError, match="has 19 classes, the dataset has 20"):
        datasets.load_formatted(tmp_path, "pascal", "train")

    np.save(folder / "formatted_train_labels.npy", labels)
    np.save(folder / "formatted_train_labels_obs.npy", obs[:-1])
    with pytest.raises(ValueError, match="formatted_train_labels_obs.npy has shape"):
        datasets.load_formatted(tmp_path, "pascal", "train")

    stale = obs.copy()
    stale[0] = 0
    stale[0, np.argmin(labels[0])] = 1            # an observed positive that is not a positive
    np.save(folder / "formatted_train_labels_obs.npy", stale)
    with pytest.raises(ValueError, match="disagrees with"):
        datasets.load_formatted(tmp_path, "pascal", "train")


def test_load_benchmark(tmp_path):
    arrays = write_formatted(tmp_path, "pascal", n_train=30, n_val=10)
    splits = datasets.load_benchmark(tmp_path, "pascal")
    train_idx, val_idx = datasets.split_train_val(30)
    names, labels, obs = arrays["train"]
    assert splits.image_dir == tmp_path / "pascal" / "VOCdevkit/VOC2012/JPEGImages"
    assert splits.train.images.tolist() == names[train_idx].tolist()
    np.testing.assert_array_equal(splits.val.labels, labels[val_idx])
    np.testing.assert_array_equal(splits.train.labels_obs, obs[train_idx])
    np.testing.assert_array_equal(splits.train_indices, train_idx)
    assert splits.test.images.tolist() == arrays["val"][0].tolist()
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 6, 10)
    assert splits.image_paths("test")[0] == str(splits.image_dir / "val_000.jpg")

    # COCO's image root is the dataset folder itself
    write_formatted(tmp_path, "coco", k=80, images=False)
    coco = datasets.load_benchmark(tmp_path, "coco", check_images=False)
    assert coco.image_dir == tmp_path / "coco"


def test_load_benchmark_missing_image(tmp_path):
    write_formatted(tmp_path, "pascal")
    (tmp_path / "pascal" / "VOCdevkit/VOC2012/JPEGImages" / "val_004.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"val_004.jpg \(1 of 40 missing\)"):
        datasets.load_benchmark(tmp_path, "pascal")
    datasets.load_benchmark(tmp_path, "pascal", check_images=False)


# ---------------------------------------------------------------------------------------------
# Transforms and Dataset classes
# ---------------------------------------------------------------------------------------------

def test_build_transform(tmp_path):
    image = Image.new("RGB", (30, 17), (255, 0, 128))
    out = datasets.build_transform(12, train=False)(image)
    assert out.shape == (3, 12, 12)
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(datasets.IMAGENET_MEAN)) \
        / torch.tensor(datasets.IMAGENET_STD)
    torch.testing.assert_close(out[:, 5, 5], expected)
    clip = datasets.build_transform(8, train=True, mean=datasets.CLIP_MEAN, std=datasets.CLIP_STD)
    assert clip(image).shape == (3, 8, 8)


def test_multilabel_dataset_views_and_flip(tmp_path):
    write_formatted(tmp_path, "pascal", n_train=12, n_val=2)
    splits = datasets.load_benchmark(tmp_path, "pascal")
    paths = splits.image_paths("train")
    plain = datasets.ImageListDataset(paths, 16, datasets.CLIP_MEAN, datasets.CLIP_STD)
    plain_transform = datasets.build_transform(16, train=False, mean=datasets.CLIP_MEAN, std=datasets.CLIP_STD)

    def teacher(image, flip):  # a teacher view: the (image, flip) the student drew
        return plain_transform(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image)
    evaluation = datasets.MultiLabelDataset(paths, splits.train.labels_obs, splits.train.labels,
                                            20, train=False, teacher_view=teacher)
    item = evaluation[3]
    assert set(item) == {"image", "observed", "clean", "index", "flip", "teacher_image"}
    assert item["image"].shape == (3, 20, 20) and item["index"] == 3 and item["flip"] is False
    assert item["observed"].dtype == torch.float32
    np.testing.assert_array_equal(item["clean"].numpy(), splits.train.labels[3])
    assert torch.equal(item["teacher_image"], plain[3][0])
    assert plain[3][1] == 3

    torch.manual_seed(0)
    training = datasets.MultiLabelDataset(paths, splits.train.labels_obs, splits.train.labels,
                                          20, train=True, teacher_view=teacher)
    flips = []
    for i in range(len(training)):
        item = training[i]
        reference = evaluation[i]
        flipped = torch.equal(item["image"], torch.flip(reference["image"], dims=[2]))
        same = torch.equal(item["image"], reference["image"])
        assert flipped or same
        # the teacher view shares the student's flip
        expected = torch.flip(plain[i][0], dims=[2]) if flipped else plain[i][0]
        assert torch.equal(item["teacher_image"], expected)
        assert item["flip"] == (flipped and not same)
        flips.append(flipped and not same)
    assert any(flips) and not all(flips)
    assert "teacher_image" not in datasets.MultiLabelDataset(
        paths, splits.train.labels_obs, splits.train.labels, 20, train=False)[0]
    # A view replaces the student's own resize and normalisation, and gets the drawn flip.
    viewed = datasets.MultiLabelDataset(paths, splits.train.labels_obs, splits.train.labels, 20, train=True,
                                        view=teacher)
    assert torch.equal(viewed[(4, True)]["image"], teacher(Image.open(paths[4]).convert("RGB"), True))


def test_datasets_check_files_at_construction(tmp_path):
    write_formatted(tmp_path, "pascal", n_train=6, n_val=2)
    splits = datasets.load_benchmark(tmp_path, "pascal")
    paths = splits.image_paths("train")
    Path(paths[2]).unlink()
    with pytest.raises(FileNotFoundError, match=Path(paths[2]).name):
        datasets.MultiLabelDataset(paths, splits.train.labels_obs, splits.train.labels, 8, True)
    with pytest.raises(FileNotFoundError, match=Path(paths[2]).name):
        datasets.ImageListDataset(paths, 8, datasets.IMAGENET_MEAN, datasets.IMAGENET_STD)
    with pytest.raises(ValueError, match="must be N x K"):
        datasets.MultiLabelDataset(paths[:2], splits.train.labels_obs, splits.train.labels, 8,
                                   True)


@pytest.mark.parametrize("sampler_kind", ["none", "range", "augmentation"])
def test_feature_batches_match_a_dataloader(sampler_kind):
    """FeatureBatches yields what a DataLoader over the same sampler yields (the short last batch too)."""
    rng = np.random.default_rng(0)
    dataset = datasets.FeatureDataset(rng.standard_normal((23, 5)), rng.integers(-1, 2, (23, 4)),
                                      rng.integers(0, 2, (23, 4)))

    def sampler():
        if sampler_kind == "range":
            return range(1, 23, 2)  # one rank's share under torchrun
        if sampler_kind == "augmentation":
            return datasets.AugmentationSampler(23, torch.Generator().manual_seed(4), rank=1, world_size=2)
        return None

    batches = list(datasets.FeatureBatches(dataset, 4, sampler()))
    reference = list(torch.utils.data.DataLoader(dataset, batch_size=4, sampler=sampler()))
    assert len(batches) == len(reference) == len(datasets.FeatureBatches(dataset, 4, sampler()))
    for got, expected in zip(batches, reference):
        assert set(got) == {"image", "index"}
        for key in got:
            assert torch.equal(torch.as_tensor(got[key]), expected[key]), key
    if sampler_kind == "augmentation":
        order, _ = datasets.AugmentationSampler(23, torch.Generator().manual_seed(4), rank=1, world_size=2).draw()
        assert torch.equal(torch.cat([b["index"] for b in batches]), order)


def test_feature_dataset_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="same number of rows"):
        datasets.FeatureDataset(np.zeros((3, 2)), np.zeros((4, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="batch_size"):
        datasets.FeatureBatches(datasets.FeatureDataset(np.zeros((3, 2)), np.zeros((3, 2)), np.zeros((3, 2))), 0)
