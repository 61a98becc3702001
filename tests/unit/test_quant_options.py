"""`zephyr quantize` refuses bad options before any model loads, and its calibration data comes from training
splits only, rendered with the model's chat template."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app
from quant import calibration
from quant.run import LLM_COMPRESSOR, SCHEMES, QuantError, QuantOptions, check, linear_input_features
from zephyr.registry import QUANT_METHODS, Registry
from zephyr.schemas import MCQItem
from zephyr.settings import Settings

DATA_DIR = Settings().data_dir
needs_data = pytest.mark.skipif(not (DATA_DIR / "arc").is_dir(), reason="needs ../shared/data")


@pytest.fixture
def registry(default_model, tmp_path) -> Registry:
    """A registry holding only the default model (linked), whatever else the real one holds."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / default_model.name).symlink_to(default_model.path)
    return Registry(tmp_path / "models")


def test_linear_widths_of_the_default_model(default_model):
    config = json.loads((default_model.path / "config.json").read_text())
    assert linear_input_features(config) == {"q_proj/k_proj/v_proj/gate_proj/up_proj": 576, "o_proj": 576,
                                             "down_proj": 1536}


@pytest.mark.parametrize(("options", "message"), [
    ({"method": "hqq"}, "unknown method 'hqq'; choose one of gptq, awq, w8a8, easyquant, bnb"),
    ({"method": "gptq", "scheme": "W8A8"}, "gptq does not take scheme 'W8A8'; it takes W4A16, W4A16_ASYM, W8A16"),
    ({"method": "gptq", "group_size": 128}, "group size 128 does not divide the 576 input features of "
                                            "q_proj/k_proj/v_proj/gate_proj/up_proj in smollm2-135m-instruct; "
                                            "choose one of 16, 32, 64"),
    ({"method": "easyquant", "group_size": 0}, "--group-size must be a positive number"),
    ({"method": "awq", "calibration": Path("/nonexistent/cal.jsonl")},
     "calibration file /nonexistent/cal.jsonl does not exist"),
    ({"method": "easyquant", "calibration": Path("/nonexistent/cal.jsonl")}, "easyquant is data-free"),
    ({"method": "w8a8", "smoothing": 1.5}, "--smoothing is SmoothQuant's strength in [0, 1)"),
    ({"method": "awq", "awq_grid": 2}, "--awq-grid must be at least 3"),
    ({"method": "gptq", "smooth_down_proj": True}, "--smooth-down-proj adds a SmoothQuant mapping: it needs --method"),
    ({"method": "w8a8", "smoothing": 0.0, "smooth_down_proj": True}, "with --smoothing > 0"),
    ({"method": "easyquant", "easyquant_form": "int3"}, "--form must be one of int4, dequantized"),
    ({"method": "bnb", "quantize_lm_head": True}, "bitsandbytes keeps lm_head in 16 bits"),
    ({"method": "gptq", "name": "smollm2-135m-instruct"}, "is the model being quantized"),
    # each of these used to fail with a traceback, some after the run folder of an --overwrite was cleared
    ({"method": "easyquant", "easyquant_steps": -1}, "easyquant: steps must be a non-negative integer"),
    ({"method": "easyquant", "easyquant_form": "dequantized", "outlier_sigma": 0.0},
     "easyquant: outlier_sigma must be a positive number"),
    ({"method": "easyquant", "outlier_sigma": 2.5}, "the int4 form isolates no outliers"),
    ({"method": "gptq", "easyquant_steps": 5}, "they need --method easyquant"),
    ({"method": "awq", "easyquant_lr": 1e-2}, "--lr are EasyQuant's; they need --method easyquant"),
    ({"method": "easyquant", "easyquant_lr": 0.0}, "easyquant: lr must be a positive number"),
    ({"method": "gptq", "calibration_sources": []}, "--calibration-sources: no MCQ sources given"),
    ({"method": "awq", "calibration_sources": ["arc_easy:test"]}, "--calibration-sources:"),
    # refused before the run folder is made, as reading it would refuse it after
    ({"method": "gptq", "calibration_sources": ["sciq:validation"]}, "refusing sciq:validation"),
    # the test split's refusal suggested validation splits this refuses next (found by a review)
    ({"method": "gptq", "calibration_sources": ["arc_easy:test"]},
     "we report; use one of arc_easy:train, arc_challenge:train, openbookqa:train, mmlu:dev"),
    # found by a review: a method with a capital was reported as a bad model name ('…-GPTQ' must be lowercase)
    ({"method": "GPTQ"}, "unknown method 'GPTQ'"),
    ({"method": "gptq", "easyquant_form": "dequantized"}, "--form dequantized is EasyQuant's"),
    ({"method": "easyquant", "quantize_lm_head": True}, "cannot be served in the int4 form"),
])
def test_bad_options_fail_with_a_message(registry, default_model, options, message):
    with pytest.raises(QuantError) as exc:
        check(QuantOptions(model=default_model.name, **options), registry)
    assert message in str(exc.value)


