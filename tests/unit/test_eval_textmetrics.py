"""BERTScore on the packaged all-MiniLM-L6-v2, and DialogRPT's loading and scoring on a tiny random GPT-2 (the
real weights are not available here)."""

from __future__ import annotations

import pytest

from evals.textmetrics import (
    DIALOGRPT_MODELS,
    DIALOGRPT_SEPARATOR,
    DialogRPT,
    DialogRPTMissing,
    bertscore,
)

WORDS = "the a cat dog sat on mat sun is hot cold plants make sugar from light water what why how".split()


def test_bertscore_identical_text_is_about_one_and_beats_unrelated_text():
    reference = "Plants make sugar from light and water."
    scores = bertscore([reference, "The stock market fell sharply on Tuesday."], [reference, reference])
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores)
    assert scores[0] == pytest.approx(1.0, abs=1e-4)
    assert scores[0] > scores[1]


def test_bertscore_length_mismatch_and_empty_inputs():
    with pytest.raises(ValueError, match="2 candidates and 1 references"):
        bertscore(["a", "b"], ["a"])
    assert bertscore([], []) == []
    # Empty candidates (or references) score 0, bert-score's own rule; the others are unaffected.
    scores = bertscore(["", "   ", "The sun is hot."], ["The sun is hot.", "The sun is hot.", ""])
    assert scores == [0.0, 0.0, 0.0]


def test_bertscore_rescale_needs_a_baseline():
    # bert-score ships baselines only for the models in its table; the MiniLM folder is not one of them.
    with pytest.raises(ValueError, match="no BERTScore rescale baseline"):
        bertscore(["The sun is hot."], ["The sun is hot."], rescale=True)


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")
def test_bertscore_rescale_with_a_given_baseline(tmp_path):
    # bert-score's baseline format: one row per layer, P/R/F columns; F = 0.5 maps 1 -> 1 and an empty 0 -> -1.
    baseline = tmp_path / "minilm.tsv"
    baseline.write_text("LAYER,P,R,F\n" + "".join(f"{layer},0.5,0.5,0.5\n" for layer in range(7)))
    scores = bertscore(["The sun is hot.", ""], ["The sun is hot.", "x"], rescale=True, baseline_path=baseline)
    assert scores == pytest.approx([1.0, -1.0], abs=1e-4)


def test_bertscore_unknown_offline_model_says_so(tmp_path):
    with pytest.raises(RuntimeError, match="cannot be loaded offline"):
        bertscore(["x"], ["x"], model=str(tmp_path / "no-such-model"))


def tiny_dialogrpt(folder):
    """A randomly initialised 2-layer GPT-2 ranker with a word-level tokenizer whose end-of-text token is GPT-2's."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([DIALOGRPT_SEPARATOR, "[UNK]", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=DIALOGRPT_SEPARATOR, unk_token="[UNK]",
                                        bos_token=DIALOGRPT_SEPARATOR)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=2, n_head=2, num_labels=1,
                        bos_token_id=0, eos_token_id=0, pad_token_id=None)
    GPT2ForSequenceClassification(config).save_pretrained(folder)
    return folder


def test_dialogrpt_scores_are_probabilities_deterministic_and_batch_independent(tmp_path):
    ranker = DialogRPT.load(tiny_dialogrpt(tmp_path / "rpt"))
    contexts = ["why is the sun hot", "what do plants make", ["the cat sat", "on what"], "how", "the dog"]
    responses = ["the sun is hot", "sugar from light", "the mat", "", "the dog sat on the mat " * 20]
    scores = ranker.score(contexts, responses, batch_size=16)
    assert len(scores) == len(contexts)
    assert all(isinstance(s, float) and 0.0 < s < 1.0 for s in scores)
    assert ranker.score(contexts, responses) == scores
    # Padding must not change a score: one at a time is the model card's own usage.
    one_by_one = [ranker.score([c], [r])[0] for c, r in zip(contexts, responses, strict=True)]
    assert scores == pytest.approx(one_by_one, abs=1e-5)
    assert ranker.model.config.pad_token_id is None  # restored after scoring


def test_dialogrpt_input_is_the_model_card_text():
    assert DialogRPT.text("hi there", "hello") == "hi there<|endoftext|>hello"
    assert DialogRPT.text(["q1", "a1", "q2"], "a2") == "q1<|endoftext|>a1<|endoftext|>q2<|endoftext|>a2"


def test_dialogrpt_length_mismatch(tmp_path):
    ranker = DialogRPT.load(tiny_dialogrpt(tmp_path / "rpt"))
    with pytest.raises(ValueError, match="2 contexts and 1 responses"):
        ranker.score(["a", "b"], ["c"])


@pytest.mark.parametrize("name", list(DIALOGRPT_MODELS))
def test_dialogrpt_missing_weights_say_what_and_how(tmp_path, name):
    hub = DIALOGRPT_MODELS[name]
    env = f"ZEPHYR_{name.upper()}_PATH"
    option = "--" + name.replace("_", "-")
    for path in (None, tmp_path / "absent", tmp_path):  # no path, no folder, a folder without weights
        with pytest.raises(DialogRPTMissing) as caught:
            DialogRPT.load(path, name)
        message = str(caught.value)
        assert hub in message and env in message and option in message and "download" in message
    assert isinstance(caught.value, FileNotFoundError)
    assert env == {"dialogrpt_updown": "ZEPHYR_DIALOGRPT_UPDOWN_PATH",
                   "dialogrpt_human_vs_rand": "ZEPHYR_DIALOGRPT_HUMAN_VS_RAND_PATH"}[name]


def test_a_dialogrpt_folder_without_its_tokenizer_is_missing_not_a_traceback(tmp_path):
    folder = tiny_dialogrpt(tmp_path / "rpt")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(DialogRPTMissing, match="no tokenizer.json"):  # not an empty tokenizer scoring noise
        DialogRPT.load(folder)
    (folder / "tokenizer.json").write_text("{torn")
    with pytest.raises(DialogRPTMissing, match="does not load"):
        DialogRPT.load(folder)


def test_a_bertscore_backbone_that_cannot_load_fails_before_the_engine_starts(tmp_path):
    from rich.console import Console

    from evals import run

    options = run.RunOptions(model="m", suite="text", bertscore_model=str(tmp_path / "no-such-model"))
    with pytest.raises(run.EvalError, match="--bertscore-model .*cannot be loaded offline"):
        run._text_tools(options, None, None, Console(quiet=True))
