"""models.py: backbones at tiny size, weight files, the start-up weights check."""
from __future__ import annotations

import copy
import time
from pathlib import Path

import open_clip
import pytest
import torch

import models
import teacher as teacher_module

NUM_CLASSES = 5


def images(size: int, batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def tiny_clip() -> torch.nn.Module:
    return models.load_clip(tiny=True)


def test_input_sizes():
    assert models.input_size("resnet50") == 448
    assert models.input_size("clip_vision") == 336
    assert models.input_size("convnext_xlarge_22k") == 448
    assert models.input_size("convnext_xlarge_1k") == 448
    assert all(models.input_size(b, tiny=True) == models.TINY_INPUT_SIZE for b in models.BACKBONES)
    with pytest.raises(ValueError, match="resnet50"):
        models.input_size("vgg16")


@pytest.mark.parametrize("backbone", models.BACKBONES)
def test_tiny_backbone_shapes(backbone):
    model = models.build_model(backbone, NUM_CLASSES, tiny=True).eval()
    size = models.input_size(backbone, tiny=True)
    assert model.input_size == size
    x = images(size)
    features = model.features(x)
    assert features.shape == (3, model.feature_dim)
    assert isinstance(model.head, torch.nn.Linear)
    assert model.head.in_features == model.feature_dim and model.head.out_features == NUM_CLASSES
    logits = model(x)
    assert logits.shape == (3, NUM_CLASSES)
    torch.testing.assert_close(logits, model.forward_head(features), rtol=0, atol=0)
    assert all(p.requires_grad for p in model.parameters())


def test_tiny_backbones_are_the_library_classes():
    import timm.models.convnext
    import torchvision
    assert isinstance(models.build_model("resnet50", 2, tiny=True).backbone, torchvision.models.ResNet)
    assert isinstance(models.build_model("convnext_xlarge_1k", 2, tiny=True).backbone,
                      timm.models.convnext.ConvNeXt)
    assert isinstance(models.build_model("clip_vision", 2, tiny=True).backbone,
                      open_clip.transformer.VisionTransformer)


def test_unknown_backbone_and_bad_class_count():
    with pytest.raises(ValueError, match="convnext_xlarge_22k"):
        models.build_model("vit", 3, tiny=True)
    with pytest.raises(ValueError, match="num_classes"):
        models.build_model("resnet50", 0, tiny=True)


@pytest.mark.parametrize("backbone,classifier", [("resnet50", "fc"),
                                                 ("convnext_xlarge_22k", "head.fc")])
@pytest.mark.parametrize("wrapping", ["plain", "state_dict", "model", "module", "classifier"])
def test_backbone_weights_file_reproduces_features(tmp_path, backbone, classifier, wrapping):
    source = models.build_model(backbone, NUM_CLASSES, tiny=True).eval()
    state = dict(source.backbone.state_dict())
    # A library file also holds its own 1000-class layer: it is dropped on load.
    state[f"{classifier}.weight"] = torch.randn(1000, source.feature_dim)
    state[f"{classifier}.bias"] = torch.randn(1000)
    saved = {"plain": state, "state_dict": {"state_dict": state, "epoch": 3},
             "model": {"model": state}, "module": {f"module.{k}": v for k, v in state.items()},
             "classifier": source.state_dict()}[wrapping]
    path = tmp_path / "weights.pth"
    torch.save(saved, path)
    loaded = models.build_model(backbone, NUM_CLASSES, tiny=True, backbone_weights=path).eval()
    x = images(models.input_size(backbone, tiny=True))
    with torch.no_grad():
        torch.testing.assert_close(loaded.features(x), source.features(x), rtol=0, atol=0)


def test_backbone_weights_safetensors(tmp_path):
    from safetensors.torch import save_file
    source = models.build_model("resnet50", 3, tiny=True).eval()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.backbone.state_dict().items()}, str(path))
    loaded = models.build_model("resnet50", 3, tiny=True, backbone_weights=path).eval()
    x = images(models.TINY_INPUT_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(loaded.features(x), source.features(x), rtol=0, atol=0)


def test_wrong_backbone_weights_name_the_flag(tmp_path):
    other = models.build_model("convnext_xlarge_1k", 3, tiny=True)
    path = tmp_path / "convnext.pth"
    torch.save(other.backbone.state_dict(), path)
    with pytest.raises(ValueError, match=r"--backbone-weights .*convnext\.pth.*not resnet50 weights"):
        models.build_model("resnet50", 3, tiny=True, backbone_weights=path)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="--backbone-weights .*garbage.pth"):
        models.build_model("resnet50", 3, tiny=True, backbone_weights=garbage)
    with pytest.raises(FileNotFoundError, match="--backbone-weights .*missing.pth"):
        models.build_model("resnet50", 3, tiny=True, backbone_weights=tmp_path / "missing.pth")