def test_a_name_other_entries_were_made_from_is_not_replaced(registry, default_model):
    from zephyr.registry import ModelManifest

    registry.add(registry.get(default_model.name).path, ModelManifest(name="mid", parent=default_model.name,
                                                                      method="dpo"))
    registry.add(registry.get("mid").path, ModelManifest(name="mid-w8a8", parent="mid", method="w8a8"))
    options = QuantOptions(model=default_model.name, method="easyquant", name="mid", overwrite=True)
    with pytest.raises(QuantError, match="'mid' is the parent of mid-w8a8"):
        check(options, registry)


def test_down_proj_smoothing_is_refused_for_an_architecture_that_is_not_llama_style(registry, tmp_path,
                                                                                    default_model):
    """Our mapping list replaced llm-compressor's own for the architecture: Phi-3 failed, Bloom smoothed nothing."""
    import shutil

    from zephyr.registry import ModelManifest

    folder = tmp_path / "phi"
    shutil.copytree(registry.get(default_model.name).path, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["Phi3ForCausalLM"]}))
    registry.add(folder, ModelManifest(name="phi-like", method="imported"))
    with pytest.raises(QuantError, match="Phi3ForCausalLM is not Llama-style: pass --no-smooth-down-proj"):
        check(QuantOptions(model="phi-like", method="w8a8"), registry)
    check(QuantOptions(model="phi-like", method="w8a8", smooth_down_proj=False), registry)


def test_unknown_and_quantized_models_are_refused(registry, tmp_path, default_model):
    from zephyr.registry import ModelManifest

    with pytest.raises(QuantError, match="no model 'nope' in the registry"):
        check(QuantOptions(model="nope", method="gptq"), registry)
    # EasyQuant's dequantized form is plain 16-bit weights: its manifest alone says it was quantized.
    registry.add(registry.get(default_model.name).path, ModelManifest(name="eq", parent=default_model.name,
                                                                      method="easyquant"))
    with pytest.raises(QuantError, match=f"eq is already quantized \\(easyquant\\); start from its unquantized "
                                         f"parent, {default_model.name}"):
        check(QuantOptions(model="eq", method="gptq"), registry)
    for overwrite in (True, False):  # without --overwrite too: "already exists; pass --overwrite" led only here
        with pytest.raises(QuantError, match="is the model being quantized") as refused:
            check(QuantOptions(model=default_model.name, method="gptq", name=default_model.name,
                               overwrite=overwrite), registry)
        assert "--overwrite" not in str(refused.value)


def test_a_folder_without_a_manifest_is_named_before_the_work(registry, default_model):
    """`check` used to pass it (no manifest, so no model) and `registry.add` refused the name after the run."""
    (registry.models_dir / f"{default_model.name}-gptq").mkdir()
    with pytest.raises(QuantError, match=r"holds no zephyr.json, so it is no model, yet it takes the name"):
        check(QuantOptions(model=default_model.name, method="gptq", overwrite=True), registry)


def test_a_reward_model_is_not_quantized_into_a_chat_model(registry, default_model, tmp_path):
    from zephyr.registry import ModelManifest

    registry.add(default_model.path, ModelManifest(name="rm", parent=default_model.name, method="rm"))
    with pytest.raises(QuantError, match=r"rm is no causal language model \(rm entry"):
        check(QuantOptions(model="rm", method="easyquant"), registry)
    folder = tmp_path / "gpt2ish"
    folder.mkdir()
    for file in default_model.path.iterdir():
        if file.name not in ("config.json", "zephyr.json"):
            (folder / file.name).symlink_to(file)
    config = json.loads((default_model.path / "config.json").read_text())
    config.pop("intermediate_size")
    (folder / "config.json").write_text(json.dumps(config))
    registry.add(folder, ModelManifest(name="other", parent=None, method="imported"))
    with pytest.raises(QuantError, match="config.json has no intermediate_size: grouped methods here know"):
        check(QuantOptions(model="other", method="gptq"), registry)


