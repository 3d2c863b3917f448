"""DAMP (AEVLP's pseudo-labels) against a plain implementation of its algorithm, AEVLP's teacher
views against a torchvision pipeline composed as its dataset composes it, and the cached views
against direct encoding."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import caches
import datasets
from pseudo_labels import damp


# ----------------------------------------------------------------------------------------------
# Pseudo-labels
# ----------------------------------------------------------------------------------------------

def plain_damp(logits, observed, accumulated, grid_size, temp, eta, threshold, top_k, negative_ratio):
    """The algorithm written out image by image and class by class, on AEVLP's layout: logits
    is (B * (1 + g^2)) x K, view-major (the B whole images, then tile 0 of every image, ...)."""
    num_tiles = grid_size * grid_size
    batch = logits.shape[0] // (num_tiles + 1)
    num_classes = logits.shape[1]
    s = torch.softmax(logits / temp, dim=1).tolist()
    observed, accumulated = observed.tolist(), accumulated.tolist()
    acc_out, current = [], []
    for b in range(batch):
        whole = s[b]
        tiles = [s[batch * (1 + j) + b] for j in range(num_tiles)]
        cap = min(max(whole[c] * observed[b][c] for c in range(num_classes)), eta)
        final, score = [], []
        for c in range(num_classes):
            column = [tile[c] for tile in tiles]
            chosen = max(column) if max(column) > cap else min(column)
            final.append(0.5 * (whole[c] + chosen))
            score.append(0.5 * (whole[c] + sum(column) / num_tiles))
        row = [0] * num_classes
        for c in sorted(range(num_classes), key=lambda c: (-final[c], c))[:top_k]:
            row[c] = int(final[c] >= threshold)
        acc_out.append([row[c] if accumulated[b][c] == 0 else accumulated[b][c] for c in range(num_classes)])
        for c in sorted(range(num_classes), key=lambda c: (score[c], c))[:int(negative_ratio * num_classes)]:
            row[c] = 0
        current.append(row)
    return torch.tensor(acc_out, dtype=torch.float64), torch.tensor(current, dtype=torch.int32)


def random_inputs(batch, grid_size, num_classes, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    views = torch.rand(batch, 1 + grid_size ** 2, num_classes, generator=g, dtype=torch.float64) * 0.2 + 0.1
    if ties:  # every class equal to the one before it: ties in every score
        views[..., 1::2] = views[..., 0::2][..., :num_classes // 2]
    observed = torch.zeros(batch, num_classes)
    observed[torch.arange(batch), torch.randint(num_classes, (batch,), generator=g)] = 1.0
    accumulated = (torch.rand(batch, num_classes, generator=g) < 0.2).float()
    return views, observed, accumulated


SETTINGS = [  # (grid, K, temp, eta, threshold, top_k, negative_ratio)
    (4, 20, 0.01, 0.0, 0.5, 3, 0.2),
    (4, 80, 0.01, 0.3, 0.5, 3, 0.3),
    (4, 81, 0.01, 0.3, 0.6, 3, 0.2),
    (5, 312, 0.1, 0.005, 0.005, 32, 0.2),
    (2, 7, 0.05, 0.1, 0.2, 7, 0.5),
    (1, 5, 0.02, 1.0, 0.0, 2, 0.0),
    (3, 12, 0.01, 0.2, 0.3, 4, 1.0),
]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("setting", SETTINGS)
def test_damp_equals_the_plain_algorithm(setting, ties):
    grid, num_classes, temp, eta, threshold, top_k, ratio = setting
    views, observed, accumulated = random_inputs(6, grid, num_classes, seed=grid * num_classes, ties=ties)
    originals = [t.clone() for t in (views, observed, accumulated)]
    acc, current = damp.damp_pseudo_labels(views, observed, accumulated, grid_size=grid, temp=temp, eta=eta,
                                           threshold=threshold, top_k=top_k, negative_ratio=ratio)
    logits = views.transpose(0, 1).reshape(-1, num_classes)   # AEVLP's layout
    expected_acc, expected_current = plain_damp(logits, observed, accumulated, grid, temp, eta, threshold,
                                                top_k, ratio)
    assert current.dtype == torch.int32 and acc.dtype == torch.float32
    assert torch.equal(current, expected_current)
    assert torch.equal(acc.double(), expected_acc)
    for before, after in zip(originals, (views, observed, accumulated)):
        assert torch.equal(before, after)   # nothing modified in place
    assert int((current > 0).sum(1).max()) <= top_k


@pytest.mark.parametrize("dataset", sorted(damp.DAMP_SETTINGS))
def test_published_settings_make_positives_and_clear_some(dataset):
    """On peaked similarities each dataset's settings give some positives, and the cleared
    classes make ``current`` differ from the (accumulated) labels taken before clearing."""
    s = damp.DAMP_SETTINGS[dataset]
    num_classes = datasets.get_dataset_info(dataset).num_classes
    views, observed, _ = random_inputs(16, s.grid_size, num_classes, seed=7)
    views[:, :, :3] += 0.2   # three strong classes
    views[:, 0, 3:6] += 0.2 * (num_classes < 300)
    zeros = torch.zeros(16, num_classes)
    kwargs = dict(grid_size=s.grid_size, temp=s.temp, eta=s.eta, threshold=s.threshold, top_k=s.top_k,
                  negative_ratio=s.negative_ratio)
    acc, current = damp.damp_pseudo_labels(views, observed, zeros, **kwargs)
    expected_acc, expected_current = plain_damp(views.transpose(0, 1).reshape(-1, num_classes), observed, zeros,
                                                s.grid_size, s.temp, s.eta, s.threshold, s.top_k, s.negative_ratio)
    assert torch.equal(current, expected_current) and torch.equal(acc.double(), expected_acc)
    assert current.sum() > 0


def test_all_ties_go_to_the_lower_class_index():
    """Equal logits: every score is 1/K exactly; the top_k lowest indices become positives
    (threshold reached with equality), the lowest indices are then cleared."""
    views = torch.zeros(2, 5, 8)
    acc, current = damp.damp_pseudo_labels(views, torch.eye(8)[:2], torch.zeros(2, 8), grid_size=2, temp=0.01,
                                           eta=0.3, threshold=0.125, top_k=3, negative_ratio=0.25)
    assert torch.equal(acc, torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0]] * 2, dtype=torch.float32))
    assert torch.equal(current, torch.tensor([[0, 0, 1, 0, 0, 0, 0, 0]] * 2, dtype=torch.int32))
    _, current = damp.damp_pseudo_labels(views, torch.eye(8)[:2], torch.zeros(2, 8), grid_size=2, temp=0.01,
                                         eta=0.3, threshold=0.1251, top_k=3, negative_ratio=0.25)
    assert current.sum() == 0


def test_eta_picks_the_tiles_max_or_min():
    """g = 2, K = 2, observed class 0. Class 1: weak globally, one strong tile (0.88), three
    weak. With eta = 0 its strongest tile counts (a positive); with eta = 1 the cap is class 0's
    global score (0.99995), above class 1's best tile, so its weakest tile counts (no positive)."""
    logits = torch.tensor([[1.0, 0.0], [0.0, 0.2], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])[None]
    kwargs = dict(grid_size=2, temp=0.1, threshold=0.4, top_k=2, negative_ratio=0.0)
    observed = torch.tensor([[1.0, 0.0]])
    _, strong = damp.damp_pseudo_labels(logits, observed, torch.zeros(1, 2), eta=0.0, **kwargs)
    _, weak = damp.damp_pseudo_labels(logits, observed, torch.zeros(1, 2), eta=1.0, **kwargs)
    assert strong.tolist() == [[1, 1]] and weak.tolist() == [[1, 0]]
    # Class 0's best tile equals the cap exactly (same logits as the whole image): the comparison
    # is strict, so its weakest tile (0.12) counts and 0.5 * (1 + 0.12) misses threshold 0.6.
    _, strict = damp.damp_pseudo_labels(logits, observed, torch.zeros(1, 2), eta=1.0,
                                        **{**kwargs, "threshold": 0.6})
    assert strict.tolist() == [[0, 0]]


