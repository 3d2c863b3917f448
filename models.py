"""Backbones, heads and weight loading (docs/DESIGN.md §6).

* The backbone table (``BackboneSpec``, ``backbone_spec``) holds every fact about a backbone the
  rest of the code asks: input size, input normalisation, convolutional or not, feature size,
  spatial output, whether it copies the CLIP tower, how it is built and which weight file it takes.
* ``build_model`` makes every backbone through one ``Classifier`` (pooled features + a linear head).
* Weights come from a named local file (``--backbone-weights`` / ``--clip-weights``) or from the
  libraries' own download; ``check_weights_available`` checks that one of them will work before
  any data work starts.
* The teacher table (``TeacherSpec``, ``TEACHERS``: ``--teacher``) names each CLIP teacher's
  open_clip architecture and where its OpenAI weights are; ``load_clip(teacher=NAME)`` reads the
  CLIP model the teacher (``teacher.py``) wraps, and ``clip_vision`` copies its tower.
* ``tiny=True`` gives the same classes at a tiny size with random weights (tests and the demo);
  ``pretrained=False`` gives the full-size architectures with random weights, reading and
  downloading nothing (bench/epoch_cost.py).
"""
from __future__ import annotations

import copy
import hashlib
import os
import pickle
import socket
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import open_clip
import timm
import torch
import torchvision
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.transformer import text_global_pool
from torch import nn
from torch.nn import functional as F

import datasets
import hf_clip


@dataclass(frozen=True)
class TeacherSpec:
    """A CLIP teacher (``--teacher``): open_clip's architecture and where OpenAI's weights for it are."""
    # open_clip's -quickgelu configs: OpenAI's weights were trained with QuickGELU (the plain
    # configs use nn.GELU and give slightly different embeddings).
    open_clip_name: str
    pretrained_tag: str          # open_clip's tag of OpenAI's weights (its download)
    openai_file: str             # OpenAI's TorchScript file, what --clip-weights should name
    hf_repo: str                 # the Hugging Face transformers checkpoint of the same weights ("": none)
    description: str             # for --help

    @property
    def config(self) -> dict:
        """open_clip's model config (a fresh copy)."""
        return open_clip.get_model_config(self.open_clip_name)

    @property
    def image_size(self) -> int:
        return int(self.config["vision_cfg"]["image_size"])

    @property
    def embed_dim(self) -> int:
        return int(self.config["embed_dim"])

    @property
    def is_resnet(self) -> bool:
        """Its image tower is CLIP's ModifiedResNet (layers per stage), not a ViT."""
        return isinstance(self.config["vision_cfg"]["layers"], (list, tuple))


# --teacher: name -> teacher. A new teacher is one entry; nothing else tests the names.
TEACHERS: dict[str, TeacherSpec] = {
    "ViT-L-14-336": TeacherSpec("ViT-L-14-336-quickgelu", "openai", "ViT-L-14-336px.pt",
                                "openai/clip-vit-large-patch14-336", "VLPL's teacher"),
    "ViT-B-16": TeacherSpec("ViT-B-16-quickgelu", "openai", "ViT-B-16.pt", "openai/clip-vit-base-patch16",
                            "AEVLP's teacher"),
}
DEFAULT_TEACHER = "ViT-L-14-336"

# The CLIP of -m clip_prompts (DualCoOp's model), not a teacher: open_clip's RN101 with OpenAI's
# weights, read from --clip-weights when given. transformers has no ResNet CLIP: no folder for it.
RN101_CLIP = TeacherSpec("RN101-quickgelu", "openai", "RN101.pt", "", "DualCoOp's CLIP")

# The default teacher's names, for callers from before the table.
CLIP_MODEL_NAME = TEACHERS[DEFAULT_TEACHER].open_clip_name
CLIP_PRETRAINED_TAG = TEACHERS[DEFAULT_TEACHER].pretrained_tag
CLIP_OPENAI_FILE = TEACHERS[DEFAULT_TEACHER].openai_file

