"""Research tools kept beside the product, not inside it: they may import any package (like cli/), nothing imports
them, and they are not installed (`python -m tools.<name>` from the repository root). Each documents itself."""