def _clip_outputs(clip, x, tokens):
    with torch.no_grad():
        return clip.encode_image(x), clip.encode_text(tokens)


def test_clip_state_dict_file_reproduces_outputs(tmp_path):
    source = tiny_clip()
    with torch.no_grad():
        for p in source.parameters():  # other weights than the fixed tiny init
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "clip_state.pt"
    torch.save(source.state_dict(), path)
    loaded = models.load_clip(path, tiny=True)
    tokens = open_clip.get_tokenizer(models.CLIP_MODEL_NAME)(["a photo of a dog.", "cat"])
    x = images(models.TINY_INPUT_SIZE)
    for a, b in zip(_clip_outputs(loaded, x, tokens), _clip_outputs(source, x, tokens)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert models.weights_fingerprint(loaded) == models.weights_fingerprint(source)
    assert models.weights_fingerprint(loaded) != models.weights_fingerprint(tiny_clip())


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_clip_torchscript_archive_loads(tmp_path):
    """OpenAI's files are TorchScript archives of the traced CLIP: a traced tiny CLIP stands in
    (same format and key names; the real file also carries the three scalars dropped here)."""
    source = tiny_clip()
    x = images(models.TINY_INPUT_SIZE, batch=2)
    tokens = torch.zeros(2, source.context_length, dtype=torch.long)
    archived = copy.deepcopy(source)
    for name, value in (("input_resolution", 64), ("context_length", 77), ("vocab_size", 49408)):
        if hasattr(archived, name):
            delattr(archived, name)  # a plain int attribute on open_clip's CLIP
        archived.register_buffer(name, torch.tensor(value))  # as in OpenAI's archives
    traced = torch.jit.trace_module(archived, {"forward": (x, tokens)}, check_trace=False)
    path = tmp_path / models.CLIP_OPENAI_FILE
    torch.jit.save(traced, str(path))
    loaded = models.load_clip(path, tiny=True)
    tokens = open_clip.get_tokenizer(models.CLIP_MODEL_NAME)(["a bird", "a boat"])
    for a, b in zip(_clip_outputs(loaded, x, tokens), _clip_outputs(source, x, tokens)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_clip_float16_state_dict_loads_as_float32(tmp_path):
    """OpenAI's weights are stored partly in float16; the model stays float32."""
    source = tiny_clip()
    path = tmp_path / "half.pt"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in source.state_dict().items()},
               path)
    loaded = models.load_clip(path, tiny=True)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    rounded = tiny_clip()
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.half().float())
    x = images(models.TINY_INPUT_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(x), rounded.encode_image(x), rtol=0, atol=0)


