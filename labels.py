"""The training split's labels, owned in one place: observed (which methods may change), clean,
and the teacher's pseudo-labels (docs/DESIGN.md §6 and §9).

Methods change observed labels only through ``update_observed``; ``sync`` brings every rank's
changes to every rank (torchrun), and ``state_dict`` puts them in checkpoints. ``restart`` goes
back to the benchmark's observed labels (each training stage starts from them).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from distributed import Distributed
from errors import RunError


class LabelState:
    def __init__(self, observed: np.ndarray | Tensor, clean: np.ndarray | Tensor, pseudo: Tensor | None = None):
        self.initial = torch.as_tensor(np.asarray(observed), dtype=torch.float32).clone()
        self.clean = torch.as_tensor(np.asarray(clean), dtype=torch.float32)
        if self.initial.ndim != 2 or self.clean.shape != self.initial.shape:
            raise ValueError(f"observed {tuple(self.initial.shape)} and clean {tuple(self.clean.shape)} labels "
                             f"must both be N x K")
        self.observed = self.initial.clone()
        self.pseudo: Tensor | None = None            # of each image as is
        self.pseudo_flipped: Tensor | None = None    # of each image flipped horizontally
        if pseudo is not None:
            self.set_pseudo(pseudo)
        self._pending: list[tuple[Tensor, Tensor, Tensor]] = []

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.initial.shape)

    def set_pseudo(self, pseudo: Tensor, flipped: Tensor | None = None) -> None:
        """The teacher's pseudo-labels of every training image (N x K in {-1, 0, 1}), and of
        every image flipped (the same when not given)."""
        pseudo = torch.as_tensor(pseudo, dtype=torch.float32).cpu()
        flipped = pseudo if flipped is None else torch.as_tensor(flipped, dtype=torch.float32).cpu()
        for matrix in (pseudo, flipped):
            if matrix.shape != self.initial.shape:
                raise ValueError(f"pseudo-labels {tuple(matrix.shape)} for {self.shape} training labels")
        self.pseudo, self.pseudo_flipped = pseudo, flipped

    def batch_pseudo(self, index: Tensor, flips: Tensor | None) -> Tensor | None:
        """The pseudo-labels of rows ``index`` as the batch saw them (``flips``: per row, whether
        the image was flipped; None: as is)."""
        if self.pseudo is None:
            return None
        if flips is None:
            return self.pseudo[index]
        return torch.where(torch.as_tensor(flips, dtype=torch.bool)[:, None], self.pseudo_flipped[index],
                           self.pseudo[index])

    def unobserved_at_start(self) -> Tensor:
        """Per class, how many training entries were unobserved before any method changed them."""
        return (self.initial == 0).sum(0)

    def restart(self) -> None:
        """Back to the benchmark's observed labels."""
        self.observed = self.initial.clone()
        self._pending.clear()

    def update_observed(self, rows: Tensor, cols: Tensor, values: Tensor) -> None:
        """Set observed[rows[i], cols[i]] = values[i] here, and on every rank at the next ``sync``."""
        rows, cols = torch.as_tensor(rows).long().cpu(), torch.as_tensor(cols).long().cpu()
        values = torch.as_tensor(values, dtype=torch.float32).cpu()
        self.observed[rows, cols] = values
        self._pending.append((rows, cols, values))

    def sync(self, dist: Distributed) -> None:
        """Apply every rank's pending changes on every rank (in rank order), then forget them."""
        if dist.enabled:
            for changes in dist.gather_objects(self._pending):
                for rows, cols, values in changes:
                    self.observed[rows, cols] = values
        self._pending.clear()

    def check(self) -> None:
        """The matrices a loss reads, validated once per epoch instead of once per batch."""
        for name, tensor in (("observed training labels", self.observed), ("pseudo-labels", self.pseudo),
                             ("pseudo-labels of flipped images", self.pseudo_flipped)):
            if tensor is not None and not bool(((tensor >= -1) & (tensor <= 1)).all()):
                raise RunError(f"{name} outside [-1, 1]")

    def state_dict(self) -> dict:
        return {"observed": self.observed.clone()}

    def load_state_dict(self, state: dict) -> None:
        observed = state["observed"]
        if tuple(observed.shape) != self.shape:
            raise ValueError(f"checkpoint labels {tuple(observed.shape)} for {self.shape} training labels")
        self.observed = observed.to(torch.float32).clone()
        self._pending.clear()