# Tiny models (tests, demo): one input size for all of them, small enough for a 2-core CPU.
TINY_INPUT_SIZE = 64
TINY_CLIP_CONFIG = dict(
    embed_dim=64,
    quick_gelu=True,
    vision_cfg=dict(image_size=TINY_INPUT_SIZE, layers=2, width=64, head_width=32, patch_size=16),
    # The real vocabulary and context length, so the real (offline) tokenizer serves both.
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
)
# The tiny CLIP of a ResNet teacher (RN101): CLIP's ModifiedResNet with one block per stage.
TINY_RN_CLIP_CONFIG = dict(
    embed_dim=64,
    quick_gelu=True,
    vision_cfg=dict(image_size=TINY_INPUT_SIZE, layers=[1, 1, 1, 1], width=8, head_width=64),
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
)
# open_clip's random ResNet passes an image on at about 1e-3 of the attention pool's random
# positional embedding, which would drown it: the tiny one's embedding is scaled down by this.
TINY_RN_POSITIONAL_SCALE = 1e-3
TINY_CLIP_SEED = 0  # the tiny CLIP is the same in every process: text features made by
                    # preproc/make_text_features.py --tiny match the teacher of a --tiny-models run

# Extra entries of OpenAI's TorchScript state dict that open_clip's CLIP does not have.
_OPENAI_JIT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
_CONNECT_TIMEOUT_S = 3.0


class WeightsUnavailableError(FileNotFoundError):
    """Weights can be neither read from a file nor downloaded (a FileNotFoundError, so the
    command line reports it as a one-line user error)."""


def teacher_spec(teacher: str | TeacherSpec) -> TeacherSpec:
    """A ``TEACHERS`` entry by name; a spec given as it is (a model's own CLIP: ``RN101_CLIP``)."""
    if isinstance(teacher, TeacherSpec):
        return teacher
    if teacher not in TEACHERS:
        raise ValueError(f"unknown teacher {teacher!r}; choose one of: {', '.join(TEACHERS)}")
    return TEACHERS[teacher]


# ----------------------------------------------------------------------------------------------
# Backbone table
# ----------------------------------------------------------------------------------------------

# (tiny, pretrained, clip_model) -> (module returning pooled B x D features, D)
BuildFn = Callable[[bool, bool, "CLIP | None"], tuple[nn.Module, int]]


@dataclass(frozen=True)
class BackboneSpec:
    input_size: int
    mean: tuple[float, float, float]      # input normalisation
    std: tuple[float, float, float]
    convolutional: bool                   # trained in channels_last
    feature_dim: int                      # pooled feature size at full size (tiny models differ)
    copies_clip_tower: bool               # starts as a copy of the CLIP teacher's vision tower
    build: BuildFn
    # Keys of the library's own classification layer, dropped from weight files.
    classifier_prefixes: tuple[str, ...]
    weights_hint: str            # what --backbone-weights should name
    download: str                # where the library download comes from (for messages)
    # Converts a weight file's state dict to the library's names (e.g. FB's ConvNeXt files).
    convert_state: Callable[[dict, nn.Module], dict] | None = None
    # Whether the library's download of the weights can be had now (cached or reachable).
    library_weights_available: Callable[[], bool] | None = None
    # The built (pooled) backbone turned into one returning its B x D x H x W feature map.
    spatial: Callable[[nn.Module], nn.Module] | None = None
    # Made of this CLIP's weights (--clip-weights, or open_clip's download), not a library's or the teacher's.
    clip: TeacherSpec | None = None
    # A method's own model: built by the method that runs it (methods.base.Method.build_model),
    # never by build_model; other methods refuse it.
    method_built: bool = False

    @property
    def spatial_output(self) -> bool:
        return self.spatial is not None


def _build_resnet50(tiny: bool, pretrained: bool, clip_model: CLIP | None) -> tuple[nn.Module, int]:
    if tiny:
        # A ResNet with one BasicBlock per stage: the same class and forward, ~5M parameters.
        net = torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
    else:
        weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V1 if pretrained else None
        net = torchvision.models.resnet50(weights=weights)
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def _convnext_builder(timm_name: str) -> BuildFn:
    def build(tiny: bool, pretrained: bool, clip_model: CLIP | None) -> tuple[nn.Module, int]:
        # num_classes=0: timm keeps the pooling and head norm and returns pooled features.
        net = timm.create_model("test_convnext" if tiny else timm_name,
                                pretrained=pretrained and not tiny, num_classes=0)
        return net, net.num_features
    return build


