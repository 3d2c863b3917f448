"""Benchmark: one training step and one eval forward of a convolutional backbone, in the default
(contiguous) layout against channels_last, the layout main_clip trains and evaluates them in.

Run from the repository root (CPU; about two minutes on 2 cores with the defaults):
    python bench/channels_last.py [-m resnet50 --batch-size 4 --repeats 3]

The real architecture at random init (``pretrained=False``: nothing is read or downloaded), at
its input size, with Adam. The two layouts alternate (contiguous, channels_last, contiguous, ...)
after one untimed step each, so a drift in the machine's speed touches both; medians are printed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

import models  # noqa: E402

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", default="resnet50", choices=[b for b in models.BACKBONES if b != "clip_vision"],
                   help="convolutional backbone")
    p.add_argument("--batch-size", type=int, default=4, help="images per step")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per layout")
    p.add_argument("--tiny", action="store_true", help="tiny model (smoke test, not a measurement)")
    return p


def timed(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor) -> tuple[float, float]:
    """Seconds of one training step and of one eval forward."""
    model.train()
    start = time.perf_counter()
    loss = torch.sigmoid(model(images)).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    train_s = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        start = time.perf_counter()
        model(images)
        eval_s = time.perf_counter() - start
    return train_s, eval_s


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    if args.batch_size < 1 or args.repeats < 1:
        raise SystemExit("error: --batch-size and --repeats must be at least 1")
    torch.manual_seed(0)
    model = models.build_model(args.model, 20, tiny=args.tiny, pretrained=False)
    size = model.input_size
    images = torch.randn(args.batch_size, 3, size, size)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    times: dict[str, dict[str, list[float]]] = {name: {"train": [], "eval": []} for name in LAYOUTS}
    for repeat in range(args.repeats + 1):
        for name, layout in LAYOUTS.items():
            model = model.to(memory_format=layout)
            train_s, eval_s = timed(model, optimizer, images.contiguous(memory_format=layout))
            if repeat > 0:  # the first step of each layout is a warm-up
                times[name]["train"].append(train_s)
                times[name]["eval"].append(eval_s)
    median = {name: {phase: statistics.median(v) for phase, v in phases.items()} for name, phases in times.items()}
    print(f"-m {args.model} at {size} px, batch {args.batch_size}, {torch.get_num_threads()} CPU threads, "
          f"median of {args.repeats}{' [TINY: smoke test only]' if args.tiny else ''}")
    for phase in ("train", "eval"):
        base, ours = median["contiguous"][phase], median["channels_last"][phase]
        print(f"  {phase:5s} step: contiguous {base:.2f} s, channels_last {ours:.2f} s -> {base / ours:.2f}x")
    return median


if __name__ == "__main__":
    main()
