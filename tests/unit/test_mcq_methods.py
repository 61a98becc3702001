"""The MCQ methods' shared arithmetic (zephyr/mcq.py) and the calibration fit (evals/calibration.py)."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from evals import calibration
from evals.calibrate import CalibrationError, benchmarks_table
from evals.mcq_eval import TASKS_DIR
from zephyr import mcq

QUESTION = mcq.MCQuestion.build("Which gas do plants absorb?", ["Oxygen", "Carbon dioxide", "Helium"])


@pytest.mark.parametrize("benchmark", ["arc_easy", "arc_challenge", "mmlu", "sciq", "openbookqa"])
@pytest.mark.parametrize("support", [None, "", "  Plants take in carbon dioxide.  "])
def test_every_lm_eval_task_renders_the_served_cloze_context(benchmark, support):
    from jinja2 import Template

    template = yaml.safe_load((TASKS_DIR / f"{benchmark}.yaml").read_text())["doc_to_text"]
    doc = {"question": "Which gas do plants absorb?", "options": ["a", "b"], "support": support}
    served = mcq.MCQuestion.build(doc["question"], doc["options"], support)
    assert Template(template).render(**doc) == mcq.cloze_context(served)


@pytest.mark.parametrize("support", [None, "Plants take in carbon dioxide."])
def test_lm_eval_tasks_render_the_record_demonstrations_before_the_question_as_served(support):
    from jinja2 import Environment

    from evals.mcq_eval import task_config

    shown = mcq.render_demonstrations([(mcq.MCQuestion.build("Is {{ this }} Jinja?", ["no", "yes"]), "no")])
    template = task_config("arc_easy", Path("items.jsonl"), shown)["doc_to_text"]
    doc = {"question": "Which gas do plants absorb?", "options": ["a", "b"], "support": support,
           "demonstrations": shown}  # write_task_items puts the text in a column: never parsed as a template
    served = mcq.MCQuestion.build(doc["question"], doc["options"], support)
    rendered = Environment(keep_trailing_newline=True).from_string(template).render(**doc)
    assert rendered == mcq.cloze_context(served, shown) and rendered.startswith("Question: Is {{ this }} Jinja?")
    assert task_config("arc_easy", Path("items.jsonl"))["doc_to_text"] == template.removeprefix("{{demonstrations}}")


def test_demonstrations_are_training_questions_rendered_as_cloze_with_their_key(tmp_path: Path):
    from evals.calibrate import CalibrationError, demonstrations
    from zephyr.settings import Settings

    train = tmp_path / "arc" / "ARC-Easy" / "ARC-Easy-Train.jsonl"
    train.parent.mkdir(parents=True)
    rows = [{"id": f"q{i}", "answerKey": "B", "question": {"stem": f"What is {i} + 1?", "choices": [
        {"label": label, "text": str(i + k)} for k, label in enumerate("ABCD")]}} for i in range(8)]
    rows.append({"id": "long", "answerKey": "A", "question": {"stem": "Why? " * 40, "choices": [
        {"label": label, "text": label} for label in "ABCD"]}})  # too long to show
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    settings = Settings(data_dir=tmp_path)
    text, source = demonstrations(settings, 3)
    assert (source["benchmark"], source["split"], source["count"], len(source["ids"])) == ("arc_easy", "train", 3, 3)
    assert "long" not in source["ids"] and demonstrations(settings, 3) == (text, source)  # the seed fixes the draw
    first = int(source["ids"][0][1:])
    assert text.startswith(f"Question: What is {first} + 1?\nAnswer: {first + 1}\n\n") and text.count("Question") == 3
    assert demonstrations(settings, 0) == ("", {})
    with pytest.raises(CalibrationError, match="0 to 16"):
        demonstrations(settings, 17)
    with pytest.raises(ValueError, match="at most 4000 characters"):
        mcq.MCQCalibration(method="cloze", weights={"cloze": 1.0}, demonstrations="x" * 4001)


def test_cloze_requests_split_context_and_continuation_as_lm_eval_does(tokenizer):
    from lm_eval.api.model import TemplateLM

    class Encoder(TemplateLM):  # lm-eval's own pair encoding, over our tokenizer
        backend = "causal"
        tokenizer_name = "test"
        eot_token_id = 0

        def tok_encode(self, string, **kwargs):
            return tokenizer.encode(string, add_special_tokens=False)

        loglikelihood_rolling = generate_until = _loglikelihood_tokens = apply_chat_template = None

    encoder = Encoder.__new__(Encoder)
    context = mcq.cloze_context(QUESTION)
    for (ids, context_length), option in zip(mcq.cloze_requests(tokenizer, QUESTION), QUESTION.options, strict=True):
        context_ids, continuation_ids = encoder._encode_pair(context, mcq.CLOZE_DELIMITER + option)
        assert ids == context_ids + continuation_ids and context_length == len(context_ids)


def test_lm_eval_encodes_cloze_pairs_without_the_bos_a_model_adds(tokenizer):
    """/mcq scores a pair without special tokens (cloze_split); lm-eval left to itself adds a BOS-adding model's BOS,
    so such a model would be calibrated on other scores than it serves. SmolLM2 adds none: here it is made to."""
    from tokenizers import processors

    from offline.engine import LM_EVAL_TOKENIZATION, _lm_eval_vllm_class

    with_bos = copy.deepcopy(tokenizer)
    with_bos._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{with_bos.bos_token} $A", special_tokens=[(with_bos.bos_token, with_bos.bos_token_id)])
    assert with_bos.encode("Photosynthesis")[0] == with_bos.bos_token_id
    vllm_model = _lm_eval_vllm_class()
    lm = vllm_model.__new__(vllm_model)  # its encoder only: no engine
    lm.tokenizer, lm.custom_prefix_token_id = with_bos, None
    lm.add_bos_token = LM_EVAL_TOKENIZATION["add_bos_token"]
    context = mcq.cloze_context(QUESTION)
    for (ids, context_length), option in zip(mcq.cloze_requests(with_bos, QUESTION), QUESTION.options, strict=True):
        context_ids, continuation_ids = lm._encode_pair(context, mcq.CLOZE_DELIMITER + option)
        assert ids == context_ids + continuation_ids and context_length == len(context_ids)


def test_letter_prompt_shows_the_support_first():
    q = mcq.MCQuestion.build("Which gas?", ["a", "b"], "A passage.")
    assert mcq.render_user_message(q).startswith("A passage.\n\nQuestion: Which gas?")
    assert mcq.MCQuestion.build("Which gas?", ["a", "b"], "   ").support is None
    with pytest.raises(mcq.MCQFormatError, match="support"):
        mcq.MCQuestion.build("Which gas?", ["a", "b"], 3)


def test_plans_auto_falls_back_to_cloze_and_named_methods_keep_their_answer():
    assert mcq.plan("auto", None) == mcq.Plan("cloze", {"cloze": 1.0})
    record = mcq.MCQCalibration(method="letter_debiased", weights={"letter": 2.0},
                                letter_prior={"2": [0.8, 0.2]}, temperatures={"letter": 4.0, "cloze": 10.0})
    scores = mcq.OptionScores(letter=[math.log(0.7), math.log(0.3)], cloze=[-5.0, -2.0], cloze_norm=[-1.0, -0.1])
    # auto removes the prior: 0.7/0.8 < 0.3/0.2, so B
    probs, answer = mcq.plan("auto", record).distribution(scores)
    assert answer == "B" and probs["B"] == pytest.approx(1 / (1 + (0.875 / 1.5) ** 2))
    # letter keeps the model's own answer and takes its temperature
    probs, answer = mcq.plan("letter", record).distribution(scores)
    assert answer == "A" and probs["A"] == pytest.approx(0.7 ** 0.25 / (0.7 ** 0.25 + 0.3 ** 0.25))
    probs, answer = mcq.plan("cloze", record).distribution(scores)
    assert answer == "B" and probs["B"] == pytest.approx(1 / (1 + math.exp(-0.3)))
    assert mcq.plan("explain", None).weights == {"letter": 1.0}
    with pytest.raises(mcq.MCQFormatError, match="method"):
        mcq.plan("vote", None)
    with pytest.raises(ValueError, match="weights"):
        mcq.MCQCalibration(method="cloze", weights={"votes": 1.0})
    # A record the server would start on and then fail or skew every request with is refused when it is read.
    for bad, named in (({"method": "bogus"}, "method must be one of"),
                       ({"weights": {"cloze": 0.0}}, "a weight other than 0"),
                       ({"temperatures": {"cloze": 1e-308}}, "at least 1e-06"),
                       ({"temperatures": {"votes": 1.0}}, "per named method"),
                       ({"temperatures": {"auto": 2.0}}, "per named method"),
                       ({"letter_prior": {"4": [0.25, 0.25, 0.5]}}, "that many positive probabilities")):
        with pytest.raises(ValueError, match=named):
            mcq.MCQCalibration.model_validate({"method": "cloze", "weights": {"cloze": 1.0}} | bad)


def test_cloze_scores_normalize_by_the_options_characters():
    scores = mcq.cloze_scores(["ab", "abcd"], [-4.0, -6.0])
    assert scores.cloze == [-4.0, -6.0] and scores.cloze_norm == [-2.0, -1.5]


def test_figures_of_no_questions_are_unknown_not_perfect():
    figures = calibration.summarize([], [])
    assert figures["n"] == 0 and all(math.isnan(figures[k]) for k in ("accuracy", "ece", "brier", "nll"))


def test_calibration_metrics():
    assert calibration.ece([0.9] * 10, [1] * 9 + [0]) == pytest.approx(0.0)
    assert calibration.ece([0.9] * 10, [1] * 5 + [0] * 5) == pytest.approx(0.4)
    assert calibration.brier([[1.0, 0.0], [0.5, 0.5]], [0, 1]) == pytest.approx(0.25)
    coverage = calibration.coverage_accuracy([0.9, 0.8, 0.3, 0.2], [1, 1, 0, 0])
    assert coverage == {"100%": 0.5, "80%": pytest.approx(2 / 3), "50%": 1.0}
    bins = calibration.reliability([0.95, 0.97, 0.1], [1, 0, 0])
    assert [(b["count"], b["accuracy"]) for b in bins] == [(1, 0.0), (2, 0.5)]
    # 15 bins (the issue's): 0.62 and 0.68 fall in bins of their own, where 10 would pool them (ECE 0.15)
    assert calibration.ece([0.62, 0.68], [1, 0]) == pytest.approx(0.53)
    assert [b["low"] for b in calibration.reliability([0.62, 0.68], [1, 0])] == [pytest.approx(9 / 15),
                                                                                 pytest.approx(10 / 15)]
    # Ties at the cut-off count by their mean: the same questions in another order give the same figure.
    for right in ([1, 1, 0, 0, 1], [0, 0, 1, 1, 1]):
        assert calibration.coverage_accuracy([0.5, 0.5, 0.5, 0.5, 0.4], right)["50%"] == pytest.approx(0.5)
    # Half a question rounds up whatever the count's parity (round() kept 12 of 25 but 14 of 27 at 50%).
    confidence = [1 - i / 100 for i in range(25)]
    assert calibration.coverage_accuracy(confidence, [1] * 12 + [0] * 13)["50%"] == pytest.approx(12 / 13)
    with pytest.raises(ValueError, match="not a finite number"):
        calibration.ece([float("nan"), 0.9], [1, 1])


def test_a_nan_score_is_an_impossible_option_wherever_it_stands():
    nan = float("nan")
    assert mcq.letter_distribution("AB", [0.0, nan]) == ({"A": 1.0, "B": 0.0}, "A")
    assert mcq.letter_distribution("AB", [nan, 0.0]) == ({"A": 0.0, "B": 1.0}, "B")
    assert mcq.log_softmax([nan, 0.0, 0.0])[0] == float("-inf")
    with pytest.raises(ValueError, match="no option"):
        mcq.log_softmax([nan, nan])


def synthetic(n: int, seed: int, temperature: float, bias: list[float]) -> list[calibration.Scored]:
    """Questions whose true answer distribution is softmax(cloze / temperature), and a letter path that sees
    only a position habit."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        cloze = [rng.gauss(-8, 3) for _ in range(4)]
        probs = [p for p in mcq.letter_distribution("ABCD", [c / temperature for c in cloze])[0].values()]
        gold = rng.choices(range(4), probs)[0]
        letter = mcq.log_softmax([b + rng.gauss(0, 0.1) for b in bias])
        items.append(calibration.Scored(dataclasses.replace(mcq.cloze_scores(["x" * 5] * 4, cloze), letter=letter),
                                        gold))
    return items


