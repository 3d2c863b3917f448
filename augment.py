"""Training-time image augmentations: ``--augmentation``, a protocol setting (a method's table picks
the one its code trains with; the user may choose another).

An augmentation acts on the training image after its resize to the input size and before
``ToTensor`` / ``Normalize``. Every random choice comes from a ``numpy.random.Generator`` seeded
per item by ``datasets.AugmentationSampler`` in the main process (never from the global ``random``
or ``numpy.random`` state of a worker), so an epoch's inputs depend only on the stage's generator:
a resumed run repeats the run in one go, whatever the number of workers.

* ``flip``: the horizontal flip drawn by the sampler, nothing else (VLPL's and every baseline's).
* ``cutout_randaugment``: DualCoOp's training transform (sunxm2357/DualCoOp,
  ``dataloaders/*.py``): ``CutoutPIL(cutout_factor=0.5)`` (``dataloaders/helper.py``), then
  ``RandAugment()`` of the pip package ``randaugment`` 1.0.2 (jizongFox/pytorch-randaugment,
  which its README installs; not torchvision's RandAugment), and no flip.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

# PIL image, per-item generator -> PIL image of the same size and mode.
ImageAugment = Callable[[Image.Image, np.random.Generator], Image.Image]


def random_sign(rng: np.random.Generator) -> int:
    """-1 or 1 with equal odds (the package's ``random.choice([-1, 1])``)."""
    return (-1, 1)[int(rng.integers(2))]


# -- DualCoOp's CutoutPIL --------------------------------------------------------------------------

def cutout_pil(image: Image.Image, rng: np.random.Generator, cutout_factor: float = 0.5) -> Image.Image:
    """DualCoOp's ``CutoutPIL``: a rectangle of ``cutout_factor`` times the image's sides, centred
    at a uniform pixel and clipped to the image, filled with one uniform random colour (PIL's
    rectangle includes both corners). Its code takes ``size[0]`` (the width) as the height: with the
    square inputs it always receives that changes nothing, and it is kept so for any input. Draws,
    in its order: the centre's row, its column, the colour. Draws on a copy."""
    image = image.copy()
    h, w = image.size[0], image.size[1]
    h_cutout, w_cutout = int(cutout_factor * h + 0.5), int(cutout_factor * w + 0.5)
    y_c, x_c = int(rng.integers(h)), int(rng.integers(w))
    y1, y2 = np.clip([y_c - h_cutout // 2, y_c + h_cutout // 2], 0, h)
    x1, x2 = np.clip([x_c - w_cutout // 2, x_c + w_cutout // 2], 0, w)
    fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
    ImageDraw.Draw(image).rectangle([int(x1), int(y1), int(x2), int(y2)], fill=fill)
    return image


# -- the pip package randaugment 1.0.2: its operations ---------------------------------------------

GREY = (128, 128, 128)              # its fill colour of the geometric operations
CUTOUT_COLOUR = (125, 122, 113)     # its Cutout's colour


def _shear_x(image, magnitude, rng):
    return image.transform(image.size, Image.Transform.AFFINE, (1, magnitude * random_sign(rng), 0, 0, 1, 0),
                           Image.Resampling.BICUBIC, fillcolor=GREY)


def _shear_y(image, magnitude, rng):
    return image.transform(image.size, Image.Transform.AFFINE, (1, 0, 0, magnitude * random_sign(rng), 1, 0),
                           Image.Resampling.BICUBIC, fillcolor=GREY)


def _translate_x(image, magnitude, rng):
    # Nearest-neighbour: the package passes no resampling filter.
    return image.transform(image.size, Image.Transform.AFFINE,
                           (1, 0, magnitude * image.size[0] * random_sign(rng), 0, 1, 0), fillcolor=GREY)


def _translate_y(image, magnitude, rng):
    return image.transform(image.size, Image.Transform.AFFINE,
                           (1, 0, 0, 0, 1, magnitude * image.size[1] * random_sign(rng)), fillcolor=GREY)


def _rotate(image, magnitude, rng):
    # Always counter-clockwise (its signed rotation is commented out), the corners grey.
    rotated = image.convert("RGBA").rotate(magnitude)
    return Image.composite(rotated, Image.new("RGBA", rotated.size, (128,) * 4), rotated).convert(image.mode)


def _enhance(enhancer):
    return lambda image, magnitude, rng: enhancer(image).enhance(1 + magnitude * random_sign(rng))


def _cutout(image, size, rng):
    """Its ``Cutout(size)``: a square of side ``size`` (clipped) centred at a uniform pixel, in its
    colour. Its first coordinate runs over ``size[0]``, the width, as PIL's pixel access expects."""
    image = image.copy()
    first, second = int(rng.integers(0, image.size[0])), int(rng.integers(0, image.size[1]))
    half = int(size) // 2
    box = (max(0, first - half), max(0, second - half), min(image.size[0], first + half),
           min(image.size[1], second + half))
    image.paste(CUTOUT_COLOUR, box)
    return image


@dataclass(frozen=True)
class RandOp:
    """One operation of the package: its 10 magnitudes (``SubPolicy``'s ``ranges``; levels 1..9 are
    drawn) and ``apply(image, magnitude, rng)``."""
    magnitudes: tuple
    apply: Callable[[Image.Image, object, np.random.Generator], Image.Image]


_SHEAR = tuple(np.linspace(0, 0.3, 10))
_TRANSLATE = tuple(np.linspace(0, 150 / 331, 10))
_ENHANCE = tuple(np.linspace(0.0, 0.9, 10))
_NONE = (0,) * 10

# In the order of its RandAugment.get_trans_list().
RANDAUGMENT_OPS: dict[str, RandOp] = {
    "Invert": RandOp(_NONE, lambda image, magnitude, rng: ImageOps.invert(image)),
    "Cutout": RandOp(tuple(int(v) for v in np.round(np.linspace(0, 20, 10), 0)), _cutout),
    "Sharpness": RandOp(_ENHANCE, _enhance(ImageEnhance.Sharpness)),
    "AutoContrast": RandOp(_NONE, lambda image, magnitude, rng: ImageOps.autocontrast(image)),
    "Posterize": RandOp(tuple(int(v) for v in np.round(np.linspace(8, 4, 10), 0)),
                        lambda image, bits, rng: ImageOps.posterize(image, bits)),
    "ShearX": RandOp(_SHEAR, _shear_x),
    "TranslateX": RandOp(_TRANSLATE, _translate_x),
    "TranslateY": RandOp(_TRANSLATE, _translate_y),
    "ShearY": RandOp(_SHEAR, _shear_y),
    "Rotate": RandOp(tuple(np.linspace(0, 30, 10)), _rotate),
    "Equalize": RandOp(_NONE, lambda image, magnitude, rng: ImageOps.equalize(image)),
    "Contrast": RandOp(_ENHANCE, _enhance(ImageEnhance.Contrast)),
    "Color": RandOp(_ENHANCE, _enhance(ImageEnhance.Color)),
    "Solarize": RandOp(tuple(np.linspace(256, 0, 10)), lambda image, threshold, rng: ImageOps.solarize(image, threshold)),
    "Brightness": RandOp(_ENHANCE, _enhance(ImageEnhance.Brightness)),
}
RANDAUGMENT_LEVELS = range(1, 10)
RANDAUGMENT_PROBABILITY = 0.5
# Its policies: every (operation, level) pair twice over, one pair drawn uniformly per image.
RANDAUGMENT_CHOICES = tuple((name, level) for name in RANDAUGMENT_OPS for level in RANDAUGMENT_LEVELS)


def rand_augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The package's ``RandAugment()(image)``: one of its 135 x 135 policies drawn uniformly, that is
    two (operation, level) choices; each applied with probability 0.5, the second to the first's
    result. Draws, in its order: the policy, then per choice the coin and the operation's own draws."""
    policy = int(rng.integers(len(RANDAUGMENT_CHOICES) ** 2))
    for name, level in (RANDAUGMENT_CHOICES[policy // len(RANDAUGMENT_CHOICES)],
                        RANDAUGMENT_CHOICES[policy % len(RANDAUGMENT_CHOICES)]):
        if rng.random() < RANDAUGMENT_PROBABILITY:
            op = RANDAUGMENT_OPS[name]
            image = op.apply(image, op.magnitudes[level], rng)
    return image


def dualcoop_augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """DualCoOp's training transform between its resize and ToTensor: CutoutPIL(0.5), RandAugment()."""
    return rand_augment(cutout_pil(image, rng), rng)


# -- the table -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Augmentation:
    """An ``--augmentation``: whether the sampler's horizontal flip applies, and the random
    transform of the resized image (None: none)."""
    flips: bool
    transform: ImageAugment | None
    help: str


AUGMENTATIONS: dict[str, Augmentation] = {
    "flip": Augmentation(True, None, "a random horizontal flip (VLPL and every baseline)"),
    "cutout_randaugment": Augmentation(
        False, dualcoop_augment, "DualCoOp's: CutoutPIL(0.5) then the pip randaugment package's RandAugment(), "
        "no flip"),
}
DEFAULT_AUGMENTATION = "flip"


def get_augmentation(name: str) -> Augmentation:
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown --augmentation {name!r}; choose one of: {', '.join(AUGMENTATIONS)}")
    return AUGMENTATIONS[name]