def test_bnb_that_cannot_run_is_refused_before_work(registry, default_model, monkeypatch):
    import quant.bnb

    monkeypatch.setattr(quant.bnb, "bnb_available", lambda: (False, "bitsandbytes is not installed: pip install"))
    with pytest.raises(QuantError, match="bitsandbytes is not installed"):
        check(QuantOptions(model=default_model.name, method="bnb"), registry)


def test_a_derived_name_too_long_suggests_naming_the_result(registry):
    with pytest.raises(QuantError, match="; pass --name for the result"):
        check(QuantOptions(model="m" * 60, method="easyquant"), registry)


def test_group_size_shapes_exactly_the_schemes_compressed_tensors_groups(registry, default_model):
    """gptq's W8A16 was taken for per channel: a group size that does not divide the widths passed the check, the
    worker kept the preset's 128 (which does not divide this model's 576 and 1536) and the manifest recorded no group
    size. Whether the group size applies is checked against the real presets."""
    presets = pytest.importorskip("compressed_tensors.quantization")
    for method in LLM_COMPRESSOR:
        for scheme in SCHEMES[method]:
            weights = presets.preset_name_to_scheme(scheme, ["Linear"]).weights
            assert QuantOptions(model="m", method=method, scheme=scheme).grouped == (weights.strategy == "group"), \
                (method, scheme)
    options = QuantOptions(model=default_model.name, method="gptq", scheme="W8A16", group_size=128)
    with pytest.raises(QuantError, match="group size 128 does not divide the 576 input features"):
        check(options, registry)
    assert QuantOptions(model="m", method="gptq", scheme="W8A16").recipe()["group_size"] == 64
    assert "group_size" not in QuantOptions(model="m", method="w8a8").recipe()


def test_good_options_pass_and_name_the_result(registry, default_model):
    options = QuantOptions(model=default_model.name, method="easyquant", easyquant_form="dequantized")
    assert check(options, registry).name == default_model.name
    assert options.resolved_name == f"{default_model.name}-easyquant-outliers"
    assert options.recipe()["outliers_isolated"] is True
    assert QuantOptions(model="m", method="awq").resolved_scheme == "W4A16_ASYM"
    assert "calibration" not in QuantOptions(model="m", method="bnb").recipe()


@pytest.mark.parametrize(("options", "expected"), [
    ({"method": "w8a8"}, True),  # on by default wherever SmoothQuant runs
    ({"method": "w8a8", "smooth_down_proj": False}, False),
    ({"method": "w8a8", "smoothing": 0.0}, False),
    ({"method": "gptq"}, False),
])
def test_down_proj_smoothing_defaults_on_with_smoothquant(registry, default_model, options, expected):
    quant_options = QuantOptions(model=default_model.name, **options)
    check(quant_options, registry)
    assert quant_options.resolved_smooth_down_proj is expected
    assert quant_options.recipe().get("smooth_down_proj", False) is expected


def test_cli_fails_before_work_with_one_line(default_model):
    result = CliRunner().invoke(app, ["quantize", "--model", default_model.name, "--method", "gptq",
                                      "--group-size", "100"])
    assert result.exit_code == 1
    assert "group size 100 does not divide the 576 input features" in result.output
    result = CliRunner().invoke(app, ["quantize", "--model", default_model.name, "--method", "fp3"])
    assert result.exit_code == 1 and "unknown method 'fp3'" in result.output
    result = CliRunner().invoke(app, ["quantize", "--model", default_model.name, "--method", "gptq",
                                      "--smooth-down-proj"])
    assert result.exit_code == 1 and "it needs --method w8a8" in result.output