def test_accumulated_keeps_its_nonzero_entries_and_dtype():
    views, observed, _ = random_inputs(4, 2, 6, seed=3)
    accumulated = torch.tensor([[0, -1, 0, 1, 0, 0]] * 4, dtype=torch.int32)
    acc, current = damp.damp_pseudo_labels(views, observed, accumulated, grid_size=2, temp=0.01, eta=0.3,
                                           threshold=0.0, top_k=6, negative_ratio=0.5)
    assert acc.dtype == torch.int32 and acc[:, 1].eq(-1).all() and acc[:, 3].eq(1).all()
    assert acc[:, [0, 2, 4, 5]].eq(1).all()       # threshold 0: every top-6 class before clearing
    assert current.sum(1).eq(3).all()              # three cleared after the accumulated copy
    assert acc.data_ptr() != accumulated.data_ptr()


def test_bad_shapes_are_refused():
    views, observed, accumulated = random_inputs(2, 2, 4, seed=0)
    kwargs = dict(temp=0.01, eta=0.3, threshold=0.5, top_k=2, negative_ratio=0.2)
    with pytest.raises(ValueError, match="B x 10 x K"):
        damp.damp_pseudo_labels(views, observed, accumulated, grid_size=3, **kwargs)
    with pytest.raises(ValueError, match="observed must be 2 x 4"):
        damp.damp_pseudo_labels(views, observed[:1], accumulated, grid_size=2, **kwargs)
    with pytest.raises(ValueError, match="top_k"):
        damp.damp_pseudo_labels(views, observed, accumulated, grid_size=2, **{**kwargs, "top_k": 5})


