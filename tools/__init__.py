"""Research tools kept beside the product, not inside it: they may import any package (like cli/), nothing imports
them, and they are not installed (`python -m tools.<name>` from the repository root). Each documents itself."""


def check_out_folder(out, option: str = "--out") -> None:
    """Before the work: an output whose folder is missing would fail its write after the work, losing it all."""
    from pathlib import Path

    if out is not None and not Path(out).resolve().parent.is_dir():
        raise SystemExit(f"error: {option}: the folder {Path(out).parent} does not exist")
