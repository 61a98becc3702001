"""`zephyr quantize`: options are checked before any model loads; errors end in one line that says what to fix."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.common import console, err, fail, load_settings, unwind_on_sigterm
from quant.calibration import DEFAULT_SOURCES
from quant.run import GROUPED, SCHEMES

METHOD_HELP = "; ".join(f"{m}: {', '.join(s)}" for m, s in SCHEMES.items())


def quantize_command(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="Registry model to quantize (an unquantized one)")],
    method: Annotated[str, typer.Option(help="gptq | awq | w8a8 | easyquant | bnb")],
    scheme: Annotated[str | None, typer.Option(help=f"Scheme, default the first listed: {METHOD_HELP}")] = None,
    group_size: Annotated[int, typer.Option(help=f"Input features per scale ({', '.join(GROUPED)}); must divide "
                                                 "every Linear's input width")] = 64,
    name: Annotated[str | None, typer.Option(help="Registry name of the result \\[default: MODEL-METHOD]")] = None,
    calibration: Annotated[Path | None, typer.Option(
        help="SFT-format JSON Lines ({\"messages\": [...]}) to calibrate on \\[default: tutoring chats built from the "
             "training splits of --calibration-sources]")] = None,
    calibration_sources: Annotated[str, typer.Option(help="MCQ training splits for the default calibration set")]
    = ",".join(DEFAULT_SOURCES),
    samples: Annotated[int, typer.Option(help="Calibration samples")] = 128,
    seq_len: Annotated[int, typer.Option(help="Calibration tokens per sample (longer ones are cut)")] = 512,
    smoothing: Annotated[float, typer.Option(help="w8a8: SmoothQuant strength, 0 = off")] = 0.8,
    smooth_down_proj: Annotated[bool | None, typer.Option(
        "--smooth-down-proj/--no-smooth-down-proj",
        help="w8a8: also smooth down_proj's input (the MLP's widest activations), folding the scales into "
             "up_proj; llm-compressor's Llama mappings smooth only q/k/v and gate/up \\[default: on with --smoothing "
             "> 0]")] = None,
    awq_grid: Annotated[int, typer.Option(help="awq: scale grid points per layer (20 = llm-compressor's default; "
                                               "5 is ~8x faster on CPU)")] = 20,
    form: Annotated[str, typer.Option(help="easyquant: int4 (served by vLLM; no outliers isolated, the range fit "
                                           "over every weight) or dequantized (the paper's int4 + full-precision "
                                           "outliers, as 16-bit weights)")]
    = "int4",
    outlier_sigma: Annotated[float | None, typer.Option(help="easyquant: outlier threshold in standard deviations")]
    = None,
    steps: Annotated[int | None, typer.Option(help="easyquant: gradient steps per layer")] = None,
    lr: Annotated[float | None, typer.Option(
        help="easyquant: Adam's learning rate on the scales, in the scales' own units: about 1% of a typical group "
             "scale (max |w| / 7) suits; the default 1e-3 is sized for SmolLM2's (docs/quantization.md)")] = None,
    quantize_lm_head: Annotated[bool, typer.Option(
        help="Experimental: also quantize lm_head. gptq/awq/w8a8 untie it from the embedding, which stays 16-bit; "
             "easyquant's dequantized form quantizes a tied head in place, so the embedding too. vLLM 0.32 cannot "
             "load the llm-compressor results (no lm_head.weight_packed in ParallelLMHead); transformers can")]
    = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a registry model of the same name")] = False,
) -> None:
    """Quantize a registry model into a new registry entry (compressed-tensors, served by vLLM as it is)."""
    from quant.calibration import CalibrationError
    from quant.env import QuantEnvError
    from quant.run import READ_BY, QuantError, QuantOptions, quantize, unread_options
    from zephyr.registry import RegistryError

    # by name: Typer carries its own copy of click, whose ParameterSource is not click's
    given = [name for name in READ_BY if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"]
    if problem := unread_options(method, given, calibration_file=calibration is not None):
        raise fail(problem)
    settings = load_settings()
    options = QuantOptions(model=model, method=method, scheme=scheme, group_size=group_size, name=name,
                           calibration=calibration.expanduser().resolve() if calibration else None,
                           calibration_sources=[s.strip() for s in calibration_sources.split(",") if s.strip()],
                           samples=samples, seq_len=seq_len, smoothing=smoothing, smooth_down_proj=smooth_down_proj,
                           awq_grid=awq_grid,
                           easyquant_form=form, outlier_sigma=outlier_sigma, easyquant_steps=steps, easyquant_lr=lr,
                           quantize_lm_head=quantize_lm_head, overwrite=overwrite)
    unwind_on_sigterm()
    try:
        # Every option is checked before any work. Markup off: a worker's line ("[/x]") is text, not Rich markup.
        result = quantize(options, settings, say=lambda text: err.print(text, markup=False))
    except (QuantError, CalibrationError, QuantEnvError, RegistryError) as exc:
        raise fail(str(exc)) from None
    except OSError as exc:  # a full disk, a folder not writable: what and where, not a traceback
        raise fail(f"quantizing failed: {exc}") from None
    table = Table("", "", title=f"{result.entry.name} ({method} {options.resolved_scheme})")
    for key in ("seconds_total", "bytes_on_disk", "linear_ratio", "checkpoint_ratio", "calibration_samples"):
        if key in result.stats:
            table.add_row(key, str(result.stats[key]))
    console.print(table)
    console.print(f"registered {result.entry.name} at {result.entry.path}")
    if quantize_lm_head and method != "easyquant":
        err.print("[yellow]warning:[/] vLLM 0.32 does not load a quantized lm_head from compressed-tensors; serve a "
                  "variant made without --quantize-lm-head")
