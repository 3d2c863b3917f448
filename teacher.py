"""The frozen CLIP teacher and its pseudo-labels (docs/DESIGN.md §3).

* ``teacher_input`` is what the teacher's image encoder receives for a training image and its
  flip, under a named view (``TEACHER_VIEWS``: ``original``, the published pipeline, and
  ``clip``, the repaired one); the cache and the online path both use it.
* ``Teacher`` wraps a frozen open_clip CLIP (weights from ``models.load_clip``) and records its
  name in ``models.TEACHERS`` (``--teacher``); ``encoder(view)`` describes its input for the
  embedding cache (``caches``): both flips of every image.
* ``pseudo_labels_from_embeddings``: softmax over the class text features, threshold, partial
  negatives (VLPL's rule, ``pseudo_labels.vlpl``, applies it to cached embeddings or to a batch).
* ``load_text_features`` reads the K x D class text features; ``pseudo_label_report`` scores
  pseudo-labels against the clean labels.
"""
from __future__ import annotations

import functools
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from PIL import Image
from torch import nn

import datasets
import models
from caches import Encoder


# The published pipeline's student input size: the teacher saw the student's 448 x 448 tensor.
ORIGINAL_SOURCE_SIZE = 448


def _to_normalized_tensor(image: Image.Image, mean, std) -> torch.Tensor:
    from torchvision.transforms import functional as TF
    return TF.normalize(TF.to_tensor(image), list(mean), list(std))


def _original_view(image: Image.Image, flip: bool, size: int) -> torch.Tensor:
    """VLPL's code: the student's batch (PIL bilinear resize to 448, flip, ImageNet
    normalisation) resized on the tensor to the teacher's size, bilinear without antialiasing
    (torchvision 0.12's tensor resize)."""
    image = image.resize((ORIGINAL_SOURCE_SIZE, ORIGINAL_SOURCE_SIZE), Image.Resampling.BILINEAR)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    tensor = _to_normalized_tensor(image, datasets.IMAGENET_MEAN, datasets.IMAGENET_STD)
    return F.interpolate(tensor[None], size=(size, size), mode="bilinear", align_corners=False,
                         antialias=False)[0]


def _clip_view(image: Image.Image, flip: bool, size: int) -> torch.Tensor:
    """The repaired view: CLIP's own normalisation, the image resized directly to the teacher's
    size (PIL bilinear), flipped first as the student's images are."""
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _to_normalized_tensor(image.resize((size, size), Image.Resampling.BILINEAR),
                                 datasets.CLIP_MEAN, datasets.CLIP_STD)


# --teacher-view: name -> (image, flip, size) -> the teacher's input. The recipes' names key the caches.
TEACHER_VIEWS = {
    "original": _original_view,
    "clip": _clip_view,
}


# --teacher-view: name -> size -> the side of the PIL bilinear resize each view starts with (for
# 'clip' after the flip, which commutes with it). An image cache (--image-cache uint8) of images
# already resized to that side gives the view exactly: resizing them again to it is a copy.
TEACHER_VIEW_SOURCE_SIZES = {
    "original": lambda size: ORIGINAL_SOURCE_SIZE,
    "clip": lambda size: size,
}


def view_source_size(view) -> int | None:
    """The side of the resize an ``ImageView`` starts with, for the views this module makes
    (``Teacher.view``, ``student_view``, and ``Flips`` of them); None for any other callable."""
    if isinstance(view, Flips):
        view = view.view
    if isinstance(view, functools.partial) and view.func is teacher_input and not view.args \
            and set(view.keywords) == {"view", "size"} and view.keywords["view"] in TEACHER_VIEW_SOURCE_SIZES:
        return TEACHER_VIEW_SOURCE_SIZES[view.keywords["view"]](view.keywords["size"])
    return None


