"""The calibration record shipped for the bundled model: what it was fitted on, and when a registry gets it."""

import json

import pytest

from evals.calibrate import DEMONSTRATIONS_DEFAULT, demonstrations
from loadtest.harness import linked_variant
from zephyr import bundled, mcq
from zephyr.registry import MANIFEST, ModelManifest, Registry, RegistryError
from zephyr.settings import DEFAULT_MODEL, Settings


def test_the_shipped_record_was_fitted_on_validation_splits_after_training_demonstrations():
    record = bundled.shipped_calibration()
    assert record.method in mcq.AUTO_METHODS and record.method in record.validation["candidates"]
    splits = record.validation["splits"]
    assert set(splits) == {"arc_easy", "arc_challenge", "mmlu", "sciq", "openbookqa"}
    # never a test split (OpenBookQA's local copy has no test; its train split stands in for validation)
    assert all(s["split"] in ("validation", "train") for s in splits.values()), splits
    assert all(s["split"] == "validation" for name, s in splits.items() if name != "openbookqa"), splits
    # the demonstrations are exactly what `zephyr eval calibrate` draws from ARC-Easy train today
    text, source = demonstrations(Settings(), DEMONSTRATIONS_DEFAULT)
    assert record.demonstrations == text and record.demonstrations_source == source
    assert record.answer_prior_context == mcq.ANSWER_PRIOR_CONTEXT
    assert record.dtype == "float32"  # what `auto` computes this bf16 checkpoint in on a CPU without AMX tiles
    # which set a question reads like, learned from training splits only (never what calibration or a report reads)
    assert record.reads_question_domain and record.question_domain is not None
    assert record.question_domain.fitted["splits"] == {"arc_challenge": "train", "arc_easy": "train",
                                                       "openbookqa": "train[500:]", "mmlu": "dev"}


def _bundled_home(tmp_path, default_model, **manifest):
    """A registry whose default entry links the bundled weights and has its own manifest, changed by `manifest`."""
    folder = linked_variant(tmp_path, default_model, DEFAULT_MODEL)
    record = ModelManifest.model_validate_json((folder / MANIFEST).read_text()).model_copy(update=manifest)
    (folder / MANIFEST).write_text(record.model_dump_json())
    return Registry(tmp_path / "models")


def test_models_prepare_gives_a_bundled_entry_without_a_record_the_shipped_one(tmp_path, default_model):
    registry = _bundled_home(tmp_path, default_model, mcq_calibration=None)
    # a server starts on what the registry holds: without a record, auto is plain cloze and says so
    assert bundled.ensure_default_model(registry).manifest.mcq_calibration is None
    entry = bundled.prepare_default_model(registry)
    assert entry.manifest.mcq_calibration == bundled.shipped_calibration() and entry.manifest.mcq_calibration_shipped
    assert registry.get(DEFAULT_MODEL).manifest.mcq_calibration == bundled.shipped_calibration()  # on disk


def test_a_record_an_older_version_shipped_is_brought_up_to_date(tmp_path, default_model):
    """A registry on a volume outlives the image that prepared it: the record it shipped then was kept for ever."""
    older = bundled.shipped_calibration().model_copy(update={"weights": {"cloze": 0.5}})
    registry = _bundled_home(tmp_path / "shipped", default_model, mcq_calibration=older, mcq_calibration_shipped=True)
    entry = bundled.prepare_default_model(registry)
    assert entry.manifest.mcq_calibration == bundled.shipped_calibration() and entry.manifest.mcq_calibration_shipped
    # the operator's `zephyr eval calibrate` writes its own, which is never replaced afterwards
    registry.record_calibration(DEFAULT_MODEL, older)
    assert not registry.get(DEFAULT_MODEL).manifest.mcq_calibration_shipped
    assert bundled.prepare_default_model(registry).manifest.mcq_calibration == older


def test_an_operators_own_record_and_another_checkpoint_are_left_alone(tmp_path, default_model):
    own = bundled.shipped_calibration().model_copy(update={"method": "cloze", "weights": {"cloze": 0.5}})
    # (said outright: the default entry this copies may hold the shipped record, flagged as shipped)
    registry = _bundled_home(tmp_path / "own", default_model, mcq_calibration=own, mcq_calibration_shipped=False)
    assert bundled.prepare_default_model(registry).manifest.mcq_calibration == own

    # the record is for the bundled GGUF's weights only: an entry made from another file answers uncalibrated
    registry = _bundled_home(tmp_path / "other", default_model, mcq_calibration=None, data_digest="sha256:" + "0" * 64)
    assert bundled.prepare_default_model(registry).manifest.mcq_calibration is None
    registry = _bundled_home(tmp_path / "imported", default_model, mcq_calibration=None, source="/some/folder")
    assert bundled.prepare_default_model(registry).manifest.mcq_calibration is None


def test_a_record_fitted_for_another_gguf_is_refused(tmp_path, default_model, monkeypatch):
    shipped = json.loads(bundled.SHIPPED_CALIBRATION.read_text())
    stale = tmp_path / "stale.json"
    stale.write_text(json.dumps({**shipped, "gguf_sha256": "f" * 64}))
    monkeypatch.setattr(bundled, "SHIPPED_CALIBRATION", stale)
    registry = _bundled_home(tmp_path / "home", default_model, mcq_calibration=None)
    with pytest.raises(RegistryError, match="eval calibrate"):
        bundled.prepare_default_model(registry)
    assert registry.get(DEFAULT_MODEL).manifest.mcq_calibration is None


def test_the_models_prepare_command_gives_the_record(tmp_path, default_model, monkeypatch):
    from typer.testing import CliRunner

    from cli.app import app

    registry = _bundled_home(tmp_path, default_model, mcq_calibration=None)
    monkeypatch.setenv("ZEPHYR_HOME", str(tmp_path))
    result = CliRunner().invoke(app, ["models", "prepare"])
    assert result.exit_code == 0, result.output
    assert registry.get(DEFAULT_MODEL).manifest.mcq_calibration == bundled.shipped_calibration()


def test_models_prepare_says_when_the_model_to_serve_is_missing(tmp_path, default_model, monkeypatch):
    """The chart's init container prepared the default model and the server then crash-looped on a ZEPHYR_MODEL the
    volume lacked; now the init container fails, saying how to put the model there (found by a review)."""
    from typer.testing import CliRunner

    from cli.app import app

    registry = _bundled_home(tmp_path, default_model, mcq_calibration=None)
    monkeypatch.setenv("ZEPHYR_HOME", str(tmp_path))
    monkeypatch.setenv("ZEPHYR_MODEL", "my-tutor")
    result = CliRunner().invoke(app, ["models", "prepare"])
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and "ZEPHYR_MODEL=my-tutor is not in the registry" in said
    assert "zephyr models import FOLDER --name my-tutor" in said
    assert registry.get(DEFAULT_MODEL).manifest.mcq_calibration is not None  # the default was still prepared
