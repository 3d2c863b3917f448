"""format_nuswide on a small fixture in the official NUS-WIDE layout: output, options, failures."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import datasets
from preproc import format_nuswide, generate_observed_labels
from test_preproc import assert_formatted, assert_no_output

REPO_ROOT = Path(__file__).resolve().parent.parent
CONCEPTS = datasets.NUSWIDE_CLASS_NAMES

# Official split -> (image list line, positive concepts), in list order. Lines are written with
# Windows line endings and backslashes, as in the release.
FIXTURE = {
    "Train": [("actor\\0001_2124494179.jpg", ("person", "dancing")),
              ("airport\\0002_1001.jpg", ("airport", "plane", "sky")),
              ("beach\\0003_1002.jpg", ()),                      # no positive
              ("zebra\\0004_1003.jpg", ("zebra", "animal", "grass")),
              ("water\\0005_1004.jpg", ("water",))],
    "Test": [("sunset\\0001_2001.jpg", ("sunset", "sky", "clouds")),
             ("tattoo\\0002_2002.jpg", ("tattoo", "person")),
             ("book\\0003_2003.jpg", ())],                       # no positive
}


def write_release(root: Path, fixture: dict = FIXTURE) -> Path:
    """The official files and (empty) images under ``root``; returns the label folder."""
    def write(path: Path, lines) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes("".join(f"{line}\r\n" for line in lines).encode())

    write(root / "Concepts81.txt", CONCEPTS)
    label_dir = root / "Groundtruth" / "TrainTestLabels"
    for split, rows in fixture.items():
        write(root / "ImageList" / f"{split}Imagelist.txt", [line for line, _ in rows])
        for concept in CONCEPTS:
            write(label_dir / f"Labels_{concept}_{split}.txt",
                  [int(concept in positives) for _, positives in rows])
        for line, _ in rows:
            image = root / "Flickr" / Path(*line.split("\\"))
            image.parent.mkdir(parents=True, exist_ok=True)
            image.write_bytes(b"x")  # a non-empty placeholder: load_benchmark refuses empty images
    return label_dir


def expected(split: str, keep=lambda line, positives: True) -> tuple[list[str], np.ndarray]:
    """Forward-slash paths and the 0/1 matrix, written out row by row from FIXTURE."""
    rows = [(line, positives) for line, positives in FIXTURE[split] if keep(line, positives)]
    images = [line.replace("\\", "/") for line, _ in rows]
    labels = np.array([[1.0 if concept in positives else 0.0 for concept in CONCEPTS]
                       for _, positives in rows])
    return images, labels


def test_registry_concepts_are_concepts81_order():
    # Concepts81.txt lists the 81 concepts alphabetically; the formatter checks the file
    # against this tuple, so the tuple itself must be in that order.
    assert len(CONCEPTS) == 81 and len(set(CONCEPTS)) == 81
    assert list(CONCEPTS) == sorted(CONCEPTS)
    assert datasets.get_dataset_info("nuswide").image_root == "Flickr"


def test_format_nuswide_official_layout(tmp_path):
    write_release(tmp_path / "raw")
    out = tmp_path / "out"
    result, summary = format_nuswide.format_nuswide(tmp_path / "raw", out)
    assert_formatted(out, "train", *expected("Train"))
    assert_formatted(out, "val", *expected("Test"))
    assert result["train"][1].shape == (5, 81)
    assert not result["train"][1][2].any()       # kept without --drop-unlabeled
    assert summary == [
        "train: 5 listed in TrainImagelist.txt -> 5 after --drop-missing (off: 0 not on disk "
        "kept) -> 5 after --drop-unlabeled (off: 1 without a positive kept)",
        "val: 3 listed in TestImagelist.txt -> 3 after --drop-missing (off: 0 not on disk "
        "kept) -> 3 after --drop-unlabeled (off: 1 without a positive kept)"]


def test_concepts_in_conceptslist_folder(tmp_path):
    write_release(tmp_path)
    (tmp_path / "ConceptsList").mkdir()
    (tmp_path / "Concepts81.txt").rename(tmp_path / "ConceptsList" / "Concepts81.txt")
    format_nuswide.format_nuswide(tmp_path, tmp_path / "out")
    assert_formatted(tmp_path / "out", "val", *expected("Test"))


def test_drop_unlabeled(tmp_path):
    write_release(tmp_path)
    out = tmp_path / "out"
    _, summary = format_nuswide.format_nuswide(tmp_path, out, drop_unlabeled=True)
    has_positive = lambda line, positives: len(positives) > 0  # noqa: E731
    assert_formatted(out, "train", *expected("Train", has_positive))
    assert_formatted(out, "val", *expected("Test", has_positive))
    assert summary[0].endswith("-> 4 after --drop-unlabeled (on: 1 without a positive left out)")
    assert summary[1].endswith("-> 2 after --drop-unlabeled (on: 1 without a positive left out)")


def test_missing_image_with_and_without_drop_missing(tmp_path):
    write_release(tmp_path)
    (tmp_path / "Flickr" / "water" / "0005_1004.jpg").unlink()
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=r"TrainImagelist.txt: image water/0005_1004.jpg "
                                                r"not found .*\(1 of 5 missing\).*--drop-missing"):
        format_nuswide.format_nuswide(tmp_path, out)
    assert_no_output(out)

    _, summary = format_nuswide.format_nuswide(tmp_path, out, drop_missing=True,
                                               drop_unlabeled=True)
    assert_formatted(out, "train", *expected("Train", lambda line, positives:
                                             positives and not line.startswith("water")))
    assert summary[0] == ("train: 5 listed in TrainImagelist.txt -> 4 after --drop-missing (on: "
                          "1 not on disk left out) -> 3 after --drop-unlabeled (on: 1 without a "
                          "positive left out)")


@pytest.mark.parametrize("name,text,message", [
    # one line short: the file does not belong to the list
    ("Labels_sky_Test.txt", "0\r\n1\r\n",
     r"Labels_sky_Test.txt: 2 lines, but \S*TestImagelist.txt lists 3 images"),
    ("Labels_zebra_Train.txt", "0\n0\n0\n2\n0\n",
     r"Labels_zebra_Train.txt, line 4: label '2' is not 0 or 1"),
    # a blank line inside would shift the later lines onto the wrong images
    ("Labels_zebra_Train.txt", "0\n0\n\n1\n0\n\n", r"Labels_zebra_Train.txt, line 3: blank line"),
])
def test_bad_concept_file(tmp_path, name, text, message):
    label_dir = write_release(tmp_path)
    (label_dir / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        format_nuswide.format_nuswide(tmp_path, tmp_path)
    assert_no_output(tmp_path)


def test_concepts_file_must_match_registry(tmp_path):
    write_release(tmp_path)
    names = list(CONCEPTS)
    names[4], names[5] = names[5], names[4]
    (tmp_path / "Concepts81.txt").write_text("\n".join(names) + "\n")
    with pytest.raises(ValueError, match=r"Concepts81.txt, line 5: concept 'boats' where the "
                                         r"registry .* has 'birds'"):
        format_nuswide.format_nuswide(tmp_path, tmp_path)
    (tmp_path / "Concepts81.txt").write_text("\n".join(names[:80]) + "\n")
    with pytest.raises(ValueError, match=r"Concepts81.txt: 80 concepts, expected 81"):
        format_nuswide.format_nuswide(tmp_path, tmp_path)
    assert_no_output(tmp_path)


def test_missing_label_file_and_bad_path(tmp_path):
    label_dir = write_release(tmp_path)
    (label_dir / "Labels_cat_Test.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing \S*Labels_cat_Test.txt; see "
                                                r"data/nuswide/README.md"):
        format_nuswide.format_nuswide(tmp_path, tmp_path)
    write_release(tmp_path)
    list_path = tmp_path / "ImageList" / "TestImagelist.txt"
    list_path.write_text(list_path.read_text().replace("book\\", "C:\\ImageData\\Flickr\\book\\"))
    with pytest.raises(ValueError, match=r"TestImagelist.txt, line 3: .* not a path relative"):
        format_nuswide.format_nuswide(tmp_path, tmp_path)
    assert_no_output(tmp_path)


def test_bad_input_leaves_earlier_output_alone(tmp_path):
    write_release(tmp_path)
    out = tmp_path / "out"
    format_nuswide.format_nuswide(tmp_path, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "Groundtruth" / "TrainTestLabels" / "Labels_tree_Test.txt").write_text("0\n1\n")
    with pytest.raises(ValueError, match="Labels_tree_Test.txt"):
        format_nuswide.format_nuswide(tmp_path, out, drop_unlabeled=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        format_nuswide.get_args_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--drop-missing" in help_text and "--drop-unlabeled" in help_text


def run_formatter(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "preproc/format_nuswide.py", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # a subprocess or a whole pipeline
def test_command_line_chain_to_benchmark(tmp_path):
    """Script from the repository root -> observed labels -> load_benchmark, all unchanged."""
    folder = tmp_path / "data" / "nuswide"
    write_release(folder)
    (folder / "Flickr" / "water" / "0005_1004.jpg").unlink()
    done = run_formatter("--load-path", str(folder), "--save-path", str(folder),
                         "--drop-missing", "--drop-unlabeled")
    assert done.returncode == 0, done.stderr
    assert ("train: 5 listed in TrainImagelist.txt -> 4 after --drop-missing (on: 1 not on disk "
            "left out) -> 3 after --drop-unlabeled (on: 1 without a positive left out)"
            in done.stdout)
    assert "train: 3 images, 81 classes, 2.67 positives per image" in done.stdout
    assert f"--dataset nuswide --data-root {tmp_path / 'data'}" in done.stdout

    parser = generate_observed_labels.get_args_parser()
    generate_observed_labels.main(parser.parse_args(["--dataset", "nuswide", "--data-root",
                                                     str(tmp_path / "data")]))
    test = datasets.load_formatted(tmp_path / "data", "nuswide", "val")
    assert test.images.tolist() == ["sunset/0001_2001.jpg", "tattoo/0002_2002.jpg"]
    np.testing.assert_array_equal((test.labels_obs == 1).sum(axis=1), [1, 1])
    splits = datasets.load_benchmark(tmp_path / "data", "nuswide", val_frac=1 / 3)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (2, 1, 2)
    assert all(Path(p).is_file() for p in splits.image_paths("train"))


def test_command_line_error_is_one_line(tmp_path):
    label_dir = write_release(tmp_path)
    (label_dir / "Labels_zebra_Train.txt").write_text("0\n0\n0\n2\n0\n")
    done = run_formatter("--load-path", str(tmp_path), "--save-path", str(tmp_path))
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"error: {label_dir / 'Labels_zebra_Train.txt'}, line 4: "
                                        f"label '2' is not 0 or 1"]
    assert_no_output(tmp_path)