def test_clip_vision_from_clip_weights_file(tmp_path):
    source = tiny_clip()
    with torch.no_grad():
        source.visual.proj.mul_(2.0)
    path = tmp_path / "clip.pt"
    torch.save(source.state_dict(), path)
    model = models.build_model("clip_vision", NUM_CLASSES, tiny=True, clip_weights=path).eval()
    assert model.feature_dim == source.visual.output_dim
    x = images(models.TINY_INPUT_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model.features(x), source.encode_image(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="--clip-weights"):
        models.build_model("clip_vision", NUM_CLASSES, tiny=True, backbone_weights=path)


def test_wrong_clip_weights_name_the_flag(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(models.build_model("resnet50", 2, tiny=True).backbone.state_dict(), path)
    with pytest.raises(ValueError, match=r"--clip-weights .*resnet\.pth.*not CLIP"):
        models.load_clip(path, tiny=True)


def test_openai_model_name_and_tag(monkeypatch):
    """Without a file, load_clip asks open_clip for ViT-L-14-336-quickgelu with OpenAI weights."""
    assert models.CLIP_MODEL_NAME == "ViT-L-14-336-quickgelu"
    config = open_clip.get_model_config(models.CLIP_MODEL_NAME)
    assert config["quick_gelu"] is True and config["embed_dim"] == 768
    assert config["vision_cfg"]["image_size"] == 336
    assert open_clip.get_pretrained_cfg(models.CLIP_MODEL_NAME, models.CLIP_PRETRAINED_TAG)
    calls = []

    def fake_create_model(name, pretrained=None, **kwargs):
        calls.append((name, pretrained))
        return tiny_clip()

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    models.load_clip()
    assert calls == [("ViT-L-14-336-quickgelu", "openai")]


def test_real_clip_architecture_matches_openai_layout():
    """The architecture a --clip-weights file is read into: open_clip's ViT-L-14-336-quickgelu
    config, whose parameter names are OpenAI's (checked on the config, not by building 428M
    parameters in a unit test)."""
    tiny = tiny_clip()
    names = set(tiny.state_dict())
    for key in ("visual.proj", "visual.conv1.weight", "visual.class_embedding", "text_projection",
                "positional_embedding", "token_embedding.weight", "ln_final.weight", "logit_scale",
                "transformer.resblocks.0.attn.in_proj_weight"):
        assert key in names
    assert isinstance(tiny.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)


# ---------------------------------------------------------------------------------------------
# Start-up check
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backbone,flag,expected", [
    ("resnet50", "--backbone-weights", "resnet50-0676ba61.pth"),
    ("convnext_xlarge_22k", "--backbone-weights", "convnext_xlarge.fb_in22k"),
    ("convnext_xlarge_1k", "--backbone-weights", "convnext_xlarge.fb_in22k_ft_in1k"),
    ("clip_vision", "--clip-weights", "ViT-L-14-336px.pt"),
])
def test_offline_without_weights_fails_fast(backbone, flag, expected):
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as error:
        models.check_weights_available(backbone, need_teacher=False)
    assert time.monotonic() - start < 5
    assert isinstance(error.value, models.WeightsUnavailableError)
    message = str(error.value)
    assert flag in message and expected in message and "\n" not in message


def test_offline_teacher_without_clip_weights_fails_fast(tmp_path):
    backbone_file = tmp_path / "resnet.pth"
    backbone_file.write_bytes(b"x")
    start = time.monotonic()
    with pytest.raises(models.WeightsUnavailableError,
                       match=r"no CLIP weights: pass --clip-weights /path/to/ViT-L-14-336px\.pt"):
        models.check_weights_available("resnet50", backbone_weights=backbone_file, need_teacher=True)
    assert time.monotonic() - start < 5
    # No teacher needed (e.g. the EM loss): the backbone file is all it takes.
    models.check_weights_available("resnet50", backbone_weights=backbone_file, need_teacher=False)


def test_named_files_are_enough_offline(tmp_path):
    for name in ("backbone.pth", "clip.pt"):
        (tmp_path / name).write_bytes(b"x")
    models.check_weights_available("convnext_xlarge_1k", backbone_weights=tmp_path / "backbone.pth",
                                   clip_weights=tmp_path / "clip.pt", need_teacher=True)
    models.check_weights_available("clip_vision", clip_weights=tmp_path / "clip.pt",
                                   need_teacher=True)