def test_fit_recovers_the_temperature_and_the_letter_prior_and_chooses_by_validation_accuracy():
    items = synthetic(3000, seed=0, temperature=4.0, bias=[1.0, 0.5, 0.0, -1.0])
    record, figures = calibration.fit(items)
    assert record.temperatures["cloze"] == pytest.approx(4.0, rel=0.15)
    assert record.letter_prior["4"][0] > record.letter_prior["4"][1] > record.letter_prior["4"][2] > \
        record.letter_prior["4"][3]
    assert record.method in ("cloze", "cloze_norm")  # the letter knows nothing here
    assert figures["cloze"]["fitted"]["nll"] < figures["cloze"]["raw"]["nll"]
    # the choice reads questions each fold's fit never saw
    assert "cross-validated" in record.validation["chosen_by"]
    held = figures["cloze"]["cross_validated"]
    assert held["n"] == 3000 and held["accuracy"] == pytest.approx(figures["cloze"]["fitted"]["accuracy"], abs=0.02)
    held_out = synthetic(3000, seed=1, temperature=4.0, bias=[1.0, 0.5, 0.0, -1.0])
    assert calibration.evaluate(record, held_out)["ece"] < 0.03
    few, _ = calibration.fit(items[:9])  # under two questions a fold: the record says how it chose
    assert few.validation["chosen_by"].startswith("in-sample accuracy")


