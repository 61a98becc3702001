"""Issue 25, item 2: a model name is a registry name before it becomes a path, anywhere. `../..` or `/abs/dir` as a
name must fail with one message before any file is read, made or deleted (`zephyr quantize --name /abs/dir` used to
delete that folder, `zephyr models remove /abs/dir` to delete any folder holding a zephyr.json)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cli.app import app
from evals.results import EvalRun, ResultStore
from loadtest.harness import linked_variant
from zephyr.mcq import MCQCalibration
from zephyr.registry import ModelManifest, Registry, RegistryError
from zephyr.schemas import Message, SFTExample, write_jsonl

RULE = "must be lowercase letters, digits, '.', '_' or '-', starting with a letter or digit (max 64)"
BAD_NAMES = ["../..", "..", ".", "../victim", "/etc", "a/b", "a/../../b", ".hidden", "Upper", "with space",
             "trailing\n", "", "-dash", "x" * 65]


def message(name: str) -> str:
    return f"model name {name!r} {RULE}"


def flat(output: str) -> str:
    return " ".join(output.split())


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ZEPHYR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ZEPHYR_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("ZEPHYR_EVAL_RESULTS_DIR", raising=False)
    return tmp_path / "home"


def victim(folder: Path, manifest: bool = True) -> Path:
    """A folder outside the registry that a path-like name would reach: with a zephyr.json it passes for a model."""
    folder.mkdir(parents=True)
    (folder / "keep.txt").write_text("must survive")
    if manifest:
        (folder / "zephyr.json").write_text(ModelManifest(name="victim", method="base").model_dump_json())
    return folder


def untouched(folder: Path) -> bool:
    return (folder / "keep.txt").read_text() == "must survive"


# ---- the one check -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BAD_NAMES)
def test_check_name_refuses_anything_but_a_registry_name(name):
    from zephyr.registry import check_name

    with pytest.raises(RegistryError) as exc:
        check_name(name)
    assert str(exc.value) == message(name)


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "a", "m.v2_gptq-w4a16", "9" * 64])
def test_check_name_passes_registry_names_through(name):
    from zephyr.registry import check_name

    assert check_name(name) == name


@pytest.mark.parametrize("name", ["../../victim", "ABSOLUTE", "Upper"])
def test_every_registry_operation_checks_the_name_first(tmp_path, default_model, name):
    registry = Registry(tmp_path / "home" / "models")
    outside = victim(tmp_path / "victim")
    registry.models_dir.mkdir(parents=True)
    name = str(outside) if name == "ABSOLUTE" else name
    operations = {
        "path_of": lambda: registry.path_of(name),
        "get": lambda: registry.get(name),
        "exists": lambda: registry.exists(name),
        "remove": lambda: registry.remove(name),
        "record_eval": lambda: registry.record_eval(name, "k", 1),
        "record_calibration": lambda: registry.record_calibration(name, None),
        "add": lambda: registry.add(default_model.path, ModelManifest(name=name, method="imported")),
        "add with that parent": lambda: registry.add(default_model.path,
                                                     ModelManifest(name="child", method="sft", parent=name)),
    }
    for operation, call in operations.items():
        with pytest.raises(RegistryError) as exc:
            call()
        assert str(exc.value) == message(name), operation
    assert untouched(outside) and json.loads((outside / "zephyr.json").read_text())["evals"] == {}
    assert list(registry.models_dir.iterdir()) == []  # no staging folder, no copy


def test_calibration_record_of_a_path_is_refused(tmp_path):
    outside = victim(tmp_path / "victim")
    record = MCQCalibration(method="letter", weights={"letter": 1.0})
    with pytest.raises(RegistryError, match="must be lowercase"):
        Registry(tmp_path / "models").record_calibration(str(outside), record)
    assert json.loads((outside / "zephyr.json").read_text())["mcq_calibration"] is None


# ---- zephyr models -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["models", "remove", "--yes"], ["models", "show"]])
@pytest.mark.parametrize("how", ["absolute", "relative"])
def test_models_commands_refuse_paths(home, tmp_path, command, how):
    outside = victim(tmp_path / "victim")
    (home / "models").mkdir(parents=True)
    name = str(outside) if how == "absolute" else "../../victim"  # $ZEPHYR_HOME/models/../../victim
    assert (home / "models" / name).resolve() == outside.resolve()
    result = CliRunner().invoke(app, [*command, name])
    assert result.exit_code == 1, result.output
    assert message(name) in flat(result.output)
    assert untouched(outside) and (outside / "zephyr.json").is_file()


def test_models_import_refuses_a_path_as_name(home, tmp_path, default_model):
    result = CliRunner().invoke(app, ["models", "import", str(default_model.path), "--name", "../escaped"])
    assert result.exit_code == 1, result.output
    assert message("../escaped") in flat(result.output)
    assert not (home / "escaped").exists() and not (home / ".escaped.incoming").exists()


# ---- zephyr quantize ---------------------------------------------------------------------------------------------

@pytest.fixture
def quant_home(home, default_model) -> Path:
    """A registry holding only the default model (linked), so the quantize options pass every other check."""
    (home / "models").mkdir(parents=True)
    (home / "models" / default_model.name).symlink_to(default_model.path)
    return home


@pytest.mark.parametrize("how", ["absolute", "relative"])
def test_quantize_name_fails_before_touching_the_filesystem(quant_home, tmp_path, default_model, how):
    outside = victim(tmp_path / "sentinel", manifest=False)
    name = str(outside) if how == "absolute" else "../../sentinel"  # $ZEPHYR_HOME/quant-runs/../../sentinel
    assert (quant_home / "quant-runs" / name).resolve() == outside.resolve()
    result = CliRunner().invoke(app, ["quantize", "--model", default_model.name, "--method", "gptq",
                                      "--name", name])
    assert result.exit_code != 0, result.output
    assert message(name) in flat(result.output)
    assert untouched(outside) and [p.name for p in outside.iterdir()] == ["keep.txt"]
    assert not (quant_home / "quant-runs").exists()  # nothing made either


def test_quantize_model_must_be_a_registry_name(quant_home, tmp_path):
    outside = victim(tmp_path / "victim")
    result = CliRunner().invoke(app, ["quantize", "--model", str(outside), "--method", "bnb"])
    assert result.exit_code == 1, result.output
    assert message(str(outside)) in flat(result.output)
    assert untouched(outside) and not (quant_home / "quant-runs").exists()


# ---- zephyr train ------------------------------------------------------------------------------------------------

@pytest.fixture
def sft_recipe(tmp_path) -> Path:
    data = tmp_path / "sft.jsonl"
    write_jsonl(data, [SFTExample(messages=[Message(role="user", content="Why?"),
                                            Message(role="assistant", content="Because.")])])
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"method": "sft", "data": {"train": str(data)}}))
    return path


def test_train_output_must_be_a_registry_name(home, sft_recipe):
    result = CliRunner().invoke(app, ["train", "sft", "--recipe", str(sft_recipe), "output=../../escaped"])
    assert result.exit_code == 1, result.output
    assert message("../../escaped") in flat(result.output)
    assert not (home / "runs").exists()


def test_train_model_path_cannot_name_the_run_folder(home, tmp_path, sft_recipe):
    """A path as the base model used to pass `registry.get` (a folder with a zephyr.json) and then name the run
    folder `<model>-<recipe>` outside $ZEPHYR_HOME/runs, which --fresh deleted."""
    base = victim(tmp_path / "victim")
    run_dir = victim(tmp_path / "victim-recipe", manifest=False)
    result = CliRunner().invoke(app, ["train", "sft", "--recipe", str(sft_recipe), "--fresh", f"model={base}"])
    assert result.exit_code == 1, result.output
    assert message(str(base)) in flat(result.output)
    assert untouched(base) and untouched(run_dir)
    assert not (home / "runs").exists()


# ---- zephyr eval and the eval results ----------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["run", "--model", "NAME"],
    ["calibrate", "--model", "NAME"],
    ["show", "--model", "NAME"],
    ["report", "--models", "NAME"],
    ["gate", "--candidate", "NAME", "--baseline", "m"],
    ["gate", "--candidate", "m", "--baseline", "NAME"],
])
def test_eval_cli_refuses_paths_as_model_names(home, tmp_path, args):
    name = "../../elsewhere"
    out = tmp_path / "report"
    args = [name if a == "NAME" else a for a in args] + (["--out", str(out)] if args[0] == "report" else [])
    result = CliRunner().invoke(app, ["eval", *args])
    assert result.exit_code == 1, result.output
    assert message(name) in flat(result.output)
    assert "Traceback" not in result.output and not out.exists()


def test_result_store_paths_go_through_the_name_check(tmp_path):
    outside = tmp_path / "outside"
    store = ResultStore(tmp_path / "eval-results")
    for name in ("../outside", str(outside)):
        with pytest.raises(RegistryError, match="must be lowercase"):
            store.save(EvalRun(model=name, suite="mcq"))
        with pytest.raises(RegistryError, match="must be lowercase"):
            store.latest(name)
    assert not outside.exists() and not (tmp_path / "eval-results").exists()
    assert store.save(EvalRun(model="m", suite="mcq")).parent == tmp_path / "eval-results" / "m" / "runs"


# ---- loadtest ----------------------------------------------------------------------------------------------------

def test_linked_variant_refuses_a_path_as_name(tmp_path, default_model):
    with pytest.raises(RegistryError, match="must be lowercase"):
        linked_variant(tmp_path / "home", default_model, "../escaped")
    assert not (tmp_path / "home" / "escaped").exists() and not (tmp_path / "escaped").exists()


def test_variant_benchmark_log_is_named_by_a_checked_name(tmp_path):
    import asyncio

    from loadtest.variants import measure

    with pytest.raises(RegistryError, match="must be lowercase"):  # before any server starts
        asyncio.run(measure("../escaped", argparse.Namespace(port=1), {}, tmp_path / "out", 0))
    assert not (tmp_path / "escaped.round0.log").exists()


def test_the_vllm_bench_refuses_a_model_name_that_is_a_path(capsys):
    import pytest

    from loadtest import vllm_bench

    with pytest.raises(SystemExit) as exit_info:
        vllm_bench.main(["--model", "../../etc"])
    assert exit_info.value.code == 2 and "model name '../../etc'" in capsys.readouterr().err