def test_missing_named_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="--backbone-weights .*nope.pth: file not found"):
        models.check_weights_available("resnet50", backbone_weights=tmp_path / "nope.pth",
                                       need_teacher=False)
    with pytest.raises(FileNotFoundError, match="--clip-weights .*nope.pt: file not found"):
        models.check_weights_available("resnet50", clip_weights=tmp_path / "nope.pt",
                                       need_teacher=True, tiny=True)
    with pytest.raises(ValueError, match="--clip-weights"):
        models.check_weights_available("clip_vision", backbone_weights=tmp_path / "nope.pt",
                                       need_teacher=True)


def test_tiny_needs_no_weights():
    for backbone in models.BACKBONES:
        models.check_weights_available(backbone, need_teacher=True, tiny=True)


def _fake_hf_cache(root: Path, repo_id: str, filename: str) -> None:
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / filename).write_bytes(b"x")


def test_download_caches_count_offline(tmp_path):
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "resnet50-0676ba61.pth").write_bytes(b"x")
    models.check_weights_available("resnet50", need_teacher=False)

    hub = tmp_path / "hf-home" / "hub"
    _fake_hf_cache(hub, "timm/convnext_xlarge.fb_in22k", "model.safetensors")
    models.check_weights_available("convnext_xlarge_22k", need_teacher=False)
    with pytest.raises(models.WeightsUnavailableError):
        models.check_weights_available("convnext_xlarge_1k", need_teacher=False)

    _fake_hf_cache(hub, "timm/vit_large_patch14_clip_336.openai", "open_clip_model.safetensors")
    models.check_weights_available("resnet50", need_teacher=True)
    models.check_weights_available("clip_vision", need_teacher=False)