def test_scores_file_round_trip(tmp_path: Path):
    from evals.calibrate import load_scores, save_scores

    items = synthetic(5, seed=2, temperature=1.0, bias=[0.0] * 4)
    path = save_scores(tmp_path / "scores.json", {"arc_easy": "validation"}, {"arc_easy": items}, "Q?\nA:")
    splits, loaded, cue, shown, source, dtype, decontaminated, question_domain, revision = load_scores(path)
    assert splits == {"arc_easy": "validation"} and [s.gold for s in loaded["arc_easy"]] == [s.gold for s in items]
    assert loaded["arc_easy"][0].scores == items[0].scores and cue == "Q?\nA:" and (shown, source) == ("", {})
    assert dtype is None  # not said: the record will not claim one
    assert decontaminated == {"arc_easy": 0} and question_domain is None and revision is None
    path = save_scores(tmp_path / "shots.json", {"arc_easy": "validation"}, {"arc_easy": items}, "Q?\nA:",
                       "Question: 1?\nAnswer: 2\n\n", {"count": 1}, "float32", {"arc_easy": 3})
    assert load_scores(path)[3:] == ("Question: 1?\nAnswer: 2\n\n", {"count": 1}, "float32", {"arc_easy": 3}, None,
                                     None)
    two = json.loads(path.read_text())
    path.write_text(json.dumps({**two, "sciq": {**two["arc_easy"], "dtype": "bfloat16"}}))
    with pytest.raises(CalibrationError, match="different dtypes"):
        load_scores(path)
    mixed = json.loads(path.read_text())
    path.write_text(json.dumps({**mixed, "sciq": {**mixed["arc_easy"], "demonstrations": ""}}))
    with pytest.raises(CalibrationError, match="different demonstrations"):
        load_scores(path)
    path = tmp_path / "scores.json"
    # A file saved before the cue was kept holds priors scored after the bare "Answer:".
    raw = json.loads(path.read_text())
    del raw["arc_easy"]["answer_prior_context"]
    path.write_text(json.dumps(raw))
    assert load_scores(path)[2] == mcq.LEGACY_ANSWER_PRIOR_CONTEXT
    path.write_text(json.dumps({**raw, "sciq": {**raw["arc_easy"], "answer_prior_context": "Answer is"}}))
    with pytest.raises(CalibrationError, match="mixes answer priors scored after different cues"):
        load_scores(path)