def _copy_clip_tower(tiny: bool, pretrained: bool, clip_model: CLIP | None) -> tuple[nn.Module, int]:
    net = copy.deepcopy(clip_model.visual)
    # The source may be the frozen teacher's tower: the copy is trained.
    net.requires_grad_(True)
    net.train()
    return net, int(net.output_dim)


def _built_by_its_method(tiny: bool, pretrained: bool, clip_model: CLIP | None) -> tuple[nn.Module, int]:
    raise ValueError("this model is built by the method that runs it (methods.base.Method.build_model)")


def _resnet_feature_map(net: nn.Module) -> nn.Module:
    # Everything before the global pooling and the (identity) classifier.
    return nn.Sequential(*list(net.children())[:-2])


class _TimmFeatureMap(nn.Module):
    """A timm model's ``forward_features``: its last feature map, before the head's pooling and norm."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)


def _convert_convnext_state(state: dict, net: nn.Module) -> dict:
    # Converts FB's original ConvNeXt checkpoints to timm names; timm files pass unchanged.
    from timm.models.convnext import checkpoint_filter_fn
    return checkpoint_filter_fn(state, net)


def _convnext_download_available(timm_name: str) -> Callable[[], bool]:
    def available() -> bool:
        hub_id = timm.models.get_pretrained_cfg(timm_name).hf_hub_id
        return _download_available(_hf_cached(hub_id, ("model.safetensors", "pytorch_model.bin")),
                                   "huggingface.co")
    return available


def _resnet50_download_available() -> bool:
    url = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url
    cached = (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)).is_file()
    # torch hub has no offline switch of its own: HF_HUB_OFFLINE means "no downloads" here too.
    return _download_available(cached, "download.pytorch.org")


def _convnext_spec(timm_name: str, fb_file: str) -> BackboneSpec:
    return BackboneSpec(
        448, datasets.IMAGENET_MEAN, datasets.IMAGENET_STD, convolutional=True, feature_dim=2048,
        copies_clip_tower=False, build=_convnext_builder(timm_name),
        classifier_prefixes=("head.fc.",),
        weights_hint=f"/path/to/model.safetensors (timm {timm_name}, or FB's {fb_file})",
        download=f"timm's download of {timm_name}", convert_state=_convert_convnext_state,
        library_weights_available=_convnext_download_available(timm_name), spatial=_TimmFeatureMap)


BACKBONE_SPECS: dict[str, BackboneSpec] = {
    "resnet50": BackboneSpec(
        448, datasets.IMAGENET_MEAN, datasets.IMAGENET_STD, convolutional=True, feature_dim=2048,
        copies_clip_tower=False, build=_build_resnet50, classifier_prefixes=("fc.",),
        weights_hint="/path/to/resnet50-0676ba61.pth (torchvision ResNet-50 ImageNet V1 state dict)",
        download="torchvision's ResNet50_Weights.IMAGENET1K_V1 download",
        library_weights_available=_resnet50_download_available, spatial=_resnet_feature_map),
    # Input size and feature size are the default teacher's: a tower copy has its teacher's
    # (input_size(..., teacher=...), the built model's output_dim).
    "clip_vision": BackboneSpec(
        TEACHERS[DEFAULT_TEACHER].image_size, datasets.CLIP_MEAN, datasets.CLIP_STD, convolutional=False,
        feature_dim=TEACHERS[DEFAULT_TEACHER].embed_dim,
        copies_clip_tower=True, build=_copy_clip_tower, classifier_prefixes=(),
        weights_hint="--clip-weights (clip_vision copies the CLIP vision tower)", download="open_clip's download"),
    # timm's ConvNeXt-XL: ImageNet-22k weights, and 22k fine-tuned on 1k.
    "convnext_xlarge_22k": _convnext_spec("convnext_xlarge.fb_in22k", "convnext_xlarge_22k_224.pth"),
    "convnext_xlarge_1k": _convnext_spec("convnext_xlarge.fb_in22k_ft_in1k", "convnext_xlarge_22k_1k_224_ema.pth"),
    # DualCoOp's model (-l DualCoOp builds it, methods/dualcoop.py): CLIP RN101 (RN101_CLIP), both
    # towers frozen, classifying with learnt prompts over the image's spatial tokens; 448 px, CLIP's
    # normalisation, as DualCoOp's loaders give it. The run records it as its -m.
    "clip_prompts": BackboneSpec(
        448, datasets.CLIP_MEAN, datasets.CLIP_STD, convolutional=True, feature_dim=RN101_CLIP.embed_dim,
        copies_clip_tower=False, build=_built_by_its_method, classifier_prefixes=(),
        weights_hint="--clip-weights RN101.pt (OpenAI's CLIP RN101)", download="open_clip's download",
        clip=RN101_CLIP, method_built=True),
}
MODELS = tuple(BACKBONE_SPECS)     # every -m: the backbones and the methods' own models
BACKBONES = tuple(name for name, spec in BACKBONE_SPECS.items() if not spec.method_built)   # build_model's


def backbone_spec(backbone: str) -> BackboneSpec:
    if backbone not in BACKBONE_SPECS:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of: {', '.join(MODELS)}")
    return BACKBONE_SPECS[backbone]


def input_size(backbone: str, tiny: bool = False, teacher: str = DEFAULT_TEACHER) -> int:
    """Side of the square input the backbone is trained at: 448; clip_vision: its ``teacher``'s
    (336 for ViT-L-14-336, 224 for ViT-B-16); ``TINY_INPUT_SIZE`` for every tiny model."""
    spec = backbone_spec(backbone)
    if tiny:
        return TINY_INPUT_SIZE
    return teacher_spec(teacher).image_size if spec.copies_clip_tower else spec.input_size


class BoostLUHead(nn.Module):
    """BoostLU (Kim et al., CVPR 2023): class activation maps from a 1x1 convolution over the
    feature map, their positive part scaled by ``alpha``, averaged over space into logits."""

    def __init__(self, feature_dim: int, num_classes: int, alpha: float = 5.0):
        super().__init__()
        self.cam = nn.Conv2d(feature_dim, num_classes, kernel_size=1)
        self.alpha = alpha

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        cam = self.cam(feature_map)
        return torch.where(cam > 0, self.alpha * cam, cam).mean(dim=(2, 3))


@dataclass(frozen=True)
class HeadSpec:
    build: Callable[[int, int], nn.Module]     # (feature size, classes) -> head
    spatial: bool                              # reads the backbone's feature map, not pooled features
    description: str


# --head: the classifier on top of the backbone.
HEADS: dict[str, HeadSpec] = {
    "linear": HeadSpec(nn.Linear, False, "a linear layer on the pooled features (every method's default)"),
    "boostlu": HeadSpec(BoostLUHead, True, "BoostLU: class activation maps, positive part x5, averaged (Kim et al. 2023)"),
}


class Classifier(nn.Module):
    """A backbone and a head: pooled features (B x D) and a linear head (D -> K), or, for a head
    that reads feature maps, the backbone's B x D x H x W map. One forward path for every backbone."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, image_size: int,
                 head: str = "linear"):
        super().__init__()
        self.backbone = backbone
        self.head = HEADS[head].build(feature_dim, num_classes)
        self.feature_dim = feature_dim
        self.input_size = image_size

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.features(x))