def test_unreachable_network_counts_as_offline(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(models, "_host_reachable", lambda host, *a, **k: False)
    with pytest.raises(models.WeightsUnavailableError, match="--clip-weights"):
        models.check_weights_available("clip_vision", need_teacher=True)
    monkeypatch.setattr(models, "_host_reachable", lambda host, *a, **k: True)
    models.check_weights_available("clip_vision", need_teacher=True)
    models.check_weights_available("convnext_xlarge_22k", need_teacher=True)


def test_host_probe_is_bounded():
    start = time.monotonic()
    # 192.0.2.1 is TEST-NET-1 (RFC 5737): never reachable.
    assert models._host_reachable("192.0.2.1", timeout=0.5) is False
    assert time.monotonic() - start < 3


def test_full_size_resnet50_from_a_torchvision_file(tmp_path):
    """The real architecture (not tiny) read from a file laid out like torchvision's download."""
    import torchvision
    reference = torchvision.models.resnet50(weights=None).eval()
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save(reference.state_dict(), path)   # includes the 1000-class fc, as the real file
    model = models.build_model("resnet50", NUM_CLASSES, backbone_weights=path).eval()
    assert model.feature_dim == 2048 and model.input_size == 448
    x = images(64, batch=2)
    reference.fc = torch.nn.Identity()
    with torch.no_grad():
        features = model.features(x)
        torch.testing.assert_close(features, reference(x), rtol=0, atol=0)
    assert model(x).shape == (2, NUM_CLASSES)


def _to_facebook_convnext_names(state: dict) -> dict:
    """timm ConvNeXt names -> the original FB release's (what timm's filter maps back)."""
    import re
    out = {}
    for key, value in state.items():
        key = key.replace("stem.", "downsample_layers.0.")
        key = re.sub(r"stages\.([0-9]+)\.downsample\.([0-9]+)", r"downsample_layers.\1.\2", key)
        key = re.sub(r"stages\.([0-9]+)\.blocks\.([0-9]+)", r"stages.\1.\2", key)
        key = key.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
        key = key.replace("head.norm.", "norm.")
        if value.ndim == 4 and "pwconv" in key:
            value = value.flatten(1)   # FB's pointwise layers are Linear
        out[key] = value
    return out


def test_convnext_weights_in_facebook_layout(tmp_path):
    source = models.build_model("convnext_xlarge_22k", NUM_CLASSES, tiny=True).eval()
    state = _to_facebook_convnext_names(source.backbone.state_dict())
    assert "norm.weight" in state and not any(k.startswith("stem.") for k in state)
    state["head.weight"] = torch.randn(21841, source.feature_dim)   # FB's 22k classifier
    state["head.bias"] = torch.randn(21841)
    path = tmp_path / "convnext_xlarge_22k_224.pth"
    torch.save({"model": state}, path)
    loaded = models.build_model("convnext_xlarge_22k", NUM_CLASSES, tiny=True, backbone_weights=path)
    x = images(models.TINY_INPUT_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().features(x), source.features(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# pretrained=False: full-size architectures at random init (benchmarks), nothing read
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def no_weight_loading(monkeypatch):
    """Every way models.py reads or downloads weights raises."""
    import torchvision

    def refuse(*args, **kwargs):
        raise AssertionError("pretrained=False must not read or download weights")

    monkeypatch.setattr(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.__class__,
                        "get_state_dict", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(open_clip, "create_model", refuse)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", refuse)
    monkeypatch.setattr(models, "read_state_dict", refuse)


def test_full_size_resnet50_at_random_init(no_weight_loading):
    import torchvision
    model = models.build_model("resnet50", NUM_CLASSES, pretrained=False).eval()
    assert isinstance(model.backbone, torchvision.models.ResNet)
    assert model.feature_dim == 2048 and model.input_size == 448
    full = sum(p.numel() for p in torchvision.models.resnet50(weights=None).parameters())
    head = 2048 * NUM_CLASSES + NUM_CLASSES
    assert sum(p.numel() for p in model.parameters()) == full - (2048 * 1000 + 1000) + head
    with torch.no_grad():
        assert model(images(64, batch=2)).shape == (2, NUM_CLASSES)


def test_random_init_clip_builds_the_real_architecture_without_weights(monkeypatch,
                                                                       no_weight_loading):
    """load_clip / build_teacher / clip_vision with pretrained=False build open_clip's
    ViT-L-14-336-quickgelu architecture (swapped for the tiny one here: 428M parameters are too
    many for a unit test) and read nothing; the teacher's fingerprint hashes the random weights."""
    calls, build_tiny = [], models._clip_architecture

    def fake_architecture(tiny, teacher=models.DEFAULT_TEACHER):
        calls.append((tiny, teacher))
        return build_tiny(True)

    monkeypatch.setattr(models, "_clip_architecture", fake_architecture)
    clip = models.load_clip(pretrained=False)
    default = (False, models.DEFAULT_TEACHER)
    assert calls == [default] and not clip.training
    teacher = teacher_module.build_teacher(pretrained=False)
    assert teacher.fingerprint == models.weights_fingerprint(teacher.clip_model)
    model = models.build_model("clip_vision", NUM_CLASSES, pretrained=False)
    assert calls == [default] * 3
    assert model(images(models.TINY_INPUT_SIZE, batch=1)).shape == (1, NUM_CLASSES)


def test_random_init_takes_no_weight_file(tmp_path):
    with pytest.raises(ValueError, match="pretrained=False"):
        models.build_model("resnet50", NUM_CLASSES, backbone_weights=tmp_path / "w.pth",
                           pretrained=False)
    with pytest.raises(ValueError, match="pretrained=False"):
        models.load_clip(tmp_path / "clip.pt", pretrained=False)
    with pytest.raises(ValueError, match="pretrained=False"):
        teacher_module.build_teacher(tmp_path / "clip.pt", pretrained=False)
