"""DualCoOp (Sun, Hu and Saenko, NeurIPS 2022, "DualCoOp: Fast Adaptation to Multi-Label Recognition
with Limited Annotations"; code sunxm2357/DualCoOp): a frozen CLIP RN101 whose learnt positive and
negative prompts score every spatial token of the image; only the prompts train.

Its code, and where each part is here:

* ``clip/model.py`` (``AttentionConv``, ``build_model_conv_proj``): the image tower's attention
  pool is replaced by the value and output projections applied to every token (token 0 the mean
  of the feature map), the positional embedding resized bicubically from 7 x 7 to the input's grid:
  ``models.clip_resnet_spatial_tokens``.
* ``models/dualcoop.py`` (``MLCPromptLearner``, ``TextEncoder``, ``DualCoop.forward``): 16 learnt
  context vectors for the positive prompts and 16 for the negative ones, N(0, 0.02), shared by the
  classes (``--csc on``: one set per class), in the template "X ... X classname."; the prompts'
  token embeddings through the text tower (``models.encode_token_embeddings``); region logits
  20 x cos(token, prompt), the positive prompts' spatial softmax weighting both, logit 5 x the
  weighted sum: ``PromptLearner``, ``region_logits``.
* ``utils/asymmetric_loss.py`` (``AsymmetricLoss``) on the 2-way softmax, summed, times
  ``--loss_w``, targets -1 dropped: ``dualcoop_asl``.
* ``configs/models/rn101_ep50.yaml``, Dassl's defaults and ``train.py``: SGD (momentum 0.9, weight
  decay 5e-4), batch 32, 50 epochs, cosine schedule after one epoch at 1e-5, stepped per epoch;
  its README's learning rates 0.001 (VOC 2007) and 0.002 (COCO): ``DATASET_DEFAULTS``.

The run predicts with the sigmoid of the model's logits: the model returns, per class, the
positive logit minus the negative one, whose sigmoid is the positive entry of DualCoOp's 2-way
softmax (softmax([n, p])[1] = 1 / (1 + exp(n - p)) = sigmoid(p - n)), and whose gradient reaches
both logits as theirs does (+g to p, -g to n). ``region_logits`` keeps their B x 2 x K layout.

The single-positive setting: DualCoOp has no single-positive mode (its ``-pp`` masks a random share
of the labels with -1, which its loss drops). Here, as the "one positive, no negative" row of
VLPL's table is read, every unobserved label is trained as a negative (assume negative;
``--unobserved-as-negative on``); ``off`` drops them as DualCoOp's loss drops unknown labels, so
only the observed positive (and any observed negative) trains.
"""
from __future__ import annotations

from types import SimpleNamespace

import open_clip
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import datasets
import models
from methods.base import NO_PROTOCOL, Hyperparameter, LossInputs, Method, on_off

# Region logits: 20 x cosine similarity; the image's logit: 5 x their softmax-weighted sum
# (DualCoOp's forward; its --logit_scale is not used there).
REGION_SCALE = 20.0
LOGIT_SCALE = 5.0
ASL_EPS = 1e-6          # AsymmetricLoss's eps: probabilities are clamped to it before the log

# configs/models/rn101_ep50.yaml with Dassl's defaults (OPTIM: momentum 0.9, weight decay 5e-4,
# WARMUP_RECOUNT true), the same for every dataset.
RN101_EP50 = dict(epochs=50, bsize=32, optimizer="sgd", weight_decay=5e-4, head_lr_mult=1.0,
                  lr_schedule="cosine", lr_warmup_epochs=1, lr_warmup_lr=1e-5,
                  augmentation="cutout_randaugment")     # its loaders' train transform (augment.py)
DATASET_DEFAULTS = {
    "pascal": dict(RN101_EP50, lr=0.001),     # its README: 0.001 for VOC2007
    "coco": dict(RN101_EP50, lr=0.002),       # its README: 0.002 for MS-COCO
    # No partial-label protocol for NUS-WIDE: the nearest documented setting, the learning rate its
    # README gives for NUS-WIDE (its zero-shot training), with the same RN101 configuration.
    "nuswide": dict(RN101_EP50, lr=0.001),
    "cub": NO_PROTOCOL,                       # nothing documented
}

# Which of a dataset's class-name lists fill the prompts: DualCoOp's loaders name VOC's and COCO's
# classes by their release names (VOC's "diningtable", "pottedplant", "tvmonitor"); CUB's release
# names are attribute keys ("has_bill_shape::dagger"), so its readable names are used. "_" becomes
# a space, as in its prompt learner. A dataset not listed: its readable names.
PROMPT_NAMES = {"pascal": "release", "coco": "release", "nuswide": "release", "cub": "readable"}

