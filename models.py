"""Backbones, the frozen CLIP teacher, weight loading and the teacher-embedding cache.

DESIGN.md sections 4 (pseudo-labels, text features) and 6 (backbones, weights, speed).

* ``build_model`` makes every backbone through one ``Classifier`` (pooled features + a linear
  head); a small table says how each backbone is constructed and which weight file it expects.
* Weights come from a named local file (``--backbone-weights`` / ``--clip-weights``) or from the
  libraries' own download; ``check_weights_available`` checks that one of them will work before
  any data work starts.
* ``Teacher`` is a frozen CLIP; its image embeddings are computed once per image and cached by
  ``cached_embeddings``, so temperature / threshold / partial / text features cost no CLIP pass.
* ``tiny=True`` gives the same classes at a tiny size with random weights (tests and the demo);
  ``pretrained=False`` gives the full-size architectures with random weights, reading and
  downloading nothing (bench/epoch_cost.py).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import socket
import sys
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import open_clip
import timm
import torch
import torch.nn.functional as F
import torchvision
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from torch import nn
from tqdm import tqdm

import datasets
from fileio import atomic_write

BACKBONES = ("resnet50", "clip_vision", "convnext_xlarge_22k", "convnext_xlarge_1k")

# open_clip's name for ViT-L/14 at 336 px with QuickGELU, the activation OpenAI's weights were
# trained with (plain 'ViT-L-14-336' uses nn.GELU and gives slightly different embeddings).
CLIP_MODEL_NAME = "ViT-L-14-336-quickgelu"
CLIP_PRETRAINED_TAG = "openai"
CLIP_OPENAI_FILE = "ViT-L-14-336px.pt"

# Tiny models (tests, demo): one input size for all of them, small enough for a 2-core CPU.
TINY_INPUT_SIZE = 64
TINY_CLIP_CONFIG = dict(
    embed_dim=64,
    quick_gelu=True,
    vision_cfg=dict(image_size=TINY_INPUT_SIZE, layers=2, width=64, head_width=32, patch_size=16),
    # The real vocabulary and context length, so the real (offline) tokenizer serves both.
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
)
TINY_CLIP_SEED = 0  # the tiny CLIP is the same in every process: text features made by
                    # preproc/make_text_features.py --tiny match the teacher of a --tiny-models run

# Extra entries of OpenAI's TorchScript state dict that open_clip's CLIP does not have.
_OPENAI_JIT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
_CONNECT_TIMEOUT_S = 3.0


class WeightsUnavailableError(FileNotFoundError):
    """Weights can be neither read from a file nor downloaded (a FileNotFoundError, so the
    command line reports it as a one-line user error)."""


# ----------------------------------------------------------------------------------------------
# Backbone table
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _BackboneSpec:
    input_size: int
    # (tiny, pretrained) -> (module returning pooled B x D features, D); None for clip_vision,
    # which copies the vision tower of a CLIP model instead.
    build: Callable[[bool, bool], tuple[nn.Module, int]] | None
    # Keys of the library's own classification layer, dropped from weight files.
    classifier_prefixes: tuple[str, ...]
    weights_hint: str            # what --backbone-weights should name
    download: str                # where the library download comes from (for messages)


def _build_resnet50(tiny: bool, pretrained: bool) -> tuple[nn.Module, int]:
    if tiny:
        # A ResNet with one BasicBlock per stage: the same class and forward, ~5M parameters.
        net = torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
    else:
        weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V1 if pretrained else None
        net = torchvision.models.resnet50(weights=weights)
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


# timm's names of the two ConvNeXt backbones (weights: ImageNet-22k, and 22k fine-tuned on 1k).
_CONVNEXT_TIMM_NAMES = {"convnext_xlarge_22k": "convnext_xlarge.fb_in22k",
                        "convnext_xlarge_1k": "convnext_xlarge.fb_in22k_ft_in1k"}


def _convnext_builder(timm_name: str) -> Callable[[bool, bool], tuple[nn.Module, int]]:
    def build(tiny: bool, pretrained: bool) -> tuple[nn.Module, int]:
        # num_classes=0: timm keeps the pooling and head norm and returns pooled features.
        net = timm.create_model("test_convnext" if tiny else timm_name,
                                pretrained=pretrained and not tiny, num_classes=0)
        return net, net.num_features
    return build


_BACKBONE_SPECS: dict[str, _BackboneSpec] = {
    "resnet50": _BackboneSpec(
        448, _build_resnet50, ("fc.",),
        "/path/to/resnet50-0676ba61.pth (torchvision ResNet-50 ImageNet V1 state dict)",
        "torchvision's ResNet50_Weights.IMAGENET1K_V1 download"),
    "clip_vision": _BackboneSpec(
        336, None, (), "--clip-weights (clip_vision copies the CLIP vision tower)",
        "open_clip's download"),
    "convnext_xlarge_22k": _BackboneSpec(
        448, _convnext_builder(_CONVNEXT_TIMM_NAMES["convnext_xlarge_22k"]), ("head.fc.",),
        "/path/to/model.safetensors (timm convnext_xlarge.fb_in22k, or FB's "
        "convnext_xlarge_22k_224.pth)",
        "timm's download of convnext_xlarge.fb_in22k"),
    "convnext_xlarge_1k": _BackboneSpec(
        448, _convnext_builder(_CONVNEXT_TIMM_NAMES["convnext_xlarge_1k"]), ("head.fc.",),
        "/path/to/model.safetensors (timm convnext_xlarge.fb_in22k_ft_in1k, or FB's "
        "convnext_xlarge_22k_1k_224_ema.pth)",
        "timm's download of convnext_xlarge.fb_in22k_ft_in1k"),
}


def _spec(backbone: str) -> _BackboneSpec:
    if backbone not in _BACKBONE_SPECS:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of: {', '.join(BACKBONES)}")
    return _BACKBONE_SPECS[backbone]


def input_size(backbone: str, tiny: bool = False) -> int:
    """Side of the square input the backbone is trained at: 448, 336 for clip_vision;
    ``TINY_INPUT_SIZE`` for every tiny model."""
    spec = _spec(backbone)
    return TINY_INPUT_SIZE if tiny else spec.input_size


class Classifier(nn.Module):
    """A backbone returning pooled features (B x D) and a linear head (D -> K): one forward
    path for every backbone."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, image_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)
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
                clip_weights: str | os.PathLike | None = None, pretrained: bool = True) -> Classifier:
    """The ``backbone`` with a ``num_classes`` head (DESIGN section 6).

    resnet50 / convnext: weights from ``backbone_weights`` when given, else the library download
    (tiny: random init, unless ``backbone_weights`` is given). clip_vision: a trainable deep copy
    of ``clip_model.visual`` (``load_clip(clip_weights, tiny=tiny, pretrained=pretrained)`` when
    ``clip_model`` is None).

    ``pretrained=False``: the full-size architecture (or the tiny one with ``tiny``) with random
    weights; nothing is read or downloaded, so a weight file may not be named with it (a given
    ``clip_model`` is still copied as it is). For benchmarks of speed and memory.
    """
    spec = _spec(backbone)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not pretrained and (backbone_weights is not None or clip_weights is not None):
        raise ValueError("pretrained=False builds random weights; it takes no weight file")
    if backbone == "clip_vision":
        if backbone_weights is not None:
            raise ValueError("clip_vision takes its weights from --clip-weights, not --backbone-weights")
        if clip_model is None:
            clip_model = load_clip(clip_weights, tiny=tiny, pretrained=pretrained)
        net = copy.deepcopy(clip_model.visual)
        # The source may be the frozen teacher's tower: the copy is trained.
        net.requires_grad_(True)
        net.train()
        dim = int(net.output_dim)
        size = _clip_image_size(clip_model)
    else:
        net, dim = spec.build(tiny, pretrained and backbone_weights is None and not tiny)
        if backbone_weights is not None:
            _load_backbone_weights(net, backbone_weights, backbone)
        size = input_size(backbone, tiny)
    return Classifier(net, dim, num_classes, size)


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
    spec = _spec(backbone)
    path = Path(path)
    state = read_state_dict(path, "--backbone-weights")
    # A Classifier state dict (e.g. from a run's best.pt): its backbone part.
    if all(k.startswith(("backbone.", "head.")) for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if backbone.startswith("convnext"):
        # Converts FB's original ConvNeXt checkpoints to timm names; timm files pass unchanged.
        from timm.models.convnext import checkpoint_filter_fn
        state = checkpoint_filter_fn(state, net)
    state = {k: v for k, v in state.items() if not k.startswith(spec.classifier_prefixes)}
    _load_strict(net, state, path, "--backbone-weights", backbone)


def _clip_architecture(tiny: bool) -> CLIP:
    if tiny:
        cfg = copy.deepcopy(TINY_CLIP_CONFIG)
        # Seeded without touching the caller's random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_CLIP_SEED)
            return CLIP(embed_dim=cfg["embed_dim"], quick_gelu=cfg["quick_gelu"],
                        vision_cfg=CLIPVisionCfg(**cfg["vision_cfg"]),
                        text_cfg=CLIPTextCfg(**cfg["text_cfg"]))
    cfg = open_clip.get_model_config(CLIP_MODEL_NAME)
    return CLIP(**cfg)


def _load_clip_weights(model: CLIP, path: str | os.PathLike) -> None:
    path = Path(path)
    state = read_state_dict(path, "--clip-weights")
    # OpenAI's TorchScript files carry three scalars open_clip drops (as load_openai_model does);
    # traced archives also store non-persistent buffers (the text causal mask), rebuilt here.
    persistent = set(model.state_dict())
    non_persistent = {name for name, _ in model.named_buffers()} - persistent
    state = {k: v for k, v in state.items()
             if k not in _OPENAI_JIT_EXTRA_KEYS and k not in non_persistent}
    # OpenAI's files are partly float16; load_state_dict copies them into the float32 model.
    _load_strict(model, state, path, "--clip-weights", f"CLIP {CLIP_MODEL_NAME}")


def load_clip(clip_weights: str | os.PathLike | None = None, *, tiny: bool = False,
              pretrained: bool = True) -> CLIP:
    """The CLIP model in eval mode, float32, on the CPU.

    ``clip_weights``: OpenAI's TorchScript ``ViT-L-14-336px.pt`` or a state-dict file; None:
    open_clip's download of ``ViT-L-14-336-quickgelu`` / ``openai``. ``tiny``: a small CLIP with
    fixed random weights (or ``clip_weights`` read into it). ``pretrained=False``: the full-size
    ``ViT-L-14-336-quickgelu`` architecture (open_clip's config, as for a weight file) with
    open_clip's random initialisation; nothing is read or downloaded (no ``clip_weights``).
    """
    if not pretrained:
        if clip_weights is not None:
            raise ValueError("pretrained=False builds random weights; it takes no --clip-weights file")
        return _clip_architecture(tiny).float().eval()
    if clip_weights is None and not tiny:
        model = open_clip.create_model(CLIP_MODEL_NAME, pretrained=CLIP_PRETRAINED_TAG)
    else:
        model = _clip_architecture(tiny)
        if clip_weights is not None:
            _load_clip_weights(model, clip_weights)
    return model.float().eval()


def _clip_image_size(clip_model: CLIP) -> int:
    size = clip_model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


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


def _library_weights_available(backbone: str) -> bool:
    if backbone == "resnet50":
        url = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url
        cached = (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)).is_file()
        # torch hub has no offline switch of its own: HF_HUB_OFFLINE means "no downloads" here too.
        return _download_available(cached, "download.pytorch.org")
    hub_id = timm.models.get_pretrained_cfg(_CONVNEXT_TIMM_NAMES[backbone]).hf_hub_id
    return _download_available(_hf_cached(hub_id, ("model.safetensors", "pytorch_model.bin")),
                               "huggingface.co")