@pytest.mark.parametrize(("method", "flags", "said"), [
    ("w8a8", ["--group-size", "128"], "w8a8 does not read --group-size (gptq or awq or easyquant): drop it"),
    ("gptq", ["--awq-grid", "5", "--smoothing", "0.5"], "gptq does not read --awq-grid (awq), --smoothing (w8a8)"),
    ("easyquant", ["--samples", "64"], "easyquant does not read --samples (gptq or awq or w8a8)"),
    ("bnb", ["--calibration-sources", "arc_easy:train"], "bnb does not read --calibration-sources"),
    ("gptq", ["--calibration", "chats.jsonl", "--calibration-sources", "arc_easy:train"],
     "--calibration-sources builds the calibration set --calibration FILE replaces"),
])
def test_an_option_the_method_does_not_read_is_refused_not_ignored(default_model, method, flags, said):
    """`--method w8a8 --group-size 128` made per-channel W8A8 without a word."""
    result = CliRunner().invoke(app, ["quantize", "--model", default_model.name, "--method", method, *flags],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 1 and said in " ".join(result.output.split()), result.output


def test_tutoring_chats_use_support_and_both_styles():
    item = MCQItem(id="q1", question="What do plants need for photosynthesis?", options=["sand", "light"],
                   answer="B", support="Plants capture light energy in chlorophyll.")
    mcq_style = calibration.tutoring_chat(item, "mcq")
    assert mcq_style[-1] == {"role": "assistant",
                             "content": "Plants capture light energy in chlorophyll. So the answer is B."}
    assert "A. sand" in mcq_style[-2]["content"] and "B. light" in mcq_style[-2]["content"]
    open_style = calibration.tutoring_chat(item, "open")
    assert open_style == [{"role": "user", "content": item.question},
                          {"role": "assistant", "content": "Plants capture light energy in chlorophyll. "
                                                           "The answer is light."}]


@needs_data
def test_calibration_comes_from_training_splits_only(tokenizer):
    chats = calibration.from_training_splits(["arc_easy:train", "openbookqa:train"], DATA_DIR, 10, seed=1)
    assert len(chats) == 10
    assert chats == calibration.from_training_splits(["arc_easy:train", "openbookqa:train"], DATA_DIR, 10, seed=1)
    served = Settings().served_system_prompt
    texts = calibration.render(chats, tokenizer, served)
    assert all(t.startswith("<|im_start|>") and t.rstrip().endswith("<|im_end|>") for t in texts)
    # each chat as served: the open-style ones with the server's system prompt, not the template's own default
    open_style = [not any(m["role"] == "system" for m in chat) for chat in chats]
    assert any(open_style) and [served in t for t in texts] == open_style
    assert all(t.startswith("<|im_start|>system\nYou are Zephyr") for t in texts)
    with pytest.raises(calibration.CalibrationError, match="never train on the split we report"):
        calibration.from_training_splits(["arc_easy:test"], DATA_DIR, 4)
    # nor on what `zephyr eval calibrate` then fits the quantized entry's /mcq on (found by a review: the default
    # sources held SciQ's validation split, and OpenBookQA train's calibration head)
    with pytest.raises(calibration.CalibrationError, match="refusing sciq:validation: `zephyr eval calibrate`"):
        calibration.from_training_splits(["sciq:validation"], DATA_DIR, 4)
    assert "sciq:validation" not in calibration.DEFAULT_SOURCES
    from offline.benchmarks import CALIBRATION_LIMITS, items_outside_calibration, mcq_training_items

    every = calibration.from_training_splits(["openbookqa:train"], DATA_DIR, 10_000, seed=1)
    kept, reserved = items_outside_calibration(["openbookqa:train"], DATA_DIR)
    assert reserved["openbookqa:train"] >= CALIBRATION_LIMITS["openbookqa"]
    assert len(every) == len(kept) == len(mcq_training_items(["openbookqa:train"], DATA_DIR)) - reserved[
        "openbookqa:train"]


def test_a_calibration_question_another_split_repeats_is_left_out(tmp_path):
    """MMLU dev's college_physics-dev-1 is validation's college_physics-val-5, options and all: `data science
    --sources mmlu:dev` trained on a question `zephyr eval calibrate` fits /mcq's auto on."""
    from offline.benchmarks import calibration_questions, items_outside_calibration

    physics = tmp_path / "mmlu"
    (physics / "dev").mkdir(parents=True)
    (physics / "val").mkdir()
    (physics / "test").mkdir()
    (physics / "dev" / "college_physics_dev.csv").write_text("What carries charge?,electron,photon,neutron,gluon,A\n"
                                                             "What is heavy?,lead,air,foam,cork,A\n")
    (physics / "val" / "college_physics_val.csv").write_text("What  carries charge?,photon,electron,neutron,gluon,B\n")
    (physics / "test" / "college_physics_test.csv").write_text("Which is a lepton?,muon,proton,pion,kaon,A\n")
    calibration_questions.cache_clear()
    kept, reserved = items_outside_calibration(["mmlu:dev"], tmp_path)
    assert [item.question for item in kept] == ["What is heavy?"] and reserved == {"mmlu:dev": 1}


def test_a_source_whose_questions_are_all_reported_is_refused_by_name(tmp_path):
    """Calibrating on none of a source's questions crashed the tokenizer inside the worker (IndexError)."""
    folder = tmp_path / "arc" / "ARC-Easy"
    folder.mkdir(parents=True)
    line = json.dumps({"id": "q1", "answerKey": "A", "question": {"stem": "Which is a planet?", "choices": [
        {"label": "A", "text": "Mars"}, {"label": "B", "text": "the Moon"}]}}) + "\n"
    for name in ("Train", "Test"):
        (folder / f"ARC-Easy-{name}.jsonl").write_text(line)
    with pytest.raises(calibration.CalibrationError, match="arc_easy:train has no question left"):
        calibration.from_training_splits(["arc_easy:train"], tmp_path, 4)


def test_calibration_file_is_checked(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"messages": [{"role": "user", "content": "Why?"},
                                             {"role": "assistant", "content": "Because."}]}) + "\n")
    assert calibration.from_file(good, 5) == [[{"role": "user", "content": "Why?"},
                                               {"role": "assistant", "content": "Because."}]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "plain text"}) + "\n")
    with pytest.raises(calibration.CalibrationError, match=r"bad.jsonl:1: not a SFTExample.*one \{\"messages\""):
        calibration.from_file(bad, 5)
    with pytest.raises(calibration.CalibrationError, match="does not exist"):
        calibration.from_file(tmp_path / "missing.jsonl", 5)
    digest = calibration.write(["a", "b"], tmp_path / "cal.jsonl")
    assert [json.loads(line)["text"] for line in (tmp_path / "cal.jsonl").read_text().splitlines()] == ["a", "b"]
    assert digest == calibration.write(["a", "b"], tmp_path / "again.jsonl")
    # samples told apart by where they break, not only by their text
    assert digest != calibration.write(["a\nb"], tmp_path / "joined.jsonl")
    bad.write_text(good.read_text() + "not json\n")  # past the samples read: not a failure
    assert len(calibration.from_file(bad, 1)) == 1


