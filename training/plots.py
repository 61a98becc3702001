"""Curves of a run from its metrics.jsonl: loss for every method, reward margins and accuracies for DPO/KTO,
accuracy and margin for the reward model, rewards and completion length for GRPO. Written as PNG beside the metrics."""

from __future__ import annotations

import json
from fnmatch import fnmatchcase
from pathlib import Path

# Metric keys as TRL logs them, per plot; eval_ keys are the held-out curve.
PANELS: dict[str, list[tuple[str, list[str]]]] = {
    "dpo": [("loss", ["loss", "eval_loss"]), ("reward margin", ["rewards/margins", "eval_rewards/margins"]),
            ("reward accuracy", ["rewards/accuracies", "eval_rewards/accuracies"])],
    "kto": [("loss", ["loss", "eval_loss"]), ("reward margin", ["rewards/margins", "eval_rewards/margins"])],
    "rm": [("loss", ["loss", "eval_loss"]), ("accuracy", ["accuracy", "eval_accuracy"]),
           ("margin", ["margin", "eval_margin"])],
    "sft": [("loss", ["loss", "eval_loss"])],
    "rs": [("loss", ["loss", "eval_loss"])],
    "grpo": [("reward (weighted)", ["reward", "eval_reward"]),
             ("rewards", ["rewards/*/mean"]),  # each reward's, built-in or a reward model's (rewards/<entry>/mean)
             ("completion length", ["completions/mean_length"]), ("loss", ["loss"])],
}


def json_line(line: str) -> dict | None:
    """One metrics.jsonl row; None for a blank line, or one a stop cut off part way."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [row for line in path.read_text().splitlines() if (row := json_line(line)) is not None]


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = {row["step"]: row[key] for row in rows if key in row}  # a resumed run re-logs steps: last wins
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def curve_label(key: str, validation: bool = False) -> str:
    """The legend of one curve: the evaluated curve (the validation part when the recipe carves one: the trainer
    then watches it, and the held-out part is measured once at the end), the training curve, or which of GRPO's
    rewards it is."""
    if key.startswith("eval_"):
        return "validation" if validation else "held out"
    if key.startswith("rewards/") and key.endswith("/mean"):
        return key.removeprefix("rewards/").removesuffix("/mean")
    return "train"


def logged_keys(rows: list[dict], keys: list[str]) -> list[str]:
    """A panel's keys, a pattern ("rewards/*/mean") standing for every logged key it matches, in the order logged."""
    found = []
    for key in keys:
        matching = [k for k in dict.fromkeys(k for row in rows for k in row) if fnmatchcase(k, key)] \
            if "*" in key else [key]
        found += [k for k in matching if k not in found]
    return found


def plot_run(run_dir: Path, method: str, validation: bool = False) -> Path | None:
    rows = read_metrics(run_dir / "metrics.jsonl")
    panels = [(title, keys) for title, keys in ((title, logged_keys(rows, keys)) for title, keys in PANELS[method])
              if any(series(rows, k)[0] for k in keys)]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels, strict=True):
        for key in keys:
            steps, values = series(rows, key)
            if steps:
                ax.plot(steps, values, marker="o" if key.startswith("eval_") else None, markersize=3,
                        label=curve_label(key, validation))
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{run_dir.name} ({method})")
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
