"""The Method interface: what one single-positive method is to the training loop.

A method declares
* what it needs: teacher pseudo-labels, clean training labels, spatial backbone features;
* its hyperparameters (each becomes a command-line flag) and its defaults per dataset, including
  its published protocol (learning rate, batch, epochs, optimizer, head learning-rate multiplier,
  early stopping), in one table with an entry for every dataset of ``datasets.DATASETS``: a row,
  or ``NO_PROTOCOL`` where nothing was published for it (the registry checks this at import);
* its batch loss, from the batch's logits and labels, at an epoch counted within the stage;
* what it changes after each epoch (label updates go through ``labels.LabelState``), its extra
  trainable parameters and its state for checkpoints.

A loss whose matrix is ``losses.combine``'s form (label-only coefficients) derives from
``CoefficientMethod`` and gets the head-only fast path of the frozen-feature modes for free.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

import augment
import losses
import models
from labels import LabelState


@dataclass(frozen=True)
class Hyperparameter:
    """A method setting: config key ``name``, flag ``--name-with-dashes``."""
    name: str
    type: Callable[[str], Any]
    help: str
    default: Any = None                 # None: the method's per-dataset table gives it
    minimum: float | None = None        # smallest allowed value (inclusive)
    maximum: float | None = None        # largest allowed value (inclusive)
    greater_than: float | None = None   # exclusive lower bound: a value the formula divides by, a temperature

    @property
    def flag(self) -> str:
        return flag_of(self.name)

    def check(self, value: Any) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{self.flag} must be finite, got {value}")
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"{self.flag} must be >= {self.minimum}, got {value}")
        if self.greater_than is not None and not value > self.greater_than:
            raise ValueError(f"{self.flag} must be > {self.greater_than}, got {value}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"{self.flag} must be <= {self.maximum}, got {value}")


class OnOff:
    """An argparse type for a switch written as on / off. A type of its own says what config.json
    holds for it (``accepts``, ``json_form``): a saved configuration is checked against that."""
    json_form = "true or false (the switch's on / off)"

    def __call__(self, text: str) -> bool:
        if text not in ("on", "off"):
            raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
        return text == "on"

    @staticmethod
    def accepts(value: Any) -> bool:
        return isinstance(value, bool)


on_off = OnOff()


class NoProtocol:
    """The entry of a method's per-dataset table for a dataset it has no published protocol for:
    the user gives the settings as flags (``Method.defaults`` names them)."""

    def __repr__(self) -> str:
        return "NO_PROTOCOL"


NO_PROTOCOL = NoProtocol()


def joined_table(combine: Callable[..., dict], *tables: dict) -> dict:
    """A per-dataset table made of the rows of ``tables``: ``combine(row, ...)`` for each dataset
    they all list, NO_PROTOCOL where one of them says so. A dataset that one of them lacks is left
    out, so that the registry's import check names the method instead of a KeyError here."""
    shared = [dataset for dataset in tables[0] if all(dataset in table for table in tables[1:])]
    return {dataset: NO_PROTOCOL if any(table[dataset] is NO_PROTOCOL for table in tables)
            else combine(*(table[dataset] for table in tables)) for dataset in shared}


def flag_of(setting: str) -> str:
    """The command-line flag of a configuration key: ``head_lr_mult`` -> ``--head-lr-mult``."""
    return "--" + setting.replace("_", "-")


# The protocol every method has; a method's table overrides entries per dataset.
PROTOCOL_DEFAULTS = dict(epochs=10, bsize=8, optimizer="adam", weight_decay=0.0, head_lr_mult=1.0, head_lr=1e-4,
                         head_bsize=None,  # None: head-only epochs use --bsize
                         patience=0, max_drop=0.0, teacher=models.DEFAULT_TEACHER)

# Protocol settings a method's table may set, added after PROTOCOL_DEFAULTS was pinned
# (tests/data/method_defaults_snapshot.json), so they are filled in by config.resolve_config where
# neither the table nor the user sets them, at what every run did before they existed: the
# learning-rate schedule (engine.LRSchedule), a constant rate without warm-up, and the training
# augmentation (augment.AUGMENTATIONS), the horizontal flip.
ADDED_PROTOCOL_DEFAULTS = dict(lr_schedule="constant", lr_warmup_epochs=0, lr_warmup_lr=1e-5,
                               augmentation=augment.DEFAULT_AUGMENTATION)

