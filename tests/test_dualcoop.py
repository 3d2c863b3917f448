"""-l DualCoOp (methods/dualcoop.py) against plain implementations written here from its code
(sunxm2357/DualCoOp: clip/model.py's AttentionConv, models/dualcoop.py's forward,
utils/asymmetric_loss.py's AsymmetricLoss; Dassl's lr_scheduler.py for the schedule), on a tiny
randomly initialised ResNet CLIP of open_clip's classes; then the method on the demo data: it
trains, evaluate.py scores it, and a run interrupted by Ctrl-C resumes to the same numbers."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import config as config_module
import engine
import evaluate
import main_clip
import methods
import models
from conftest import demo_args, run_once_and_resumed
from methods.dualcoop import (DualCoOp, DualCoOpModel, PromptLearner, clip_tokenizer, dualcoop_asl, prompt_class_names,
                              prompt_texts, region_logits)

# DualCoOp's loaders' class names (dataloaders/pascal_voc.py, dataloaders/coco_detection.py).
DUALCOOP_VOC = ['aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow',
                'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa',
                'train', 'tvmonitor']
DUALCOOP_COCO = ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
                 "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
                 "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
                 "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
                 "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
                 "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
                 "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
                 "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
                 "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
                 "teddy bear", "hair drier", "toothbrush"]


def resolved(*flags: str) -> dict:
    return config_module.resolve_config(main_clip.get_args_parser().parse_args(["--tiny-models", *flags]))


@pytest.fixture(scope="module")
def clip_model():
    return models.load_clip(teacher=models.RN101_CLIP, tiny=True)


def tiny_model(seed: int = 0, **overrides) -> DualCoOpModel:
    config = {**resolved("-l", "DualCoOp"), **overrides}
    torch.manual_seed(seed)
    return DualCoOp.build_model(config, 20)


# -- the image tower's spatial tokens ---------------------------------------------------------------

def attention_conv_reference(visual, images, positional_embedding):
    """ModifiedResNet_conv_proj.forward and AttentionConv.forward as DualCoOp writes them (its
    attention output, computed under no_grad and unused by DualCoOp's forward, left out), with the
    positional embedding as its build_model_conv_proj stores it for the input's grid."""
    x = visual.stem(images)
    x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
    pool = visual.attnpool
    x = x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3]).permute(2, 0, 1)  # NCHW -> (HW)NC
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)  # (HW+1)NC
    x = x + positional_embedding[:, None, :].to(x.dtype)  # (HW+1)NC
    x2 = F.linear(x, pool.v_proj.weight, pool.v_proj.bias)
    x2 = F.linear(x2, pool.c_proj.weight, pool.c_proj.bias)
    return x2.permute(1, 2, 0)


def conv_proj_positional_embedding(state, new_size):
    """build_model_conv_proj's resize of the stored 1 + S*S positional embedding (S = 7 there)."""
    old = round((state.shape[0] - 1) ** 0.5)
    w_spacial = state[1:].permute(1, 0).reshape(1, -1, old, old)
    w_spacial = F.interpolate(w_spacial, size=(new_size, new_size), mode='bicubic')
    w_special = w_spacial.reshape(-1, new_size ** 2).permute(1, 0)
    return torch.cat([state[:1], w_special], dim=0)


@pytest.mark.parametrize("size", [64, 128])   # the tiny tower's own 2 x 2 grid, and a 4 x 4 one (resized)
def test_spatial_tokens_are_attention_convs(clip_model, size):
    visual = clip_model.visual
    images = torch.randn(3, 3, size, size)
    grid = size // 32
    with torch.no_grad():
        tokens = models.clip_resnet_spatial_tokens(visual, images)
        expected = attention_conv_reference(visual, images,
                                            conv_proj_positional_embedding(visual.attnpool.positional_embedding, grid))
        assert tokens.shape == (3, clip_model.visual.output_dim, 1 + grid * grid)
        torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-7)
        # Token by token: value then output projection of (feature + its position); token 0 the mean.
        feature = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(images)))))
        positional = conv_proj_positional_embedding(visual.attnpool.positional_embedding, grid)
        pool = visual.attnpool

        def project(vector):
            return pool.c_proj(pool.v_proj(vector))
        torch.testing.assert_close(tokens[:, :, 0], project(feature.mean(dim=(2, 3)) + positional[0]),
                                   rtol=1e-5, atol=1e-7)
        for i in range(grid):
            for j in range(grid):
                torch.testing.assert_close(tokens[:, :, 1 + i * grid + j],
                                           project(feature[:, :, i, j] + positional[1 + i * grid + j]),
                                           rtol=1e-5, atol=1e-7)