def test_the_worker_reads_back_texts_holding_line_separators(tmp_path):
    """An MMLU validation question holds U+0085; splitlines() cut its record in two inside the worker."""
    from quant.llmc_worker import read_texts

    texts = ["Which\u0085one?", "line\u2028separator\u2029and\nnewline", "plain"]
    calibration.write(texts, tmp_path / "cal.jsonl")
    assert read_texts(tmp_path / "cal.jsonl") == texts


def test_quant_env_is_made_only_when_missing_or_stale(tmp_path, monkeypatch):
    from quant import env

    assert not env.is_ready(tmp_path / "none")
    fake = tmp_path / "qenv"
    (fake / "bin").mkdir(parents=True)
    (fake / "bin" / "python").write_text("")
    (fake / env.STAMP).write_text("\n".join(env.requirements()) + "\n")
    assert env.is_ready(fake) and env.ensure(fake) == fake / "bin" / "python"  # nothing made, nothing installed
    (fake / env.STAMP).write_text("torch==1.0\n")
    assert not env.is_ready(fake)  # other pins: made again on next use


def test_a_hung_nvidia_smi_is_a_quant_env_error_not_a_hang(tmp_path, monkeypatch):
    from quant import env

    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\nsleep 30\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setattr(env, "NVIDIA_SMI_SECONDS", 0.5)
    with pytest.raises(env.QuantEnvError, match="nvidia-smi -L did not answer in 0.5 s"):
        env.requirements()
    smi.write_text("#!/bin/sh\nexit 9\n")  # no GPU it can list: the CPU pins
    assert env.requirements() == env.REQUIREMENTS


def test_a_folder_zephyr_did_not_make_is_never_deleted_for_the_quant_env(tmp_path):
    from quant import env

    own = tmp_path / "my-venv"
    (own / "bin").mkdir(parents=True)
    (own / "bin" / "python").write_text("")
    (own / "notes.txt").write_text("precious")
    with pytest.raises(env.QuantEnvError, match="not a quantization environment made by zephyr .* left alone"):
        env.ensure(own, say=lambda _: None)
    assert (own / "notes.txt").read_text() == "precious"