N_CTX_POS = Hyperparameter("n_ctx_pos", int, "DualCoOp: learnt context vectors of the positive prompts (its "
                           "--n_ctx_pos; 16)", default=16, minimum=1, maximum=70)
N_CTX_NEG = Hyperparameter("n_ctx_neg", int, "DualCoOp: learnt context vectors of the negative prompts (its "
                           "--n_ctx_neg; 16)", default=16, minimum=1, maximum=70)
CSC = Hyperparameter("csc", on_off, "DualCoOp: class-specific contexts, one set per class (its --csc; off: one set "
                     "shared by the classes, its default)", default=False)
# Its README trains with --loss_w 0.03 (COCO, half the labels known) and uses "larger loss_w for
# smaller pp"; every label is known here (the observed positive, the rest as negatives), so its
# documented value is the default (opts.py's own default, 1, is never what its README runs).
LOSS_WEIGHT = Hyperparameter("loss_weight", float, "DualCoOp: factor of its summed asymmetric loss (its --loss_w; "
                             "0.03, its README's value)", default=0.03, greater_than=0.0, minimum=0.0)
ASL_GAMMA_POS = Hyperparameter("asl_gamma_pos", float, "DualCoOp: focusing power of its asymmetric loss on positives "
                               "(its --gamma_pos; 1)", default=1.0, minimum=0.0)
ASL_GAMMA_NEG = Hyperparameter("asl_gamma_neg", float, "DualCoOp: focusing power of its asymmetric loss on negatives "
                               "(its --gamma_neg; 2)", default=2.0, minimum=0.0)
ASL_CLIP = Hyperparameter("asl_clip", float, "DualCoOp: probability margin added to the negative entry before its "
                          "log (its AsymmetricLoss clip; 0.05)", default=0.05, minimum=0.0, maximum=1.0)
UNOBSERVED_AS_NEGATIVE = Hyperparameter(
    "unobserved_as_negative", on_off, "DualCoOp: on: every unobserved label trains as a negative (assume negative: "
    "the one-positive, no-negative setting of VLPL's table); off: unobserved labels are dropped from the loss, as "
    "DualCoOp drops unknown labels (on / off)", default=True)


def prompt_class_names(dataset: str) -> list[str]:
    """The class names DualCoOp's prompts carry on ``dataset`` (``PROMPT_NAMES``)."""
    info = datasets.get_dataset_info(dataset)
    names = info.release_names if PROMPT_NAMES.get(dataset, "readable") == "release" else info.class_names
    return [name.replace("_", " ") for name in names]


def prompt_texts(class_names: list[str], n_ctx: int) -> list[str]:
    """"X X ... X classname." with ``n_ctx`` placeholders, whose token embeddings the learnt
    context vectors replace (DualCoOp's random initialisation's prompt prefix)."""
    return [" ".join(["X"] * n_ctx) + " " + name + "." for name in class_names]


def prompts_that_do_not_fit(class_names: list[str], n_ctx: int, tokenizer, context_length: int) -> list[str]:
    """The prompts longer than the text tower's context (start and end tokens included)."""
    return [text for text in prompt_texts(class_names, n_ctx) if len(tokenizer.encode(text)) + 2 > context_length]


def its_clip() -> models.TeacherSpec:
    """The CLIP of its model, -m clip_prompts: open_clip's RN101 (OpenAI's weights, --clip-weights)."""
    return models.backbone_spec(DualCoOp.own_model).clip


def clip_tokenizer(context_length: int):
    """Its CLIP's tokenizer (open_clip's, offline) at ``context_length``."""
    return open_clip.get_tokenizer(its_clip().open_clip_name, context_length=context_length)