def teacher_input(image: Image.Image, flip: bool, view: str, *, size: int = 336) -> torch.Tensor:
    """3 x size x size float tensor: exactly what the teacher's image encoder receives for the
    RGB ``image`` (flipped horizontally if ``flip``) under ``view`` (``TEACHER_VIEWS``)."""
    if view not in TEACHER_VIEWS:
        raise ValueError(f"unknown teacher view {view!r}; choose one of: {', '.join(TEACHER_VIEWS)}")
    return TEACHER_VIEWS[view](image.convert("RGB"), bool(flip), size)


def student_view(backbone: models.BackboneSpec, view: str, image_size: int) -> datasets.ImageView | None:
    """A student's input when it is not its backbone's own resize and normalisation: a backbone
    that copies the teacher's tower sees the teacher's view at its own size, as the original fed
    its CLIP student the teacher's tensor."""
    if not backbone.copies_clip_tower:
        return None
    return functools.partial(teacher_input, view=view, size=image_size)


class Teacher(nn.Module):
    """A frozen CLIP: eval mode, no gradients, L2-normalised image and text embeddings. ``name``:
    its ``models.TEACHERS`` entry (the tokenizer of ``encode_text``)."""

    def __init__(self, clip_model: CLIP, fingerprint: str, name: str = models.DEFAULT_TEACHER):
        super().__init__()
        self.spec = models.teacher_spec(name)
        self.name = name
        self.clip_model = clip_model.eval()
        self.clip_model.requires_grad_(False)
        self.fingerprint = fingerprint
        self.input_size = models.clip_image_size(clip_model)
        self.embed_dim = int(clip_model.text_projection.shape[1])
        self.context_length = int(clip_model.context_length)
        self.eval()

    def train(self, mode: bool = True) -> Teacher:
        # Stays in eval mode even when a parent module is switched to training.
        return super().train(False)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """B x D unit-norm embeddings of images already at ``input_size`` with CLIP normalisation."""
        return F.normalize(self.clip_model.encode_image(images).float(), dim=-1)

    def view(self, view: str) -> datasets.ImageView:
        """(image, flip) -> this teacher's input under ``view`` (picklable: loader workers)."""
        return functools.partial(teacher_input, view=view, size=self.input_size)

    def encoder(self, view: str, flips: bool = True) -> Encoder:
        """Its image tower as the embedding cache sees it: raw image embeddings (normalised
        when pseudo-labels are made) of each image as is and, with ``flips``, flipped (N x 2 x D);
        keyed by the weights and the view (not the teacher's name: the weights' fingerprint
        already tells real teachers apart, and the caches of existing runs stay valid)."""
        def encode(images: torch.Tensor) -> torch.Tensor:
            return self.clip_model.encode_image(images).float()
        key = {"teacher": self.fingerprint, "output": "image embedding before L2 normalisation",
               "view": view, "flips": [False, True] if flips else [False]}
        if view == "original":
            key["source_size"] = ORIGINAL_SOURCE_SIZE
        return Encoder(encode, key, f"teacher-{view}", self.input_size, (), (),
                       views=Flips(self.view(view), tuple(key["flips"])))

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256, *, normalize: bool = True) -> torch.Tensor:
        """K x D float32 text embeddings: unit-norm, or with ``normalize=False`` the text tower's
        raw output after its projection (AEVLP perturbs those). The teacher's own open_clip
        tokenizer, which ships with the package and works offline."""
        tokenizer = open_clip.get_tokenizer(self.spec.open_clip_name, context_length=self.context_length)
        device = self.clip_model.text_projection.device
        parts = [self.clip_model.encode_text(tokenizer(list(texts[i:i + batch_size])).to(device))
                 for i in range(0, len(texts), batch_size)]
        embeddings = torch.cat(parts).float()
        return F.normalize(embeddings, dim=-1) if normalize else embeddings