def test_calibrate_records_the_cue_its_answer_priors_were_scored_after(tmp_path: Path, monkeypatch, default_model):
    """--scores refits keep the file's cue in the record; the service then asks with it."""
    from rich.console import Console

    from evals.calibrate import CalibrationError, calibrate, save_scores
    from loadtest.harness import linked_variant
    from zephyr.registry import Registry
    from zephyr.settings import Settings

    rng = random.Random(4)
    items = []
    for i in range(60):
        cloze = [rng.gauss(-8, 2) for _ in range(4)]
        scores = dataclasses.replace(mcq.cloze_scores(["x" * 5] * 4, cloze), answer_prior=[rng.gauss(-6, 1)] * 4)
        items.append(calibration.Scored(scores, rng.randrange(4), f"q{i}"))
    shown = "Question: Which is a star?\nAnswer: the Sun\n\n"
    # A refit checks the scored questions, by id, against the reported splits: the data they were scored on.
    dev = tmp_path / "data" / "arc" / "ARC-Easy" / "ARC-Easy-Dev.jsonl"
    dev.parent.mkdir(parents=True)
    dev.write_text("".join(json.dumps({"id": f"q{i}", "answerKey": "A", "question": {
        "stem": f"What is {i} plus one?", "choices": [{"label": label, "text": f"{label}{i}"} for label in "ABCD"]}})
        + "\n" for i in range(60)))
    monkeypatch.setenv("ZEPHYR_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ZEPHYR_HOME", str(tmp_path / "home"))
    settings = Settings()
    linked_variant(settings.home, default_model, "cue-test")  # its own zephyr.json: the shared one stays as it is
    own = settings.resolved_eval_results_dir / "cue-test" / "calibration"
    own.mkdir(parents=True)
    path = save_scores(own / "scores.json", {"arc_easy": "validation"}, {"arc_easy": items}, "Q: Why?\nA:",
                       shown, {"benchmark": "arc_easy", "count": 1}, "bfloat16")
    # Only this model's own scores, and only of the splits calibration reads (validation).
    elsewhere = save_scores(tmp_path / "scores.json", {"arc_easy": "validation"}, {"arc_easy": items}, "Q?")
    with pytest.raises(CalibrationError, match="not one of cue-test's saved scores"):
        calibrate("cue-test", settings, Console(file=io.StringIO()), scores=elsewhere)
    on_test = save_scores(own / "test.json", {"arc_easy": "test"}, {"arc_easy": items}, "Q?")
    with pytest.raises(CalibrationError, match="arc_easy:test .calibration reads validation"):
        calibrate("cue-test", settings, Console(file=io.StringIO()), scores=on_test)
    record = calibrate("cue-test", settings, Console(file=io.StringIO()), scores=path)
    assert record.answer_prior_context == "Q: Why?\nA:"
    saved = Registry(settings.models_dir).get("cue-test").manifest.mcq_calibration
    assert saved.answer_prior_context == "Q: Why?\nA:" and saved.method == record.method
    # the demonstrations the scores were made after are the ones the service will ask with
    assert (saved.demonstrations, saved.demonstrations_source["count"]) == (shown, 1)
    assert saved.dtype == "bfloat16"  # the numerics its weights fit, for the server's check at start
    assert mcq.plan("auto", saved).demonstrations == shown and mcq.plan("auto", None).demonstrations == ""
    assert mcq.MCQCalibration(method="cloze", weights={"cloze": 1.0}).answer_prior_context == "Answer:"


