"""Hugging Face transformers CLIP checkpoints read into open_clip's CLIP (``--clip-weights FOLDER``).

A transformers ``CLIPModel`` folder (``config.json`` and ``model.safetensors`` or
``pytorch_model.bin``; e.g. the Hugging Face cache's snapshot of
``openai/clip-vit-large-patch14-336``, which the original VLPL code downloaded) holds the same
weights as OpenAI's file (here ``ViT-L-14-336px.pt``) under other names; each teacher of
``models.TEACHERS`` names its checkpoint (``hf_repo``):

* ``check_folder`` finds the folder's files and compares its ``config.json`` with the open_clip
  architecture being loaded, the run's teacher's (sizes, layers, heads and activation, which the
  tensor shapes alone do not all show);
* ``to_open_clip_state`` renames and reshapes the tensors to open_clip's layout (``models``
  reads the file and loads the result strictly).

Pure dictionary work: neither transformers nor a network is needed.
"""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path

import torch
from open_clip.model import CLIP
from open_clip.transformer import QuickGELU

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # transformers' names, preferred first
FOLDER_CONTENTS = (f"a transformers CLIPModel folder ({CONFIG_FILE} and {' or '.join(WEIGHT_FILES)}; "
                   f"in the Hugging Face cache, models--ORG--NAME/snapshots/REVISION)")

# The config fields checked, as "section.field", with transformers' defaults (CLIPConfig,
# CLIPVisionConfig, CLIPTextConfig): a field a config.json leaves out takes its default, as it
# does when transformers reads the file.
_TRANSFORMERS_DEFAULTS: dict[str, object] = {
    "projection_dim": 512,
    "vision_config.image_size": 224,
    "vision_config.patch_size": 32,
    "vision_config.hidden_size": 768,
    "vision_config.num_hidden_layers": 12,
    "vision_config.num_attention_heads": 12,
    "vision_config.intermediate_size": 3072,
    "vision_config.hidden_act": "quick_gelu",
    "text_config.max_position_embeddings": 77,
    "text_config.vocab_size": 49408,
    "text_config.hidden_size": 512,
    "text_config.num_hidden_layers": 12,
    "text_config.num_attention_heads": 8,
    "text_config.intermediate_size": 2048,
    "text_config.hidden_act": "quick_gelu",
}

# (transformers prefix, open_clip prefix); the first that matches renames a key.
_PREFIXES = (
    ("vision_model.embeddings.class_embedding", "visual.class_embedding"),
    ("vision_model.embeddings.patch_embedding.", "visual.conv1."),
    ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding"),
    ("vision_model.pre_layrnorm.", "visual.ln_pre."),  # sic: transformers' spelling
    ("vision_model.encoder.layers.", "visual.transformer.resblocks."),
    ("vision_model.post_layernorm.", "visual.ln_post."),
    ("text_model.embeddings.token_embedding.", "token_embedding."),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
    ("text_model.encoder.layers.", "transformer.resblocks."),
    ("text_model.final_layer_norm.", "ln_final."),
)
# Within a transformer block (q, k and v are concatenated separately).
_BLOCK_PARTS = (
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
    ("self_attn.out_proj.", "attn.out_proj."),
)
_BLOCK = re.compile(r"((?:visual\.)?transformer\.resblocks\.\d+\.)(.*)")
_QKV = re.compile(r"(.*)\.self_attn\.([qkv])_proj\.(weight|bias)")
# transformers keeps the projections as nn.Linear weights (out x in); open_clip as matrices that
# the features multiply from the left (in x out).
_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}
# Buffers older transformers versions saved with the weights; open_clip computes positions itself.
_DROPPED_SUFFIX = "embeddings.position_ids"


def check_folder(folder: str | os.PathLike, model: CLIP, flag: str, architecture: str) -> Path:
    """The folder's weight file (``model.safetensors`` before ``pytorch_model.bin``), once its
    ``config.json`` is found to describe ``model``'s architecture (named ``architecture`` in
    messages). ``model`` may live on the meta device: only its sizes are read. One-line errors
    naming the folder or file: FileNotFoundError for a missing file, ValueError for a config
    that does not match."""
    weights = _weights_file(Path(folder), flag)
    _check_config(Path(folder) / CONFIG_FILE, model, flag, architecture)
    return weights


def _weights_file(folder: Path, flag: str) -> Path:
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{flag} {folder}: folder has no {CONFIG_FILE}; expected {FOLDER_CONTENTS}")
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{flag} {folder}: folder has no {' or '.join(WEIGHT_FILES)} next to its "
                            f"{CONFIG_FILE}; expected {FOLDER_CONTENTS}")


