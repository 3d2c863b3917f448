"""--augmentation (augment.py): DualCoOp's training transform against its code, and its place in
the data path.

* ``RandAugment()`` of the pip package randaugment 1.0.2 (the one DualCoOp's README installs) is
  the reference: its random calls are routed to a twin of the generator ours draws from, so both
  make the same choices, and the images must then be equal to the bit.
* DualCoOp's ``CutoutPIL`` (dataloaders/helper.py; not in any package) is written plainly in numpy here.
"""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from PIL import Image

import augment
import config as config_module
import datasets
from errors import RunError

# The reference implementation (requirements.txt pins it).
from randaugment import randaugment as randaugment_package


def random_image(seed: int, size=(24, 24)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture
def package(monkeypatch):
    """The package's module, its random calls drawn from ``package.twin`` (set per test): Python's
    random.random / choice / randint and numpy's np.random.randint, in the calls' order."""
    monkeypatch.setattr(np, "int", int, raising=False)      # the package predates numpy 1.24
    twin = {}
    shim = types.SimpleNamespace(
        random=lambda: twin["rng"].random(),
        choice=lambda seq: seq[int(twin["rng"].integers(len(seq)))],
        randint=lambda low, high: low + int(twin["rng"].integers(high - low + 1)))
    monkeypatch.setattr(randaugment_package, "random", shim)
    monkeypatch.setattr(np.random, "randint", lambda low, high=None: int(
        twin["rng"].integers(low, high) if high is not None else twin["rng"].integers(low)))

    def route(rng):
        twin["rng"] = rng
    randaugment_package.route = route
    randaugment_package.seed = lambda value: route(np.random.default_rng(value))
    return randaugment_package


def assert_same_image(ours: Image.Image, theirs: Image.Image) -> None:
    assert ours.mode == theirs.mode and ours.size == theirs.size
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


@pytest.mark.parametrize("size", [(24, 24), (20, 28)])
def test_every_operation_at_every_level_equals_the_package(package, size):
    image = random_image(1, size)
    changed = 0
    for name in package.RandAugment.get_trans_list():
        for level in augment.RANDAUGMENT_LEVELS:
            for seed in range(3):          # the sign (and Cutout's centre) the operation draws
                package.seed(seed)
                theirs = package.SubPolicy(1.0, name, level, 0.0, name, level)(image)
                op = augment.RANDAUGMENT_OPS[name]
                rng = np.random.default_rng(seed)
                rng.random()            # SubPolicy's coin, drawn before the operation's own draws
                ours = op.apply(image, op.magnitudes[level], rng)
                assert_same_image(ours, theirs)
                changed += not np.array_equal(np.asarray(ours), np.asarray(image))
    assert changed > 300        # the operations do change the image
    assert list(augment.RANDAUGMENT_OPS) == package.RandAugment.get_trans_list()


def test_rand_augment_equals_the_package_policy_for_policy(package):
    image = random_image(2)
    policy = package.RandAugment()      # its 18,225 policies, listed once
    applied = 0
    for seed in range(150):
        package.seed(seed)
        theirs = policy(image)
        ours = augment.rand_augment(image, np.random.default_rng(seed))
        assert_same_image(ours, theirs)
        applied += not np.array_equal(np.asarray(ours), np.asarray(image))
    assert 50 < applied < 150   # each choice applies with probability 0.5 (and some leave the image as is)


def plain_cutout_pil(pixels: np.ndarray, rng: np.random.Generator, factor: float = 0.5) -> np.ndarray:
    """DualCoOp's CutoutPIL on an H x W x 3 array: h is the width (its size[0]), the rectangle from
    (x1, y1) to (x2, y2) inclusive, clipped to the image."""
    out = pixels.copy()
    h, w = pixels.shape[1], pixels.shape[0]
    h_cut, w_cut = int(factor * h + 0.5), int(factor * w + 0.5)
    y_c, x_c = rng.integers(h), rng.integers(w)
    y1, y2 = min(max(y_c - h_cut // 2, 0), h), min(max(y_c + h_cut // 2, 0), h)
    x1, x2 = min(max(x_c - w_cut // 2, 0), w), min(max(x_c + w_cut // 2, 0), w)
    fill = rng.integers(0, 256, size=3)
    out[y1:y2 + 1, x1:x2 + 1] = fill      # rows are y, columns x; numpy clips the end
    return out


@pytest.mark.parametrize("size", [(16, 16), (9, 9), (1, 1)])
def test_cutout_pil_equals_a_plain_computation(size):
    image = random_image(3, size)
    for seed in range(40):
        ours = augment.cutout_pil(image, np.random.default_rng(seed))
        expected = plain_cutout_pil(np.asarray(image), np.random.default_rng(seed))
        np.testing.assert_array_equal(np.asarray(ours), expected)
    assert not np.array_equal(np.asarray(augment.cutout_pil(image, np.random.default_rng(0))), np.asarray(image)) \
        or size == (1, 1)


def test_dualcoop_augment_is_cutout_then_rand_augment(package):
    image = random_image(4)
    policy = package.RandAugment()
    for seed in range(30):
        ours = augment.dualcoop_augment(image, np.random.default_rng(seed))
        twin = np.random.default_rng(seed)
        cut = Image.fromarray(plain_cutout_pil(np.asarray(image), twin))
        package.route(twin)          # RandAugment draws where the cutout left the stream
        assert_same_image(ours, policy(cut))


# -- in the data path ------------------------------------------------------------------------------

def demo_set(root, augmentation, train=True, **kwargs):
    bench = datasets.load_benchmark(root, "pascal")
    split = bench.train if train else bench.val
    return datasets.MultiLabelDataset([bench.image_dir / p for p in split.images], split.labels_obs, split.labels,
                                      32, train=train, augmentation=augment.AUGMENTATIONS[augmentation], **kwargs)


def expected_input(path, seed, size=32):
    from torchvision import transforms
    image = datasets.open_rgb(path).resize((size, size), Image.Resampling.BILINEAR)
    image = augment.dualcoop_augment(image, np.random.default_rng(seed))
    tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    return transforms.Normalize(datasets.IMAGENET_MEAN, datasets.IMAGENET_STD)(tensor)


def test_a_training_item_is_its_seed_s_augmentation_and_never_flipped(demo_root):
    train = demo_set(demo_root, "cutout_randaugment")
    for index, seed in ((0, 5), (3, 2 ** 61 + 7)):
        for flip in (False, True):
            item = train[datasets.SampledItem(index, flip, None, seed)]
            assert item["flip"] is False
            torch.testing.assert_close(item["image"], expected_input(train.image_paths[index], seed),
                                       atol=1e-6, rtol=0)
    a, b = (train[datasets.SampledItem(0, False, None, seed)]["image"] for seed in (1, 2))
    assert not torch.equal(a, b)


def test_flip_augmentation_and_evaluation_sets_are_unchanged(demo_root):
    flip = demo_set(demo_root, "flip")
    plain = datasets.MultiLabelDataset(flip.image_paths, flip.observed.numpy(), flip.clean.numpy(), 32, train=True)
    for item in ((0, True), (1, False)):
        assert torch.equal(flip[item]["image"], plain[item]["image"])
        assert flip[item]["flip"] is item[1]
    val = demo_set(demo_root, "flip", train=False)
    val_plain = datasets.MultiLabelDataset(val.image_paths, val.observed.numpy(), val.clean.numpy(), 32, train=False)
    assert torch.equal(val[2]["image"], val_plain[2]["image"])


def test_an_augmentation_with_a_transform_refuses_a_teacher_view(demo_root):
    with pytest.raises(ValueError, match="--augmentation flip"):
        demo_set(demo_root, "cutout_randaugment", view=lambda image, flip: torch.zeros(3, 8, 8))


def test_seeds_are_drawn_last_and_shard_with_the_items():
    plain = datasets.AugmentationSampler(11, torch.Generator().manual_seed(7), num_view_flips=2).draw()
    order, flips, view_flips, seeds = datasets.AugmentationSampler(
        11, torch.Generator().manual_seed(7), num_view_flips=2, seeds=True).draw()
    for before, now in zip(plain, (order, flips, view_flips)):
        assert torch.equal(before, now)
    assert seeds.dtype == torch.int64 and len(set(seeds.tolist())) == 11 and int(seeds.min()) >= 0
    items = list(datasets.AugmentationSampler(11, torch.Generator().manual_seed(7), seeds=True))
    order2, flips2, seeds2 = datasets.AugmentationSampler(11, torch.Generator().manual_seed(7), seeds=True).draw()
    assert items[3] == datasets.SampledItem(int(order2[3]), bool(flips2[3]), None, int(seeds2[3]))
    ranks = [datasets.AugmentationSampler(11, torch.Generator().manual_seed(7), rank=r, world_size=2,
                                          seeds=True).draw()[2] for r in (0, 1)]
    padded = torch.cat([seeds2, seeds2[:1]])
    assert torch.equal(ranks[0], padded[0::2]) and torch.equal(ranks[1], padded[1::2])


# -- the setting ---------------------------------------------------------------------------------

def resolved(*argv):
    parser = config_module.get_args_parser()
    return config_module.resolve_config(parser.parse_args(["--data-root", "/nonexistent", *argv]))


def test_dualcoop_trains_with_its_augmentation_and_every_other_method_with_the_flip():
    assert resolved("-l", "DualCoOp", "--dataset", "coco")["augmentation"] == "cutout_randaugment"
    assert resolved("-l", "DualCoOp", "--dataset", "pascal", "--augmentation", "flip")["augmentation"] == "flip"
    assert resolved("-l", "VLPL", "--dataset", "pascal")["augmentation"] == "flip"
    assert resolved("-l", "an", "--dataset", "coco", "--augmentation", "cutout_randaugment")["augmentation"] \
        == "cutout_randaugment"


def test_a_flip_run_keeps_its_name_and_an_old_folder_reads_as_flip():
    config = resolved("-l", "VLPL", "--dataset", "pascal")
    without = {key: value for key, value in config.items() if key != "augmentation"}
    assert config_module.default_run_name(config) == config_module.default_run_name(without)
    assert config_module.as_recorded_now(without)["augmentation"] == "flip"
    other = dict(config, augmentation="cutout_randaugment")
    assert config_module.default_run_name(other) != config_module.default_run_name(config)


@pytest.mark.parametrize("argv, says", [
    (["--train-mode", "linear_fixed_features"], "cached features"),
    (["-m", "clip_vision"], "teacher's view"),
])
def test_a_transform_where_no_image_trains_is_refused_in_one_line(argv, says):
    with pytest.raises(RunError, match=says):
        resolved("-l", "an", "--dataset", "pascal", "--augmentation", "cutout_randaugment", *argv)


def test_loader_workers_give_the_inputs_of_the_main_process(demo_root):
    """The seeds come from the sampler, not from a worker's random state: 0 or 2 workers, the same
    augmented batches, and the same again from the same generator seed."""
    train = demo_set(demo_root, "cutout_randaugment")

    def batches(workers):
        sampler = datasets.AugmentationSampler(len(train), torch.Generator().manual_seed(3), seeds=True)
        loader = torch.utils.data.DataLoader(train, batch_size=4, sampler=sampler, num_workers=workers)
        return [batch["image"] for batch in loader]
    main, workers = batches(0), batches(2)
    assert len(main) == len(workers) > 1
    for a, b in zip(main, workers):
        assert torch.equal(a, b)
