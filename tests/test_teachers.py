"""Teachers by name (models.TEACHERS, --teacher): the architecture, weight files, start-up check,
tokenizer and raw text embeddings of each table entry, and the name through a run's config.json,
its resume, make_text_features.py and the tools that rebuild a run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from transformers import CLIPConfig, CLIPModel

import checkpoint
import hf_clip
import config as config_module
import main_clip
import models
import rundir
import teacher as teacher_module
from conftest import demo_args, demo_argv
from errors import RunError
from preproc import make_text_features as mtf
from reading import saved_run

# What each entry must build: (input size, embedding width).
EXPECTED = {"ViT-L-14-336": (336, 768), "ViT-B-16": (224, 512)}
OTHER = "ViT-B-16"   # the teacher that is not the default, for the tests of the name's path


def one_line(error: pytest.ExceptionInfo, *fragments: str) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    assert all(fragment in message for fragment in fragments), message
    return message


@pytest.fixture(scope="module")
def vit_b16() -> torch.nn.Module:
    """A randomly initialised full-size ViT-B-16 (about a second on a CPU)."""
    return models.load_clip(teacher=OTHER, pretrained=False)


def test_the_table():
    assert set(models.TEACHERS) == set(EXPECTED) and OTHER != models.DEFAULT_TEACHER
    assert models.DEFAULT_TEACHER == "ViT-L-14-336"
    # Run folders from before --teacher ran the default teacher (resume and summariser read that).
    assert rundir.ADDED_SETTINGS["teacher"] == models.DEFAULT_TEACHER
    for name, spec in models.TEACHERS.items():
        assert (spec.image_size, spec.embed_dim) == EXPECTED[name]
        assert spec.config["quick_gelu"] is True  # OpenAI's weights were trained with QuickGELU
        assert open_clip.get_pretrained_cfg(spec.open_clip_name, spec.pretrained_tag)
        assert models.input_size("clip_vision", teacher=name) == spec.image_size
        assert models.input_size("clip_vision", tiny=True, teacher=name) == models.TINY_INPUT_SIZE
        assert models.input_size("resnet50", teacher=name) == 448
    default = models.TEACHERS[models.DEFAULT_TEACHER]
    assert (models.CLIP_MODEL_NAME, models.CLIP_PRETRAINED_TAG, models.CLIP_OPENAI_FILE) == \
        (default.open_clip_name, default.pretrained_tag, default.openai_file)
    for call in (lambda: models.teacher_spec("RN50"), lambda: models.load_clip(teacher="RN50", tiny=True),
                 lambda: models.input_size("clip_vision", teacher="RN50")):
        with pytest.raises(ValueError) as error:
            call()
        one_line(error, "'RN50'", "ViT-B-16")


@pytest.mark.parametrize("name", list(EXPECTED))
def test_random_init_builds_each_teachers_architecture(name, vit_b16):
    """pretrained=False builds the entry's architecture (ViT-L on the meta device: its shapes
    without 428M random numbers; ViT-B-16 for real)."""
    if name == OTHER:
        clip = vit_b16
    else:
        with torch.device("meta"):
            clip = models.load_clip(teacher=name, pretrained=False)
    size, width = EXPECTED[name]
    assert models.clip_image_size(clip) == size
    assert clip.text_projection.shape[1] == width and clip.visual.output_dim == width
    assert isinstance(clip.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    # tiny: the one tiny CLIP whatever the name (tests and the demo).
    tiny = models.load_clip(teacher=name, tiny=True)
    assert models.weights_fingerprint(tiny) == models.weights_fingerprint(models.load_clip(tiny=True))


def test_clip_vision_copies_the_named_teachers_tower(vit_b16):
    model = models.build_model("clip_vision", 3, clip_model=vit_b16, pretrained=False)
    assert model.input_size == 224 and model.feature_dim == 512


@pytest.mark.slow  # a subprocess or a whole pipeline
def test_state_dict_file_loads_into_its_teacher_only(tmp_path, vit_b16):
    path = tmp_path / "vit_b16_state.pt"
    torch.save(vit_b16.state_dict(), path)
    loaded = models.load_clip(path, teacher=OTHER)
    source = vit_b16.state_dict()
    assert all(torch.equal(tensor, source[key]) for key, tensor in loaded.state_dict().items())
    assert models.weights_fingerprint(loaded) == models.weights_fingerprint(vit_b16)
    with pytest.raises(ValueError) as error:
        models.load_clip(path, teacher="ViT-L-14-336")   # builds the ViT-L once (a few seconds)
    one_line(error, "--clip-weights", str(path), "not CLIP ViT-L-14-336-quickgelu weights", "wrong shape")


def test_startup_check_names_the_teachers_file_and_download(tmp_path):
    spec = models.TEACHERS[OTHER]
    resnet_file = _touch(tmp_path / "resnet.pth")
    tower = lambda: models.check_weights_available("clip_vision", need_teacher=False, teacher=OTHER)  # noqa: E731
    teacher = lambda: models.check_weights_available("resnet50", backbone_weights=resnet_file,  # noqa: E731
                                                     need_teacher=True, teacher=OTHER)
    for call in (tower, teacher):
        with pytest.raises(models.WeightsUnavailableError) as error:
            call()
        message = one_line(error, f"--clip-weights /path/to/{spec.openai_file}", spec.hf_repo,
                           spec.open_clip_name)
        assert models.CLIP_OPENAI_FILE not in message
    # open_clip's cached download of this teacher (and not of the other) is enough offline.
    repo = open_clip.get_pretrained_cfg(spec.open_clip_name, spec.pretrained_tag)["hf_hub"].rstrip("/")
    _fake_hf_cache(tmp_path / "hf-home" / "hub", repo, "open_clip_model.safetensors")
    models.check_weights_available("clip_vision", need_teacher=True, teacher=OTHER)
    with pytest.raises(models.WeightsUnavailableError):
        models.check_weights_available("clip_vision", need_teacher=True)
    with pytest.raises(ValueError) as error:
        models.check_weights_available("clip_vision", need_teacher=True, teacher="RN50")
    one_line(error, "'RN50'")


def _touch(path: Path) -> Path:
    path.write_bytes(b"x")
    return path


def _fake_hf_cache(root: Path, repo_id: str, filename: str) -> None:
    snapshot = root / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    (snapshot / filename).write_bytes(b"x")


# openai/clip-vit-base-patch16's config.json on the Hugging Face hub, as far as the check reads it.
OPENAI_B16_CONFIG = {
    "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 512,
    "text_config": {"hidden_act": "quick_gelu", "hidden_size": 512, "intermediate_size": 2048,
                    "max_position_embeddings": 77, "num_attention_heads": 8, "num_hidden_layers": 12,
                    "vocab_size": 49408},
    "vision_config": {"hidden_act": "quick_gelu", "hidden_size": 768, "image_size": 224, "intermediate_size": 3072,
                      "num_attention_heads": 12, "num_hidden_layers": 12, "patch_size": 16},
}


def test_transformers_folder_is_checked_against_the_named_teacher(tmp_path):
    """The hub's openai/clip-vit-base-patch16 (on the meta device) maps onto open_clip's
    ViT-B-16-quickgelu key for key and shape for shape; its config.json passes the start-up check
    for --teacher ViT-B-16 and is refused, in one line, for the default teacher."""
    with torch.device("meta"):
        hf_full = CLIPModel(CLIPConfig(**OPENAI_B16_CONFIG))
        open_clip_full = models.load_clip(teacher=OTHER, pretrained=False)
    converted = hf_clip.to_open_clip_state(hf_full.state_dict())
    assert {k: tuple(v.shape) for k, v in converted.items()} == \
        {k: tuple(v.shape) for k, v in open_clip_full.state_dict().items() if k != "attn_mask"}
    (tmp_path / "config.json").write_text(json.dumps(OPENAI_B16_CONFIG))
    (tmp_path / "model.safetensors").write_bytes(b"not read by the start-up check")
    models.check_weights_available("clip_vision", clip_weights=tmp_path, need_teacher=True, teacher=OTHER)
    with pytest.raises(ValueError) as error:
        models.check_weights_available("clip_vision", clip_weights=tmp_path, need_teacher=True)
    one_line(error, "--clip-weights", "ViT-L-14-336-quickgelu", "vision_config.image_size is 224, expected 336")


# ---------------------------------------------------------------------------------------------
# The Teacher
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(EXPECTED))
def test_teacher_records_its_name_and_tokenizes_with_it(monkeypatch, name):
    teacher = teacher_module.build_teacher(teacher=name, tiny=True)
    assert teacher.name == name
    asked, real = [], open_clip.get_tokenizer

    def recording_tokenizer(model_name, **kwargs):
        asked.append(model_name)
        return real(model_name, **kwargs)

    monkeypatch.setattr(teacher_module.open_clip, "get_tokenizer", recording_tokenizer)
    teacher.encode_text(["a dog"])
    assert asked == [models.TEACHERS[name].open_clip_name]
    clip = models.load_clip(tiny=True)
    assert teacher_module.build_teacher(clip_model=clip, teacher=name).name == name
    assert teacher_module.build_teacher(clip_model=clip).name == models.DEFAULT_TEACHER


def test_raw_text_embeddings_are_the_normalised_ones_up_to_their_norm(tiny_teacher):
    texts = ["aeroplane", "a photo of a dog.", "has bill shape: curved (up or down)"]
    raw = tiny_teacher.encode_text(texts, normalize=False)
    unit = tiny_teacher.encode_text(texts)
    assert raw.dtype == torch.float32 and raw.shape == unit.shape
    norms = raw.norm(dim=1, keepdim=True)
    assert not torch.allclose(norms, torch.ones_like(norms), atol=1e-2)   # really not normalised
    torch.testing.assert_close(raw / norms, unit)
    tokens = open_clip.get_tokenizer(models.CLIP_MODEL_NAME)(texts)
    with torch.no_grad():   # the text tower's output after its projection
        torch.testing.assert_close(raw, tiny_teacher.clip_model.encode_text(tokens), rtol=0, atol=0)
    # Another batch size: the same up to the matrix products' summation order (CUDA's differs).
    torch.testing.assert_close(tiny_teacher.encode_text(texts, batch_size=2, normalize=False), raw,
                               rtol=1e-5, atol=1e-5)


def test_text_features_hint_names_the_runs_teacher(tmp_path):
    path = tmp_path / "text.npy"
    np.save(path, np.ones((20, 768), dtype=np.float32))
    with pytest.raises(ValueError) as error:
        teacher_module.load_text_features(path, 20, 512, dataset="pascal", teacher=OTHER)
    one_line(error, f"make_text_features.py --dataset pascal --teacher {OTHER}`")
    for teacher in (None, models.DEFAULT_TEACHER):
        with pytest.raises(ValueError) as error:
            teacher_module.load_text_features(path, 20, 512, dataset="pascal", teacher=teacher)
        assert "--teacher" not in one_line(error, "make_text_features.py --dataset pascal`")


def test_make_text_features_with_a_named_teacher(tmp_path, capsys, tiny_teacher):
    parsed = mtf.get_args_parser().parse_args(["--dataset", "pascal", "--data-root", str(tmp_path), "--tiny"])
    assert parsed.teacher == models.DEFAULT_TEACHER
    out = mtf.main(mtf.get_args_parser().parse_args(["--dataset", "pascal", "--data-root", str(tmp_path),
                                                     "--tiny", "--teacher", OTHER]))
    assert f"teacher {OTHER}" in capsys.readouterr().out
    features = np.load(out)
    assert features.shape == (20, tiny_teacher.embed_dim) and features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)
    # Its own file beside the default teacher's, the one a run with that teacher reads by default.
    assert out == tmp_path / "pascal" / f"VOC20text_feature_labelonly_{OTHER}.npy"
    config = config_module.resolve_config(main_clip.get_args_parser().parse_args(
        ["-d", "pascal", "--data-root", str(tmp_path), "--teacher", OTHER]))
    assert config["text_features"] == str(out)
    assert config_module.resolve_config(main_clip.get_args_parser().parse_args(
        ["-d", "pascal", "--data-root", str(tmp_path)]))["text_features"] == str(
        tmp_path / "pascal" / "VOC20text_feature_labelonly.npy")
    with pytest.raises(SystemExit):
        mtf.get_args_parser().parse_args(["--dataset", "pascal", "--teacher", "RN50"])


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------

def test_teacher_flag_defaults_from_the_method_and_is_checked(demo_root, tmp_path, capsys):
    config = config_module.resolve_config(demo_args(demo_root, tmp_path))
    assert config["teacher"] == models.DEFAULT_TEACHER
    full = ["-d", "pascal", "--data-root", str(demo_root), "--output-dir", str(tmp_path), "-m", "clip_vision"]
    parser = main_clip.get_args_parser()
    assert config_module.resolve_config(parser.parse_args(full))["image_size"] == 336
    assert config_module.resolve_config(parser.parse_args(full + ["--teacher", OTHER]))["image_size"] == 224
    with pytest.raises(SystemExit):
        parser.parse_args(full + ["--teacher", "RN50"])
    assert "invalid choice: 'RN50'" in capsys.readouterr().err


def test_teacher_lands_in_config_json_and_resume_without_it_is_the_default(demo_root, tmp_path, capsys):
    # The tiny teacher is the same network under every name: the demo's text features serve.
    demo_features = str(demo_root / "pascal" / "VOC20text_feature_labelonly.npy")
    main_clip.main(demo_args(demo_root, tmp_path, "-l", "EM_PL", "--teacher", OTHER, "--epochs", "1",
                             "--text-features", demo_features, "--run-name", "other"))
    assert json.loads((tmp_path / "other" / "config.json").read_text())["teacher"] == OTHER
    # A resume cannot switch the teacher.
    capsys.readouterr()
    code = main_clip.cli(demo_argv(demo_root, tmp_path, "-l", "EM_PL", "--teacher", "ViT-L-14-336",
                                   "--run-name", "other", "--resume"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "teacher: 'ViT-B-16' -> 'ViT-L-14-336'" in err[0]

    # A run folder from before --teacher: its config.json has no "teacher"; it means the default.
    main_clip.main(demo_args(demo_root, tmp_path, "-l", "EM_PL", "--epochs", "1", "--run-name", "old"))
    config_file = tmp_path / "old" / "config.json"
    config = json.loads(config_file.read_text())
    assert config.pop("teacher") == models.DEFAULT_TEACHER
    config_file.write_text(json.dumps(config))
    resumed = main_clip.main(main_clip.get_args_parser().parse_args(
        ["--output-dir", str(tmp_path), "--run-name", "old", "--resume", "--epochs", "2"]))
    assert resumed["epochs_run"] == 2
    assert json.loads(config_file.read_text())["teacher"] == models.DEFAULT_TEACHER


def test_saved_clip_vision_run_rebuilds_with_its_teacher(demo_root, tmp_path, monkeypatch):
    main_clip.main(demo_args(demo_root, tmp_path, "-l", "an", "-m", "clip_vision", "--teacher", OTHER,
                             "--epochs", "1", "--run-name", "c"))
    asked, real = [], models.load_clip

    def recording_load_clip(*args, **kwargs):
        asked.append(kwargs.get("teacher"))
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "load_clip", recording_load_clip)
    run_dir = tmp_path / "c"
    assert saved_run.load_run(run_dir, "last").model.input_size == models.TINY_INPUT_SIZE
    config_file = run_dir / "config.json"
    config = json.loads(config_file.read_text())
    del config["teacher"]
    config_file.write_text(json.dumps(config))
    # As an older version wrote both files: its checkpoint records no teacher either.
    state = checkpoint.load_checkpoint(run_dir / "last.pt")
    del state["config"]["teacher"]
    checkpoint.CheckpointSaver(run_dir, logger=None)._write("last.pt", state)
    saved_run.load_run(run_dir, "last")
    assert asked == [OTHER, models.DEFAULT_TEACHER]
    config_file.write_text(json.dumps({**config, "teacher": "RN50"}))
    with pytest.raises(RunError) as error:
        saved_run.load_run(run_dir, "last")
    one_line(error, "names teacher 'RN50'", "ViT-B-16")