def test_the_positional_embedding_is_resized_from_openais_7x7_to_448s_14x14():
    embedding = torch.randn(1 + 49, 32)
    resized = models.resized_positional_embedding(embedding, (14, 14))
    torch.testing.assert_close(resized, conv_proj_positional_embedding(embedding, 14))
    assert torch.equal(resized[0], embedding[0])
    assert models.resized_positional_embedding(embedding, (7, 7)) is embedding


# -- prompts through the text tower -----------------------------------------------------------------

def test_token_embeddings_through_the_text_tower_equal_encoding_the_tokens(clip_model):
    tokenizer = clip_tokenizer(clip_model.context_length)
    tokens = tokenizer(["a photo of a cat.", "X X X X dining table.", "tv monitor"])
    with torch.no_grad():
        embeddings = clip_model.token_embedding(tokens)
        torch.testing.assert_close(models.encode_token_embeddings(clip_model, embeddings, tokens),
                                   clip_model.encode_text(tokens), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("csc", [False, True])
def test_prompts_with_the_placeholders_embeddings_are_the_prompt_texts(clip_model, csc):
    """With its context vectors set to the embedding of "X", the prompt learner gives the token
    embeddings of "X ... X classname." (negative prompts, then positive), whose text features are
    the text tower's encoding of those texts."""
    names = ["cat", "dining table", "tv"]
    tokenizer = clip_tokenizer(clip_model.context_length)
    learner = PromptLearner(clip_model, names, tokenizer, n_ctx_pos=4, n_ctx_neg=3, csc=csc)
    assert learner.ctx_pos.shape == ((3, 4, 64) if csc else (4, 64)) and learner.ctx_neg.shape[-2] == 3
    x = clip_model.token_embedding(tokenizer(["X"]))[0, 1].detach()
    with torch.no_grad():
        learner.ctx_pos.copy_(x.expand_as(learner.ctx_pos))
        learner.ctx_neg.copy_(x.expand_as(learner.ctx_neg))
        embeddings, tokens = learner()
        texts = prompt_texts(names, 3) + prompt_texts(names, 4)
        assert texts[0] == "X X X cat." and texts[3] == "X X X X cat."
        expected_tokens = tokenizer(texts)
        assert torch.equal(tokens, expected_tokens)
        torch.testing.assert_close(embeddings, clip_model.token_embedding(expected_tokens))
        torch.testing.assert_close(models.encode_token_embeddings(clip_model, embeddings, tokens),
                                   clip_model.encode_text(expected_tokens), rtol=1e-5, atol=1e-6)


def test_contexts_start_as_its_random_initialisation():
    model = tiny_model(seed=3)
    torch.manual_seed(3)    # the tiny CLIP is built without touching the random stream
    pos, neg = torch.empty(16, 64), torch.empty(16, 64)
    torch.nn.init.normal_(pos, std=0.02)
    torch.nn.init.normal_(neg, std=0.02)
    assert torch.equal(model.head.ctx_pos, pos) and torch.equal(model.head.ctx_neg, neg)
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["head.ctx_pos", "head.ctx_neg"]


def test_prompts_carry_dualcoops_class_names():
    assert prompt_class_names("pascal") == DUALCOOP_VOC
    assert prompt_class_names("coco") == DUALCOOP_COCO
    assert prompt_class_names("cub")[1] == "dagger bill shape"     # its readable names, not attribute keys
    assert len(prompt_class_names("nuswide")) == 81


# -- region aggregation and the 2-way softmax --------------------------------------------------------

def dualcoop_forward_reference(image_features, text_features):
    """DualCoop.forward after its encoders (models/dualcoop.py)."""
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    image_features_norm = image_features / image_features.norm(dim=1, keepdim=True)
    output = 20 * F.conv1d(image_features_norm, text_features[:, :, None])
    b, c, _ = output.shape
    output_half = output[:, c // 2:]
    w_half = F.softmax(output_half, dim=-1)
    w = torch.cat([w_half, w_half], dim=1)
    output = 5 * (output * w).sum(-1)
    b, c = output.shape
    return output.reshape(b, 2, c // 2)


def test_region_logits_and_the_prediction_are_dualcoops():
    torch.manual_seed(0)
    tokens, text = torch.randn(4, 32, 1 + 9), torch.randn(2 * 5, 32)
    logits = region_logits(tokens, text)
    expected = dualcoop_forward_reference(tokens, text)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    # The run's prediction, the sigmoid of positive minus negative, is the softmax's positive entry.
    torch.testing.assert_close(torch.sigmoid(logits[:, 1] - logits[:, 0]), F.softmax(expected, dim=1)[:, 1])


def test_the_model_is_the_encoders_and_the_aggregation():
    model = tiny_model().eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        image_features = models.clip_resnet_spatial_tokens(model.backbone.visual, images)
        text_features = models.encode_token_embeddings(model.backbone, *model.head())
        expected = F.softmax(dualcoop_forward_reference(image_features, text_features), dim=1)[:, 1]
        torch.testing.assert_close(torch.sigmoid(model(images)), expected, rtol=1e-5, atol=1e-6)


def test_the_frozen_clip_stays_in_eval_mode_and_gets_no_gradient():
    model = tiny_model().train()
    assert model.training and model.head.training and not model.backbone.training
    running_mean = model.backbone.visual.bn1.running_mean.clone()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert torch.equal(model.backbone.visual.bn1.running_mean, running_mean)
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.head.ctx_pos.grad is not None and model.head.ctx_neg.grad is not None


def test_evaluation_reuses_the_text_features_until_the_prompts_change():
    model = tiny_model().eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        first = model(images)
        cached = model._text_cache[1]
        assert torch.equal(model(images), first) and model._text_cache[1] is cached
        model.head.ctx_pos.add_(0.1)    # an optimizer step, or a loaded checkpoint
        moved = model(images)
        assert model._text_cache[1] is not cached
    model._text_cache = None
    with torch.no_grad():
        assert torch.equal(model(images), moved)
    assert model(images).requires_grad   # with autograd: computed afresh, never the cache


# -- the loss ---------------------------------------------------------------------------------------

class AsymmetricLossReference(torch.nn.Module):
    """utils/asymmetric_loss.py's AsymmetricLoss, as written there."""

    def __init__(self, gamma_neg=4, gamma_pos=1, clip=0.05, eps=1e-6, disable_torch_grad_focal_loss=True):
        super().__init__()
        self.gamma_neg, self.gamma_pos, self.clip = gamma_neg, gamma_pos, clip
        self.disable_torch_grad_focal_loss, self.eps = disable_torch_grad_focal_loss, eps
        self.softmax = torch.nn.Softmax(dim=1)

    def forward(self, x, y):
        x_softmax = self.softmax(x)
        xs_pos = x_softmax[:, 1, :]
        xs_neg = x_softmax[:, 0, :]
        y = y.reshape(-1)
        xs_pos = xs_pos.reshape(-1)
        xs_neg = xs_neg.reshape(-1)
        xs_pos = xs_pos[y != -1]
        xs_neg = xs_neg[y != -1]
        y = y[y != -1]
        if self.clip is not None and self.clip > 0:
            xs_neg = (xs_neg + self.clip).clamp(max=1)
        los_pos = y * torch.log(xs_pos.clamp(min=self.eps))
        los_neg = (1 - y) * torch.log(xs_neg.clamp(min=self.eps))
        loss = los_pos + los_neg
        if self.gamma_neg > 0 or self.gamma_pos > 0:
            if self.disable_torch_grad_focal_loss:
                torch.set_grad_enabled(False)
            pt0 = xs_pos * y
            pt1 = xs_neg * (1 - y)
            pt = pt0 + pt1
            one_sided_gamma = self.gamma_pos * y + self.gamma_neg * (1 - y)
            one_sided_w = torch.pow(1 - pt, one_sided_gamma)
            if self.disable_torch_grad_focal_loss:
                torch.set_grad_enabled(True)
            loss *= one_sided_w
        return -loss.sum()


@pytest.mark.parametrize("gamma_neg, gamma_pos, clip", [(2.0, 1.0, 0.05), (4.0, 0.0, 0.0), (0.0, 0.0, 0.05)])
def test_asymmetric_loss_on_the_two_way_softmax_values_and_gradients(gamma_neg, gamma_pos, clip):
    torch.manual_seed(1)
    two_way = (3 * torch.randn(6, 2, 7, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(-1, 2, (6, 7)).to(torch.float64)       # -1: unknown, dropped
    expected = AsymmetricLossReference(gamma_neg, gamma_pos, clip)(two_way, targets)
    (expected_grad,) = torch.autograd.grad(expected, two_way)
    logits = two_way[:, 1] - two_way[:, 0]
    loss = dualcoop_asl(logits, (targets == 1).to(logits.dtype), targets != -1, gamma_pos, gamma_neg, clip)
    (grad,) = torch.autograd.grad(loss, two_way)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)


def loss_inputs(logits, observed):
    return methods.LossInputs(logits, torch.sigmoid(logits), torch.arange(len(logits)), observed, None,
                              torch.zeros_like(observed))


def test_unobserved_labels_train_as_negatives_or_are_dropped():
    torch.manual_seed(2)
    logits = torch.randn(4, 5, requires_grad=True)
    observed = torch.zeros(4, 5)
    observed[torch.arange(4), torch.tensor([0, 3, 1, 4])] = 1
    observed[0, 2] = -1
    as_negative = DualCoOp.from_config(resolved("-l", "DualCoOp", "--loss-weight", "0.5"), None, 10)
    expected = 0.5 * AsymmetricLossReference(2.0, 1.0, 0.05)(
        torch.stack([torch.zeros_like(logits), logits], dim=1), (observed == 1).float())
    torch.testing.assert_close(as_negative.loss(loss_inputs(logits, observed), 1), expected)
    dropped = DualCoOp.from_config(resolved("-l", "DualCoOp", "--unobserved-as-negative", "off"), None, 10)
    targets = torch.where(observed == 0, -1.0, (observed == 1).float())
    expected = 0.03 * AsymmetricLossReference(2.0, 1.0, 0.05)(torch.stack([torch.zeros_like(logits), logits], dim=1),
                                                              targets)
    torch.testing.assert_close(dropped.loss(loss_inputs(logits, observed), 1), expected)


# -- its learning-rate schedule ---------------------------------------------------------------------

def dassl_rates(base_lr: float, max_epoch: int, warmup_epoch: int, cons_lr: float) -> list[float]:
    """The learning rate of each epoch under Dassl's build_lr_scheduler("cosine", WARMUP_TYPE
    "constant", WARMUP_RECOUNT true), stepped once per epoch as DualCoOp's train_coop steps it:
    CosineAnnealingLR wrapped in ConstantWarmupScheduler (its step and get_lr, written out here)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr, momentum=0.9)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, float(max_epoch))

    class ConstantWarmup:
        def __init__(self):
            self.last_epoch = -1
            self.step()

        def get_lr(self):
            return cosine.get_last_lr() if self.last_epoch >= warmup_epoch else [cons_lr]

        def step(self):
            if self.last_epoch >= warmup_epoch:
                cosine.step()
            else:
                self.last_epoch += 1
                for group, lr in zip(optimizer.param_groups, self.get_lr()):
                    group["lr"] = lr

    scheduler = ConstantWarmup() if warmup_epoch > 0 else cosine
    rates = []
    for _ in range(max_epoch):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()     # the epoch's steps (no gradient here: nothing moves)
        scheduler.step()
    return rates


@pytest.mark.parametrize("base_lr, epochs, warmup", [(0.002, 50, 1), (0.001, 50, 1), (0.01, 7, 2), (0.01, 6, 0)])
def test_the_cosine_schedule_with_its_warm_up_is_dassls(base_lr, epochs, warmup):
    optimizer = torch.optim.SGD([{"params": [], "lr": base_lr},
                                 {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": base_lr}], momentum=0.9)
    schedule = engine.LRSchedule(optimizer, "cosine", epochs, warmup, 1e-5, base_lr)
    ours = []
    for epoch in range(1, epochs + 1):
        schedule.start_epoch(epoch)
        ours.append(optimizer.param_groups[1]["lr"])
    expected = dassl_rates(base_lr, epochs, warmup, 1e-5)
    assert ours == pytest.approx(expected, rel=1e-12, abs=0)
    if warmup:
        assert ours[:warmup] == [1e-5] * warmup and ours[warmup] == base_lr


def test_the_constant_schedule_leaves_the_optimizer_alone_and_a_warm_up_keeps_the_multipliers():
    optimizer = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-3},
                                 {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-2}])
    constant = engine.LRSchedule(optimizer, "constant", 10, 0, 1e-5, 1e-3)
    assert not constant.active and constant.start_epoch(3) is None
    assert [group["lr"] for group in optimizer.param_groups] == [1e-3, 1e-2]
    warm = engine.LRSchedule(optimizer, "constant", 10, 2, 1e-5, 1e-3)
    assert warm.start_epoch(2) == pytest.approx([1e-5, 1e-4]) and warm.start_epoch(3) == [1e-3, 1e-2]


# -- configuration -----------------------------------------------------------------------------------

def test_its_protocol_per_dataset():
    voc, coco, nus = (resolved("-l", "DualCoOp", "-d", d) for d in ("pascal", "coco", "nuswide"))
    for config in (voc, coco, nus):
        assert (config["epochs"], config["bsize"], config["optimizer"], config["weight_decay"]) == (50, 32, "sgd", 5e-4)
        assert (config["lr_schedule"], config["lr_warmup_epochs"], config["lr_warmup_lr"]) == ("cosine", 1, 1e-5)
        assert config["model"] == "clip_prompts" and config["head_lr_mult"] == 1.0
        assert (config["n_ctx_pos"], config["n_ctx_neg"], config["csc"], config["loss_weight"]) == (16, 16, False, 0.03)
        assert (config["asl_gamma_pos"], config["asl_gamma_neg"], config["asl_clip"]) == (1.0, 2.0, 0.05)
        assert config["unobserved_as_negative"] is True
    assert (voc["lr"], coco["lr"], nus["lr"]) == (0.001, 0.002, 0.001)
    assert resolved("-l", "DualCoOp")["image_size"] == models.TINY_INPUT_SIZE
    full = config_module.resolve_config(main_clip.get_args_parser().parse_args(["-l", "DualCoOp"]))
    assert full["image_size"] == 448
    with pytest.raises(main_clip.RunError, match=r"^-l DualCoOp has no published protocol for cub: give --lr \(its "
                                                 r"published protocols also choose --epochs, --bsize, --optimizer"):
        resolved("-l", "DualCoOp", "-d", "cub")
    cub = resolved("-l", "DualCoOp", "-d", "cub", "--lr", "0.001")
    assert cub["model"] == "clip_prompts" and cub["lr_schedule"] == "constant"


@pytest.mark.parametrize("flags, message", [
    (["-m", "clip_vision"], "-l DualCoOp runs its own model (-m clip_prompts): leave -m out"),
    (["--train-mode", "linear_init"], "it needs --train-mode end_to_end"),
    (["--head", "boostlu"], "leave --head out"),
    (["--backbone-weights", "x.pth"], "not --backbone-weights"),
])
def test_what_dualcoop_cannot_run_with_is_one_line(flags, message):
    with pytest.raises(main_clip.RunError) as error:
        resolved("-l", "DualCoOp", *flags)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_its_model_is_not_a_backbone_for_other_methods():
    with pytest.raises(main_clip.RunError, match="-m clip_prompts is the model of -l DualCoOp"):
        resolved("-l", "an", "-m", "clip_prompts")
    with pytest.raises(ValueError, match="built by the method"):
        models.build_model("clip_prompts", 20, tiny=True)
    assert "clip_prompts" in models.MODELS and "clip_prompts" not in models.BACKBONES
    assert main_clip.get_args_parser().parse_args(["-m", "clip_prompts"]).model == "clip_prompts"


def test_its_clip_weights_are_rn101s(tmp_path):
    """--clip-weights names its CLIP's file (the start-up check asks for RN101.pt, whatever
    --teacher says); a state dict of that architecture is read into its model."""
    with pytest.raises(models.WeightsUnavailableError, match=r"--clip-weights /path/to/RN101\.pt \(OpenAI\), or "
                                                            r"allow open_clip's download of RN101-quickgelu"):
        models.check_weights_available("clip_prompts", need_teacher=False, teacher="ViT-B-16")
    with pytest.raises(ValueError, match="clip_prompts takes its weights from --clip-weights"):
        models.check_weights_available("clip_prompts", backbone_weights=tmp_path / "x.pth", need_teacher=False)
    weights = models.load_clip(teacher=models.RN101_CLIP, tiny=True).state_dict()
    weights = {key: torch.randn_like(value) if value.is_floating_point() else value for key, value in weights.items()}
    torch.save(weights, tmp_path / "rn.pt")
    models.check_weights_available("clip_prompts", clip_weights=tmp_path / "rn.pt", need_teacher=False)
    model = DualCoOp.build_model({**resolved("-l", "DualCoOp"), "clip_weights": str(tmp_path / "rn.pt")}, 20)
    assert torch.equal(model.backbone.visual.attnpool.v_proj.weight, weights["visual.attnpool.v_proj.weight"])
    with pytest.raises(ValueError, match="--clip-weights .*vit.pt: not CLIP tiny"):
        torch.save(models.load_clip(tiny=True).state_dict(), tmp_path / "vit.pt")
        DualCoOp.build_model({**resolved("-l", "DualCoOp"), "clip_weights": str(tmp_path / "vit.pt")}, 20)


def test_the_new_schedule_settings_leave_every_other_run_as_it_was():
    config = resolved("-l", "EM_PL")
    assert (config["lr_schedule"], config["lr_warmup_epochs"], config["lr_warmup_lr"]) == ("constant", 0, 1e-5)
    without = {key: value for key, value in config.items() if not key.startswith("lr_")}
    assert config_module.default_run_name(config) == config_module.default_run_name(without)
    assert config_module.as_recorded_now(without)["lr_schedule"] == "constant"
    scheduled = resolved("-l", "EM_PL", "--lr-schedule", "cosine")
    assert config_module.default_run_name(scheduled) != config_module.default_run_name(config)


# -- on the demo data ---------------------------------------------------------------------------------

def test_dualcoop_trains_evaluates_and_resumes_exactly(demo_root, tmp_path, monkeypatch):
    once, resumed = run_once_and_resumed(demo_root, tmp_path, monkeypatch, "-l", "DualCoOp")
    assert resumed == once
    states = [torch.load(tmp_path / run / "last.pt", map_location="cpu", weights_only=True)
              for run in ("once", "split")]
    for key, value in states[0]["model"].items():
        assert torch.equal(value, states[1]["model"][key]), key
    assert states[0]["optimizer"]["state"].keys() == states[1]["optimizer"]["state"].keys()
    for index, state in states[0]["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], states[1]["optimizer"]["state"][index]["momentum_buffer"])
    assert states[0]["lr_schedule"] == states[1]["lr_schedule"] == {"name": "cosine", "base_lrs": [1e-3, 1e-3],
                                                                    "epoch": 2}
    # Only the prompts trained: the CLIP in last.pt is the one the run started from.
    start = tiny_model(lr=1e-3)
    for key, value in start.state_dict().items():
        if key.startswith("backbone."):
            assert torch.equal(states[0]["model"][key], value), key
    assert not torch.equal(states[0]["model"]["head.ctx_pos"], start.state_dict()["head.ctx_pos"])
    log = (tmp_path / "once" / "log.txt").read_text()
    assert "Epoch 1/2 (end to end; learning rate 1e-05)" in log and "Epoch 2/2 (end to end; learning rate 0.001)" in log
    config = json.loads((tmp_path / "once" / "config.json").read_text())
    assert config["model"] == "clip_prompts" and config["method"] == "DualCoOp"
    assert config["augmentation"] == "cutout_randaugment"      # its transform, drawn per item: the resume repeats it
    result = evaluate.main(evaluate.get_args_parser().parse_args([str(tmp_path / "once"), "--device", "cpu"]))
    assert result["clean"]["map"] == pytest.approx(once["best_test_map"], abs=1e-9)


def test_dualcoop_trains_its_prompts_on_the_demo_data(demo_root, tmp_path):
    """The train loss falls epoch by epoch. (The tiny CLIP stays random, so its prompts have little
    to find in the images; its gradients are large, hence the small learning rate.)"""
    main_clip.main(demo_args(demo_root, tmp_path, "-l", "DualCoOp", "--run-name", "learn", "--epochs", "3",
                             "--lr", "1e-7", "--lr-warmup-epochs", "0", "--lr-schedule", "constant",
                             "--loss-weight", "1"))
    records = [json.loads(line) for line in (tmp_path / "learn" / "metrics.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in records if record["phase"] == "train"]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert losses[2] < losses[1] < losses[0], losses