# ----------------------------------------------------------------------------------------------
# Views
# ----------------------------------------------------------------------------------------------

def random_image(width, height, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def torchvision_views(image, flips, grid_size, size):
    """AEVLP's sub_images: tx['pl'] (Resize((size, size)), RandomHorizontalFlip, ToTensor,
    ImageNet Normalize) on the image, then on each tile cut with integer tile sizes."""
    def tx(piece, flip):
        return T.Compose([T.Resize((size, size)), T.RandomHorizontalFlip(p=1.0 if flip else 0.0), T.ToTensor(),
                          T.Normalize(datasets.IMAGENET_MEAN, datasets.IMAGENET_STD)])(piece)
    width, height = image.size
    tw, th = width // grid_size, height // grid_size
    out = [tx(image, flips[0])]
    for y in range(grid_size):
        for x in range(grid_size):
            box = (max(0, x * tw), max(0, y * th), min(width, (x + 1) * tw), min(height, (y + 1) * th))
            out.append(tx(image.crop(box), flips[1 + y * grid_size + x]))
    return torch.stack(out)


@pytest.mark.parametrize("width,height,grid_size", [(101, 67, 4), (37, 53, 5), (500, 333, 4), (9, 13, 2)])
def test_views_are_aevlps_pipeline(width, height, grid_size):
    image = random_image(width, height, seed=width)
    v = 1 + grid_size ** 2
    drawn = torch.rand(v, generator=torch.Generator().manual_seed(height)) < 0.5
    for flips in ([False] * v, [True] * v, drawn.tolist()):
        ours = damp.aevlp_views(image, flips, grid_size=grid_size, size=64)
        assert ours.shape == (v, 3, 64, 64) and ours.dtype == torch.float32
        assert torch.equal(ours, torchvision_views(image, flips, grid_size, 64))


def test_tiles_drop_the_remainder_and_go_row_by_row():
    boxes = damp.tile_boxes(10, 7, 4)
    assert boxes[:4] == [(0, 0, 2, 1), (2, 0, 4, 1), (4, 0, 6, 1), (6, 0, 8, 1)]
    assert boxes[-1] == (6, 3, 8, 4) and len(boxes) == 16
    with pytest.raises(ValueError, match="too small for a 5 x 5 grid"):
        damp.tile_boxes(4, 100, 5)


def test_a_flip_mirrors_each_view_in_place():
    image = random_image(61, 45, seed=1)
    plain = damp.aevlp_views(image, [False] * 5, grid_size=2, size=32)
    flipped = damp.aevlp_views(image, [False, True, False, False, True], grid_size=2, size=32)
    assert torch.equal(flipped[[0, 2, 3]], plain[[0, 2, 3]])
    assert torch.equal(flipped[[1, 4]], torch.flip(plain[[1, 4]], dims=[-1]))
    assert not torch.equal(flipped[1], plain[1])


@pytest.mark.parametrize("grid_size", [2, 5])
def test_recipe_is_every_view_in_both_flips_view_major(grid_size):
    image = random_image(83, 59, seed=grid_size)
    recipe = pickle.loads(pickle.dumps(damp.aevlp_view_recipe(grid_size, size=48)))
    outputs = recipe(image)
    v = 1 + grid_size ** 2
    assert len(outputs) == 2 * v == 2 * recipe.num_views
    for flip in (False, True):
        views = damp.aevlp_views(image, [flip] * v, grid_size=grid_size, size=48)
        for index in range(v):
            assert torch.equal(outputs[2 * index + int(flip)], views[index])


def test_pick_flips_takes_each_views_drawn_flip():
    cached = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)
    flips = torch.tensor([[False, True, True], [True, False, False]])
    picked = damp.pick_flips(cached, flips)
    assert torch.equal(picked[0], cached[0, [0, 3, 5]]) and torch.equal(picked[1], cached[1, [1, 2, 4]])
    with pytest.raises(ValueError, match="do not match"):
        damp.pick_flips(cached, flips[:, :2])