class PromptLearner(nn.Module):
    """DualCoOp's ``MLCPromptLearner`` (random initialisation): the learnt context vectors and the
    frozen token embeddings around them. ``forward()`` gives the 2K prompts' token embeddings
    (the K negative prompts, then the K positive ones) and the token ids they stand for."""

    def __init__(self, clip_model, class_names: list[str], tokenizer, n_ctx_pos: int = 16, n_ctx_neg: int = 16,
                 csc: bool = False):
        super().__init__()
        width = clip_model.ln_final.weight.shape[0]
        k = len(class_names)
        ctx_pos = torch.empty((k, n_ctx_pos, width) if csc else (n_ctx_pos, width))
        ctx_neg = torch.empty((k, n_ctx_neg, width) if csc else (n_ctx_neg, width))
        nn.init.normal_(ctx_pos, std=0.02)
        nn.init.normal_(ctx_neg, std=0.02)
        self.ctx_pos, self.ctx_neg = nn.Parameter(ctx_pos), nn.Parameter(ctx_neg)
        tokens_pos = tokenizer(prompt_texts(class_names, n_ctx_pos))
        tokens_neg = tokenizer(prompt_texts(class_names, n_ctx_neg))
        with torch.no_grad():
            embedding_pos = clip_model.token_embedding(tokens_pos)
            embedding_neg = clip_model.token_embedding(tokens_neg)
        # Saved with the prompts (as DualCoOp's buffers): a checkpoint carries its class names' tokens.
        self.register_buffer("token_prefix_pos", embedding_pos[:, :1].clone())
        self.register_buffer("token_suffix_pos", embedding_pos[:, 1 + n_ctx_pos:].clone())
        self.register_buffer("token_prefix_neg", embedding_neg[:, :1].clone())
        self.register_buffer("token_suffix_neg", embedding_neg[:, 1 + n_ctx_neg:].clone())
        self.register_buffer("tokenized_prompts", torch.cat([tokens_neg, tokens_pos]))
        self.num_classes = k

    def forward(self) -> tuple[Tensor, Tensor]:
        ctx_pos, ctx_neg = self.ctx_pos, self.ctx_neg
        if ctx_pos.dim() == 2:
            ctx_pos = ctx_pos.unsqueeze(0).expand(self.num_classes, -1, -1)
        if ctx_neg.dim() == 2:
            ctx_neg = ctx_neg.unsqueeze(0).expand(self.num_classes, -1, -1)
        prompts_pos = torch.cat([self.token_prefix_pos, ctx_pos, self.token_suffix_pos], dim=1)
        prompts_neg = torch.cat([self.token_prefix_neg, ctx_neg, self.token_suffix_neg], dim=1)
        return torch.cat([prompts_neg, prompts_pos]), self.tokenized_prompts


def region_logits(spatial_tokens: Tensor, text_features: Tensor) -> Tensor:
    """DualCoOp's class-specific region aggregation: B x 2 x K logits (entry 0 of the negative
    prompts, entry 1 of the positive ones) of B x D x T spatial tokens and 2K x D text features (the
    K negative prompts, then the K positive ones). Region logits 20 x cos; the positive prompts'
    softmax over the T tokens weights the positive and the negative logits of each class; the
    logit is 5 x the weighted sum."""
    text = text_features / text_features.norm(dim=-1, keepdim=True)
    tokens = spatial_tokens / spatial_tokens.norm(dim=1, keepdim=True)
    similarity = REGION_SCALE * torch.einsum("bdt,cd->bct", tokens, text)        # B x 2K x T
    k = text.shape[0] // 2
    weights = similarity[:, k:].softmax(dim=-1)
    logits = LOGIT_SCALE * (similarity * torch.cat([weights, weights], dim=1)).sum(dim=-1)
    return logits.reshape(len(logits), 2, k)


