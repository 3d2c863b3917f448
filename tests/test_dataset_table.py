"""Every method's per-dataset table against the dataset table: each covers every dataset of
``datasets.DATASETS`` (a row or NO_PROTOCOL, checked when ``methods`` is imported), a dataset
without a published protocol is one line naming the flags to give, and the defaults of every
method on every dataset are those of a snapshot taken before the tables were redesigned."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import datasets
import methods
from methods.base import NO_PROTOCOL, joined_table

SNAPSHOT = Path(__file__).resolve().parent / "data" / "method_defaults_snapshot.json"
REPO_ROOT = Path(__file__).resolve().parent.parent

FAKE = datasets.DatasetInfo(name="fake", paper_title="FAKE", class_names=("cat", "dog"), release_names=("cat", "dog"),
                            image_root="images", text_feature_file="fake_text_feature.npy",
                            format_command="no formatter")


def with_entry(monkeypatch, method: type[methods.Method], dataset: str, entry) -> None:
    """``method``'s table with ``entry`` for ``dataset``, for this test only."""
    monkeypatch.setattr(method, "dataset_defaults", {**method.dataset_defaults, dataset: entry})


def snapshot_differences(snapshot: dict) -> list[str]:
    """'method / dataset / key: snapshot ..., now ...' for each value (its repr) that differs."""
    differences = []
    for name, per_dataset in snapshot.items():
        for dataset, expected in per_dataset.items():
            now = {key: repr(value) for key, value in methods.REGISTRY[name].defaults(dataset).items()}
            differences += [f"{name} / {dataset} / {key}: snapshot {expected.get(key)}, now {now.get(key)}"
                            for key in sorted(set(expected) | set(now)) if expected.get(key) != now.get(key)]
    return differences


# -- coverage ---------------------------------------------------------------------------------------

def test_every_method_has_an_entry_for_every_dataset():
    gaps = methods.protocol_table_gaps()
    assert gaps == [], "\n".join(gaps)
    for name, method in methods.REGISTRY.items():
        for dataset in datasets.DATASETS:
            entry = method.dataset_defaults[dataset]
            assert entry is NO_PROTOCOL or isinstance(entry, dict), (name, dataset)


def test_a_new_dataset_is_named_with_every_method_that_lacks_it(monkeypatch):
    monkeypatch.setitem(datasets.DATASETS, "fake", FAKE)
    assert methods.protocol_table_gaps() == [f"-l {name} has no entry for fake" for name in methods.REGISTRY]
    with pytest.raises(TypeError, match="-l bce has no entry for fake; -l an has no entry for fake"):
        methods.check_protocol_tables()
    # Methods whose tables say NO_PROTOCOL, or give a row, are covered.
    with_entry(monkeypatch, methods.REGISTRY["EM_APL"], "fake", NO_PROTOCOL)
    with_entry(monkeypatch, methods.REGISTRY["GR"], "fake", dict(methods.REGISTRY["GR"].dataset_defaults["cub"]))
    gaps = methods.protocol_table_gaps()
    assert "-l EM_APL has no entry for fake" not in gaps and "-l GR has no entry for fake" not in gaps
    assert len(gaps) == len(methods.REGISTRY) - 2


def test_a_misspelt_or_malformed_entry_is_named(monkeypatch):
    em = methods.REGISTRY["EM"]
    monkeypatch.setattr(em, "dataset_defaults", {**em.dataset_defaults, "nus-wide": {"lr": 1e-5}, "cub": None})
    assert methods.protocol_table_gaps() == [
        "-l EM's entry for cub is None, neither a row (dict) nor NO_PROTOCOL",
        "-l EM has a row for 'nus-wide', which is not a dataset of datasets.DATASETS"]


@pytest.mark.slow  # a subprocess or a whole pipeline
def test_importing_the_registry_fails_naming_method_and_dataset():
    """The check runs at import: a dataset that no table lists stops ``import methods``."""
    code = "import datasets; datasets.DATASETS['fake'] = datasets.DATASETS['pascal']; import methods"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("TypeError: per-dataset tables (dataset_defaults) incomplete: -l bce has no entry "
                                "for fake;"), result.stderr
    assert all(f"-l {name} has no entry for fake" in last_line for name in methods.REGISTRY), last_line


