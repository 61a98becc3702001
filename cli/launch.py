"""`zephyr train` as a module that `accelerate launch` starts once per GPU (docs/training-multi-gpu.md):

    accelerate launch --config_file training/accelerate/multi_gpu.yaml \\
        -m cli.launch --method dpo --recipe training/recipes/dpo-science.yaml [key=value ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from training.recipes import METHODS

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", required=True, choices=[m for m in METHODS if m != "rs"])
    parser.add_argument("--recipe", required=True, type=Path)
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args()

    import sys

    import typer

    from cli.train import run_method

    try:
        run_method(args.method, args.recipe, args.overrides, args.fresh, args.overwrite)
    except typer.Exit as exc:  # fail()'s one line is printed; outside typer nothing else would catch the exit
        sys.exit(exc.exit_code)