class DualCoOpModel(nn.Module):
    """The frozen CLIP (``backbone``, always in eval mode: its BatchNorm keeps its statistics, as
    DualCoOp's trainer keeps the image encoder in eval mode) and the prompt learner (``head``).
    ``forward(images)`` gives B x K logits, positive minus negative (see the module docstring)."""

    def __init__(self, clip_model, class_names: list[str], tokenizer, n_ctx_pos: int = 16, n_ctx_neg: int = 16,
                 csc: bool = False):
        super().__init__()
        self.head = PromptLearner(clip_model, class_names, tokenizer, n_ctx_pos, n_ctx_neg, csc)
        self.backbone = clip_model.eval()
        self.backbone.requires_grad_(False)
        self._text_cache: tuple[tuple, Tensor] | None = None

    def train(self, mode: bool = True) -> DualCoOpModel:
        super().train(mode)
        self.backbone.eval()
        return self

    def text_features(self) -> Tensor:
        """2K x D: the prompts through the text tower. Without autograd (evaluation) they are
        computed once per state of the prompts (and autocast setting) instead of per batch."""
        if torch.is_grad_enabled():
            return models.encode_token_embeddings(self.backbone, *self.head())
        autocast = (torch.is_autocast_enabled(self.head.ctx_pos.device.type),
                    torch.get_autocast_dtype(self.head.ctx_pos.device.type))
        key = (autocast, *((id(t), t._version, t.device) for t in [*self.head.parameters(), *self.head.buffers()]))
        if self._text_cache is None or self._text_cache[0] != key:
            self._text_cache = (key, models.encode_token_embeddings(self.backbone, *self.head()))
        return self._text_cache[1]

    def forward(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            tokens = models.clip_resnet_spatial_tokens(self.backbone.visual, images)
        logits = region_logits(tokens, self.text_features())
        return logits[:, 1] - logits[:, 0]


def dualcoop_asl(logits: Tensor, targets: Tensor, known: Tensor | None = None, gamma_pos: float = 1.0,
                 gamma_neg: float = 2.0, clip: float = 0.05, eps: float = ASL_EPS) -> Tensor:
    """DualCoOp's ``AsymmetricLoss`` (summed, not averaged) of B x K logits (positive minus
    negative: the 2-way softmax's entries are sigmoid(logits) and sigmoid(-logits)) against 0/1
    ``targets``, over the entries where ``known`` (None: all). The negative entry gets ``clip``
    added (at most 1) before the log; the focusing weights (1 - p_t)^gamma, p_t the target's entry
    (the clipped one for negatives), are constants (computed without autograd, as theirs)."""
    if known is not None:
        logits, targets = logits[known], targets[known]
    xs_pos, xs_neg = torch.sigmoid(logits), torch.sigmoid(-logits)
    if clip is not None and clip > 0:
        xs_neg = (xs_neg + clip).clamp(max=1)
    loss = targets * torch.log(xs_pos.clamp(min=eps)) + (1 - targets) * torch.log(xs_neg.clamp(min=eps))
    if gamma_neg > 0 or gamma_pos > 0:
        with torch.no_grad():
            p_target = xs_pos * targets + xs_neg * (1 - targets)
            weights = torch.pow(1 - p_target, gamma_pos * targets + gamma_neg * (1 - targets))
        loss = loss * weights
    return -loss.sum()


def _world_size() -> int:
    distributed = torch.distributed
    return distributed.get_world_size() if distributed.is_available() and distributed.is_initialized() else 1


class DualCoOp(Method):
    name = "DualCoOp"
    description = "DualCoOp: learnt positive and negative prompts of a frozen CLIP RN101 over its spatial tokens"
    hyperparameters = (N_CTX_POS, N_CTX_NEG, CSC, LOSS_WEIGHT, ASL_GAMMA_POS, ASL_GAMMA_NEG, ASL_CLIP,
                       UNOBSERVED_AS_NEGATIVE)
    dataset_defaults = DATASET_DEFAULTS
    own_model = "clip_prompts"

    @classmethod
    def check_config(cls, config: dict) -> None:
        super().check_config(config)
        if config["train_mode"] != "end_to_end":
            raise ValueError("-l DualCoOp trains its prompts on images: it needs --train-mode end_to_end")
        if config["head"] != "linear":
            raise ValueError("-l DualCoOp classifies with its prompts: leave --head out")
        if config["backbone_weights"] is not None:
            raise ValueError("-l DualCoOp's model is the --teacher CLIP: give its weights with --clip-weights, "
                             "not --backbone-weights")
        names = prompt_class_names(config["dataset"])
        context_length = int((models.TINY_RN_CLIP_CONFIG if config["tiny_models"] else its_clip().config)
                             ["text_cfg"]["context_length"])
        tokenizer = clip_tokenizer(context_length)
        for flag, n_ctx in (("--n-ctx-pos", config["n_ctx_pos"]), ("--n-ctx-neg", config["n_ctx_neg"])):
            long = prompts_that_do_not_fit(names, n_ctx, tokenizer, context_length)
            if long:
                raise ValueError(f"{flag} {n_ctx}: {len(long)} prompt(s) do not fit the text tower's {context_length} "
                                 f"tokens (e.g. {long[0][-60:]!r}); give a smaller {flag}")

    @classmethod
    def build_model(cls, config: dict, num_classes: int, *, pretrained: bool = True) -> DualCoOpModel:
        clip_model = models.load_clip(config["clip_weights"] if pretrained else None, teacher=its_clip(),
                                      tiny=config["tiny_models"], pretrained=pretrained)
        names = prompt_class_names(config["dataset"])
        if len(names) != num_classes:
            raise ValueError(f"{config['dataset']} has {len(names)} class names for {num_classes} classes")
        tokenizer = clip_tokenizer(int(clip_model.context_length))
        return DualCoOpModel(clip_model, names, tokenizer, config["n_ctx_pos"], config["n_ctx_neg"], config["csc"])

    def loss(self, inputs: LossInputs, epoch: int) -> Tensor:
        hp: SimpleNamespace = self.hp
        targets = (inputs.observed == 1).to(inputs.logits.dtype)
        known = None if hp.unobserved_as_negative else inputs.observed != 0
        loss = dualcoop_asl(inputs.logits, targets, known, hp.asl_gamma_pos, hp.asl_gamma_neg, hp.asl_clip)
        # A sum over the batch: under torchrun, where DDP averages the processes' gradients, each
        # process's share counts world-size times, so the step is the one-process step.
        return hp.loss_weight * _world_size() * loss
