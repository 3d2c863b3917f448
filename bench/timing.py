"""What the benchmarks time with: wall and process-CPU seconds per named part, and how much CPU
other processes took meanwhile (the machine may be shared: a wall time measured while others run
is too long; ratios of process-CPU seconds are less sensitive to that)."""
from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, TypeVar

import torch


def require_at_least_one(args, *names: str) -> None:
    """SystemExit naming the first flag among ``names`` (argparse destinations) set below 1."""
    for name in names:
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1")


Result = TypeVar("Result")


def run_in_work_dir(args: argparse.Namespace, prefix: str, run: Callable[[argparse.Namespace, Path], Result]) -> Result:
    """``run(args, folder)`` after ``--threads``, in ``--work-dir`` or else a temporary folder that
    is removed afterwards."""
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix=prefix) as temporary:
        return run(args, Path(args.work_dir or temporary))


def machine_busy_seconds() -> float | None:
    """CPU seconds all processes of the machine have run (Linux /proc/stat; None elsewhere)."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = [int(v) for v in handle.readline().split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None


class Meter:
    """Each ``measure(name)`` span's wall and process-CPU seconds, listed per name (``total`` sums
    them). Spans measured with ``others=True`` also count other processes' CPU; /proc/stat counts in
    clock ticks (10 ms), too coarse for millisecond parts, so time those inside a longer span.
    On CUDA, each span starts and ends with a synchronize, so it includes its kernels."""

    def __init__(self, device: torch.device = torch.device("cpu")):
        self.device = device
        self.wall: dict[str, list[float]] = defaultdict(list)
        self.cpu: dict[str, list[float]] = defaultdict(list)
        self.other_cpu = 0.0
        self.measured_wall = 0.0

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def measure(self, name: str, others: bool = True):
        self.synchronize()
        busy = machine_busy_seconds() if others else None
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.synchronize()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        self.wall[name].append(wall)
        self.cpu[name].append(cpu)
        end_busy = machine_busy_seconds() if others else None
        if busy is not None and end_busy is not None:
            self.other_cpu += max(0.0, end_busy - busy - cpu)
            self.measured_wall += wall

    def total(self, name: str) -> tuple[float, float]:
        """(wall, process CPU) seconds of all of ``name``'s spans."""
        return sum(self.wall[name]), sum(self.cpu[name])

    def other_cores(self) -> float:
        """Mean number of cores other processes kept busy while this meter measured."""
        return self.other_cpu / self.measured_wall if self.measured_wall else float("nan")
