"""The run's checkpoints, decided and written in one place (docs/DESIGN.md §7).

``last.pt`` after every epoch holds everything a resume needs (model, optimizer, scaler, label
state, method state, early stopping, logger); ``best.pt`` holds the weights and the method state
of the best epoch by val mAP (strictly better than every earlier epoch). Both are written
atomically by rank 0, load with ``weights_only=True`` and carry a checksum of their contents,
verified at load: a damaged file is refused with one line, never silently replaced by a fresh
start.
"""
from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from distributed import Distributed
from errors import RunError
from fileio import atomic_torch_save
from instrumentation import RunLogger

LAST = "last.pt"
BEST = "best.pt"
CHECKSUM = "checksum"


def checksum(obj) -> str:
    """sha256 of a checkpoint's contents: tensors by dtype, shape and bytes, containers in order."""
    digest = hashlib.sha256()

    def feed(value) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            digest.update(f"D{len(value)}".encode())
            for key, item in value.items():
                feed(key)
                feed(item)
        elif isinstance(value, (list, tuple)):
            digest.update(f"L{len(value)}".encode())
            for item in value:
                feed(item)
        else:
            digest.update(f"{type(value).__name__}:{value!r}".encode())
    feed(obj)
    return digest.hexdigest()


def _first_words(error: Exception) -> str:
    """What a load error says, in one short line: the unpickler's own complaint when torch wraps it
    in advice about trusting the file (which does not apply to a damaged one)."""
    text = str(error).strip()
    if "WeightsUnpickler error: " in text:
        text = text.split("WeightsUnpickler error: ", 1)[1]
    line = (text.splitlines() or [""])[0].strip() or type(error).__name__
    return f"{type(error).__name__}: {line[:200]}"


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by ``CheckpointSaver``, its checksum verified (RunError, one line,
    when it cannot be read or does not match)."""
    advice = "restore it from a copy, or start the run again under another --run-name"
    try:
        with warnings.catch_warnings():
            # A damaged pickle stream may read as another protocol; the checksum below judges it.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged stream can make the unpickler raise anything (KeyError, IndexError...)
        raise RunError(f"{path}: cannot read the checkpoint ({_first_words(error)}); {advice}") from error
    if not isinstance(state, dict) or CHECKSUM not in state:
        raise RunError(f"{path}: not a checkpoint of this code (no checksum)")
    expected = state.pop(CHECKSUM)
    try:
        matches = isinstance(expected, str) and checksum(state) == expected
    except Exception as error:  # a damaged structure (e.g. a list holding itself) that loaded nonetheless
        raise RunError(f"{path}: damaged (its contents cannot be checked: {_first_words(error)}); {advice}") from error
    if not matches:
        raise RunError(f"{path}: damaged (its contents do not match its checksum); {advice}")
    return state


class CheckpointSaver:
    def __init__(self, run_dir: Path, logger: RunLogger, dist: Distributed = Distributed()):
        self.run_dir, self.logger, self.dist = Path(run_dir), logger, dist

    @property
    def last_path(self) -> Path:
        return self.run_dir / LAST

    def update_best(self, epoch: int, val_map: float, model: torch.nn.Module, config: dict,
                    method_state: Callable[[], dict] = dict) -> bool:
        """Record ``epoch``'s val mAP; on a new best, write its weights and ``method_state()`` (the
        method's state, which a later training stage may start from) to best.pt. True on a new best."""
        new_best = self.logger.update_best(epoch, val_map)
        if new_best:
            self._write(BEST, dict(model=model.state_dict(), method=method_state(), epoch=epoch, val_map=val_map,
                                   config=config))
        return new_best

    def save_last(self, state: dict) -> None:
        self._write(LAST, state)

    def load_last(self) -> dict:
        return load_checkpoint(self.run_dir / LAST)

    def load_best(self) -> dict:
        return load_checkpoint(self.run_dir / BEST)

    def bytes_needed(self, model: torch.nn.Module) -> int:
        """Free space the run's checkpoints need beside those already written: a new last.pt
        (weights, and optimizer moments up to twice their size) and a new best.pt are each
        written whole before they replace the old ones."""
        weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        return 4 * weights + 2**20

    def _write(self, name: str, state: dict) -> None:
        if self.dist.is_main:
            path = self.run_dir / name
            try:
                atomic_torch_save(path, {**state, CHECKSUM: checksum(state)})
            except OSError as error:
                raise CheckpointWriteError(f"cannot write {path} ({error.strerror or error}); the checkpoints "
                                           f"already there are whole: free space there") from error
        self.dist.barrier()  # nobody reads a checkpoint before it is whole


class CheckpointWriteError(RunError):
    """A checkpoint could not be written (full disk, read-only folder); the older one stays whole."""
