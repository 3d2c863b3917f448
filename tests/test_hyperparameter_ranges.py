"""Every method hyperparameter has the range its formula needs, checked by ``resolve_config``
when the run starts: a value the method cannot run with is one error line naming its flag, not a
traceback in epoch 1 and a stranded run folder."""
from __future__ import annotations

import math
import re

import pytest

import config as config_module
import main_clip
import methods
from conftest import demo_argv
from methods.base import on_off
from methods.gr import FloatListHyperparameter

HYPERPARAMETERS = [(method.name, hyperparameter) for method in methods.REGISTRY.values()
                   for hyperparameter in method.hyperparameters]
IDS = [f"{name}{hyperparameter.flag}" for name, hyperparameter in HYPERPARAMETERS]


def kind(hyperparameter) -> str:
    if isinstance(hyperparameter, FloatListHyperparameter):
        return "list"       # FloatListHyperparameter.check and the method's check_config (GR: sigmas > 0)
    if hyperparameter.type is on_off:
        return "switch"
    if hyperparameter.type in (int, float):
        return "number"
    return "unknown"


def resolve(name: str, flag_value: str) -> dict:
    return config_module.resolve_config(main_clip.get_args_parser().parse_args(
        ["--tiny-models", "-l", name, flag_value]))


def step(value, hyperparameter, direction: float):
    """The next value of the hyperparameter's type beyond ``value`` in ``direction``."""
    if hyperparameter.type is int:
        return int(value) + int(direction)
    return math.nextafter(float(value), direction * math.inf)


def edges(hyperparameter) -> list[tuple[object, object]]:
    """(the value just outside, the value at the edge inside) of each declared bound."""
    pairs = []
    greater_than, minimum, maximum = hyperparameter.greater_than, hyperparameter.minimum, hyperparameter.maximum
    if greater_than is not None and (minimum is None or greater_than >= minimum):
        pairs.append((greater_than, step(greater_than, hyperparameter, +1)))
    elif minimum is not None:
        pairs.append((step(minimum, hyperparameter, -1), minimum))
    if maximum is not None:
        pairs.append((step(maximum, hyperparameter, +1), maximum))
    return pairs


def test_every_numeric_hyperparameter_declares_a_range():
    assert [ids for ids, (_, h) in zip(IDS, HYPERPARAMETERS) if kind(h) == "unknown"] == []
    unbounded = [ids for ids, (_, h) in zip(IDS, HYPERPARAMETERS) if kind(h) == "number" and not edges(h)]
    assert unbounded == []


@pytest.mark.parametrize("name, hyperparameter", [pair for pair in HYPERPARAMETERS if kind(pair[1]) == "number"],
                         ids=[ids for ids, pair in zip(IDS, HYPERPARAMETERS) if kind(pair[1]) == "number"])
def test_the_value_just_outside_a_declared_range_is_refused_and_its_edge_accepted(name, hyperparameter):
    for outside, inside in edges(hyperparameter):
        with pytest.raises(main_clip.RunError) as error:
            resolve(name, f"{hyperparameter.flag}={outside!r}")
        message = str(error.value)
        assert hyperparameter.flag in message and "\n" not in message, message
        assert resolve(name, f"{hyperparameter.flag}={inside!r}")[hyperparameter.name] == inside


# Values the code cannot run with, and why; each is refused at start.
CANNOT_RUN = [
    ("AEVLP", "--damp-temp=0"),           # DAMP divides the similarities by it (damp_pseudo_labels raises)
    ("AEVLP", "--grid-size=0"),           # no tiles (damp.num_views raises)
    ("AEVLP", "--damp-top-k=0"),          # an empty top-k (damp_pseudo_labels raises)
    ("AEVLP", "--damp-top-k=21"),         # more than VOC's 20 classes
    ("AEVLP", "--negative-ratio=1.5"),    # clears more classes than there are (damp_pseudo_labels raises)
    ("AEVLP", "--damp-threshold=1.5"),    # a score (a mean of softmax probabilities) never reaches it
    ("AEVLP", "--rho=1.5"),               # a negative weight on -log(1 - p): the loss has no minimum
    ("GR", "--q2=0"),                     # divides the robust loss of unobserved labels
    ("GR", "--q3=0"),
    ("GR", "--v-schedule=0.5,0,0.8,0.5"),  # sigma divides
    ("GR", "--k-schedule=0,inf,1,1"),
    ("EM_APL", "--warmup-epoch=10"),      # APL divides by the epochs after the warm-up (EM_APL: 10 epochs)
    ("EM_APL", "--neg-proportion=1.5"),   # more soft negatives than unobserved labels
    ("EM_PL_ASL", "--gamma-pos=-1"),      # (1 - p)^gamma is infinite at p = 1
    ("an_ls", "--ls-coef=1.5"),           # a negative weight: the loss has no minimum
    ("EM_PL", "--alpha=-0.1"),            # maximises the entropy's opposite
    ("LL-R", "--delta-rel=1.5"),          # a clean rate below 0 from epoch 2
]


@pytest.mark.parametrize("name, flag_value", CANNOT_RUN, ids=[f"{n}{f}" for n, f in CANNOT_RUN])
def test_a_value_the_method_cannot_run_with_is_refused_at_start(name, flag_value):
    with pytest.raises(main_clip.RunError) as error:
        resolve(name, flag_value)
    flag = flag_value.split("=")[0]
    assert flag in str(error.value) and "\n" not in str(error.value)


def test_aevlp_at_damp_temperature_zero_stops_before_its_run_folder_exists(demo_root, tmp_path, capsys):
    out = tmp_path / "out"
    capsys.readouterr()
    assert main_clip.cli(demo_argv(demo_root, out, "-l", "AEVLP", "--damp-temp", "0")) == 2
    lines = [line for line in re.split(r"[\r\n]", capsys.readouterr().err) if line.strip()]
    assert lines == ["error: --damp-temp must be > 0.0, got 0.0"]
    assert not out.exists()