def test_cached_views_equal_direct_encoding(tmp_path, tiny_teacher):
    grid, size = 2, tiny_teacher.input_size
    assert size == 64
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.png")
        random_image(41 + 9 * i, 30 + 5 * i, seed=10 + i).save(paths[-1])
    encoder = damp.aevlp_encoder(tiny_teacher, grid)
    messages = []

    def embed():
        return caches.cached_embeddings(encoder.encode, encoder.key, paths, encoder.image_size, encoder.mean,
                                        encoder.std, tmp_path / "aevlp.npz", batch_size=3, log=messages.append,
                                        views=encoder.views, dtype=encoder.dtype)
    cached = embed()
    assert cached.shape == (4, 2 * (1 + grid ** 2), tiny_teacher.embed_dim) and cached.dtype == np.float16
    flips = torch.rand(4, 1 + grid ** 2, generator=torch.Generator().manual_seed(5)) < 0.5
    assert flips.any() and not flips.all()
    picked = damp.pick_flips(torch.from_numpy(cached), flips)
    for index, path in enumerate(paths):
        views = damp.aevlp_views(Image.open(path), flips[index].tolist(), grid_size=grid, size=size)
        with torch.no_grad():
            direct = encoder.encode(views)
            unrounded = tiny_teacher.clip_model.encode_image(views).float()
        # The same numbers: the encoder rounds to float16 whether its output is cached or not.
        assert torch.equal(picked[index].float(), direct)
        torch.testing.assert_close(direct, unrounded, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(embed(), cached)
    assert messages[-1].endswith("using cached embeddings " + str(tmp_path / "aevlp.npz"))
    # The views' similarities feed DAMP end to end.
    text = torch.randn(6, tiny_teacher.embed_dim, generator=torch.Generator().manual_seed(0))
    views = damp.cosine_similarities(picked, text)
    assert views.shape == (4, 5, 6) and views.abs().max() <= 1 + 1e-6
    _, current = damp.damp_pseudo_labels(views, torch.eye(6)[:4], torch.zeros(4, 6), grid_size=grid, temp=0.01,
                                         eta=0.3, threshold=0.0, top_k=2, negative_ratio=0.0)
    assert current.sum(1).eq(2).all()