def _check_config(path: Path, model: CLIP, flag: str, architecture: str) -> None:
    config = _read_config(path, flag)
    if config.get("model_type") != "clip":
        raise ValueError(f"{flag} {path}: model_type is {config.get('model_type')!r}, expected 'clip' "
                         f"(a transformers CLIPModel of the CLIP architecture {architecture})")
    found = _config_values(config, path, flag)
    mismatches = [f"{key} is {found[key]!r}, expected {value!r}"
                  for key, value in _architecture_values(model).items() if found[key] != value]
    if mismatches:
        raise ValueError(f"{flag} {path}: does not match the CLIP architecture {architecture} "
                         f"({'; '.join(mismatches)})")


def to_open_clip_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIPModel state dict in open_clip's CLIP names and shapes. Keys it does not
    know (and a q/k/v projection whose partners are missing) keep their names, so a strict load
    reports them."""
    converted: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = defaultdict(dict)
    for name, tensor in state.items():
        if name.endswith(_DROPPED_SUFFIX):
            continue
        if name in _TRANSPOSED:
            converted[_TRANSPOSED[name]] = tensor.T.contiguous()
            continue
        name = _open_clip_name(name)
        projection = _QKV.fullmatch(name)
        if projection:
            block, part, kind = projection.groups()
            qkv[(block, kind)][part] = tensor
        else:
            converted[name] = tensor
    for (block, kind), parts in qkv.items():
        if set(parts) == set("qkv"):
            # nn.MultiheadAttention's packed input projection: rows q, then k, then v.
            converted[f"{block}.attn.in_proj_{kind}"] = torch.cat([parts[p] for p in "qkv"])
        else:
            converted.update({f"{block}.self_attn.{p}_proj.{kind}": t for p, t in parts.items()})
    return converted


def _open_clip_name(name: str) -> str:
    for hf_prefix, open_clip_prefix in _PREFIXES:
        if name.startswith(hf_prefix):
            name = open_clip_prefix + name[len(hf_prefix):]
            break
    else:
        return name
    block = _BLOCK.fullmatch(name)
    if block:
        head, part = block.groups()
        for hf_part, open_clip_part in _BLOCK_PARTS:
            if part.startswith(hf_part):
                return head + open_clip_part + part[len(hf_part):]
    return name


def _read_config(path: Path, flag: str) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{flag} {path}: cannot read it as JSON ({error})") from error
    if not isinstance(config, dict):
        raise ValueError(f"{flag} {path}: not a JSON object")
    return config


def _config_values(config: dict, path: Path, flag: str) -> dict[str, object]:
    """The checked fields of a CLIPConfig dict, sizes of square images as one int."""
    sections = {"": config}
    for name in ("vision_config", "text_config"):
        # Older files also carry '<section>_dict', whose values transformers lets win.
        parts = [config.get(name), config.get(f"{name}_dict")]
        if not all(part is None or isinstance(part, dict) for part in parts):
            raise ValueError(f"{flag} {path}: {name} is not a JSON object")
        sections[name] = {k: v for part in parts if part for k, v in part.items()}
    values = {}
    for key, default in _TRANSFORMERS_DEFAULTS.items():
        section, _, field = key.rpartition(".")
        values[key] = _square(sections[section].get(field, default))
    return values


def _architecture_values(model: CLIP) -> dict[str, object]:
    """What a matching config.json says, read off the open_clip model (same keys as
    ``_TRANSFORMERS_DEFAULTS``)."""
    values: dict[str, object] = {
        "projection_dim": int(model.text_projection.shape[1]),
        "vision_config.image_size": _square(model.visual.image_size),
        "vision_config.patch_size": _square(model.visual.patch_size),
        "text_config.max_position_embeddings": int(model.context_length),
        "text_config.vocab_size": int(model.vocab_size),
    }
    for section, tower in (("vision_config", model.visual.transformer), ("text_config", model.transformer)):
        block = tower.resblocks[0]
        values.update({
            f"{section}.hidden_size": int(tower.width),
            f"{section}.num_hidden_layers": int(tower.layers),
            f"{section}.num_attention_heads": int(block.attn.num_heads),
            f"{section}.intermediate_size": int(block.mlp.c_fc.out_features),
            # open_clip's two activations; transformers' "gelu" is the exact one, as nn.GELU.
            f"{section}.hidden_act": "quick_gelu" if isinstance(block.mlp.gelu, QuickGELU) else "gelu",
        })
    return values


def _square(value: object) -> object:
    """An image or patch size: one int when square ((336, 336) and [336, 336] -> 336)."""
    if isinstance(value, (list, tuple)) and value and all(v == value[0] for v in value):
        return value[0]
    return tuple(value) if isinstance(value, list) else value
