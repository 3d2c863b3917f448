"""hf_clip.py: a Hugging Face transformers CLIPModel folder as --clip-weights, converted to
open_clip's CLIP. Only these tests import transformers (to make the folders and the reference
embeddings); the project reads the folders without it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel

import datasets
import hf_clip
import models

# The config.json of openai/clip-vit-large-patch14-336 on the Hugging Face hub, as far as the
# check reads it (the hub's file also has the older '*_config_dict' copies and eos_token_id 2).
OPENAI_336_CONFIG = {
    "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 768,
    "logit_scale_init_value": 2.6592,
    "text_config": {"hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072,
                    "max_position_embeddings": 77, "num_attention_heads": 12, "num_hidden_layers": 12,
                    "projection_dim": 768, "vocab_size": 49408, "eos_token_id": 2},
    "text_config_dict": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                         "num_hidden_layers": 12, "projection_dim": 768},
    "vision_config": {"hidden_act": "quick_gelu", "hidden_size": 1024, "image_size": 336,
                      "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768},
    "vision_config_dict": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                           "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14,
                           "projection_dim": 768},
}


def tiny_hf_config() -> CLIPConfig:
    """transformers' description of models.TINY_CLIP_CONFIG (open_clip's MLPs are 4x wide)."""
    tiny = models.TINY_CLIP_CONFIG
    vision, text = tiny["vision_cfg"], tiny["text_cfg"]
    activation = "quick_gelu" if tiny["quick_gelu"] else "gelu"
    return CLIPConfig(
        projection_dim=tiny["embed_dim"],
        vision_config=dict(image_size=vision["image_size"], patch_size=vision["patch_size"],
                           hidden_size=vision["width"], intermediate_size=4 * vision["width"],
                           num_hidden_layers=vision["layers"],
                           num_attention_heads=vision["width"] // vision["head_width"], hidden_act=activation),
        text_config=dict(hidden_size=text["width"], intermediate_size=4 * text["width"],
                         num_hidden_layers=text["layers"], num_attention_heads=text["heads"],
                         max_position_embeddings=text["context_length"], vocab_size=text["vocab_size"],
                         hidden_act=activation))


def tiny_hf_clip(seed: int = 1) -> CLIPModel:
    torch.manual_seed(seed)
    model = CLIPModel(tiny_hf_config()).eval()
    with torch.no_grad():
        # transformers initialises the biases and norms to 0 and 1: random ones show a swapped or
        # misplaced bias or norm in the conversion; the logit scale too.
        for name, tensor in model.named_parameters():
            if name.endswith("bias") or "norm" in name or name == "logit_scale":
                tensor.normal_(0.0, 0.5 if name != "logit_scale" else 1.0)
    return model


def save_hf_folder(model: CLIPModel, folder: Path, weights: str) -> Path:
    """``weights``: transformers' model.safetensors, or the pytorch_model.bin that transformers 4
    wrote (as on the hub), with the position-id buffers that older versions saved too."""
    model.save_pretrained(folder)
    if weights == "pytorch_model.bin":
        (folder / "model.safetensors").unlink()
        state = dict(model.state_dict())
        state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
        state["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
        torch.save(state, folder / "pytorch_model.bin")
    return folder


@pytest.fixture(scope="module")
def hf_model() -> CLIPModel:
    return tiny_hf_clip()


def test_conversion_gives_open_clip_names_and_shapes(hf_model):
    converted = hf_clip.to_open_clip_state(hf_model.state_dict())
    target = models.load_clip(tiny=True).state_dict()
    assert {k: tuple(v.shape) for k, v in converted.items()} == \
        {k: tuple(v.shape) for k, v in target.items() if k != "attn_mask"}


def test_full_size_conversion_and_config_match_open_clip(tmp_path):
    """The hub's openai/clip-vit-large-patch14-336 (built on the meta device: no memory) maps onto
    open_clip's ViT-L-14-336-quickgelu key for key and shape for shape, and its config.json passes
    the start-up check."""
    with torch.device("meta"):
        hf_full = CLIPModel(CLIPConfig(**OPENAI_336_CONFIG))
        open_clip_full = models.load_clip(pretrained=False)
    converted = hf_clip.to_open_clip_state(hf_full.state_dict())
    target = open_clip_full.state_dict()
    assert {k: tuple(v.shape) for k, v in converted.items()} == \
        {k: tuple(v.shape) for k, v in target.items() if k != "attn_mask"}

    (tmp_path / "config.json").write_text(json.dumps(OPENAI_336_CONFIG))
    (tmp_path / "model.safetensors").write_bytes(b"not read by the start-up check")
    models.check_weights_available("clip_vision", clip_weights=tmp_path, need_teacher=True)


@pytest.mark.parametrize("weights", hf_clip.WEIGHT_FILES)
def test_folder_gives_transformers_embeddings(tmp_path, hf_model, weights):
    folder = save_hf_folder(hf_model, tmp_path / "snapshot", weights)
    assert sorted(p.name for p in folder.iterdir()) == sorted([hf_clip.CONFIG_FILE, weights])
    models.check_weights_available("clip_vision", clip_weights=folder, need_teacher=True, tiny=True)
    loaded = models.load_clip(folder, tiny=True)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())

    images = torch.randn(4, 3, models.TINY_INPUT_SIZE, models.TINY_INPUT_SIZE,
                         generator=torch.Generator().manual_seed(0))
    tokens = open_clip.get_tokenizer(models.CLIP_MODEL_NAME)(
        ["a photo of a dog.", "a dining table", "", "an aeroplane over the sea at dawn"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images),
                                   hf_model.get_image_features(pixel_values=images).pooler_output,
                                   rtol=0, atol=1e-5)
        # open_clip pools the text at the highest token id, transformers at the first end token:
        # the same place with CLIP's tokenizer, whose end token has the highest id.
        torch.testing.assert_close(loaded.encode_text(tokens),
                                   hf_model.get_text_features(input_ids=tokens).pooler_output,
                                   rtol=0, atol=1e-5)
    assert loaded.logit_scale.item() == pytest.approx(hf_model.logit_scale.item())


def test_clip_vision_backbone_copies_the_folder_tower(tmp_path, hf_model):
    folder = save_hf_folder(hf_model, tmp_path / "snapshot", "model.safetensors")
    backbone = models.build_model("clip_vision", 3, tiny=True, clip_weights=folder).eval()
    images = torch.randn(2, 3, models.TINY_INPUT_SIZE, models.TINY_INPUT_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(backbone.features(images),
                                   hf_model.get_image_features(pixel_values=images).pooler_output,
                                   rtol=0, atol=1e-5)


def test_text_features_script_reads_the_folder(tmp_path, hf_model):
    """preproc/make_text_features.py --clip-weights FOLDER: transformers' unit text embeddings."""
    from preproc import make_text_features as mtf
    folder = save_hf_folder(hf_model, tmp_path / "snapshot", "model.safetensors")
    args = mtf.get_args_parser().parse_args(["--dataset", "pascal", "--label-only", "--tiny", "--out",
                                             str(tmp_path / "f.npy"), "--clip-weights", str(folder)])
    features = np.load(mtf.main(args))
    names = datasets.get_dataset_info("pascal").class_names
    tokens = open_clip.get_tokenizer(models.CLIP_MODEL_NAME)(list(names))
    with torch.no_grad():
        reference = F.normalize(hf_model.get_text_features(input_ids=tokens).pooler_output, dim=-1)
    np.testing.assert_allclose(features, reference.numpy(), rtol=0, atol=1e-5)