def test_a_quantized_entry_is_calibrated_after_as_many_demonstrations_as_its_parent_record(tmp_path: Path,
                                                                                             default_model):
    from evals.calibrate import DEMONSTRATIONS_DEFAULT, default_demonstrations
    from loadtest.harness import linked_variant
    from zephyr.registry import Registry

    home = tmp_path / "home"
    record = mcq.MCQCalibration(method="cloze", weights={"cloze": 1.0})
    shown = mcq.MCQCalibration(method="cloze", weights={"cloze": 1.0}, demonstrations="Question: a?\nAnswer: b\n\n",
                               demonstrations_source={"count": 3})
    linked_variant(home, default_model, "trained", method="dpo", mcq_calibration=record)  # chose none
    linked_variant(home, default_model, "parent-of-few", method="base", mcq_calibration=shown)
    linked_variant(home, default_model, "uncalibrated", method="dpo")
    registry = Registry(home / "models")

    def count(name: str, parent: str | None, method: str) -> int:
        linked_variant(home, default_model, name, method=method, parent=parent)
        return default_demonstrations(registry, registry.get(name))[0]

    assert count("trained-w8a8", "trained", "w8a8") == 0
    assert count("few-gptq", "parent-of-few", "gptq") == 3
    # Anything else gets the default: a trained entry (its count is chosen on validation, not inherited), a quantized
    # entry whose parent has no record or is not in this registry.
    assert count("trained-again", "trained", "dpo") == DEMONSTRATIONS_DEFAULT
    assert count("bare-awq", "uncalibrated", "awq") == DEMONSTRATIONS_DEFAULT
    assert count("orphan-w8a8", "gone", "w8a8") == DEMONSTRATIONS_DEFAULT


