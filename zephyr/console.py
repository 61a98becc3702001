"""Rich consoles for every command. Tables are the results people compare, so when output goes to a log file, a
pipe or CI (not a terminal) they are laid out at LOG_WIDTH columns instead of rich's 80, which cut model names
and figures to "smo…". A COLUMNS setting still wins."""

from __future__ import annotations

import os
from typing import Any

from rich.console import Console

LOG_WIDTH = 200


def make_console(**kwargs: Any) -> Console:
    kwargs.setdefault("emoji", False)  # "sciq:train:" and the like are split names, not emoji codes
    console = Console(**kwargs)
    if not console.is_terminal and "width" not in kwargs and not os.environ.get("COLUMNS"):
        console.width = LOG_WIDTH
    return console
