"""The evaluation report: `report.md` and a self-contained `report.html` (inline CSS, plots as base64 PNG).

The report is first built as a small document and then rendered twice, so the Markdown and the HTML always say
the same thing and escaping happens in one place. By concern:

- `views`: what is known about each model (merged results, registry entry) and how its figures are written;
- `sections`: what each section says, from the views (tables, paragraphs, which plots);
- `plots`: the matplotlib figures, PNG files under out_dir/plots;
- `document`: the document model and its Markdown and HTML renderers.
"""

from __future__ import annotations

from pathlib import Path

from evals.preference import by_these_weights, human_win_rates, read_review_records, registry_name
from evals.results import ResultStore
from zephyr.paths import write_text_atomic
from zephyr.registry import NAME_PATTERN, Registry, check_name

from .document import render_html, render_markdown
from .plots import PLOT_FILES
from .sections import build_sections
from .views import collect

PLOTS_DIR = "plots"


def write_report(
    store: ResultStore,
    models: list[str],
    out_dir: Path,
    registry: Registry | None = None,
    reviews: Path | None = None,
) -> tuple[Path, Path]:
    """Write out_dir/report.md, out_dir/report.html and out_dir/plots/*.png; returns (markdown, html) paths.

    `reviews`, a `zephyr review export --format dpo` file, adds human win rates; ValueError when it is missing."""
    models = list(dict.fromkeys(m.strip() for m in models if m.strip()))
    if not models:
        raise ValueError("give at least one model to report on")
    for name in models:  # names become result paths; a bad one fails before anything is written
        check_name(name)
    # Read before anything is written: a bad file leaves an earlier report as it was.
    human = (current_reviews(Path(reviews), registry), Path(reviews)) if reviews is not None else None
    views = collect(store, models, registry)
    # A mistyped name in CI wrote a report of "no results" that passed as one. A name with no results is reported
    # (what to run is said) where the registry knows it; one nothing knows is refused, as is a report of nothing.
    # (A report of reviewers' verdicts alone, of remote models the registry does not hold, is one.)
    unknown = [v.name for v in views if v.run is None and human is None and registry is not None
               and not registry.exists(v.name)]
    if unknown or (not any(view.run for view in views) and human is None and registry is None):
        raise ValueError(f"no results for {', '.join(unknown or models)}"
                         f"{' and no such registry model' if unknown else ''}: check the name, or run `zephyr eval "
                         "run --model NAME --suite mcq` first (nothing was written)")
    out_dir = Path(out_dir)
    plots = out_dir / PLOTS_DIR
    plots.mkdir(parents=True, exist_ok=True)
    for name in PLOT_FILES:  # a plot left from an earlier report must not pass for this one's
        (plots / name).unlink(missing_ok=True)
    sections = build_sections(views, plots, registry, human)
    title = f"Zephyr evaluation report: {', '.join(models)}"
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    write_text_atomic(md_path, render_markdown(title, sections, out_dir))
    write_text_atomic(html_path, render_html(title, sections))
    return md_path, html_path


def current_reviews(reviews: Path, registry: Registry | None) -> dict:
    """`human_win_rates` of an export's pairs written by the weights this registry holds under their models' names
    (`by_these_weights`), with `stale`: how many other weights of those names wrote."""
    records = read_review_records(reviews)
    names = {registry_name((r.get("meta") or {}).get(key)) for r in records
             for key in ("chosen_model", "rejected_model")}
    entries = {name: registry.get(name).manifest for name in names
               if registry is not None and NAME_PATTERN.fullmatch(name) and registry.exists(name)}
    records, stale = by_these_weights(records, entries)
    return human_win_rates(records) | {"stale": stale}


__all__ = ["write_report"]
