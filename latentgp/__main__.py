"""Command line: ``python -m latentgp demo [--out DIR] [--smoke]``."""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m latentgp")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the main analysis end to end and write figures + CSV")
    demo.add_argument("which", nargs="?", default="spikes", choices=["spikes", "co2"],
                      help="spikes: cvHM latents from spike trains (default); co2: exact GP on Mauna Loa CO2")
    demo.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    demo.add_argument("--smoke", action="store_true", default=os.environ.get("LATENTGP_SMOKE") == "1",
                      help="small, fast version (also LATENTGP_SMOKE=1)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demos import co2_demo, spike_demo

        out = (spike_demo if args.which == "spikes" else co2_demo)(args.out, smoke=args.smoke)
        print(f"latentgp demo: wrote figures and CSV to {out.resolve()}")
        for path in sorted(out.iterdir()):
            print(f"  {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