def _clip_download_available() -> bool:
    cfg = open_clip.get_pretrained_cfg(CLIP_MODEL_NAME, CLIP_PRETRAINED_TAG)
    repo_id = cfg["hf_hub"].rstrip("/")
    cached = _hf_cached(repo_id, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))
    return _download_available(cached, "huggingface.co")


def _check_file(path: str | os.PathLike, flag: str) -> None:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{flag} {path}: file not found")


def check_weights_available(backbone: str, *, backbone_weights: str | os.PathLike | None = None,
                            clip_weights: str | os.PathLike | None = None, need_teacher: bool,
                            tiny: bool = False) -> None:
    """Fail fast (seconds), before any data work, when the weights a run needs can be neither
    read nor downloaded. Named files must exist; otherwise the library's cached download must be
    present or its server reachable (not with HF_HUB_OFFLINE=1). Raises FileNotFoundError
    (``WeightsUnavailableError``) naming the flag and the expected file."""
    _spec(backbone)
    if backbone == "clip_vision" and backbone_weights is not None:
        raise ValueError("clip_vision takes its weights from --clip-weights, not --backbone-weights")
    if backbone_weights is not None:
        _check_file(backbone_weights, "--backbone-weights")
    if clip_weights is not None:
        _check_file(clip_weights, "--clip-weights")
    if tiny:
        return  # random weights: nothing to download
    if backbone != "clip_vision" and backbone_weights is None \
            and not _library_weights_available(backbone):
        raise WeightsUnavailableError(
            f"no {backbone} weights: pass --backbone-weights {_spec(backbone).weights_hint} or "
            f"allow {_spec(backbone).download} (offline: HF_HUB_OFFLINE is set or the server is "
            f"unreachable, and the file is not in the download cache)")
    if (need_teacher or backbone == "clip_vision") and clip_weights is None \
            and not _clip_download_available():
        raise WeightsUnavailableError(
            f"no CLIP weights: pass --clip-weights /path/to/{CLIP_OPENAI_FILE} (OpenAI) or allow "
            f"open_clip's download of {CLIP_MODEL_NAME} '{CLIP_PRETRAINED_TAG}' (offline: "
            f"HF_HUB_OFFLINE is set or huggingface.co is unreachable, and it is not in "
            f"{_hf_cache_dir()})")


