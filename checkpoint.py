"""The run's checkpoints, decided and written in one place (DESIGN section 7).

``last.pt`` after every epoch holds everything a resume needs (model, optimizer, scaler, label
state, method state, early stopping, logger); ``best.pt`` holds the weights of the best epoch by
val mAP (strictly better than every earlier epoch). Both are written atomically by rank 0 and
load with ``weights_only=True``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from distributed import Distributed
from fileio import atomic_torch_save
from instrumentation import RunLogger

LAST = "last.pt"
BEST = "best.pt"


class CheckpointSaver:
    def __init__(self, run_dir: Path, logger: RunLogger, dist: Distributed = Distributed()):
        self.run_dir, self.logger, self.dist = Path(run_dir), logger, dist

    @property
    def last_path(self) -> Path:
        return self.run_dir / LAST

    def update_best(self, epoch: int, val_map: float, model: torch.nn.Module, config: dict) -> bool:
        """Record ``epoch``'s val mAP; on a new best, write its weights to best.pt. True on a new best."""
        new_best = self.logger.update_best(epoch, val_map)
        if new_best:
            self._write(BEST, dict(model=model.state_dict(), epoch=epoch, val_map=val_map, config=config))
        return new_best

    def save_last(self, state: dict) -> None:
        self._write(LAST, state)

    def load_last(self) -> dict:
        return torch.load(self.run_dir / LAST, map_location="cpu", weights_only=True)

    def load_best(self) -> dict:
        return torch.load(self.run_dir / BEST, map_location="cpu", weights_only=True)

    def _write(self, name: str, state: dict) -> None:
        if self.dist.is_main:
            atomic_torch_save(self.run_dir / name, state)
        self.dist.barrier()  # nobody reads a checkpoint before it is whole
