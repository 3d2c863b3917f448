"""DAMP, the pseudo-labels of AEVLP (Tran et al., ICCV 2025; code ``Fsoft-AIC/AEVLP``), and the
teacher views it is computed from: the whole image and a g x g grid of tiles.

* ``damp_pseudo_labels``: AEVLP's ``utils.get_pseudo_labels`` as a pure function of the views'
  cosine similarities with the class text features.
* ``aevlp_views``: what AEVLP's dataset (``datasets.ds_multilabel.__getitem__``, ``tx['pl']``)
  feeds its CLIP for one image and a draw of per-view flips.
* ``aevlp_view_recipe``: every view in both flips, for the embedding cache (``caches``): the
  teacher is frozen and each view's flip is its only randomness, so the teacher's output for a
  training image is a pure function of (image, flips) and both flips of every view can be
  embedded once; ``pick_flips`` takes the rows of the flips a batch drew.
* ``DAMP_SETTINGS``: the published per-dataset settings.
* ``DampRule``: the pseudo-label rule ``damp`` (``pseudo_labels.RULES``): DAMP on the whole image
  and its g x g tiles, each view flipped independently. Every view in both flips is embedded once
  and cached (float16, as AEVLP's teacher computes); each batch picks the flip its sampler drew for
  each view, and DAMP runs on the cosine similarities of those rows. Nothing but the flips varies
  between AEVLP's per-step CLIP passes, so these are the pseudo-labels it would compute, without a
  CLIP pass per step.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import functional as TF

import datasets
import teacher as teacher_module
from pseudo_labels import aevlp_text
from caches import Encoder
from teacher import cosine_similarities
from distributed import Distributed
from pseudo_labels.base import PseudoLabelRule, RuleContext


# The input size of AEVLP's CLIP (OpenAI ViT-B/16): tx['pl'] resizes every view to 224 x 224.
AEVLP_VIEW_SIZE = 224


@dataclass(frozen=True)
class DampSettings:
    """DAMP's settings for one dataset (AEVLP's names)."""
    grid_size: int          # g: the image is cut into g x g tiles
    temp: float             # softmax temperature over classes
    eta: float              # cap on the observed positive's global score (gamma's threshold)
    threshold: float        # a top-k class becomes a positive when its score is >= threshold
    top_k: int              # at most this many positives per image
    negative_ratio: float   # int(negative_ratio * K) lowest-scored classes are cleared to 0


# A run's configuration key of each setting (the flags of the methods that use DAMP: its temp and
# threshold are not VLPL's -t and -th).
DAMP_CONFIG_KEYS = {"grid_size": "grid_size", "temp": "damp_temp", "eta": "damp_eta", "threshold": "damp_threshold",
                    "top_k": "damp_top_k", "negative_ratio": "negative_ratio"}


def settings_from_config(config: dict) -> DampSettings:
    return DampSettings(**{field: config[key] for field, key in DAMP_CONFIG_KEYS.items()})


def settings_as_config(settings: DampSettings) -> dict:
    return {key: getattr(settings, field) for field, key in DAMP_CONFIG_KEYS.items()}


# AEVLP's configs/<dataset>.json (grid_size, temp, eta, threshold, negative_ratio; the run scripts
# pass --use_config_file True) and config.py's _LOOKUP['top_k'] (set after the file is read).
DAMP_SETTINGS = {
    "pascal": DampSettings(grid_size=4, temp=0.01, eta=0.0, threshold=0.5, top_k=3, negative_ratio=0.2),
    "coco": DampSettings(grid_size=4, temp=0.01, eta=0.3, threshold=0.5, top_k=3, negative_ratio=0.3),
    "nuswide": DampSettings(grid_size=4, temp=0.01, eta=0.3, threshold=0.6, top_k=3, negative_ratio=0.2),
    "cub": DampSettings(grid_size=5, temp=0.1, eta=0.005, threshold=0.005, top_k=32, negative_ratio=0.2),
}


def num_views(grid_size: int) -> int:
    """1 + g^2: the whole image, then the g x g tiles."""
    if int(grid_size) != grid_size or grid_size < 1:
        raise ValueError(f"grid_size must be a positive integer, got {grid_size!r}")
    return 1 + int(grid_size) ** 2


# ----------------------------------------------------------------------------------------------
# Pseudo-labels
# ----------------------------------------------------------------------------------------------

def damp_pseudo_labels(views: torch.Tensor, observed: torch.Tensor, accumulated: torch.Tensor, *,
                       grid_size: int, temp: float, eta: float, threshold: float, top_k: int,
                       negative_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """AEVLP's ``get_pseudo_labels`` (utils.py) on the same inputs; returns the same two
    matrices, ``(accumulated, current)``, as new tensors (no argument is modified).

    ``views``: B x (1+g^2) x K cosine similarities between each view's image embedding and the
    class text features, view 0 the whole image, then the tiles row by row (AEVLP passes them
    view-major, flattened: its ``logits`` are ``views.transpose(0, 1).reshape(-1, K)``).
    ``observed``: B x K observed labels (a single 1 per row). ``accumulated``: B x K, what
    AEVLP passes as ``pseudo_label_vec``.

    With s = softmax(views / temp) over classes, s_0 the whole image's row and s_1..s_{g^2}
    the tiles', per image and class:

    * max_c = max over tiles, min_c = min over tiles, avg_c = mean over tiles;
    * e = min(max_c' (s_0 * observed)_c', eta): the observed positive's global score, capped;
    * final_c = (s_0,c + (max_c if max_c > e else min_c)) / 2, score_c = (s_0,c + avg_c) / 2;
    * current = 1 on the top_k classes by final that have final >= threshold, else 0 (int32);
    * accumulated (returned) = where(accumulated == 0, current, accumulated), taken before the
      next step (the dtype of ``torch.where(int32, accumulated)``: float32 for float32 input);
    * then current is set to 0 on the int(negative_ratio * K) classes with the lowest score
      ("negative pseudo-labels": they only clear positives, no -1 is ever written).

    ``preds`` (the student's predictions), an argument of theirs, is unused there and omitted.
    Ties: ``torch.topk`` leaves which of equal scores it picks unspecified; here the lower class
    index wins (stable sort), for the positives and the cleared classes alike. Otherwise the
    operations are theirs, in their order and dtypes (fp16 similarities give fp16 scores).

    **Which output AEVLP trains on.** Its train.py calls ``_, pseudo_labels =
    get_pseudo_labels(...)``: the loss (GPR) receives ``current``, and ``current`` (not the
    accumulated matrix) is what it keeps between epochs, written in place into the train set's
    ``pseudo_label_matrix[idx]`` (initially zeros) and read back next epoch as
    ``pseudo_label_vec``, i.e. this function's ``accumulated`` argument. The returned
    ``accumulated`` is discarded, so in the published code the kept matrix influences nothing
    the model is trained on; it only feeds the discarded output. ``get_pseudo_labels`` itself
    modifies none of its inputs (its in-place ``scatter_`` calls write the new ``current``).
    """
    if views.ndim != 3 or views.shape[1] != num_views(grid_size):
        raise ValueError(f"views must be B x {num_views(grid_size)} x K (the whole image and "
                         f"{grid_size}x{grid_size} tiles), got {tuple(views.shape)}")
    batch, _, num_classes = views.shape
    for name, matrix in (("observed", observed), ("accumulated", accumulated)):
        if tuple(matrix.shape) != (batch, num_classes):
            raise ValueError(f"{name} must be {batch} x {num_classes}, got {tuple(matrix.shape)}")
    if not temp > 0:
        raise ValueError(f"temp must be positive, got {temp}")
    if not 1 <= top_k <= num_classes:
        raise ValueError(f"top_k must be in [1, {num_classes}], got {top_k}")
    if not 0 <= negative_ratio <= 1:
        raise ValueError(f"negative_ratio must be in [0, 1], got {negative_ratio}")

    similarity = torch.softmax(views / temp, dim=-1)
    sim_global, sim_locals = similarity[:, 0], similarity[:, 1:]
    local_max = sim_locals.max(dim=1).values
    local_min = sim_locals.min(dim=1).values
    local_avg = sim_locals.mean(dim=1)
    observed_score = (sim_global * observed.to(views.device)).max(dim=1).values
    cap = torch.minimum(observed_score, torch.tensor(float(eta), device=views.device))[:, None]
    final = 0.5 * (sim_global + torch.where(local_max > cap, local_max, local_min))
    score = 0.5 * (sim_global + local_avg)

    ranked = torch.sort(final, dim=1, descending=True, stable=True)
    current = torch.zeros(final.shape, dtype=torch.int32, device=views.device)
    current.scatter_(1, ranked.indices[:, :top_k], (ranked.values[:, :top_k] >= threshold).int())
    accumulated_out = torch.where(accumulated.to(views.device) == 0, current, accumulated.to(views.device))

    num_cleared = int(negative_ratio * num_classes)
    if num_cleared > 0:
        lowest = torch.sort(score, dim=1, stable=True).indices[:, :num_cleared]
        current.scatter_(1, lowest, 0)
    return accumulated_out, current


# ----------------------------------------------------------------------------------------------
# Views
# ----------------------------------------------------------------------------------------------

def tile_boxes(width: int, height: int, grid_size: int) -> list[tuple[int, int, int, int]]:
    """The (left, upper, right, lower) PIL crop boxes of the g x g tiles, row by row, as AEVLP
    cuts them: tiles of width // g by height // g pixels from the top-left corner (the last
    width % g columns and height % g rows belong to no tile; the random overlap their loop draws
    is overwritten with 0)."""
    num_views(grid_size)
    g = int(grid_size)
    tile_width, tile_height = width // g, height // g
    if tile_width == 0 or tile_height == 0:
        raise ValueError(f"image {width} x {height} is too small for a {g} x {g} grid of tiles")
    return [(x * tile_width, y * tile_height, min(width, (x + 1) * tile_width), min(height, (y + 1) * tile_height))
            for y in range(g) for x in range(g)]


def _pieces(image: Image.Image, grid_size: int) -> list[Image.Image]:
    """The whole RGB image, then its tiles."""
    image = image.convert("RGB")
    return [image] + [image.crop(box) for box in tile_boxes(*image.size, grid_size)]


def _unflipped(piece: Image.Image, size: int) -> torch.Tensor:
    """tx['pl'] without its flip: Resize((size, size)) (PIL bilinear), ToTensor, ImageNet Normalize.
    Their flip comes after the resize and everything after it is per pixel, so a flipped view
    is exactly ``torch.flip`` of this one along the width."""
    resized = piece.resize((size, size), Image.Resampling.BILINEAR)
    return TF.normalize(TF.to_tensor(resized), list(datasets.IMAGENET_MEAN), list(datasets.IMAGENET_STD))


def _flipped(tensor: torch.Tensor) -> torch.Tensor:
    return torch.flip(tensor, dims=[-1])


def aevlp_views(image: Image.Image, flips: Sequence[bool], *, grid_size: int,
                size: int = AEVLP_VIEW_SIZE) -> torch.Tensor:
    """(1+g^2) x 3 x size x size: what AEVLP's CLIP receives for ``image`` (its ``sub_images``),
    the whole image and then the tiles (``tile_boxes``), each resized to size x size (PIL
    bilinear), flipped horizontally where ``flips`` (1+g^2 bools, one per view, drawn
    independently by AEVLP) is true, ImageNet-normalised."""
    pieces = _pieces(image, grid_size)
    if len(flips) != len(pieces):
        raise ValueError(f"flips must have {len(pieces)} entries (one per view), got {len(flips)}")
    views = [_unflipped(piece, size) for piece in pieces]
    return torch.stack([_flipped(v) if flip else v for v, flip in zip(views, flips)])


@dataclass(frozen=True)
class AEVLPViewRecipe:
    """image -> the 2*(1+g^2) views for the cache (picklable: loader workers), view-major:
    entry 2*v + f is view v (0 the whole image, then the tiles row by row) unflipped (f = 0)
    and flipped (f = 1); ``aevlp_views(image, flips)[v]`` is entry ``2*v + flips[v]``."""
    grid_size: int
    size: int = AEVLP_VIEW_SIZE

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        out = []
        for piece in _pieces(image, self.grid_size):
            view = _unflipped(piece, self.size)
            out += [view, _flipped(view)]
        return out

    @property
    def num_views(self) -> int:
        return num_views(self.grid_size)

    def key(self) -> dict:
        """What a cache of its embeddings depends on besides the encoder."""
        return {"views": "AEVLP whole image + grid tiles (width // g, height // g from the top left)",
                "grid_size": self.grid_size, "size": self.size, "resize": "PIL bilinear",
                "normalisation": "imagenet", "order": "view-major, [unflipped, flipped]"}


def aevlp_view_recipe(grid_size: int, size: int = AEVLP_VIEW_SIZE) -> AEVLPViewRecipe:
    """Every view of an image in both flips (``AEVLPViewRecipe``: order 2*v + flip)."""
    num_views(grid_size)
    return AEVLPViewRecipe(int(grid_size), int(size))


def pick_flips(cached: torch.Tensor | np.ndarray, flips: torch.Tensor) -> torch.Tensor:
    """B x (1+g^2) x D rows of the drawn flips from B x 2(1+g^2) x D cached rows (recipe order)
    and B x (1+g^2) boolean ``flips``."""
    cached = torch.as_tensor(cached)
    batch, total, dim = cached.shape
    if total % 2 or tuple(flips.shape) != (batch, total // 2):
        raise ValueError(f"cached rows {tuple(cached.shape)} and flips {tuple(flips.shape)} do not match "
                         f"(B x 2V x D and B x V)")
    pairs = cached.reshape(batch, total // 2, 2, dim)
    index = flips.to(device=cached.device, dtype=torch.long)[:, :, None, None].expand(batch, total // 2, 1, dim)
    return pairs.gather(2, index)[:, :, 0]


def aevlp_encoder(teacher: teacher_module.Teacher, grid_size: int, size: int | None = None) -> Encoder:
    """The teacher's image tower over the recipe's views, for ``caches.cached_embeddings`` /
    ``OfficialSetCache``: N x 2(1+g^2) x D raw image embeddings (normalise them, e.g. with
    ``cosine_similarities``), keyed by the weights and the recipe.

    The embeddings are rounded to float16 (AEVLP's CLIP runs in float16, so its embeddings are
    float16 values) and cached as float16: half the disk and memory of a multi-view cache
    (COCO: N x 34 x 512 is 2.9 GB instead of 5.7 GB). ``encode`` itself rounds, so embeddings
    computed now and cached ones are the same numbers."""
    recipe = aevlp_view_recipe(grid_size, teacher.input_size if size is None else size)

    def encode(images: torch.Tensor) -> torch.Tensor:
        return teacher.clip_model.encode_image(images).half().float()
    key = {"teacher": teacher.fingerprint, "output": "image embedding before L2 normalisation, rounded to float16",
           **recipe.key()}
    return Encoder(encode, key, f"teacher-aevlp-g{recipe.grid_size}", recipe.size, (), (), views=recipe,
                   dtype="float16")


# ----------------------------------------------------------------------------------------------
# The rule
# ----------------------------------------------------------------------------------------------

class DampRule(PseudoLabelRule):
    """AEVLP's DAMP pseudo-labels from cached view embeddings, with the settings of the method's
    DAMP flags (``methods.aevlp``)."""

    def __init__(self, context: RuleContext):
        super().__init__(context)
        self.settings = settings_from_config(context.config)
        self.similarities: Tensor | None = None          # N x 2V x K, float32, on the CPU
        # AEVLP's pseudo_label_matrix: each row's latest pseudo-labels, fed back to DAMP as its
        # accumulated input (which only shapes an output AEVLP discards; kept for fidelity and
        # for the per-epoch report).
        self.kept = torch.zeros(context.labels.shape, dtype=torch.float32)
        self._pending: list[tuple[Tensor, Tensor]] = []

    @classmethod
    def check_config(cls, config):
        if config["train_mode"] != "end_to_end":
            raise ValueError(f"-l {config['method']} draws a flip per teacher view in every step: it needs "
                             f"--train-mode end_to_end")
        if config["pseudo_labels"] != "cached":
            raise ValueError(f"-l {config['method']}: DAMP's views are cached in both flips, which gives the "
                             f"pseudo-labels a per-step pass would (bench/aevlp_cost.py measures that pass); "
                             f"drop --pseudo-labels online")
        num_classes = datasets.get_dataset_info(config["dataset"]).num_classes
        if config["damp_top_k"] > num_classes:
            raise ValueError(f"--damp-top-k {config['damp_top_k']} exceeds the {num_classes} classes")

    @classmethod
    def text_features(cls, config, teacher, num_classes):
        """AEVLP's: the teacher's raw text embeddings of "a photo of a {name}." for its class-name
        lists, perturbed by its frozen graph convolution (``--text-gcn``, seeded by ``-s``),
        L2-normalised."""
        raw = teacher.encode_text(aevlp_text.aevlp_prompts(config["dataset"]), normalize=False)
        return aevlp_text.aevlp_text_features(raw, config["dataset"], config["seed"], perturb=config["text_gcn"])

    @property
    def num_view_flips(self) -> int:
        return num_views(self.settings.grid_size)

    def encoder(self) -> Encoder:
        context = self.context
        context.teacher.to(context.device)
        return aevlp_encoder(context.teacher, self.settings.grid_size)

    def prepare(self) -> None:
        """Every view of every official train image in both flips, embedded once (cached), and
        their cosine similarities with the class text features."""
        context = self.context
        # Not kept in memory by the cache: a multi-view cache is GBs and nothing reads it again.
        official = context.cache.embeddings("train", self.encoder(), keep=False)   # every official train image
        rows = context.benchmark.train_indices
        text_features = context.text_features.to(context.device)
        # The train split's rows a chunk at a time: no copy of the (float16, GBs) cache is made.
        chunk = max(1, 2 ** 22 // int(np.prod(official.shape[1:])))
        self.similarities = torch.cat([
            cosine_similarities(torch.from_numpy(official[rows[start:start + chunk]]).to(context.device),
                                text_features).cpu()
            for start in range(0, len(rows), chunk)])
        context.log(f"DAMP: {self.similarities.shape[1] // 2} views x 2 flips of {len(rows)} training images "
                    f"cached; settings {self.settings}")

    def batch(self, index, batch, observed):
        device = observed.device
        views = pick_flips(self.similarities[index], batch["view_flips"]).to(device)
        _, current = damp_pseudo_labels(views, observed, self.kept[index].to(device),
                                        **dataclasses.asdict(self.settings))
        rows = current.float().cpu()
        self.kept[index] = rows
        self._pending.append((index.cpu(), rows))
        return current.float()

    def restart(self) -> None:
        self.kept.zero_()
        self._pending.clear()

    def sync(self, dist: Distributed) -> None:
        if dist.enabled:
            for changes in dist.gather_objects(self._pending):
                for index, rows in changes:
                    self.kept[index] = rows
        self._pending.clear()

    def end_epoch(self, epoch: int) -> None:
        """AEVLP's per-epoch report: its pseudo-labels against the clean labels, unobserved
        entries only (its compute_precision_recall_pl, as fractions)."""
        context = self.context
        self.set_report(teacher_module.pseudo_label_report(self.kept, context.benchmark.train.labels,
                                                           context.labels.observed.numpy()),
                        f"DAMP pseudo-labels of epoch {epoch} (unobserved entries, vs clean train labels)")

    def state_dict(self) -> dict:
        return {"kept": self.kept.clone()}

    def load_state_dict(self, state: dict) -> None:
        kept = state["kept"]
        if tuple(kept.shape) != tuple(self.kept.shape):
            raise ValueError(f"checkpoint DAMP pseudo-labels {tuple(kept.shape)} for {tuple(self.kept.shape)} "
                             f"training labels")
        self.kept = kept.to(torch.float32).clone()
        self._pending.clear()