def build_teacher(clip_weights: str | os.PathLike | None = None, *, teacher: str = models.DEFAULT_TEACHER,
                  tiny: bool = False, clip_model: CLIP | None = None, pretrained: bool = True) -> Teacher:
    """The frozen ``teacher`` (a ``models.TEACHERS`` name) around ``clip_model``
    (``load_clip(clip_weights, teacher=teacher, tiny=tiny, pretrained=pretrained)`` if None); its
    fingerprint hashes the weights (``weights_fingerprint``), random ones included."""
    if clip_model is None:
        clip_model = models.load_clip(clip_weights, teacher=teacher, tiny=tiny, pretrained=pretrained)
    return Teacher(clip_model, models.weights_fingerprint(clip_model), teacher)


# ----------------------------------------------------------------------------------------------
# Pseudo-labels and text features
# ----------------------------------------------------------------------------------------------

def cosine_similarities(embeddings: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """... x K cosine similarities of ... x D image embeddings with K x D text features (both
    L2-normalised, as AEVLP's generator does before its product)."""
    e = F.normalize(torch.as_tensor(embeddings).float(), dim=-1)
    t = F.normalize(torch.as_tensor(text_features).float().to(e.device), dim=-1)
    return e @ t.T


def pseudo_labels_from_embeddings(embeddings: torch.Tensor | np.ndarray,
                                  text_features: torch.Tensor | np.ndarray, temperature: float,
                                  threshold: float, partial: float
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """docs/DESIGN.md §3: s = softmax(e T^T / temperature) over classes; q = +1 where
    s > threshold; then, if partial > 0, the int(partial * K) classes with the smallest s of
    each row get q = -1 (applied last, so it wins in the corner case threshold < 1/K).
    Ties among the smallest s go to the lower class index (stable sort).
    Returns (q, s): float B x K on the embeddings' device."""
    e = torch.as_tensor(embeddings).float()
    t = torch.as_tensor(text_features).float().to(e.device)
    if e.ndim != 2 or t.ndim != 2 or e.shape[1] != t.shape[1]:
        raise ValueError(f"embeddings {tuple(e.shape)} and text features {tuple(t.shape)} must be "
                         f"B x D and K x D with the same D")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if not 0 <= partial <= 1:
        raise ValueError(f"partial must be in [0, 1], got {partial}")
    similarity = torch.softmax(e @ t.T / temperature, dim=1)
    q = (similarity > threshold).float()
    num_negative = int(partial * t.shape[0])
    if num_negative > 0:
        order = torch.sort(similarity, dim=1, stable=True).indices[:, :num_negative]
        q.scatter_(1, order, -1.0)
    return q, similarity


def text_features_file(info: datasets.DatasetInfo, teacher: str = models.DEFAULT_TEACHER) -> str:
    """The dataset folder's text-feature file of ``teacher``: the registry's file (VLPL's, made
    with its ViT-L teacher) for the default teacher, ``<stem>_<teacher>.npy`` for another, so
    that features of different widths never share a file."""
    models.teacher_spec(teacher)
    if teacher == models.DEFAULT_TEACHER:
        return info.text_feature_file
    path = Path(info.text_feature_file)
    return f"{path.stem}_{teacher}{path.suffix}"


def _text_features_command(dataset: str | None, teacher: str | None = None, data_root: str | None = None,
                            tiny: bool = False) -> str:
    # The run's own settings, each only where it is not make_text_features.py's default (the
    # shortest command that makes the file this run reads).
    options = "".join((f" --teacher {teacher}" if teacher not in (None, models.DEFAULT_TEACHER) else "",
                       f" --data-root {shlex.quote(str(data_root))}" if data_root not in (None, "data") else "",
                       " --tiny" if tiny else ""))
    return f"python preproc/make_text_features.py --dataset {dataset or 'NAME'}{options}"


def _warn_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# Rows whose norm is further than this from 1 are reported (files saved from fp16 features are
# unit-norm to about 1e-3).
UNIT_NORM_TOLERANCE = 1e-2


def load_text_features(path: str | os.PathLike, num_classes: int, embed_dim: int, *,
                       dataset: str | None = None, teacher: str | None = None,
                       data_root: str | None = None, tiny: bool = False,
                       warn: Callable[[str], None] = _warn_stderr) -> torch.Tensor:
    """A K x D float32 ``.npy``, rows used as stored (as the original code did). Errors name the
    file, the expected K x D (or the bad row: zero or non-finite) and the command that makes a
    matching file (for the run's ``teacher``); rows that are not unit-norm are one line through
    ``warn`` (stderr)."""
    path = Path(path)
    expected = f"{num_classes} x {embed_dim} (classes x teacher embedding width)"
    remake = f"`{_text_features_command(dataset, teacher, data_root, tiny)}`"
    if not path.is_file():
        raise FileNotFoundError(f"text features {path} not found; expected a {expected} .npy: "
                                f"make it with {remake}")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise ValueError(f"text features {path}: not a readable .npy ({error}); remake it with "
                         f"{remake}") from error
    if array.ndim != 2 or array.shape != (num_classes, embed_dim):
        raise ValueError(f"text features {path} have shape {array.shape}, expected {expected}; "
                         f"make matching ones with {remake} (with the teacher's --clip-weights)")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"text features {path}: need floats, got dtype {array.dtype}; remake them with {remake}")
    norms = np.linalg.norm(array.astype(np.float64), axis=1)
    for bad, what in ((~np.isfinite(array).all(axis=1), "holds a non-finite value"), (norms == 0, "is all zeros")):
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(f"text features {path}: row {row}{_class_name(dataset, row)} {what} "
                             f"({int(bad.sum())} such rows); remake them with {remake}")
    off = np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE
    if off.any():
        warn(f"warning: text features {path}: {int(off.sum())} of {len(norms)} rows are not unit-norm (norms "
             f"{norms.min():.3g} to {norms.max():.3g}); they are used as stored, as the original code did")
    return torch.from_numpy(array.astype(np.float32))


def _class_name(dataset: str | None, row: int) -> str:
    """' (<class name>)' of ``row`` when the dataset is known, else ''."""
    if dataset not in datasets.DATASETS:
        return ""
    names = datasets.get_dataset_info(dataset).class_names
    return f" ({names[row]})" if row < len(names) else ""


def pseudo_label_report(q: torch.Tensor | np.ndarray, clean_labels: np.ndarray,
                        observed: np.ndarray | None = None) -> dict:
    """How good the pseudo-labels are against the clean labels (entries == 1 are positive):
    precision and recall of the +1 pseudo-labels, positives and negatives per image, and, when
    there are -1 pseudo-labels, ``negative_precision`` (share of them truly absent). With
    ``observed``, only the unobserved entries (o == 0, where the loss reads q) count.
    All values are numbers (a ratio with an empty denominator is 0.0, as scikit-learn's
    zero_division=0), so the dict formats and serialises as it is."""
    q = q.detach().cpu().numpy() if isinstance(q, torch.Tensor) else np.asarray(q)
    clean = np.asarray(clean_labels) == 1
    if q.shape != clean.shape:
        raise ValueError(f"pseudo-labels {q.shape} and clean labels {clean.shape} differ in shape")
    counted = np.ones_like(clean) if observed is None else (np.asarray(observed) == 0)
    positive = (q == 1) & counted
    negative = (q == -1) & counted
    num_positive, num_negative = int(positive.sum()), int(negative.sum())
    true_positive = int((positive & clean).sum())
    num_images = int(q.shape[0])

    def ratio(numerator: int, denominator: int) -> float:
        return float(numerator / denominator) if denominator else 0.0

    report = {
        "precision": ratio(true_positive, num_positive),
        "recall": ratio(true_positive, int((clean & counted).sum())),
        "positives_per_image": ratio(num_positive, num_images),
        "negatives_per_image": ratio(num_negative, num_images),
        "num_images": num_images,
    }
    if num_negative:
        report["negative_precision"] = ratio(int((negative & ~clean).sum()), num_negative)
    return report



@dataclass(frozen=True)
class Flips:
    """An image's views for the cache: ``view(image, flip)`` for each flip (picklable)."""
    view: datasets.ImageView
    flips: tuple[bool, ...]

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [self.view(image, flip) for flip in self.flips]