# ----------------------------------------------------------------------------------------------
# Teacher
# ----------------------------------------------------------------------------------------------

class Teacher(nn.Module):
    """A frozen CLIP: eval mode, no gradients, L2-normalised image and text embeddings."""

    def __init__(self, clip_model: CLIP, fingerprint: str):
        super().__init__()
        self.clip_model = clip_model.eval()
        self.clip_model.requires_grad_(False)
        self.fingerprint = fingerprint
        self.input_size = _clip_image_size(clip_model)
        self.mean = tuple(datasets.CLIP_MEAN)
        self.std = tuple(datasets.CLIP_STD)
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

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """K x D unit-norm text embeddings (open_clip's tokenizer for ViT-L-14-336-quickgelu,
        which ships with the package and works offline)."""
        tokenizer = open_clip.get_tokenizer(CLIP_MODEL_NAME, context_length=self.context_length)
        device = self.clip_model.text_projection.device
        parts = [self.clip_model.encode_text(tokenizer(list(texts[i:i + batch_size])).to(device))
                 for i in range(0, len(texts), batch_size)]
        return F.normalize(torch.cat(parts).float(), dim=-1)


def build_teacher(clip_weights: str | os.PathLike | None = None, *, tiny: bool = False,
                  clip_model: CLIP | None = None, pretrained: bool = True) -> Teacher:
    """The frozen teacher around ``clip_model`` (``load_clip(clip_weights, tiny=tiny,
    pretrained=pretrained)`` if None); its fingerprint hashes the weights
    (``weights_fingerprint``), random ones included."""
    if clip_model is None:
        clip_model = load_clip(clip_weights, tiny=tiny, pretrained=pretrained)
    return Teacher(clip_model, weights_fingerprint(clip_model))