def build_model(backbone: str, num_classes: int, *, backbone_weights: str | os.PathLike | None = None,
                clip_model: CLIP | None = None, tiny: bool = False,
                clip_weights: str | os.PathLike | None = None, pretrained: bool = True,
                head: str = "linear", teacher: str = DEFAULT_TEACHER) -> Classifier:
    """The ``backbone`` with a ``num_classes`` head (docs/DESIGN.md §6).

    resnet50 / convnext: weights from ``backbone_weights`` when given, else the library download
    (tiny: random init, unless ``backbone_weights`` is given). clip_vision: a trainable deep copy
    of ``clip_model.visual`` (``load_clip(clip_weights, teacher=teacher, tiny=tiny,
    pretrained=pretrained)`` when ``clip_model`` is None).

    ``pretrained=False``: the full-size architecture (or the tiny one with ``tiny``) with random
    weights; nothing is read or downloaded, so a weight file may not be named with it (a given
    ``clip_model`` is still copied as it is). For benchmarks of speed and memory.

    ``head``: a ``HEADS`` entry; one that reads feature maps needs a backbone with a spatial output.

    A method's own model (``method_built``: clip_prompts) is built by its method, not here.
    """
    spec = backbone_spec(backbone)
    if spec.method_built:
        raise ValueError(f"-m {backbone} is built by the method that runs it (methods.base.Method.build_model)")
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of: {', '.join(HEADS)}")
    if HEADS[head].spatial and spec.spatial is None:
        raise ValueError(f"--head {head} reads a feature map, which -m {backbone} does not give; choose a "
                         f"convolutional backbone")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not pretrained and (backbone_weights is not None or clip_weights is not None):
        raise ValueError("pretrained=False builds random weights; it takes no weight file")
    if spec.copies_clip_tower:
        if backbone_weights is not None:
            raise ValueError(f"{backbone} takes its weights from --clip-weights, not --backbone-weights")
        if clip_model is None:
            clip_model = load_clip(clip_weights, teacher=teacher, tiny=tiny, pretrained=pretrained)
        net, dim = spec.build(tiny, pretrained, clip_model)
        size = clip_image_size(clip_model)
    else:
        net, dim = spec.build(tiny, pretrained and backbone_weights is None and not tiny, None)
        if backbone_weights is not None:
            _load_backbone_weights(net, backbone_weights, backbone)
        size = input_size(backbone, tiny)
    if HEADS[head].spatial:
        net = spec.spatial(net)  # after the weights are in: files hold the pooled backbone's names
    return Classifier(net, dim, num_classes, size, head)