def test_joined_tables_pass_on_no_protocol_and_leave_out_what_one_table_lacks():
    first = {"pascal": {"a": 1}, "coco": NO_PROTOCOL, "cub": {"a": 3}}
    second = {"pascal": {"b": 2}, "coco": {"b": 4}}
    joined = joined_table(lambda one, two: {**one, **two}, first, second)
    assert joined == {"pascal": {"a": 1, "b": 2}, "coco": NO_PROTOCOL}


# -- no published protocol -------------------------------------------------------------------------

def test_no_published_protocol_is_one_line_naming_the_flags_to_give(monkeypatch):
    apl = methods.REGISTRY["EM_APL"]
    with_entry(monkeypatch, apl, "cub", NO_PROTOCOL)
    with pytest.raises(ValueError) as error:
        apl.defaults("cub")
    assert str(error.value) == ("-l EM_APL has no published protocol for cub: give --lr, --alpha, --beta (its "
                                "published protocols also choose --bsize, --warmup-epoch per dataset)")
    with pytest.raises(ValueError, match=r"for cub: give --alpha, --beta \(its published protocols also choose "
                                         r"--warmup-epoch per dataset\)$"):
        apl.defaults("cub", given={"lr", "bsize"})
    # Given them all, the values that hold for every dataset, and nothing else.
    values = apl.defaults("cub", given={"lr", "alpha", "beta"})
    assert values == {**methods.PROTOCOL_DEFAULTS, "warmup_epoch": 0, "neg_proportion": 0.9}
    assert apl.defaults("pascal")["warmup_epoch"] == 5  # the other datasets keep their rows


@pytest.mark.parametrize("name", list(methods.REGISTRY))
def test_every_method_without_a_protocol_names_its_flags_in_one_line(monkeypatch, name):
    method = methods.REGISTRY[name]
    with_entry(monkeypatch, method, "pascal", NO_PROTOCOL)
    with pytest.raises(ValueError) as error:
        method.defaults("pascal")
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"-l {name} has no published protocol for pascal: give --lr")
    required = method.settings_without_default()
    assert all(f"--{setting.replace('_', '-')}" in message for setting in required), message
    values = method.defaults("pascal", given=set(required))
    assert not set(required) & set(values) and values["epochs"] == methods.PROTOCOL_DEFAULTS["epochs"]


def test_a_table_without_the_dataset_is_named_for_an_unregistered_method():
    class Unregistered(methods.Method):
        name = "toy_unregistered"
        description = "test: a method with a one-dataset table"
        dataset_defaults = {"pascal": {"lr": 1e-3}}

    assert Unregistered.defaults("pascal")["lr"] == 1e-3
    with pytest.raises(ValueError, match="-l toy_unregistered has no entry for dataset 'coco' in its per-dataset "
                                         "table"):
        Unregistered.defaults("coco")


# -- the numbers ------------------------------------------------------------------------------------

def test_every_default_of_every_method_on_every_dataset_equals_the_snapshot():
    snapshot = json.loads(SNAPSHOT.read_text())["defaults"]
    # 16 methods on 4 datasets, all still there (methods and datasets added since are not in it).
    assert sum(len(per_dataset) for per_dataset in snapshot.values()) == 16 * 4
    assert set(snapshot) <= set(methods.REGISTRY)
    assert all(set(per_dataset) <= set(datasets.DATASETS) for per_dataset in snapshot.values())
    differences = snapshot_differences(snapshot)
    assert differences == [], "\n".join(differences)


def test_the_snapshot_comparison_sees_a_changed_default(monkeypatch):
    snapshot = json.loads(SNAPSHOT.read_text())["defaults"]
    apl = methods.REGISTRY["EM_APL"]
    with_entry(monkeypatch, apl, "coco", {**apl.dataset_defaults["coco"], "bsize": 17, "beta": 0.9000001})
    assert snapshot_differences(snapshot) == ["EM_APL / coco / beta: snapshot 0.9, now 0.9000001",
                                              "EM_APL / coco / bsize: snapshot 16, now 17"]
