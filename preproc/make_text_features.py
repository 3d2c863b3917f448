"""Make a dataset's CLIP text features: K x D float32, unit rows, in class-index order.

Run from the repository root:
    python preproc/make_text_features.py --dataset NAME [--label-only | --prompt "a photo of a {}."]
        [--teacher NAME] [--clip-weights FILE] [--data-root data] [--out FILE] [--force] [--tiny]
Writes ``<data-root>/<NAME>/<registry text-feature file>`` (e.g. VOC20text_feature_labelonly.npy;
for a teacher other than the default ``<stem>_<teacher>.npy``, ``teacher.text_features_file``,
what main_clip.py reads by default) unless ``--out`` is given. Default texts: the bare class name when that file name says
'labelonly' (as the original's files presumably were), otherwise "a photo of a {}.".
The teacher is the CLIP of main_clip.py: ``--teacher`` (a ``models.TEACHERS`` name, default
VLPL's), its weights from ``--clip-weights``, else open_clip's download; ``--tiny`` uses the tiny
random CLIP of ``main_clip.py --tiny-models`` (tests, demo), the same for every teacher name.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import datasets  # noqa: E402
from preproc import run_script  # noqa: E402
import models  # noqa: E402
import teacher as teacher_module  # noqa: E402
from fileio import atomic_save_npy  # noqa: E402

DEFAULT_PROMPT = "a photo of a {}."


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Make CLIP text features for a dataset's classes.")
    parser.add_argument("--dataset", required=True, choices=sorted(datasets.DATASETS))
    texts = parser.add_mutually_exclusive_group()
    texts.add_argument("--label-only", action="store_true", help="encode the bare class names")
    texts.add_argument("--prompt", default=None,
                       help=f"template with one '{{}}' for the class name (e.g. {DEFAULT_PROMPT!r})")
    parser.add_argument("--teacher", choices=list(models.TEACHERS), default=models.DEFAULT_TEACHER,
                        help="the CLIP teacher of the runs that read the features (main_clip.py --teacher)")
    parser.add_argument("--clip-weights", default=None,
                        help="the teacher's weights: OpenAI's file (" + ", ".join(
                            f"{spec.openai_file} for {name}" for name, spec in models.TEACHERS.items())
                        + "), a CLIP state dict or a Hugging Face CLIP folder (default: open_clip's download)")
    parser.add_argument("--data-root", default="data", help="folder holding <dataset>/")
    parser.add_argument("--out", default=None, help="output .npy (default: the dataset folder's "
                                                    "registry text-feature file; <stem>_<teacher>.npy "
                                                    "for a teacher other than the default)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny random CLIP of --tiny-models runs (tests, demo)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def resolve_prompt(info: datasets.DatasetInfo, label_only: bool, prompt: str | None) -> str | None:
    """None means the bare class name."""
    if label_only:
        return None
    if prompt is not None:
        if prompt.count("{}") != 1:
            raise ValueError(f"--prompt {prompt!r} must contain '{{}}' exactly once (the class name)")
        return prompt
    return None if "labelonly" in info.text_feature_file.lower() else DEFAULT_PROMPT


def class_texts(class_names: Sequence[str], prompt: str | None) -> list[str]:
    return [name if prompt is None else prompt.format(name) for name in class_names]


def make_text_features(teacher: teacher_module.Teacher, class_names: Sequence[str],
                       prompt: str | None) -> np.ndarray:
    """K x D float32 unit rows: the teacher's text embedding of each class text."""
    features = teacher.encode_text(class_texts(class_names, prompt)).cpu().numpy()
    return features.astype(np.float32)


def main(args: argparse.Namespace) -> Path:
    info = datasets.get_dataset_info(args.dataset)
    prompt = resolve_prompt(info, args.label_only, args.prompt)
    out = Path(args.out) if args.out else (datasets.dataset_dir(args.data_root, args.dataset)
                                           / teacher_module.text_features_file(info, args.teacher))
    if out.exists() and not args.force:
        raise ValueError(f"{out} exists (it may be a published file); pass --force to overwrite it "
                         f"or --out to write elsewhere")
    models.check_weights_available("clip_vision", clip_weights=args.clip_weights, need_teacher=True,
                                   tiny=args.tiny, teacher=args.teacher)
    teacher = teacher_module.build_teacher(args.clip_weights, teacher=args.teacher, tiny=args.tiny).to(args.device)
    features = make_text_features(teacher, info.class_names, prompt)
    atomic_save_npy(out, features)
    example = class_texts(info.class_names[:1], prompt)[0]
    print(f"wrote {out}: {features.shape[0]} x {features.shape[1]} text features "
          f"({'class names' if prompt is None else repr(prompt)}, e.g. {example!r}; "
          f"teacher {teacher.name}{' (tiny)' if args.tiny else ''} {teacher.fingerprint[:16]})")
    return out


if __name__ == "__main__":
    run_script(main, get_args_parser())