# ----------------------------------------------------------------------------------------------
# Pseudo-labels and text features
# ----------------------------------------------------------------------------------------------

def pseudo_labels_from_embeddings(embeddings: torch.Tensor | np.ndarray,
                                  text_features: torch.Tensor | np.ndarray, temperature: float,
                                  threshold: float, partial: float
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """DESIGN section 4: s = softmax(e T^T / temperature) over classes; q = +1 where
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


def _text_features_command(dataset: str | None) -> str:
    return f"python preproc/make_text_features.py --dataset {dataset or 'NAME'}"


def load_text_features(path: str | os.PathLike, num_classes: int, embed_dim: int, *,
                       dataset: str | None = None) -> torch.Tensor:
    """A K x D float32 ``.npy`` (rows used as stored). Errors name the file, the expected
    K x D and the command that makes a matching file."""
    path = Path(path)
    expected = f"{num_classes} x {embed_dim} (classes x teacher embedding width)"
    if not path.is_file():
        raise FileNotFoundError(f"text features {path} not found; expected a {expected} .npy: "
                                f"make it with `{_text_features_command(dataset)}`")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise ValueError(f"text features {path}: not a readable .npy ({error}); remake it with "
                         f"`{_text_features_command(dataset)}`") from error
    if array.ndim != 2 or array.shape != (num_classes, embed_dim):
        raise ValueError(f"text features {path} have shape {array.shape}, expected {expected}; "
                         f"make matching ones with `{_text_features_command(dataset)}` (with the "
                         f"teacher's --clip-weights)")
    if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
        raise ValueError(f"text features {path}: need finite floats; remake them with "
                         f"`{_text_features_command(dataset)}`")
    return torch.from_numpy(array.astype(np.float32))


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


# ----------------------------------------------------------------------------------------------
# Embedding cache
# ----------------------------------------------------------------------------------------------

_CACHE_FORMAT = 1


def cache_key_hash(key: dict, image_paths: Sequence[str], image_size: int, mean, std) -> str:
    """sha256 of a canonical JSON of everything the cached embeddings depend on."""
    images = hashlib.sha256("\n".join(str(p) for p in image_paths).encode()).hexdigest()
    full = {"format": _CACHE_FORMAT, "key": key, "num_images": len(image_paths), "images": images,
            "image_size": int(image_size), "mean": [float(m) for m in mean],
            "std": [float(s) for s in std]}
    return hashlib.sha256(json.dumps(full, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _read_cache(cache_file: Path, key_hash: str, num_images: int) -> tuple[np.ndarray | None, str]:
    """(embeddings, '') when the file is a valid cache for ``key_hash``, else (None, reason)."""
    try:
        contents = np.load(cache_file, allow_pickle=False)
        if not isinstance(contents, np.lib.npyio.NpzFile):
            return None, "is not an embedding cache (not an .npz archive)"
        with contents:
            if "key" not in contents.files or "embeddings" not in contents.files:
                return None, "is not an embedding cache (no key/embeddings)"
            if str(contents["key"]) != key_hash:
                return None, "was made for other inputs (key differs)"
            embeddings = contents["embeddings"]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
        return None, f"is unreadable ({type(error).__name__}: {error})"
    if embeddings.ndim != 2 or embeddings.shape[0] != num_images:
        return None, f"has shape {embeddings.shape}, expected {num_images} rows"
    if embeddings.dtype != np.float32 or not np.isfinite(embeddings).all():
        return None, "holds non-float32 or non-finite values"
    return embeddings, ""


def _log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cached_embeddings(encode: Callable[[torch.Tensor], torch.Tensor], key: dict,
                      image_paths: Sequence[str], image_size: int, mean, std,
                      cache_file: str | os.PathLike, *, batch_size: int = 32, num_workers: int = 0,
                      device: str | torch.device = "cpu", desc: str = "teacher",
                      log: Callable[[str], None] = _log_stderr, rank: int = 0, world_size: int = 1,
                      gather_rows: Callable | None = None) -> np.ndarray:
    """N x D float32 ``encode`` outputs of the images (resized to ``image_size``, normalised
    with ``mean``/``std``, no augmentation), computed once and cached in ``cache_file``.

    ``key`` names what else the outputs depend on (e.g. the encoder's weights fingerprint); it
    is hashed with the image list, size and normalisation into the file. A file with another
    key, the wrong shape, or that cannot be read is reported through ``log`` and rebuilt; the
    new file is written atomically.

    Under torchrun (``world_size`` > 1) each rank encodes every ``world_size``-th image from
    position ``rank``; ``gather_rows(indices, rows)`` must return every rank's rows, sorted by
    index, on every rank; rank 0 writes the file.
    """
    cache_file = Path(cache_file)
    image_paths = [str(p) for p in image_paths]
    if not image_paths:
        raise ValueError(f"{desc}: no images to embed for {cache_file}")
    key_hash = cache_key_hash(key, image_paths, image_size, mean, std)
    if cache_file.exists():
        cached, reason = _read_cache(cache_file, key_hash, len(image_paths))
        if cached is not None:
            log(f"{desc}: using cached embeddings {cache_file}")
            return cached
        log(f"{desc}: cache {cache_file} {reason}; recomputing it")
    if world_size > 1 and gather_rows is None:
        raise ValueError("cached_embeddings: world_size > 1 needs gather_rows")
    dataset = datasets.ImageListDataset(image_paths, image_size, mean, std)
    mine = range(rank, len(dataset), world_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=mine, num_workers=num_workers,
        pin_memory=torch.device(device).type == "cuda")
    outputs, rows = [], []
    with torch.no_grad(), tqdm(total=len(mine), desc=desc, unit="img", mininterval=3.0,
                               dynamic_ncols=True, disable=rank != 0) as bar:
        for images, indices in loader:
            outputs.append(encode(images.to(device, non_blocking=True)).float().cpu().numpy())
            rows.append(indices.numpy())
            bar.update(len(indices))
    row_index, embeddings = np.concatenate(rows), np.concatenate(outputs).astype(np.float32)
    if world_size > 1:
        row_index, embeddings = gather_rows(row_index, embeddings)
    if not np.array_equal(row_index, np.arange(len(dataset))):
        raise RuntimeError(f"{desc}: embeddings for {len(row_index)} of {len(dataset)} images")
    if not np.isfinite(embeddings).all():
        bad = int(np.flatnonzero(~np.isfinite(embeddings).all(axis=1))[0])
        raise ValueError(f"{desc}: non-finite embedding for image {image_paths[bad]}")
    if rank != 0:
        return embeddings
    readable_key = json.dumps(key, sort_keys=True)
    atomic_write(cache_file, lambda handle: np.savez(handle, key=np.array(key_hash),
                                                     key_json=np.array(readable_key),
                                                     embeddings=embeddings))
    log(f"{desc}: wrote {cache_file} ({embeddings.shape[0]} x {embeddings.shape[1]})")
    return embeddings
