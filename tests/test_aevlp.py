"""AEVLP (-l AEVLP): the sampler's per-view flips, DAMP pseudo-labels from the cached views equal to
recomputing the views, the caches of other teachers / grids / recipes never read, and the method
end to end on the demo data, resuming exactly."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import caches
import datasets
import engine
import losses
import config as config_module
import main_clip
import methods
import pseudo_labels
import teacher as teacher_module
from conftest import demo_args, run_once_and_resumed
from distributed import Distributed
from methods.aevlp import AEVLP
from pseudo_labels import aevlp_text, damp


# -- defaults and flags ------------------------------------------------------------------------

@pytest.mark.parametrize("dataset", ["pascal", "coco", "nuswide", "cub"])
def test_defaults_are_aevlps_protocol_teacher_and_damp_settings(dataset):
    config = config_module.resolve_config(main_clip.get_args_parser().parse_args(["-d", dataset, "-l", "AEVLP"]))
    published = {"pascal": (8, 8, 4, 0.01, 0.0, 0.5, 3, 0.2), "coco": (8, 16, 4, 0.01, 0.3, 0.5, 3, 0.3),
                 "nuswide": (10, 16, 4, 0.01, 0.3, 0.6, 3, 0.2), "cub": (10, 8, 5, 0.1, 0.005, 0.005, 32, 0.2)}
    assert (config["epochs"], config["bsize"], config["grid_size"], config["damp_temp"], config["damp_eta"],
            config["damp_threshold"], config["damp_top_k"], config["negative_ratio"]) == published[dataset]
    assert (config["teacher"], config["lr"], config["optimizer"], config["head_lr_mult"], config["patience"],
            config["max_drop"], config["text_gcn"]) == ("ViT-B-16", 1e-5, "adam", 10.0, 2, 2.0, True)
    assert AEVLP.pseudo_label_rule in pseudo_labels.RULES and AEVLP.needs_pseudo_labels


def test_damp_settings_are_checked_and_belong_to_aevlp():
    parser = main_clip.get_args_parser()
    for bad, message in ((["--damp-top-k", "21"], "--damp-top-k 21 exceeds the 20 classes"),
                         (["--train-mode", "linear_init"], "needs --train-mode end_to_end"),
                         (["--pseudo-labels", "online"], "drop --pseudo-labels online"),
                         (["--negative-ratio", "1.5"], "--negative-ratio must be <= 1.0"),
                         (["--grid-size", "0"], "--grid-size must be >= 1")):
        with pytest.raises(main_clip.RunError, match=message):
            config_module.resolve_config(parser.parse_args(["-l", "AEVLP", "--tiny-models", *bad]))
    with pytest.raises(main_clip.RunError, match="--grid-size is a setting of AEVLP, not of -l EM_PL"):
        config_module.resolve_config(parser.parse_args(["-l", "EM_PL", "--grid-size", "3"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["-l", "AEVLP", "--text-gcn", "yes"])
    assert config_module.resolve_config(parser.parse_args(["-l", "AEVLP", "--text-gcn", "off"]))["text_gcn"] is False


def test_the_loss_is_gpr_with_pseudo_labels_over_the_stage_epochs():
    config = config_module.resolve_config(main_clip.get_args_parser().parse_args(["-l", "AEVLP"]))
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 20, generator=generator, requires_grad=True)
    observed = torch.zeros(8, 20)
    observed[torch.arange(8), torch.randint(0, 20, (8,), generator=generator)] = 1
    pseudo = (torch.rand(8, 20, generator=generator) < 0.2).float()
    method = AEVLP.from_config(config, None, 8)
    for epoch in (1, 5, 8):
        inputs = methods.LossInputs(logits, torch.sigmoid(logits), torch.arange(8), observed, pseudo, observed)
        hp = AEVLP.hyperparameter_values(config)
        hp.use_pl = True
        expected = losses.gpr_loss(logits, observed, pseudo, hp, epoch=epoch, num_epochs=8)
        assert torch.equal(method.loss(inputs, epoch), expected)
    # The pseudo-labels change the loss (use_pl is on).
    inputs = methods.LossInputs(logits, torch.sigmoid(logits), torch.arange(8), observed, torch.zeros(8, 20), observed)
    assert not torch.equal(method.loss(inputs, 2), losses.gpr_loss(logits, observed, pseudo, hp, epoch=2, num_epochs=8))


# -- the sampler's view flips --------------------------------------------------------------------

def test_view_flips_are_drawn_after_the_order_and_flips_and_shard_with_them():
    plain = datasets.AugmentationSampler(11, torch.Generator().manual_seed(7)).draw()
    order, flips, view_flips = datasets.AugmentationSampler(11, torch.Generator().manual_seed(7),
                                                            num_view_flips=5).draw()
    assert torch.equal(order, plain[0]) and torch.equal(flips, plain[1]) and len(plain) == 2
    assert view_flips.shape == (11, 5) and view_flips.dtype == torch.bool and view_flips.any() and not view_flips.all()
    again = datasets.AugmentationSampler(11, torch.Generator().manual_seed(7), num_view_flips=5).draw()
    assert torch.equal(again[2], view_flips)
    # Two ranks: each takes every second item of the padded draw, view flips with their items.
    ranks = [datasets.AugmentationSampler(11, torch.Generator().manual_seed(7), rank=r, world_size=2,
                                          num_view_flips=5).draw() for r in (0, 1)]
    padded = [torch.cat([values, values[:1]]) for values in (order, flips, view_flips)]
    for rank, drawn in enumerate(ranks):
        for mine, everything in zip(drawn, padded):
            assert torch.equal(mine, everything[rank::2])
    items = list(datasets.AugmentationSampler(11, torch.Generator().manual_seed(7), num_view_flips=5))
    assert items[0] == (int(order[0]), bool(flips[0]), tuple(view_flips[0].tolist()))


def test_a_dataset_item_carries_its_view_flips(demo_root):
    bench = datasets.load_benchmark(demo_root, "pascal")
    dataset = datasets.MultiLabelDataset([bench.image_dir / p for p in bench.train.images[:2]],
                                         bench.train.labels_obs[:2], bench.train.labels[:2], 32, train=True)
    item = dataset[(1, True, (True, False, True))]
    assert item["index"] == 1 and item["flip"] is True
    assert torch.equal(item["view_flips"], torch.tensor([True, False, True]))
    assert "view_flips" not in dataset[(1, False)]


# -- DAMP pseudo-labels from the cache ------------------------------------------------------------

def aevlp_trainer(demo_root, tmp_path, *extra) -> engine.Trainer:
    config = config_module.resolve_config(demo_args(demo_root, tmp_path, "-l", "AEVLP", "--run-name", "t", *extra))
    (tmp_path / "t").mkdir()
    return engine.Trainer(config, tmp_path / "t", main_clip.setup(config))


def test_cached_views_give_the_pseudo_labels_of_recomputed_views(demo_root, tmp_path):
    run = aevlp_trainer(demo_root, tmp_path, "--grid-size", "2", "--damp-threshold", "0.05", "--negative-ratio", "0.1")
    rule = run.pseudo_labels
    assert isinstance(rule, pseudo_labels.DampRule) and rule.num_view_flips == 5
    run.make_pseudo_labels()
    stage = run.build_stage(engine.END_TO_END, 2)
    stage.generator.manual_seed(11)
    encoder = damp.aevlp_encoder(run.teacher, 2)
    text_features = run.setup.text_features
    settings = rule.settings
    checked = made = 0
    for batch in stage.loaders["train"]:
        index = torch.as_tensor(batch["index"])
        observed = run.labels.observed[index]
        ours = rule.batch(index, batch, observed.to(run.device)).cpu()
        # AEVLP's step: cut the views of each image with the drawn flips, run the teacher now.
        views = torch.stack([damp.aevlp_views(Image.open(run.benchmark.image_dir / run.benchmark.train.images[i]),
                                              flips.tolist(), grid_size=2, size=run.teacher.input_size)
                             for i, flips in zip(index.tolist(), batch["view_flips"])])
        with torch.no_grad():
            embeddings = encoder.encode(views.flatten(0, 1).to(run.device)).cpu().reshape(len(index), 5, -1)
        similarities = damp.cosine_similarities(embeddings, text_features)
        torch.testing.assert_close(similarities, damp.pick_flips(rule.similarities[index], batch["view_flips"]),
                                   rtol=0, atol=1e-6)
        _, expected = damp.damp_pseudo_labels(similarities, observed, torch.zeros_like(observed), grid_size=2,
                                              temp=settings.temp, eta=settings.eta, threshold=settings.threshold,
                                              top_k=settings.top_k, negative_ratio=settings.negative_ratio)
        assert torch.equal(ours, expected.float())
        assert torch.equal(rule.kept[index], ours)  # AEVLP keeps what it trains on
        checked += len(index)
        made += int(ours.sum())
    assert checked == len(run.benchmark.train.images) and made > 0
    # Some view flips differ from the student's flip, and from each other.
    assert batch["view_flips"].any() and not batch["view_flips"].all()


def test_a_cache_of_another_teacher_grid_or_recipe_is_never_read(demo_root, tmp_path, tiny_teacher):
    bench = datasets.load_benchmark(demo_root, "pascal")
    paths = [bench.image_dir / p for p in bench.train.images[:3]]
    other_weights = copy.deepcopy(tiny_teacher.clip_model)
    with torch.no_grad():
        other_weights.visual.conv1.weight.add_(1e-3)
    other_teacher = teacher_module.build_teacher(clip_model=other_weights)
    g2 = damp.aevlp_encoder(tiny_teacher, 2)
    encoders = {"g2": g2, "g3": damp.aevlp_encoder(tiny_teacher, 3), "other teacher": damp.aevlp_encoder(other_teacher, 2),
                "VLPL's view": tiny_teacher.encoder("original"),
                "float32": caches.Encoder(g2.encode, g2.key, g2.prefix, g2.image_size, g2.mean, g2.std, views=g2.views)}
    messages = []

    def embed(encoder):
        # One file for all: each encoder must refuse what another wrote there.
        return caches.cached_embeddings(encoder.encode, encoder.key, paths, encoder.image_size, encoder.mean,
                                        encoder.std, tmp_path / "cache.npz", log=messages.append,
                                        views=encoder.views, dtype=encoder.dtype)
    previous = embed(g2)
    for name, encoder in list(encoders.items())[1:] + [("g2 again", g2)]:
        ours = embed(encoder)
        assert "was made for other inputs" in messages[-2] and "wrote" in messages[-1], name
        assert ours.shape != previous.shape or not np.array_equal(ours, previous) or ours.dtype != previous.dtype, name
        previous = ours
    assert "using cached embeddings" in (embed(g2), messages[-1])[1]
    # Another view size is another recipe, so another key (the tiny CLIP only takes 64 px).
    assert damp.aevlp_encoder(tiny_teacher, 2, size=48).key != g2.key


class FakeDistributed(Distributed):
    """Two ranks in one process: gather_objects returns this rank's object and the other's."""

    def __init__(self, other):
        super().__init__(rank=0, world_size=2)
        object.__setattr__(self, "other", other)

    def gather_objects(self, obj):
        return [obj, self.other]


def test_damp_rows_of_other_ranks_arrive_at_sync_and_restart_clears_them(demo_root, tmp_path):
    run = aevlp_trainer(demo_root, tmp_path, "--grid-size", "2")
    rule = run.pseudo_labels
    rule.kept[0] = 1.0
    rule._pending.append((torch.tensor([0]), torch.ones(1, run.num_classes)))
    other = [(torch.tensor([3, 4]), torch.full((2, run.num_classes), 1.0))]
    rule.sync(FakeDistributed(other))
    assert rule.kept[[0, 3, 4]].eq(1).all() and rule.kept[[1, 2]].eq(0).all() and not rule._pending
    state = rule.state_dict()
    rule.restart()
    assert rule.kept.eq(0).all()
    rule.load_state_dict(state)
    assert rule.kept[[0, 3, 4]].eq(1).all()


def test_text_features_are_the_seeded_gcn_perturbation_of_the_teachers_prompts(demo_root, tmp_path, tiny_teacher):
    def text(*extra):
        config = config_module.resolve_config(demo_args(demo_root, tmp_path, "-l", "AEVLP", *extra))
        return pseudo_labels.DampRule.text_features(config, tiny_teacher, 20)
    raw = tiny_teacher.encode_text(aevlp_text.aevlp_prompts("pascal"), normalize=False)
    torch.testing.assert_close(text("--text-gcn", "off"), torch.nn.functional.normalize(raw, dim=-1))
    seeded = text("-s", "3")
    assert torch.equal(seeded, aevlp_text.aevlp_text_features(raw, "pascal", 3))
    assert not torch.allclose(seeded, text("-s", "4")) and torch.equal(seeded, text("-s", "3"))


# -- end to end ------------------------------------------------------------------------------------

def test_aevlp_trains_on_the_demo_data_and_reports_its_pseudo_labels(demo_root, tmp_path):
    summary = main_clip.main(demo_args(demo_root, tmp_path, "-l", "AEVLP", "--grid-size", "2", "--run-name", "a"))
    run = tmp_path / "a"
    config = json.loads((run / "config.json").read_text())
    assert (config["method"], config["teacher"], config["grid_size"], config["text_gcn"]) == ("AEVLP", "ViT-B-16", 2, True)
    assert summary["epochs_run"] == 2 and math.isfinite(summary["best_val_map"])
    report = summary["pseudo_labels"]
    assert report["num_images"] > 0 and 0 <= report["precision"] <= 1
    log = (run / "log.txt").read_text()
    assert "DAMP pseudo-labels of epoch 2" in log and "DAMP: 5 views x 2 flips" in log


def test_aevlp_resumes_exactly_after_an_interruption(demo_root, tmp_path, monkeypatch):
    once, resumed = run_once_and_resumed(demo_root, tmp_path, monkeypatch, "-l", "AEVLP", "--grid-size", "2",
                                         "--damp-threshold", "0.05")
    assert resumed == once and resumed["epochs_run"] == 2
    states = [torch.load(tmp_path / name / "last.pt", map_location="cpu", weights_only=True) for name in ("once", "split")]
    assert all(torch.equal(states[0]["model"][k], states[1]["model"][k]) for k in states[0]["model"])
    assert torch.equal(states[0]["pseudo_labels"]["kept"], states[1]["pseudo_labels"]["kept"])
    assert states[1]["pseudo_labels"]["kept"].sum() > 0
