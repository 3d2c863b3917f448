"""The BoostLU head (``--head boostlu``, Kim et al. 2023): its logits equal the formula on the
backbone's feature map, it trains with any method, and it is refused where there is no map."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import evaluate
import config as config_module
import main_clip
import models
from conftest import demo_args, demo_argv


@pytest.mark.parametrize("backbone", ["resnet50", "convnext_xlarge_1k"])
def test_boostlu_logits_are_the_mean_of_the_boosted_class_activation_maps(backbone):
    torch.manual_seed(0)
    pooled = models.build_model(backbone, 7, tiny=True, pretrained=False)
    torch.manual_seed(0)
    boosted = models.build_model(backbone, 7, tiny=True, pretrained=False, head="boostlu")
    x = torch.randn(3, 3, 64, 64, requires_grad=True)
    pooled.eval(), boosted.eval()
    logits = boosted(x)
    # Plain computation: the same backbone up to its last feature map, a 1x1 convolution written
    # as a matrix product over channels, positive part x5, mean over positions.
    if backbone == "resnet50":
        net = pooled.backbone
        stem = torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3,
                                   net.layer4)
        feature_map = stem(x)
    else:
        feature_map = pooled.backbone.forward_features(x)
    weight = boosted.head.cam.weight[:, :, 0, 0]
    cam = torch.einsum("bdhw,kd->bkhw", feature_map, weight) + boosted.head.cam.bias[None, :, None, None]
    expected = torch.where(cam > 0, 5.0 * cam, cam).mean(dim=(2, 3))
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    grad, = torch.autograd.grad(logits.sum(), x)
    expected_grad, = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)
    assert (cam > 0).any() and (cam < 0).any()  # both branches of the boost are exercised


def test_boostlu_trains_with_a_method_and_evaluates_back(demo_root, tmp_path, capsys):
    summary = main_clip.main(demo_args(demo_root, tmp_path, "-l", "LL-R", "--head", "boostlu", "--run-name", "b"))
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["head"] == "boostlu" and summary["best_test_map"] > 0
    state = torch.load(tmp_path / "b" / "best.pt", weights_only=True)["model"]
    assert state["head.cam.weight"].shape[:2] == (20, 512) and "head.weight" not in state
    assert evaluate.cli([str(tmp_path / "b")]) == 0
    result = json.loads((tmp_path / "b" / "eval_test_best.json").read_text())
    assert result["clean"]["map"] == pytest.approx(summary["best_test_map"], abs=1e-6)


@pytest.mark.parametrize("flags,message", [
    (["-m", "clip_vision"], "--head boostlu reads a feature map, which -m clip_vision does not give"),
    (["--train-mode", "linear_fixed_features"], "--head boostlu reads feature maps, which are not cached"),
])
def test_boostlu_without_a_feature_map_is_one_line(demo_root, tmp_path, capsys, flags, message):
    code = main_clip.cli([*demo_argv(demo_root, tmp_path / "out"), "--head", "boostlu", "-l", "an", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]
    assert not (tmp_path / "out").exists()



def test_the_readme_commands_run_boostlus_protocol():
    """BoostLU's code (youngwk/BridgeGapExplanationPAMC): Adam without weight decay, lr 1e-5, the 1x1
    convolution at 10x, batch 16, 10 epochs, no early stop, delta_rel 0.5 / 0.2 / 0.1 percent."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `--head boostlu`"))
    command = re.search(r"`python main_clip\.py (-d <dataset> -l LL-R [^`]*)`", row).group(1)
    extra = dict(re.findall(r"(LL-C[tp]): `([^`]*)`", row))
    parser = main_clip.get_args_parser()
    for dataset in ("pascal", "coco", "nuswide", "cub"):
        for scheme, delta in (("LL-R", 0.005), ("LL-Ct", 0.002), ("LL-Cp", 0.001)):
            argv = command.replace("<dataset>", dataset).replace("LL-R", scheme).split() + \
                extra.get(scheme, "").split() + ["--tiny-models"]
            config = config_module.resolve_config(parser.parse_args(argv))
            assert {key: config[key] for key in ("head", "optimizer", "weight_decay", "lr", "head_lr_mult", "bsize",
                                                 "epochs", "max_drop", "patience", "delta_rel")} == dict(
                head="boostlu", optimizer="adam", weight_decay=0.0, lr=1e-5, head_lr_mult=10.0, bsize=16, epochs=10,
                max_drop=0.0, patience=0, delta_rel=delta)
            assert config.get("permanent_ties") is (True if scheme == "LL-Cp" else None)
