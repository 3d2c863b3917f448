"""Formatters on small fixtures in the real raw layouts: bit-exact output and clear failures."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import datasets
from preproc import format_coco, format_cub, format_pascal

OUTPUT_NAMES = [f"formatted_{phase}_{kind}.npy" for phase in ("train", "val")
                for kind in ("images", "labels", "labels_obs")]


def assert_no_output(folder: Path) -> None:
    left = [name for name in OUTPUT_NAMES if (folder / name).exists()]
    left += [p.name for p in folder.glob(".formatted_*")] if folder.exists() else []
    assert not left, f"partial output left behind: {left}"


def load_strict(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def assert_formatted(folder: Path, phase: str, images: list[str], labels: np.ndarray) -> None:
    got_images = load_strict(folder / f"formatted_{phase}_images.npy")
    got_labels = load_strict(folder / f"formatted_{phase}_labels.npy")
    assert got_images.dtype.kind == "U"
    assert got_images.tolist() == images
    assert got_labels.dtype == np.float64
    np.testing.assert_array_equal(got_labels, labels)


# ---------------------------------------------------------------------------------------------
# PASCAL VOC
# ---------------------------------------------------------------------------------------------

def voc_line(image_id: str, label: int) -> str:
    # The real files: '<id> -1' for absent, '<id>  1' and '<id>  0' (two spaces) otherwise.
    return f"{image_id} -1" if label == -1 else f"{image_id}  {label}"


def write_voc(root: Path, phase_labels: dict[str, dict[str, dict[str, int]]]) -> Path:
    """phase -> image id -> {class file name: label}; unlisted classes are -1."""
    main_dir = root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Main"
    main_dir.mkdir(parents=True)
    for phase, images in phase_labels.items():
        for class_name in datasets.VOC_CLASSES:
            lines = [voc_line(image_id, labels.get(class_name, -1))
                     for image_id, labels in images.items()]
            (main_dir / f"{class_name}_{phase}.txt").write_text("\n".join(lines) + "\n")
    return main_dir


VOC_FIXTURE = {
    # listed out of order; 2008_000003 has only a difficult (0) label and must be left out
    "train": {"2008_000010": {"aeroplane": 1, "dog": 1},
              "2008_000002": {"person": 1},
              "2007_000005": {"person": 1, "aeroplane": 0},
              "2008_000003": {"person": 0}},
    "val": {"2009_000002": {"train": 1, "sofa": 1},
            "2009_000001": {"tvmonitor": 1, "bird": 0}},
}


def voc_index(name: str) -> int:
    return datasets.VOC_CLASSES.index(name)


def test_format_pascal_bit_exact(tmp_path):
    write_voc(tmp_path / "raw", VOC_FIXTURE)
    out = tmp_path / "out"
    format_pascal.format_pascal(tmp_path / "raw", out)

    train = np.zeros((3, 20))
    train[0, voc_index("person")] = 1
    train[1, voc_index("person")] = 1
    train[2, [voc_index("aeroplane"), voc_index("dog")]] = 1
    assert_formatted(out, "train", ["2007_000005.jpg", "2008_000002.jpg", "2008_000010.jpg"],
                     train)
    val = np.zeros((2, 20))
    val[0, voc_index("tvmonitor")] = 1
    val[1, [voc_index("sofa"), voc_index("train")]] = 1
    assert_formatted(out, "val", ["2009_000001.jpg", "2009_000002.jpg"], val)


def test_format_pascal_missing_main_folder(tmp_path):
    (tmp_path / "VOCdevkit" / "VOC2012").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="ImageSets/Main"):
        format_pascal.format_pascal(tmp_path, tmp_path)
    assert_no_output(tmp_path)


def test_format_pascal_missing_class_file_and_bad_label(tmp_path):
    main_dir = write_voc(tmp_path, VOC_FIXTURE)
    (main_dir / "sofa_val.txt").unlink()
    with pytest.raises(FileNotFoundError, match="sofa_val.txt"):
        format_pascal.format_pascal(tmp_path, tmp_path)
    assert_no_output(tmp_path)

    (main_dir / "sofa_val.txt").write_text("2009_000001 -1\n2009_000002  2\n")
    with pytest.raises(ValueError, match=r"sofa_val.txt, line 2"):
        format_pascal.format_pascal(tmp_path, tmp_path)
    assert_no_output(tmp_path)


# ---------------------------------------------------------------------------------------------
# COCO
# ---------------------------------------------------------------------------------------------

def coco_categories() -> list[dict]:
    # ids deliberately not in list order: the class index is the position in the list
    return [{"id": 200 - i, "name": name, "supercategory": "x"}
            for i, name in enumerate(datasets.COCO_CLASS_NAMES)]


def write_coco(root: Path, split: str, annotations: list[tuple[int, int]],
               extra_images: tuple[int, ...] = (), categories: list | None = None) -> Path:
    """annotations: (image_id, category position in the list)."""
    categories = categories or coco_categories()
    image_ids = sorted({i for i, _ in annotations} | set(extra_images))
    data = {"images": [{"id": i, "file_name": f"COCO_{split}2014_{i:012d}.jpg"}
                       for i in image_ids],
            "annotations": [{"id": n, "image_id": i, "category_id": categories[c]["id"],
                             "bbox": [0, 0, 1, 1]} for n, (i, c) in enumerate(annotations)],
            "categories": categories}
    path = root / "annotations" / f"instances_{split}2014.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_format_coco_bit_exact_string_order(tmp_path):
    # image 55 has no annotation; 9, 10, 100 sort as strings: '10' < '100' < '9'
    write_coco(tmp_path, "train", [(9, 0), (10, 3), (100, 3), (100, 79), (9, 0)],
               extra_images=(55,))
    write_coco(tmp_path, "val", [(7, 5), (12, 0), (12, 1)])
    out = tmp_path / "out"
    format_coco.format_coco(tmp_path, out)

    train = np.zeros((3, 80))
    train[0, 3] = 1            # image 10
    train[1, [3, 79]] = 1      # image 100
    train[2, 0] = 1            # image 9
    assert_formatted(out, "train", ["train2014/COCO_train2014_000000000010.jpg",
                                    "train2014/COCO_train2014_000000000100.jpg",
                                    "train2014/COCO_train2014_000000000009.jpg"], train)
    val = np.zeros((2, 80))
    val[0, [0, 1]] = 1         # image 12
    val[1, 5] = 1              # image 7
    assert_formatted(out, "val", ["val2014/COCO_val2014_000000000012.jpg",
                                  "val2014/COCO_val2014_000000000007.jpg"], val)


def test_format_coco_malformed_json(tmp_path):
    write_coco(tmp_path, "train", [(9, 0)])
    path = write_coco(tmp_path, "val", [(7, 5)])
    path.write_text(path.read_text()[:-20])
    with pytest.raises(ValueError, match=r"instances_val2014.json: malformed JSON"):
        format_coco.format_coco(tmp_path, tmp_path)
    assert_no_output(tmp_path)

    path.write_text(json.dumps({"categories": coco_categories()}))
    with pytest.raises(ValueError, match=r"instances_val2014.json: .*'annotations'"):
        format_coco.format_coco(tmp_path, tmp_path)
    assert_no_output(tmp_path)


def test_format_coco_categories_must_agree(tmp_path):
    write_coco(tmp_path, "train", [(9, 0)])
    swapped = coco_categories()
    swapped[0], swapped[1] = swapped[1], swapped[0]
    write_coco(tmp_path, "val", [(7, 5)], categories=swapped)
    with pytest.raises(ValueError, match="instances_val2014.json: 'categories' differ"):
        format_coco.format_coco(tmp_path, tmp_path)
    assert_no_output(tmp_path)


def test_format_coco_unknown_category_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="instances_train2014.json"):
        format_coco.format_coco(tmp_path, tmp_path)
    path = write_coco(tmp_path, "train", [(9, 0)])
    write_coco(tmp_path, "val", [(7, 5)])
    data = json.loads(path.read_text())
    data["annotations"][0]["category_id"] = 999
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="instances_train2014.json: annotation 0 .* 999"):
        format_coco.format_coco(tmp_path, tmp_path)
    assert_no_output(tmp_path)


# ---------------------------------------------------------------------------------------------
# CUB
# ---------------------------------------------------------------------------------------------

CUB_PATHS = ["001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg",
             "001.Black_footed_Albatross/Black_Footed_Albatross_0009_34.jpg",
             "002.Laysan_Albatross/Laysan_Albatross_0002_1027.jpg",
             "200.Common_Yellowthroat/Common_Yellowthroat_0055_190967.jpg"]
CUB_IS_TRAIN = [1, 0, 1, 0]


def write_cub(root: Path, labels: np.ndarray, drop: tuple[int, int] | None = None) -> Path:
    """Raw CUB files for len(CUB_PATHS) images; returns the labels file. ``drop`` = (image id,
    attribute id) whose line is left out. Lines are shuffled; one carries an extra field."""
    cub = root / "CUB_200_2011"
    (cub / "attributes").mkdir(parents=True)
    (root / "attributes.txt").write_text(
        "".join(f"{i + 1} {name}\n" for i, name in enumerate(datasets.CUB_ATTRIBUTE_KEYS)))
    (cub / "images.txt").write_text(
        "".join(f"{i + 1} {path}\n" for i, path in enumerate(CUB_PATHS)))
    (cub / "train_test_split.txt").write_text(
        "".join(f"{i + 1} {flag}\n" for i, flag in enumerate(CUB_IS_TRAIN)))
    lines = []
    for i in range(labels.shape[0]):
        for a in range(labels.shape[1]):
            if (i + 1, a + 1) != drop:
                lines.append(f"{i + 1} {a + 1} {int(labels[i, a])} 3 12.5")
    lines[7] += " 0"  # a line with an extra field, as in some copies of the file
    order = np.random.RandomState(0).permutation(len(lines))
    path = cub / "attributes" / "image_attribute_labels.txt"
    path.write_text("".join(lines[k] + "\n" for k in order))
    return path


def cub_labels() -> np.ndarray:
    return (np.random.RandomState(3).rand(len(CUB_PATHS), 312) < 0.1).astype(np.float64)


def test_format_cub_bit_exact(tmp_path):
    labels = cub_labels()
    write_cub(tmp_path, labels)
    out = tmp_path / "out"
    format_cub.format_cub(tmp_path, out)
    assert_formatted(out, "train", [CUB_PATHS[0], CUB_PATHS[2]], labels[[0, 2]])
    assert_formatted(out, "val", [CUB_PATHS[1], CUB_PATHS[3]], labels[[1, 3]])


def test_format_cub_missing_attribute(tmp_path):
    write_cub(tmp_path, cub_labels(), drop=(3, 150))
    with pytest.raises(ValueError, match=r"image_attribute_labels.txt: image 3 has no value "
                                         r"for attribute 150"):
        format_cub.format_cub(tmp_path, tmp_path)
    assert_no_output(tmp_path)


def test_format_cub_bad_files(tmp_path):
    path = write_cub(tmp_path, cub_labels())
    text = path.read_text()
    path.write_text(text + "2 5\n")
    with pytest.raises(ValueError, match=r"image_attribute_labels.txt, line \d+: expected at "
                                         r"least 3 fields"):
        format_cub.format_cub(tmp_path, tmp_path)
    path.write_text(text + "2 5 7 3 1.0\n")
    with pytest.raises(ValueError, match="is_present is 7"):
        format_cub.format_cub(tmp_path, tmp_path)
    path.write_text(text)
    (tmp_path / "attributes.txt").write_text("1 has_bill_shape::dagger\n")
    with pytest.raises(ValueError, match="attributes.txt: 1 attributes, expected 312"):
        format_cub.format_cub(tmp_path, tmp_path)
    (tmp_path / "attributes.txt").unlink()
    with pytest.raises(FileNotFoundError, match="attributes.txt"):
        format_cub.format_cub(tmp_path, tmp_path)
    assert_no_output(tmp_path)