def test_a_stopped_install_leaves_an_env_made_again_not_one_refused(tmp_path, monkeypatch):
    from quant import env

    target = tmp_path / "qenv"

    def pip_fails(*args, **kwargs):
        (target / "half-installed").write_text("")
        return __import__("subprocess").CompletedProcess(args, 1, "", "network unreachable")

    monkeypatch.setattr(env.venv.EnvBuilder, "create", lambda self, path: (Path(path) / "bin").mkdir(parents=True))
    monkeypatch.setattr(env.subprocess, "run", pip_fails)
    with pytest.raises(env.QuantEnvError, match="network unreachable"):
        env.ensure(target, say=lambda _: None)
    assert not env.is_ready(target)
    monkeypatch.setattr(env.subprocess, "run", lambda *a, **k: __import__("subprocess").CompletedProcess(a, 0, "", ""))
    assert env.ensure(target, say=lambda _: None) == target / "bin" / "python"  # was: "not made by zephyr"
    assert (target / env.STAMP).read_text().split() == list(env.requirements())
    assert not (target / "half-installed").exists()


def test_a_stopped_command_stops_its_worker(tmp_path, monkeypatch):
    import sys
    import time

    from quant import env

    script = tmp_path / "worker.py"  # stands in for llmc_worker: one line, then a long quiet phase
    script.write_text("import time\nprint('calibrating', flush=True)\ntime.sleep(60)\n")
    spec = tmp_path / "spec.json"
    spec.write_text("{}")
    started = time.monotonic()

    def stop(line: str) -> None:
        raise SystemExit(143)  # what unwind_on_sigterm turns SIGTERM into, here at the first line

    monkeypatch.setattr(env, "WORKER", script)
    with pytest.raises(SystemExit):
        env.run_worker(Path(sys.executable), spec, tmp_path / "worker.log", say=stop)
    assert time.monotonic() - started < 30  # it waited out the worker's sleep before


def test_a_failing_worker_reports_its_last_lines(tmp_path):
    import sys

    from quant import env

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"method": "gptq"}))
    lines: list[str] = []
    with pytest.raises(env.QuantEnvError) as exc:  # this env has no llm-compressor: the import fails
        env.run_worker(Path(sys.executable), spec, tmp_path / "worker.log", say=lines.append)
    assert "the quantization worker failed" in str(exc.value) and "llmcompressor" in str(exc.value)
    assert "full log:" in str(exc.value) and "llmcompressor" in (tmp_path / "worker.log").read_text()
    assert lines  # streamed while it ran


def test_the_worker_is_given_no_credentials_and_a_progress_bar_is_not_a_line_per_redraw(tmp_path, monkeypatch):
    """It got the whole environment: the server's keys, database URL and tokens went to third-party packages. And a
    text-mode pipe made every tqdm redraw (a carriage return) a line of its own, in the console and the log."""
    import sys

    from quant import env

    for name in ("ZEPHYR_API_KEYS", "ZEPHYR_DB_URL", "HF_TOKEN", "AWS_SECRET", "OPENAI_API_KEY", "PGPASSWORD",
                 "AZURE_STORAGE_CONNECTION_STRING"):
        monkeypatch.setenv(name, "secret-value")
    monkeypatch.setenv("DATABASE_URL", "postgresql://tutor:secret-value@db/zephyr")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "2")  # a setting, though its name holds TOKEN
    script = tmp_path / "worker.py"
    script.write_text("import os, sys\n"
                      "print(sorted(k for k, v in os.environ.items() if 'secret-value' in v))\n"
                      "print(os.environ.get('OMP_NUM_THREADS') + os.environ.get('TOKENIZERS_PARALLELISM'))\n"
                      "sys.stdout.write(''.join(f'step {i}\\r' for i in range(50)) + 'step 50\\n')\n")
    monkeypatch.setattr(env, "WORKER", script)
    lines: list[str] = []
    env.run_worker(Path(sys.executable), tmp_path / "spec.json", tmp_path / "worker.log", say=lines.append)
    assert lines[:2] == ["[]", "22"]
    assert lines[2:] == ["step 0", "step 50"]  # the first redraw, then none within REDRAW_SECONDS, then the end
    assert (tmp_path / "worker.log").read_text().splitlines() == lines


def test_every_quantization_method_has_schemes_and_the_core_knows_it():
    # Calibration and the report tell a quantized entry by its manifest's method, from the core's list.
    assert tuple(SCHEMES) == QUANT_METHODS