# ----------------------------------------------------------------------------------------------
# Weight files
# ----------------------------------------------------------------------------------------------

def _is_torchscript_archive(path: Path) -> bool:
    """True for a TorchScript zip (OpenAI's CLIP ``.pt`` files); torch.load's own test."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name == "constants.pkl" or name.endswith("/constants.pkl")
                   for name in archive.namelist())


def read_state_dict(path: str | os.PathLike, flag: str) -> dict[str, torch.Tensor]:
    """Tensors of a weight file: a TorchScript archive, ``.safetensors``, or a ``torch.save``d
    state dict (also wrapped as {'state_dict': ...} or {'model': ...}; 'module.' prefixes of
    DataParallel are removed). Errors name the file and ``flag``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: file not found")
    try:
        if _is_torchscript_archive(path):
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, ValueError, EOFError, zipfile.BadZipFile,
            pickle.UnpicklingError) as error:
        # torch.load runs with weights_only=True (no code from the file runs): a checkpoint that
        # pickles other objects is refused; its tensors can be re-saved alone.
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{flag} {path}: cannot read weights ({first_line}); expected a state "
                         f"dict of tensors (torch.save(model.state_dict(), FILE)), a .safetensors "
                         f"or a TorchScript file") from error
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state or \
            not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{flag} {path}: not a state dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], path: Path, flag: str,
                 expected: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming the file on a mismatch."""
    target = module.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    wrong_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
                   for k in target if k in state and state[k].shape != target[k].shape]
    if missing or unexpected or wrong_shape:
        details = "; ".join(f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                            for what, keys in (("missing", missing), ("unexpected", unexpected),
                                               ("wrong shape", wrong_shape)) if keys)
        raise ValueError(f"{flag} {path}: not {expected} weights ({details})")
    module.load_state_dict(state, strict=True)


def _load_backbone_weights(net: nn.Module, path: str | os.PathLike, backbone: str) -> None:
    spec = backbone_spec(backbone)
    path = Path(path)
    state = read_state_dict(path, "--backbone-weights")
    # A Classifier state dict (e.g. from a run's best.pt): its backbone part.
    if all(k.startswith(("backbone.", "head.")) for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if spec.convert_state is not None:
        state = spec.convert_state(state, net)
    state = {k: v for k, v in state.items() if not k.startswith(spec.classifier_prefixes)}
    _load_strict(net, state, path, "--backbone-weights", backbone)


def _clip_architecture(tiny: bool, teacher: str | TeacherSpec = DEFAULT_TEACHER) -> CLIP:
    """The ``teacher``'s architecture with open_clip's random initialisation; ``tiny``: the one
    tiny CLIP (for every teacher name: tests and the demo; ``TINY_RN_CLIP_CONFIG`` for a ResNet
    CLIP, ``RN101_CLIP``), with fixed random weights."""
    if tiny:
        cfg = copy.deepcopy(TINY_RN_CLIP_CONFIG if teacher_spec(teacher).is_resnet else TINY_CLIP_CONFIG)
        # Seeded without touching the caller's random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_CLIP_SEED)
            model = CLIP(embed_dim=cfg["embed_dim"], quick_gelu=cfg["quick_gelu"],
                         vision_cfg=CLIPVisionCfg(**cfg["vision_cfg"]),
                         text_cfg=CLIPTextCfg(**cfg["text_cfg"]))
        if teacher_spec(teacher).is_resnet:
            with torch.no_grad():
                model.visual.attnpool.positional_embedding.mul_(TINY_RN_POSITIONAL_SCALE)
        return model
    return CLIP(**teacher_spec(teacher).config)


def _clip_architecture_name(tiny: bool, teacher: str | TeacherSpec = DEFAULT_TEACHER) -> str:
    if tiny:
        return f"tiny (models.{'TINY_RN_CLIP_CONFIG' if teacher_spec(teacher).is_resnet else 'TINY_CLIP_CONFIG'})"
    return teacher_spec(teacher).open_clip_name


def _load_clip_weights(model: CLIP, path: str | os.PathLike, architecture: str) -> None:
    path = Path(path)
    if path.is_dir():
        # A transformers CLIPModel folder: its config must describe this architecture (heads
        # and activation do not show in the tensor shapes); its tensors are renamed to open_clip's.
        weights = hf_clip.check_folder(path, model, "--clip-weights", architecture)
        state = hf_clip.to_open_clip_state(read_state_dict(weights, "--clip-weights"))
        path = weights
    else:
        state = read_state_dict(path, "--clip-weights")
    # OpenAI's TorchScript files carry three scalars open_clip drops (as load_openai_model does);
    # traced archives also store non-persistent buffers (the text causal mask), rebuilt here.
    persistent = set(model.state_dict())
    non_persistent = {name for name, _ in model.named_buffers()} - persistent
    state = {k: v for k, v in state.items()
             if k not in _OPENAI_JIT_EXTRA_KEYS and k not in non_persistent}
    # OpenAI's files are partly float16; load_state_dict copies them into the float32 model.
    _load_strict(model, state, path, "--clip-weights", f"CLIP {architecture}")


def load_clip(clip_weights: str | os.PathLike | None = None, *, teacher: str | TeacherSpec = DEFAULT_TEACHER,
              tiny: bool = False, pretrained: bool = True) -> CLIP:
    """The CLIP model of ``teacher`` (a ``TEACHERS`` name, or a spec: ``RN101_CLIP``) in eval
    mode, float32, on the CPU.

    ``clip_weights``: OpenAI's TorchScript file (``ViT-L-14-336px.pt``, ``ViT-B-16.pt``: the
    teacher's ``openai_file``), a state-dict file, or a Hugging Face transformers CLIPModel folder
    (``hf_clip``: ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``, e.g. the
    cache's snapshot of the teacher's ``hf_repo``), read into the teacher's architecture (one-line
    errors naming it); None: open_clip's download of the teacher (``open_clip_name`` /
    ``pretrained_tag``). ``tiny``: a small CLIP with fixed random weights, the same for every
    teacher name (or ``clip_weights`` read into it). ``pretrained=False``: the full-size
    architecture (open_clip's config, as for a weight file) with open_clip's random
    initialisation; nothing is read or downloaded (no ``clip_weights``).
    """
    spec = teacher_spec(teacher)
    if not pretrained:
        if clip_weights is not None:
            raise ValueError("pretrained=False builds random weights; it takes no --clip-weights file")
        return _clip_architecture(tiny, teacher).float().eval()
    if clip_weights is None and not tiny:
        model = open_clip.create_model(spec.open_clip_name, pretrained=spec.pretrained_tag)
    else:
        model = _clip_architecture(tiny, teacher)
        if clip_weights is not None:
            _load_clip_weights(model, clip_weights, _clip_architecture_name(tiny, teacher))
    return model.float().eval()


def clip_image_size(clip_model: CLIP) -> int:
    size = clip_model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


# ----------------------------------------------------------------------------------------------
# A CLIP's spatial tokens and its text tower on token embeddings (DualCoOp's model: clip_prompts)
# ----------------------------------------------------------------------------------------------

def resized_positional_embedding(positional_embedding: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A ResNet CLIP attention pool's (1 + S*S) x C positional embedding for an h x w grid: token
    0's row as it is, the S x S spatial rows resized bicubically (``align_corners=False``), as
    DualCoOp's ``build_model_conv_proj`` resizes OpenAI's 7 x 7 to the input's grid (14 x 14 at 448)."""
    side = round((positional_embedding.shape[0] - 1) ** 0.5)
    if side * side + 1 != positional_embedding.shape[0]:
        raise ValueError(f"a positional embedding of {positional_embedding.shape[0]} rows is not 1 + a square grid")
    if (side, side) == tuple(grid):
        return positional_embedding
    spatial = positional_embedding[1:].permute(1, 0).reshape(1, -1, side, side)
    spatial = F.interpolate(spatial, size=tuple(grid), mode="bicubic", align_corners=False)
    return torch.cat([positional_embedding[:1], spatial.reshape(positional_embedding.shape[1], -1).permute(1, 0)])


def clip_resnet_spatial_tokens(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """B x D x (1 + h*w): every token of a ResNet CLIP's attention pool through its value and
    output projections only, without the attention (DualCoOp's ``AttentionConv``). Token 0 is the
    mean of the h x w feature map; the positional embedding is resized to the grid
    (``resized_positional_embedding``)."""
    x = visual.stem(images)
    x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
    pool = visual.attnpool
    positional = resized_positional_embedding(pool.positional_embedding, x.shape[-2:])
    x = x.flatten(2).permute(2, 0, 1)                                    # (h*w) x B x C
    x = torch.cat([x.mean(dim=0, keepdim=True), x]) + positional[:, None, :].to(x.dtype)
    x = F.linear(F.linear(x, pool.v_proj.weight, pool.v_proj.bias), pool.c_proj.weight, pool.c_proj.bias)
    return x.permute(1, 2, 0)


def encode_token_embeddings(clip_model: CLIP, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """N x D text features of N sequences given as token embeddings (N x L x width) instead of
    token ids: ``clip_model.encode_text`` after its token embedding, pooled where ``tokens`` (the
    ids the sequences stand for) put it (the end-of-text token). Learnt prompt vectors enter the
    text tower this way (CoOp's and DualCoOp's ``TextEncoder``)."""
    cast_dtype = clip_model.transformer.get_cast_dtype()
    x = embeddings.to(cast_dtype) + clip_model.positional_embedding.to(cast_dtype)
    x = clip_model.transformer(x, attn_mask=clip_model.attn_mask)
    x = clip_model.ln_final(x)
    x = text_global_pool(x, tokens, clip_model.text_pool_type, eos_token_id=getattr(clip_model, "text_eos_id", None))
    if isinstance(clip_model.text_projection, nn.Linear):
        return clip_model.text_projection(x)
    return x @ clip_model.text_projection


def weights_fingerprint(module: nn.Module) -> str:
    """A hash of a module's state dict (names, dtypes, shapes and values): identifies the weights
    wherever and in whatever format they were stored (~1 s per GB)."""
    digest = hashlib.sha256(type(module).__name__.encode())
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Start-up check: will the weights be there?
# ----------------------------------------------------------------------------------------------

def _offline_by_env() -> bool:
    """HF_HUB_OFFLINE set: the user asked for no downloads (read now, not at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _host_reachable(host: str, port: int = 443, timeout: float = _CONNECT_TIMEOUT_S) -> bool:
    """A TCP connection to ``host`` opens within ``timeout`` seconds (DNS included: the attempt
    runs in a daemon thread so a hanging resolver cannot stall start-up)."""
    result: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def _hf_cache_dir() -> Path:
    """huggingface_hub's cache folder, from the environment as it is now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "huggingface" / "hub"


def _hf_cached(repo_id: str, filenames: Sequence[str]) -> bool:
    from huggingface_hub import try_to_load_from_cache
    cache_dir = _hf_cache_dir()
    return any(isinstance(try_to_load_from_cache(repo_id, name, cache_dir=str(cache_dir)), str)
               for name in filenames)


def _download_available(cached: bool, host: str) -> bool:
    return cached or (not _offline_by_env() and _host_reachable(host))


def _clip_download_available(teacher: str | TeacherSpec = DEFAULT_TEACHER) -> bool:
    spec = teacher_spec(teacher)
    cfg = open_clip.get_pretrained_cfg(spec.open_clip_name, spec.pretrained_tag)
    repo_id = cfg["hf_hub"].rstrip("/")
    cached = _hf_cached(repo_id, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))
    return _download_available(cached, "huggingface.co")


def _check_file(path: str | os.PathLike, flag: str) -> None:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{flag} {path}: file not found")


def _check_clip_weights(path: str | os.PathLike, tiny: bool, teacher: str | TeacherSpec) -> None:
    """A file must exist; a transformers folder must hold its files and a config that matches
    the teacher's architecture, checked on a model built on the meta device (no memory, milliseconds)."""
    if not Path(path).is_dir():
        _check_file(path, "--clip-weights")
        return
    with torch.device("meta"):
        architecture = _clip_architecture(tiny, teacher)
    hf_clip.check_folder(path, architecture, "--clip-weights", _clip_architecture_name(tiny, teacher))


def check_weights_available(backbone: str, *, backbone_weights: str | os.PathLike | None = None,
                            clip_weights: str | os.PathLike | None = None, need_teacher: bool,
                            tiny: bool = False, teacher: str = DEFAULT_TEACHER) -> None:
    """Fail fast (seconds), before any data work, when the weights a run needs can be neither
    read nor downloaded. Named files must exist (a ``--clip-weights`` folder: its files, and a
    config.json matching the architecture); otherwise the library's cached download must be
    present or its server reachable (not with HF_HUB_OFFLINE=1). Raises FileNotFoundError
    (``WeightsUnavailableError``) naming the flag and the expected file, or ValueError for a
    folder whose config.json does not match. The CLIP weights are the ``teacher``'s (a
    ``TEACHERS`` name), which also gives ``clip_vision`` its tower; a model made of a CLIP of its
    own (``BackboneSpec.clip``: clip_prompts) takes ``--clip-weights`` for that CLIP instead."""
    spec = backbone_spec(backbone)
    if spec.clip is not None:
        teacher = spec.clip
    clip = teacher_spec(teacher)
    if (spec.copies_clip_tower or spec.clip is not None) and backbone_weights is not None:
        raise ValueError(f"{backbone} takes its weights from --clip-weights, not --backbone-weights")
    if backbone_weights is not None:
        _check_file(backbone_weights, "--backbone-weights")
    if clip_weights is not None:
        _check_clip_weights(clip_weights, tiny, teacher)
    if tiny:
        return  # random weights: nothing to download
    if not (spec.copies_clip_tower or spec.clip is not None) and backbone_weights is None \
            and not spec.library_weights_available():
        raise WeightsUnavailableError(
            f"no {backbone} weights: pass --backbone-weights {spec.weights_hint} or "
            f"allow {spec.download} (offline: HF_HUB_OFFLINE is set or the server is "
            f"unreachable, and the file is not in the download cache)")
    if (need_teacher or spec.copies_clip_tower or spec.clip is not None) and clip_weights is None \
            and not _clip_download_available(teacher):
        folder = f" or a transformers folder of {clip.hf_repo}" if clip.hf_repo else ""
        raise WeightsUnavailableError(
            f"no CLIP weights: pass --clip-weights /path/to/{clip.openai_file} (OpenAI){folder}, or allow "
            f"open_clip's download of {clip.open_clip_name} '{clip.pretrained_tag}' (offline: "
            f"HF_HUB_OFFLINE is set or huggingface.co is unreachable, and it is not in "
            f"{_hf_cache_dir()})")
