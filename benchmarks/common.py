"""Small helpers shared by the ``benchmarks/bench_*.py`` scripts.

* :func:`time_interleaved` -- time several callables in alternating rounds (so background load hits all
  of them alike) and keep every sample; :func:`median` summarises them.
* :func:`machine` -- a one-dict description of the machine and library versions.
* :func:`append_rows` -- append result rows to ``bench_output/<name>.csv`` (created with a header).
* :func:`markdown_table` -- render rows as a GitHub markdown table.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "bench_output"


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def time_interleaved(fns: Mapping[str, Callable[[], object]], *, repeats: int, warmup: int = 1,
                     per_call: int = 1) -> dict[str, list[float]]:
    """Wall-clock seconds per call of each function, ``repeats`` samples each.

    Every round runs each function once (``per_call`` calls, time divided by ``per_call``); the order
    is reversed every other round so neither side systematically runs first. ``warmup`` untimed rounds
    come first.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            for _ in range(per_call):
                fns[name]()
            times[name].append((time.perf_counter() - t0) / per_call)
    return times


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of num[i] / den[i] (samples from the same round saw similar load)."""
    return median([a / b for a, b in zip(num, den, strict=True)])


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """Date, CPU, core count, load, torch threads and library versions."""
    import gpytorch
    import torch

    try:
        load = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        load = "n/a"
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg": load,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpytorch": gpytorch.__version__,
    }


def describe(info: Mapping) -> str:
    return (f"{info['date']}; {info['cpu']}, nproc={info['nproc']}, torch threads={info['torch_threads']}, "
            f"load avg {info['loadavg']}; python {info['python']}, torch {info['torch']}, "
            f"gpytorch {info['gpytorch']}")


def append_rows(name: str, rows: Sequence[Mapping], info: Mapping | None = None) -> Path:
    """Append ``rows`` (stamped with ``info``, e.g. :func:`machine`) to ``bench_output/<name>.csv``."""
    OUTPUT.mkdir(exist_ok=True)
    path = OUTPUT / f"{name}.csv"
    rows = [{**(info or {}), **row} for row in rows]
    fields = list(dict.fromkeys(k for row in rows for k in row))  # the union, in first-seen order
    new = not path.exists() or path.stat().st_size == 0
    if not new:  # keep the existing header if the columns are unchanged, else start a new file
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != fields:
            path = path.with_name(f"{name}-{_dt.datetime.now():%Y%m%d-%H%M%S}.csv")
            new = True
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> str:
    columns = list(columns or (rows[0] if rows else []))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def run_cli(main: Callable[[bool], object], default_threads: int = 1) -> None:
    """``python bench_x.py [--quick] [--threads N]``: set torch's threads, then ``main(quick)``."""
    import argparse

    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=default_threads)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    main(args.quick)