def test_easyquant_records_the_values_it_ran_with_not_the_options_left_empty():
    from quant.easyquant import EasyQuantConfig

    defaults = EasyQuantConfig(bits=4, group_size=64)
    plain = QuantOptions(model="m", method="easyquant").recipe()
    assert plain["steps"] == defaults.steps and plain["outlier_sigma"] is None  # the int4 form isolates none
    assert QuantOptions(model="m", method="easyquant", easyquant_steps=defaults.steps).recipe() == plain
    kept = QuantOptions(model="m", method="easyquant", easyquant_form="dequantized").recipe()
    assert kept["outliers_isolated"] and kept["outlier_sigma"] == defaults.outlier_sigma
    # the learning rate shapes the scales (in their own units: a model's weight size decides what suits it)
    assert plain["lr"] == defaults.lr and QuantOptions(model="m", method="easyquant", easyquant_lr=1e-2).recipe()[
        "lr"] == 1e-2


def test_a_worker_stops_when_its_parent_is_killed_outright(tmp_path):
    """SIGKILL (the OOM killer) unwinds nothing in the parent: the worker must not go on orphaned."""
    import os
    import signal
    import subprocess
    import sys
    import time

    if sys.platform != "linux":
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    pid_file = tmp_path / "worker.pid"
    (tmp_path / "worker.py").write_text(
        "import os, sys, time\nopen(sys.argv[1], 'w').write(str(os.getpid()))\nprint('calibrating', flush=True)\n"
        "time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", (
        "import sys; from pathlib import Path; from quant import env\n"
        f"env.WORKER = Path({str(tmp_path / 'worker.py')!r})\n"
        f"env.run_worker(Path(sys.executable), Path({str(pid_file)!r}), Path({str(tmp_path / 'worker.log')!r}))\n")],
        cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE, text=True)
    assert parent.stdout.readline().strip() == "calibrating"  # the worker runs
    worker = int(pid_file.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    def alive(pid: int) -> bool:  # a zombie no one has reaped yet is gone too
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        return state != "Z"

    for _ in range(100):
        if not alive(worker):
            break
        time.sleep(0.05)
    else:
        os.kill(worker, signal.SIGKILL)
        raise AssertionError("the worker outlived its killed parent")


def test_a_failed_virtualenv_is_a_clear_error_and_made_again_next_time(tmp_path, monkeypatch):
    """Creating the virtualenv raised CalledProcessError (no ensurepip) as a traceback, and the half-made folder,
    unstamped, was then refused for good as "not made by zephyr"."""
    import subprocess

    from quant import env

    target = tmp_path / "qenv"

    def no_ensurepip(self, path):
        (Path(path) / "bin").mkdir(parents=True)
        raise subprocess.CalledProcessError(1, ["python", "-m", "ensurepip"])

    monkeypatch.setattr(env.venv.EnvBuilder, "create", no_ensurepip)
    with pytest.raises(env.QuantEnvError, match="making a virtualenv .* python3-venv"):
        env.ensure(target, say=lambda _: None)
    seen = {}

    def pip(*args, **kwargs):
        seen.update(kwargs["env"])
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(env.venv.EnvBuilder, "create", lambda self, path: (Path(path) / "bin").mkdir(parents=True))
    monkeypatch.setattr(env.subprocess, "run", pip)
    monkeypatch.setenv("ZEPHYR_API_KEYS", "admin:secret-key-0001")
    monkeypatch.setenv("PIP_INDEX_URL", "https://user:pw@pypi.internal/simple")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/secrets/gcp.json")
    monkeypatch.setenv("PYTHONPATH", "/usr/lib/python3/dist-packages")
    assert env.ensure(target, say=lambda _: None) == target / "bin" / "python"
    # pip runs third-party setup code: none of the server's credentials, but what a private index's keyring reads
    assert "ZEPHYR_API_KEYS" not in seen and seen["PIP_INDEX_URL"] == "https://user:pw@pypi.internal/simple"
    assert seen["GOOGLE_APPLICATION_CREDENTIALS"] == "/secrets/gcp.json" and "PYTHONPATH" not in seen


def test_the_env_is_not_made_again_under_a_running_worker(tmp_path, monkeypatch):
    """One env serves every run: a second run found it not ready and deleted it under the first one's pip, and
    `--recreate` deleted it under a running worker. Making it waits for the runs using it."""
    import subprocess
    import threading

    from quant import env

    target = tmp_path / "qenv"
    made = []

    def create(self, path):
        made.append(1)
        (Path(path) / "bin").mkdir(parents=True)
        (Path(path) / "bin" / "python").write_text("")

    monkeypatch.setattr(env.venv.EnvBuilder, "create", create)
    monkeypatch.setattr(env.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, "", ""))
    said = []
    with env.ready(target, say=lambda _: None) as python:
        assert python == target / "bin" / "python" and made == [1]
        recreate = threading.Thread(target=env.ensure, args=(target,), kwargs={"say": said.append, "recreate": True})
        recreate.start()
        recreate.join(timeout=1)
        assert recreate.is_alive() and made == [1]  # waiting for the worker, not deleting its env
        assert said == [f"waiting for another zephyr run using the quantization environment {target}"]
        assert python.is_file()  # the worker's env is whole while it runs
    recreate.join(timeout=10)
    assert not recreate.is_alive() and made == [1, 1]