def one_line_error(error_type, call, *fragments: str) -> str:
    with pytest.raises(error_type) as error:
        call()
    message = str(error.value)
    assert "\n" not in message and "--clip-weights" in message
    assert all(fragment in message for fragment in fragments), message
    return message


def startup_check(folder: Path, tiny: bool = True):
    return lambda: models.check_weights_available("resnet50", clip_weights=folder,
                                                  need_teacher=True, tiny=tiny)


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_folder_lacking_a_file_is_a_one_line_error(tmp_path, hf_model, missing):
    folder = save_hf_folder(hf_model, tmp_path / "snapshot", "model.safetensors")
    (folder / missing).unlink()
    expected = "config.json" if missing == "config.json" else "model.safetensors or pytorch_model.bin"
    for call in (startup_check(folder), lambda: models.load_clip(folder, tiny=True)):
        one_line_error(FileNotFoundError, call, str(folder), f"folder has no {expected}")


@pytest.mark.parametrize("section,field,value,expected", [
    ("vision_config", "hidden_act", "gelu", "vision_config.hidden_act is 'gelu', expected 'quick_gelu'"),
    ("text_config", "hidden_act", "gelu", "text_config.hidden_act is 'gelu', expected 'quick_gelu'"),
    ("vision_config", "num_attention_heads", 4, "vision_config.num_attention_heads is 4, expected 2"),
    ("vision_config", "image_size", [32, 32], "vision_config.image_size is 32, expected 64"),
    ("vision_config", "patch_size", 8, "vision_config.patch_size is 8, expected 16"),
    (None, "model_type", "siglip", "model_type is 'siglip', expected 'clip'"),
])
def test_config_not_matching_the_architecture_is_a_one_line_error(tmp_path, hf_model, section, field,
                                                                  value, expected):
    folder = save_hf_folder(hf_model, tmp_path / "snapshot", "model.safetensors")
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    (config[section] if section else config)[field] = value
    config_file.write_text(json.dumps(config))
    for call in (startup_check(folder), lambda: models.load_clip(folder, tiny=True)):
        one_line_error(ValueError, call, str(config_file), expected)


def test_tiny_folder_against_the_full_architecture(tmp_path, hf_model):
    """The start-up check reads the full-size architecture's sizes without building its weights."""
    folder = save_hf_folder(hf_model, tmp_path / "snapshot", "model.safetensors")
    one_line_error(ValueError, startup_check(folder, tiny=False), "ViT-L-14-336-quickgelu",
                   "vision_config.image_size is 64, expected 336", "vision_config.num_hidden_layers is 2, expected 24")


def test_pytorch_model_bin_is_read_without_unpickling_objects(tmp_path, hf_model):
    folder = save_hf_folder(hf_model, tmp_path / "snapshot", "pytorch_model.bin")
    torch.save({"state": hf_model.state_dict(), "saved_from": Path("/somewhere")}, folder / "pytorch_model.bin")
    one_line_error(ValueError, lambda: models.load_clip(folder, tiny=True), "pytorch_model.bin",
                   "cannot read weights")


def test_wrong_tensors_name_the_file(tmp_path, hf_model):
    folder = save_hf_folder(hf_model, tmp_path / "snapshot", "pytorch_model.bin")
    state = dict(hf_model.state_dict())
    del state["vision_model.encoder.layers.1.self_attn.k_proj.weight"]
    torch.save(state, folder / "pytorch_model.bin")
    one_line_error(ValueError, lambda: models.load_clip(folder, tiny=True), "pytorch_model.bin",
                   "missing: visual.transformer.resblocks.1.attn.in_proj_weight",
                   "unexpected: ", "visual.transformer.resblocks.1.self_attn.q_proj.weight")
