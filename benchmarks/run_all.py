"""Run every ``benchmarks/bench_*.py`` and print their tables (``make bench``).

Usage: ``.venv/bin/python benchmarks/run_all.py [--quick] [NAME ...]``

Each bench module has ``main(quick: bool)``, which prints a markdown table and writes a CSV to
``bench_output/``. NAME (e.g. ``exact_gp``) restricts the run to matching benches. A bench whose
``main`` takes no ``quick`` argument is run as a script in a subprocess instead. torch's thread count is
reset to its default before each bench. A failing bench is reported and the others still run; the
exit code is 1 if any failed.
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def discover(names: list[str]) -> list[Path]:
    paths = sorted(HERE.glob("bench_*.py"))
    if names:
        paths = [p for p in paths if any(n in p.stem for n in names)]
    return paths


def run_one(path: Path, quick: bool) -> None:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    main = getattr(module, "main", None)
    if main is None:
        raise AttributeError(f"{path.name} has no main()")
    if "quick" in inspect.signature(main).parameters:
        main(quick=quick)
    else:
        print(f"({path.name}: main() takes no `quick`; running it as a script)", flush=True)
        subprocess.run([sys.executable, str(path)], check=True, cwd=HERE.parent)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes / few repeats")
    ap.add_argument("names", nargs="*", help="only run benches whose file name contains one of these")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))  # benches import `common`

    paths = discover(args.names)
    if not paths:
        print("no benchmarks matched", file=sys.stderr)
        return 1
    import torch

    default_threads = torch.get_num_threads()  # benches may call torch.set_num_threads; undo it between them
    summary = []
    for path in paths:
        torch.set_num_threads(default_threads)
        print(f"\n## {path.stem}{' (quick)' if args.quick else ''}\n", flush=True)
        t0 = time.perf_counter()
        try:
            run_one(path, args.quick)
            status = "ok"
        except Exception:  # report and go on with the other benches
            traceback.print_exc()
            status = "FAILED"
        summary.append((path.stem, status, time.perf_counter() - t0))
        sys.stdout.flush()
    print("\n## summary\n")
    for name, status, secs in summary:
        print(f"- {name}: {status} ({secs:.0f} s)")
    return int(any(status != "ok" for _, status, _ in summary))


if __name__ == "__main__":
    sys.exit(main())