# VLPL's settings (docs/DESIGN.md §5), shared by the methods of its results table: per dataset, a
# row or NO_PROTOCOL.
VLPL_DATASET_DEFAULTS = {
    "pascal": dict(lr=1e-5, alpha=0.2),
    "coco": dict(lr=1e-5, alpha=0.1),
    "nuswide": dict(lr=1e-5, alpha=0.1),
    "cub": dict(lr=1e-4, alpha=0.01),
}


@dataclass
class LossInputs:
    """One training batch as a loss sees it (rows of the training split, float32, on the device)."""
    logits: Tensor              # B x K, float32
    preds: Tensor               # sigmoid(logits)
    index: Tensor               # B row numbers in the training split
    observed: Tensor            # B x K in [-1, 1]
    pseudo: Tensor | None       # B x K in {-1, 0, 1}, for methods that need pseudo-labels
    clean: Tensor               # B x K 0/1 (read only by methods that declare needs_clean_labels)
    # B x K rows -> the whole batch's rows across torchrun's processes, gradients flowing back to
    # this process's rows (Distributed.global_batch); the rows themselves in one process.
    global_batch: Callable[[Tensor], Tensor] = losses.one_process_batch


class Method:
    """Base class of a single-positive method; see the module docstring."""
    name: ClassVar[str]
    description: ClassVar[str]
    hyperparameters: ClassVar[tuple[Hyperparameter, ...]] = ()
    # Dataset -> its row (values of PROTOCOL_DEFAULTS' keys, "lr" and the hyperparameters; other
    # keys are ignored, so methods can share a table) or NO_PROTOCOL. VLPL's unless a method says.
    dataset_defaults: ClassVar[dict[str, dict | NoProtocol]] = VLPL_DATASET_DEFAULTS
    needs_pseudo_labels: ClassVar[bool] = False
    pseudo_label_rule: ClassVar[str] = "vlpl"         # which entry of pseudo_labels.RULES makes them
    needs_clean_labels: ClassVar[bool] = False
    needs_spatial_features: ClassVar[bool] = False
    uses_train_predictions: ClassVar[bool] = False    # end_epoch reads predictions on the train split
    # Extra parameters are per process: a method that has them is not synchronised under torchrun.
    runs_distributed: ClassVar[bool] = True
    # A method that brings its own model (DualCoOp: a frozen CLIP with learnt prompts) names it: its
    # models.BACKBONE_SPECS entry (method_built), which gives the run its input size, normalisation
    # and weights check and is recorded as the run's -m; build_model builds it. None: the -m
    # backbone with --head (models.build_model).
    own_model: ClassVar[str | None] = None

    def __init__(self, hp: SimpleNamespace, labels: LabelState, stage_epochs: int):
        self.hp, self.labels, self.stage_epochs = hp, labels, stage_epochs

    # -- configuration ---------------------------------------------------------------------------
    @classmethod
    def defaults(cls, dataset: str, given: set[str] | frozenset[str] = frozenset()) -> dict:
        """Protocol and hyperparameter values for ``dataset`` (before the user's flags). For a
        dataset the table marks NO_PROTOCOL, the values that hold for every dataset, once
        ``given`` (the settings the user set) holds every setting they lack; else ValueError in one
        line naming the flags to give."""
        values = cls.general_defaults()
        row = cls.protocol_row(dataset)
        if row is NO_PROTOCOL:
            missing = [name for name in cls.settings_without_default() if name not in given]
            if missing:
                raise ValueError(cls.no_protocol_message(dataset, missing, given))
            return values
        values.update({key: value for key, value in row.items() if key in cls.settings()})
        return values

    @classmethod
    def settings(cls) -> set[str]:
        """The configuration keys this method's table may set."""
        return {h.name for h in cls.hyperparameters} | set(PROTOCOL_DEFAULTS) | set(ADDED_PROTOCOL_DEFAULTS) | {"lr"}

    @classmethod
    def general_defaults(cls) -> dict:
        """The values that hold for every dataset: the common protocol and the hyperparameters' own defaults."""
        return {**PROTOCOL_DEFAULTS, **{h.name: h.default for h in cls.hyperparameters if h.default is not None}}

    @classmethod
    def settings_without_default(cls) -> list[str]:
        """The settings only a dataset's row or the user gives: the learning rate and the
        hyperparameters without a default of their own."""
        return ["lr"] + [h.name for h in cls.hyperparameters if h.default is None]

    @classmethod
    def settings_chosen_per_dataset(cls) -> list[str]:
        """The settings with a general default that some published row of the table changes."""
        general = {**cls.general_defaults(), **ADDED_PROTOCOL_DEFAULTS}
        rows = [row for row in cls.dataset_defaults.values() if row is not NO_PROTOCOL]
        return [name for name in general
                if any(name in row and row[name] != general[name] for row in rows)]

    @classmethod
    def protocol_row(cls, dataset: str) -> dict | NoProtocol:
        """The table's entry for ``dataset``; ValueError naming the method where it has none (the
        registry's import check makes that impossible for a registered method)."""
        if dataset not in cls.dataset_defaults:
            raise ValueError(f"-l {cls.name} has no entry for dataset {dataset!r} in its per-dataset table "
                             f"(dataset_defaults): give it a row of the method's protocol, or NO_PROTOCOL")
        return cls.dataset_defaults[dataset]

    @classmethod
    def no_protocol_message(cls, dataset: str, missing: list[str], given: set[str] | frozenset[str]) -> str:
        """One line: the flags to give for ``dataset``, and those its published protocols choose per dataset."""
        message = f"-l {cls.name} has no published protocol for {dataset}: give {', '.join(map(flag_of, missing))}"
        chosen = [name for name in cls.settings_chosen_per_dataset() if name not in given]
        if chosen:
            message += f" (its published protocols also choose {', '.join(map(flag_of, chosen))} per dataset)"
        return message

    @classmethod
    def check_config(cls, config: dict) -> None:
        """ValueError for settings this method cannot run with (after defaults are filled)."""
        for hyperparameter in cls.hyperparameters:
            hyperparameter.check(config[hyperparameter.name])

    @classmethod
    def hyperparameter_values(cls, config: dict) -> SimpleNamespace:
        """This method's settings out of a resolved configuration."""
        return SimpleNamespace(**{h.name: config[h.name] for h in cls.hyperparameters})

    @classmethod
    def from_config(cls, config: dict, labels: LabelState, stage_epochs: int) -> Method:
        return cls(cls.hyperparameter_values(config), labels, stage_epochs)

    # -- the model -------------------------------------------------------------------------------
    @classmethod
    def build_model(cls, config: dict, num_classes: int, *, pretrained: bool = True) -> torch.nn.Module | None:
        """The method's own model (``own_model``) for a resolved ``config``, or None: the run
        builds the -m backbone with its head. The model maps a batch of images to B x K logits whose
        sigmoid is the prediction; its ``backbone`` and ``head`` are the optimizer's two parameter
        groups (at --lr and --lr x --head-lr-mult; parameters that do not require gradients are
        left out), and ``train()`` / ``eval()`` set its modes. ``pretrained=False``: random weights,
        nothing read or downloaded (a checkpoint is loaded into it: evaluate.py, predict.py)."""
        return None

    # -- training --------------------------------------------------------------------------------
    def loss(self, inputs: LossInputs, epoch: int) -> Tensor:
        """The scalar batch loss at ``epoch`` (1-based, counted within the stage)."""
        raise NotImplementedError

    def label_coefficients(self, observed: Tensor, pseudo: Tensor | None, clean: Tensor,
                           epoch: int) -> losses.Coefficients | None:
        """``losses.combine``'s coefficients for these labels, or None where the loss is not of
        that form. A method that returns them must not change labels during an epoch."""
        return None

    def parameter_groups(self) -> list[tuple[list[torch.nn.Parameter], float]]:
        """Extra trainable parameters, each group with its learning-rate multiplier (relative to
        the stage's learning rate). The trainer moves them to its device (``to``)."""
        return []

    def to(self, device: torch.device) -> Method:
        for params, _ in self.parameter_groups():
            for param in params:
                param.data = param.data.to(device)
        return self

    def end_epoch(self, epoch: int, train_predictions: Callable[[], Tensor]) -> None:
        """After each epoch's val and test phases; ``train_predictions()`` gives N x K
        probabilities of the train split in eval mode (only if ``uses_train_predictions``)."""

    def start_from_previous_stage(self, state: dict) -> None:
        """At the start of a later training stage (``linear_init``'s fine-tuning), after
        construction: ``state`` is ``state_dict()`` at the best epoch so far, whose weights the
        stage starts from. By default the stage's method starts afresh."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class CoefficientMethod(Method):
    """A method whose loss matrix is ``losses.combine(preds, *coefficients)`` with label-only
    coefficients: ``label_coefficients`` is all it defines."""

    def label_coefficients(self, observed, pseudo, clean, epoch) -> losses.Coefficients:
        raise NotImplementedError

    def loss(self, inputs: LossInputs, epoch: int) -> Tensor:
        coefficients = self.label_coefficients(inputs.observed, inputs.pseudo, inputs.clean, epoch)
        return losses.mean_loss(losses.combine(inputs.preds, *coefficients))
