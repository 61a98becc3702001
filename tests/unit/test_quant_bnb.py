"""bitsandbytes 4-bit: a tiny Llama quantized to nf4 on CPU, saved, loaded back and scored through transformers in
letter format (exactly as the vLLM scorer would score it) and cloze (lm-eval's transformers backend); the service
and the generation suites refuse it without CUDA."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from evals.run import EvalError, RunOptions, check_options, run
from offline import benchmarks
from service.engine import VLLMEngine
from tests.unit.test_eval_datasets import write_arc
from tests.unit.tiny_llama import TINY, make_tiny_llama
from zephyr import mcq
from zephyr.registry import ModelManifest, Registry, vllm_serving_problem
from zephyr.schemas import MCQItem
from zephyr.settings import Settings

pytest.importorskip("bitsandbytes")
NF4 = "tiny-llama-nf4"
ITEMS = [
    MCQItem(id="q1", question="Which gas do plants take in for photosynthesis?",
            options=["Oxygen", "Carbon dioxide", "Nitrogen", "Helium"], answer="B", subject="biology"),
    MCQItem(id="q2", question="What is the boiling point of water at sea level?", options=["50 °C", "100 °C"],
            answer="B"),
    MCQItem(id="q3", question="Which planet is closest to the Sun?", options=["Venus", "Earth", "Mercury"],
            answer="C", subject="astronomy"),
]


@pytest.fixture(scope="module")
def home(tmp_path_factory, default_model):
    """A registry with the tiny Llama (bf16, the default model's tokenizer and chat template) and its nf4 copy."""
    from quant.bnb import quantize_bnb

    home = tmp_path_factory.mktemp("bnb-home")
    registry = Registry(home / "models")
    base = make_tiny_llama(registry, default_model)
    out = home / "build-nf4"
    stats = quantize_bnb(base.path, out)
    recipe = {"quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
    registry.add(out, ModelManifest(name=NF4, parent=TINY, method="bnb", recipe=recipe, stats=stats), move=True)
    return home


@pytest.fixture
def no_cuda(monkeypatch):
    """This machine, wherever the tests run: bitsandbytes works, vLLM cannot serve its checkpoints."""
    monkeypatch.setattr("zephyr.registry.cuda_available", lambda: False)
    monkeypatch.setattr("evals.run.cuda_available", lambda: False)


def _registry(home):
    return Registry(home / "models")


def test_quantize_writes_a_complete_smaller_nf4_checkpoint(home):
    base, nf4 = _registry(home).get(TINY), _registry(home).get(NF4)
    config = json.loads((nf4.path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["load_in_4bit"]
    assert config["bnb_4bit_quant_type"] == "nf4" and config["bnb_4bit_use_double_quant"]
    weights = {e.name: sum(f.stat().st_size for f in e.path.glob("*.safetensors")) for e in (base, nf4)}
    assert weights[NF4] < weights[TINY]
    assert nf4.size_bytes() < base.size_bytes()
    stats = nf4.manifest.stats
    assert stats["quant_type"] == "nf4" and stats["double_quant"] is True
    assert stats["quantized_modules"] == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert stats["bytes"] == nf4.size_bytes() - (nf4.path / "zephyr.json").stat().st_size
    assert (nf4.path / "chat_template.jinja").is_file() or "chat_template" in (
        nf4.path / "tokenizer_config.json").read_text()


def test_quantize_refuses_bad_arguments(home, tmp_path):
    from quant.bnb import quantize_bnb

    with pytest.raises(ValueError, match="quant_type must be one of nf4, fp4"):
        quantize_bnb(_registry(home).get(TINY).path, tmp_path / "x", quant_type="int3")
    with pytest.raises(FileExistsError, match="is not empty"):
        quantize_bnb(_registry(home).get(TINY).path, _registry(home).get(NF4).path)


def test_nf4_checkpoint_loads_back_and_generates(home):
    import bitsandbytes
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"  # bitsandbytes 4-bit runs on either
    model = AutoModelForCausalLM.from_pretrained(_registry(home).get(NF4).path, device_map=device)
    assert isinstance(model.model.layers[0].self_attn.q_proj, bitsandbytes.nn.Linear4bit)
    assert model.device.type == device
    prompt = torch.tensor([[1, 2, 3, 4]], device=device)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)


def _direct(model, tokenizer, item: MCQItem) -> tuple[str, dict[str, float]]:
    """One question, unpadded, all positions' logits: the reference the batched scorer must reproduce."""
    import torch

    ids = mcq.encode_prompt(tokenizer, mcq.MCQuestion(item.question, tuple(item.options)))
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0, -1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    letter_ids = mcq.letter_token_ids(tokenizer, len(item.options))
    probs, answer = mcq.letter_distribution(mcq.LETTERS[: len(item.options)], logprobs[letter_ids].tolist())
    return answer, probs


def test_letter_scorer_matches_a_direct_computation(home):
    from evals.hf_letter import TransformersEngine, letter_logprobs

    engine = TransformersEngine(_registry(home).get(NF4).path, batch_size=2)  # 3 questions: a padded batch
    m = engine.letter("arc_easy", "test", ITEMS)
    assert (m.benchmark, m.metric, m.n) == ("arc_easy", "letter_acc", 3)
    assert set(m.details) == {"answers", "answer_probability", "letter_logprobs"}
    assert {"biology", "astronomy"} <= set(m.groups)
    batched = letter_logprobs(engine.model, engine.tokenizer, ITEMS, batch_size=2)
    for item, logprobs in zip(ITEMS, batched, strict=True):
        answer, probs = _direct(engine.model, engine.tokenizer, item)
        assert len(logprobs) == len(item.options)
        assert m.details["answers"][item.id] == answer
        assert m.details["answer_probability"][item.id] == pytest.approx(probs[answer], abs=2e-3)
        assert m.items[item.id] == float(answer == item.answer)
    assert engine.engine_info["backend"] == "transformers"


def _cloze_choice(model, tokenizer, item: MCQItem) -> int:
    """The option with the highest summed log-probability after the arc task's prompt, computed directly (lm-eval
    encodes context + continuation whole and takes the continuation as the tokens after the context's)."""
    import torch

    context = f"Question: {item.question}\nAnswer:"
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    totals = []
    for option in item.options:
        ids = tokenizer.encode(f"{context} {option}", add_special_tokens=False)
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        totals.append(sum(logprobs[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids))))
    return max(range(len(totals)), key=totals.__getitem__)


def test_cloze_through_transformers_scores_the_loaded_model(home, tmp_path):
    from evals import mcq_eval
    from evals.hf_letter import TransformersEngine

    engine = TransformersEngine(_registry(home).get(NF4).path, batch_size=2)
    assert engine.lm_eval_model.model is engine.model  # lm-eval wraps the very nf4 weights the letter format scores
    acc, acc_norm = mcq_eval.cloze(engine.lm_eval_model, {"arc_easy": ("test", ITEMS)}, tmp_path)
    assert (acc.key, acc_norm.key, acc.n) == ("arc_easy/cloze_acc", "arc_easy/cloze_acc_norm", 3)
    for item in ITEMS:
        chosen = _cloze_choice(engine.model, engine.tokenizer, item)
        assert acc.items[item.id] == float(mcq.LETTERS[chosen] == item.answer)


def test_eval_run_scores_letter_format_and_cloze_through_transformers(home, tmp_path, no_cuda):
    path = write_arc(tmp_path / "arc.jsonl", [("a1", ["red", "blue", "green"], "B", None),
                                              ("a2", ["one", "two"], "A", None)])
    settings = Settings(home=home)
    options = RunOptions(model=NF4, suite="mcq", benchmarks=["arc_easy"], sources={"arc_easy": str(path)})
    [result] = run(options, settings, Console(quiet=True))
    assert result.engine["backend"] == "transformers" and "server" not in result.engine
    assert result.data == {"arc_easy": str(path)}  # where the items came from: --data, else ZEPHYR_DATA_DIR
    digest = {"arc_easy": benchmarks.fingerprint(benchmarks.load("arc_easy", source=path))}
    assert all(m.data_digest == digest for m in result.measurements)  # what each figure was computed on
    assert result.quantization["quant_method"] == "bitsandbytes"
    assert [m.key for m in result.measurements] == ["arc_easy/letter_acc", "arc_easy/cloze_acc",
                                                    "arc_easy/cloze_acc_norm", "arc_easy/mcq_acc_auto"]
    auto = result.get("arc_easy/mcq_acc_auto")  # /mcq's default for a model without a record: plain cloze
    assert auto.details["method"] == "cloze" and auto.items == result.get("arc_easy/cloze_acc").items
    assert {m.n for m in result.measurements} == {2}
    assert {"arc_easy/letter_acc", "arc_easy/cloze_acc"} <= set(_registry(home).get(NF4).manifest.evals)


@pytest.mark.parametrize(("suite", "named"), [("gsm8k", "the gsm8k suite needs"), ("text", "the text suite needs"),
                                               ("mcq,gsm8k", "the gsm8k suite needs"),
                                               ("all", "the gsm8k and text suites need")])
def test_eval_run_refuses_what_needs_vllm(home, no_cuda, suite, named):
    options = RunOptions(model=NF4, suite=suite)
    with pytest.raises(EvalError, match="vLLM runs those only on a CUDA GPU") as info:
        check_options(options, Settings(home=home), _registry(home))
    assert f"{named} vLLM" in str(info.value) and "run `--suite mcq`" in str(info.value)
    # The mcq suite (cloze included), a server-only measurement and unquantized models are not affected.
    check_options(RunOptions(model=NF4, suite="mcq"), Settings(home=home), _registry(home))
    check_options(RunOptions(model=NF4, suite="mcq", local=False, server="http://x"), Settings(home=home),
                  _registry(home))
    check_options(RunOptions(model=TINY, suite=suite), Settings(home=home), _registry(home))


SERVE_MESSAGE = (f"model {NF4} is a bitsandbytes 4-bit checkpoint; vLLM serves bitsandbytes only on CUDA GPUs. "
                 "Serve a compressed-tensors variant (gptq, awq, w8a8, easyquant) on this machine or evaluate it "
                 "with `zephyr eval run` (transformers)")


def test_service_refuses_a_bnb_checkpoint_without_cuda(home, no_cuda, monkeypatch):
    from typer.testing import CliRunner

    from cli.app import app

    registry = _registry(home)
    assert vllm_serving_problem(registry.get(NF4)) == SERVE_MESSAGE
    assert vllm_serving_problem(registry.get(TINY)) is None
    with pytest.raises(RuntimeError) as info:  # create_app's lifespan path, before vLLM is imported
        VLLMEngine.start(Settings(home=home), registry.get(NF4).path, NF4)
    assert str(info.value) == SERVE_MESSAGE
    monkeypatch.setenv("ZEPHYR_HOME", str(home))
    result = CliRunner().invoke(app, ["serve", "--model", NF4])
    assert result.exit_code == 1
    assert SERVE_MESSAGE in " ".join(result.output.split())


def test_service_allows_bnb_with_cuda(home, monkeypatch):
    monkeypatch.setattr("zephyr.registry.cuda_available", lambda: True)
    assert vllm_serving_problem(_registry(home).get(NF4)) is None


def test_bnb_support_is_reported(no_cuda):
    from quant.bnb import bnb_available

    ok, reason = bnb_available()
    assert ok, reason