def test_a_worker_line_that_the_locale_cannot_encode_is_kept(tmp_path):
    """The log copy used the locale's encoding: under LC_ALL=C a progress bar's blocks ended the run."""
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text("print('\\u2588' * 3, flush=True)\n")
    code = ("import sys; from pathlib import Path; from quant import env; env.WORKER = Path(sys.argv[1]); "
            "env.run_worker(Path(sys.executable), Path(sys.argv[2]), Path(sys.argv[3]), say=lambda _: None)")
    result = subprocess.run([sys.executable, "-c", code, str(script), str(tmp_path / "spec.json"),
                             str(tmp_path / "worker.log")], capture_output=True, text=True,
                            env={**__import__("os").environ, "LC_ALL": "C", "PYTHONUTF8": "0",
                                 "PYTHONCOERCECLOCALE": "0", "PYTHONIOENCODING": "utf-8"})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "worker.log").read_text(encoding="utf-8") == "\u2588" * 3 + "\n"


def test_a_chat_template_that_refuses_a_calibration_chat_is_named():
    from jinja2 import TemplateError

    class Gemma:
        def apply_chat_template(self, messages, tokenize=False):
            if messages[0]["role"] == "system":
                raise TemplateError("System role not supported")
            return "text"

    with pytest.raises(calibration.CalibrationError, match="calibration chat 1: .*System role not supported"):
        calibration.render([[{"role": "user", "content": "hi"}]], Gemma(), "You are a tutor.")
    assert calibration.render([[{"role": "user", "content": "hi"}]], Gemma(), None) == ["text"]


def test_runs_share_a_ready_env(tmp_path):
    """A second run's worker does not wait for the first one's to end (an hour of GPTQ)."""
    from quant import env

    target = tmp_path / "qenv"
    (target / "bin").mkdir(parents=True)
    (target / "bin" / "python").write_text("")
    (target / env.STAMP).write_text("\n".join(env.requirements()) + "\n")
    said = []
    with env.ready(target, say=said.append) as first, env.ready(target, say=said.append) as second:
        assert first == second == target / "bin" / "python" and said == []


def test_a_ready_env_in_a_folder_the_user_may_only_read_is_used(tmp_path, monkeypatch):
    """An admin's env under /opt: opening the lock for writing failed with a traceback on every quantize run."""
    from quant import env

    target = tmp_path / "qenv"
    (target / "bin").mkdir(parents=True)
    (target / "bin" / "python").write_text("")
    (target / env.STAMP).write_text("\n".join(env.requirements()) + "\n")
    real_open = Path.open

    def read_only(self, mode="r", *args, **kwargs):
        if self.name == ".qenv.lock" and mode != "r":
            raise PermissionError(13, "Permission denied")
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", read_only)
    with env.ready(target, say=lambda _: None) as python:  # no lock file yet, none can be made: used all the same
        assert python == target / "bin" / "python"
    with pytest.raises(env.QuantEnvError, match="cannot lock the quantization environment"):
        env.ensure(target, say=lambda _: None, recreate=True)


def test_stored_bytes_are_read_from_the_safetensors_header(tmp_path):
    """Sizes came from a table of dtypes that guessed 2 bytes for every dtype it did not list (F64, U32, BOOL)."""
    import torch
    from safetensors.torch import save_file

    from quant.run import _stored_bytes

    file = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(3, 5, dtype=torch.float64), "b": torch.zeros(7, dtype=torch.bool),
               "c": torch.zeros(2, 4, dtype=torch.bfloat16), "d": torch.zeros(6, dtype=torch.uint32)}, str(file),
              metadata={"format": "pt"})
    assert _stored_bytes(file) == {"a": 120, "b": 7, "c": 16, "d": 24}
