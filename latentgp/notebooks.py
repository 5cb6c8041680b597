"""Execute the jupytext tutorials: ``python -m latentgp.notebooks tutorials [--smoke] [--out DIR]``.

Each ``tutorials/*.py`` (jupytext percent format, the source of truth) is converted to a notebook,
executed with nbclient, and written next to it as ``.ipynb`` (or into ``--out``). ``LATENTGP_SMOKE=1``
(``--smoke``) asks the tutorials to shrink their sizes so tests can run them quickly.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def execute(source: Path, out: Path | None = None, smoke: bool = False, timeout: int = 1800) -> Path:
    import jupytext
    import nbformat
    from nbclient import NotebookClient

    source = Path(source)
    nb = jupytext.read(source)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    env_before = os.environ.get("LATENTGP_SMOKE")
    os.environ["LATENTGP_SMOKE"] = "1" if smoke else "0"
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(source.parent)}}).execute()
    finally:
        if env_before is None:
            os.environ.pop("LATENTGP_SMOKE", None)
        else:
            os.environ["LATENTGP_SMOKE"] = env_before
    target = (out or source.parent) / (source.stem + ".ipynb")
    target.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, target)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m latentgp.notebooks")
    parser.add_argument("folder", nargs="?", default="tutorials")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    for source in sorted(Path(args.folder).glob("[0-9]*.py")):
        target = execute(source, Path(args.out) if args.out else None, smoke=args.smoke)
        print(f"executed {source} -> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