def two_kinds(seed: int, scores_of: Callable[[bool, list[float]], mcq.OptionScores],
              n: int = 3000) -> list[calibration.Scored]:
    """Two kinds of question in turn (the first the reliable kind), alike in their cloze score shapes: the key is
    drawn from softmax(cloze / T), T = 0.5 for the reliable kind and 8 for the other. `scores_of(reliable, cloze)`
    gives each question what tells the kinds apart, or nothing."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        reliable = i % 2 == 0
        cloze = [rng.gauss(-8, 2) for _ in range(4)]
        probs = list(mcq.letter_distribution("ABCD", [c / (0.5 if reliable else 8.0) for c in cloze])[0].values())
        items.append(calibration.Scored(scores_of(reliable, cloze), rng.choices(range(4), probs)[0]))
    return items


def test_per_question_sharpness_never_changes_the_answer_and_is_fitted_where_it_differs():
    # Questions with a passage are answered far more reliably at the same raw margin: one temperature cannot
    # fit both kinds, a sharpness that reads `support` can.
    items = two_kinds(3, lambda support, cloze: mcq.cloze_scores(["x" * 5] * 4, cloze, support))
    record, figures = calibration.fit(items)
    assert record.method == "cloze" and record.scaling["support"] > 1.0
    plain = mcq.MCQCalibration(method="cloze", weights=record.weights, letter_prior={})
    by_kind = {kind: [i for i in items if i.scores.support == kind] for kind in (True, False)}
    for subset in by_kind.values():
        assert calibration.evaluate(record, subset)["ece"] < 0.05 < calibration.evaluate(plain, subset)["ece"]
    for item in items[:50]:
        assert mcq.plan("auto", record).distribution(item.scores)[1] == mcq.plan("cloze", None).distribution(
            item.scores)[1]
    with pytest.raises(ValueError, match="scaling"):
        mcq.MCQCalibration(method="cloze", weights={"cloze": 1.0}, scaling={"mood": 1.0})


def test_a_set_left_out_is_measured_by_a_fit_that_never_saw_it():
    # Passages make answers reliable, but only one set has passages: fitted with it, the sharpness learns that;
    # fitted on the other set alone, it cannot, and the left-out figures say so (too modest where it is right).
    items = two_kinds(3, lambda support, cloze: mcq.cloze_scores(["x" * 5] * 4, cloze, support))
    scored = {"passages": [i for i in items if i.scores.support], "bare": [i for i in items if not i.scores.support]}
    pooled, _ = calibration.fit(items)
    unseen = calibration.left_out_sets(scored, pooled.method)
    assert set(unseen) == {"passages", "bare"} and unseen["passages"]["n"] == len(scored["passages"])
    assert calibration.evaluate(pooled, scored["passages"])["ece"] < 0.05 < unseen["passages"]["ece"]
    assert unseen["passages"]["confidence"] < unseen["passages"]["accuracy"] - 0.05
    assert calibration.left_out_sets({"passages": scored["passages"]}, pooled.method) == {}
    per_set = {name: calibration.evaluate(pooled, subset) for name, subset in scored.items()}
    out = Console(file=io.StringIO(), width=250)
    out.print(benchmarks_table(pooled, per_set, unseen))
    assert "set left out" in out.file.getvalue()
    assert f"{unseen['passages']['confidence']:.2f} / {unseen['passages']['ece']:.3f}" in out.file.getvalue()


def test_an_impossible_option_stays_impossible_and_a_record_refuses_what_is_not_a_number():
    inf, nan = float("-inf"), float("nan")
    scores = dataclasses.replace(mcq.cloze_scores(["ab", "cd", "ef", "gh"], [-4.0, -5.0, inf, -6.0]),
                                 answer_prior=[-3.0, -3.0, inf, -3.0])
    # the answer prior's weight is negative in cloze_pmi: -inf times it must not make option C certain
    record = mcq.MCQCalibration(method="cloze_pmi", weights={"cloze": 0.1, "cloze_norm": 1.0, "answer_prior": -0.1},
                                scaling={"bias": 0.5, "log_cloze_spread": 0.2, "norm_margin": 0.3, "mean_norm": 0.1})
    probabilities, answer = mcq.plan("auto", record).distribution(scores)
    assert answer == "A" and probabilities["C"] == 0.0 and sum(probabilities.values()) == pytest.approx(1.0)
    # the features read the options with finite scores: as if C were not offered, but for the option count
    features = mcq.confidence_features(scores)
    without = mcq.confidence_features(mcq.cloze_scores(["ab", "cd", "gh"], [-4.0, -5.0, -6.0]))
    assert all(math.isfinite(v) for v in features.values())
    assert {k: v for k, v in features.items() if k not in ("options", "log_option_chars")} == pytest.approx(
        {k: v for k, v in without.items() if k not in ("options", "log_option_chars")})
    with pytest.raises(ValueError, match="not finite"):
        mcq.sharpness(scores, {"bias": nan})
    for bad in ({"weights": {"cloze": nan}}, {"scaling": {"bias": nan}}, {"temperatures": {"cloze": -2.0}},
                {"temperatures": {"cloze": 0.0}}):
        with pytest.raises(ValueError):
            mcq.MCQCalibration.model_validate({"method": "cloze", "weights": {"cloze": 1.0}} | bad)


def test_a_tiny_sharpness_leaves_the_answer_to_the_unscaled_scores():
    # exp(factor * x - peak) with factor = exp(-36) rounds every option to the same weight: the argmax of those
    # would be the first letter. The answer is the argmax of the combined scores themselves.
    scores = mcq.cloze_scores(["x" * 5] * 4, [-10, -9.9, -12, -11])
    for scaling in ({"bias": -36.0}, {"bias": -30.0}, {}):
        probs, answer = mcq.combine(scores, {"cloze": 1.0}, scaling=scaling)
        assert answer == "B" and sum(probs.values()) == pytest.approx(1.0), scaling
    record = mcq.MCQCalibration(method="cloze", weights={"cloze": 1.0}, scaling={"bias": -36.0})
    probs, answer = mcq.plan("auto", record).distribution(scores)
    assert answer == "B" and probs["A"] == pytest.approx(0.25) and probs["B"] == pytest.approx(0.25)
    # the letter distribution reads the answer off the log-probabilities too, ties to the earlier letter
    assert mcq.letter_distribution("ABC", [-1e-300 * 3, -1e-300, -1e-300])[1] == "B"
    assert mcq.letter_distribution("ABCD", [-2.0, -1.0, -1.0, float("nan")])[1] == "B"
    # the calibration figures count the answer given, not the argmax of probabilities that tie
    items = [calibration.Scored(scores, 1)] * 3
    assert calibration.evaluate(record, items)["accuracy"] == 1.0


def test_sharpness_reads_how_predictable_the_options_are_and_older_records_still_apply():
    # Two kinds of question alike in every other feature (same spread, same margins, no passage): the options of
    # one are familiar text (high per-character log-likelihood) and its answers far more reliable. Only
    # `mean_norm` tells them apart.
    rng = random.Random(5)
    items = []
    for i in range(3000):
        familiar = i % 2 == 0
        shape = [rng.gauss(0, 2) for _ in range(4)]
        cloze = [(-5 if familiar else -40) + x for x in shape]
        temperature = 0.5 if familiar else 8.0
        probs = list(mcq.letter_distribution("ABCD", [x / temperature for x in shape])[0].values())
        items.append(calibration.Scored(mcq.cloze_scores(["x" * 10] * 4, cloze), rng.choices(range(4), probs)[0]))
    record, _ = calibration.fit(items)
    assert record.scaling["mean_norm"] > 0
    for kind in (0, 1):
        assert calibration.evaluate(record, items[kind::2])["ece"] < 0.05
    # A record fitted before the feature existed has no weight for it and scores as it did.
    older = record.model_copy(update={"scaling": {k: v for k, v in record.scaling.items() if k != "mean_norm"}})
    features = mcq.confidence_features(items[0].scores)
    assert mcq.sharpness(items[0].scores, older.scaling) == pytest.approx(
        math.exp(sum(w * features[f] for f, w in older.scaling.items())))


def test_every_auto_method_is_a_fitted_candidate():
    assert set(calibration.CANDIDATES) == set(mcq.AUTO_METHODS)


@pytest.mark.parametrize("context", [mcq.ANSWER_PRIOR_CONTEXT, mcq.LEGACY_ANSWER_PRIOR_CONTEXT])
def test_answer_prior_requests_score_the_option_after_the_cue(tokenizer, context):
    cue = tokenizer.encode(context, add_special_tokens=False)
    for (ids, context_length), option in zip(mcq.answer_prior_requests(tokenizer, QUESTION, context),
                                             QUESTION.options, strict=True):
        assert ids[:context_length] == cue and context_length == len(cue)
        assert tokenizer.decode(ids[context_length:]) == " " + option


def test_fit_subtracts_the_answer_prior_where_common_phrases_are_distractors():
    # The cloze score is the key's evidence plus how common each text is; the common texts are distractors, so
    # removing the answer prior (a negative weight) is what recovers the key.
    rng = random.Random(4)
    items = []
    for _ in range(2000):
        gold = rng.randrange(4)
        prior = [rng.gauss(-10, 3) for _ in range(4)]
        evidence = [2.0 * (i == gold) + rng.gauss(0, 1) for i in range(4)]
        cloze = [p + e for p, e in zip(prior, evidence, strict=True)]
        items.append(calibration.Scored(dataclasses.replace(mcq.cloze_scores(["x" * 5] * 4, cloze),
                                                            answer_prior=prior), gold))
    record, figures = calibration.fit(items)
    assert record.method == "cloze_pmi" and record.weights["answer_prior"] < 0 < record.weights["cloze"]
    pmi, cloze = (figures[n]["cross_validated"]["accuracy"] for n in ("cloze_pmi", "cloze"))
    assert pmi > cloze + 0.1
    assert mcq.plan("auto", record).needs_answer_prior and not mcq.plan("cloze", record).needs_answer_prior
    # without answer-prior scores (the transformers engine) the candidate is not fitted
    record, figures = calibration.fit([dataclasses.replace(i, scores=dataclasses.replace(i.scores, answer_prior=None))
                                       for i in items])
    assert "cloze_pmi" not in figures and not mcq.plan("auto", record).needs_answer_prior


def test_fit_without_letter_scores_fits_only_what_needs_no_letter():
    """`zephyr eval calibrate --no-letter` (a model trained for cloze): no letter candidate, no letter prior, and a
    record whose auto never asks the engine for letters."""
    items = [dataclasses.replace(i, scores=dataclasses.replace(i.scores, letter=None))
             for i in synthetic(1000, seed=3, temperature=4.0, bias=[0.0] * 4)]
    record, figures = calibration.fit(items)
    assert not {"letter", "letter_debiased", "combined"} & set(figures)
    assert record.letter_prior == {} and "letter" not in record.temperatures
    assert record.temperatures["cloze"] == pytest.approx(4.0, rel=0.2)
    assert not mcq.plan("auto", record).needs_letter


def test_the_letter_prior_of_an_unseen_option_count_comes_from_the_nearest_larger_one():
    """Validation held 3-5 options: a true/false question's letters kept their position bias whole."""
    import math

    record = mcq.MCQCalibration(method="letter_debiased", weights={"letter": 1.0},
                                letter_prior={"4": [0.4, 0.2, 0.2, 0.2], "5": [0.2] * 5})
    two = mcq.debiased_letter(record, [math.log(0.6), math.log(0.4)])
    assert two[0] - two[1] == pytest.approx(math.log(0.6 / 0.4) - math.log(0.4 / 0.2))  # 4's first two, renormalized
    four = mcq.debiased_letter(record, [math.log(0.4)] + [math.log(0.2)] * 3)
    assert max(four) - min(four) == pytest.approx(0.0)  # a count it has: its own row
    six = [0.0] * 6
    assert mcq.debiased_letter(record, six) == six  # none larger: left as it is
