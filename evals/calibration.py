"""How honest an answer's confidence is, and the fit that makes it so.

Metrics (ECE over 15 equal-width bins, Brier score, NLL, accuracy at a coverage, the reliability diagram's bins)
read the probabilities a method gave each question. `fit` chooses and calibrates /mcq's `auto` for one model from
per-option scores measured on validation splits: a temperature per method (minimum NLL), the letter path's
position prior (the mean letter distribution, removed as contextual calibration does), and a weighted combination
of letter and cloze scores. zephyr/mcq.py applies the result, in the service and in evals alike."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from zephyr import mcq

ECE_BINS = 15
COVERAGES = (1.0, 0.8, 0.5)
# The combination must beat the best single method by this much on validation to be worth its extra requests.
COMBINED_MIN_GAIN = 0.005


def ece(confidence: Sequence[float], correct: Sequence[float], bins: int = ECE_BINS) -> float:
    """Expected calibration error: the count-weighted gap between confidence and accuracy over equal-width bins."""
    conf, right = np.asarray(confidence, float), np.asarray(correct, float)
    if not len(conf):
        return float("nan")
    if not np.isfinite(conf).all():  # a NaN would fall in no bin yet count in the denominator
        raise ValueError("a confidence is not a finite number")
    index = np.minimum((conf * bins).astype(int), bins - 1)
    gap = 0.0
    for b in range(bins):
        mask = index == b
        if mask.any():
            gap += mask.sum() * abs(conf[mask].mean() - right[mask].mean())
    return float(gap / len(conf))


def reliability(confidence: Sequence[float], correct: Sequence[float], bins: int = ECE_BINS) -> list[dict[str, float]]:
    """The reliability diagram's bins: mean confidence, accuracy and count of each non-empty bin."""
    conf, right = np.asarray(confidence, float), np.asarray(correct, float)
    index = np.minimum((conf * bins).astype(int), bins - 1)
    return [{"low": b / bins, "confidence": float(conf[index == b].mean()), "accuracy": float(right[index == b].mean()),
             "count": int((index == b).sum())} for b in range(bins) if (index == b).any()]


def brier(probabilities: Sequence[Sequence[float]], gold: Sequence[int]) -> float:
    """Mean over questions of the squared distance between the distribution and the one-hot answer."""
    if not gold:  # no questions: unknown, like accuracy, ECE and NLL (not a perfect 0)
        return float("nan")
    total = 0.0
    for probs, g in zip(probabilities, gold, strict=True):
        total += sum((p - float(i == g)) ** 2 for i, p in enumerate(probs))
    return total / len(gold)


def nll(probabilities: Sequence[Sequence[float]], gold: Sequence[int]) -> float:
    """Mean negative log-probability of the right answer, for reports (fits minimize their own, unclamped). A right
    answer given probability 0 (an impossible option) counts as 1e-12, 27.6 nats, so the mean stays finite: read a
    mean near or above that as a sign of such answers, not as a figure to compare."""
    if not gold:
        return float("nan")
    return float(-np.mean([math.log(max(probs[g], 1e-12)) for probs, g in zip(probabilities, gold, strict=True)]))


def coverage_accuracy(confidence: Sequence[float], correct: Sequence[float],
                      coverages: Sequence[float] = COVERAGES) -> dict[str, float]:
    """Accuracy on the most confident share of questions (risk-coverage): what an abstaining tutor delivers. Questions
    tied at the cut-off's confidence count by their mean, so the figure does not depend on the order they come in."""
    conf = np.asarray(confidence, float)
    order = np.argsort(-conf, kind="stable")
    conf, right = conf[order], np.asarray(correct, float)[order]
    out = {}
    for share in coverages:
        if not len(right):
            out[f"{share:.0%}"] = float("nan")
            continue
        keep = max(1, math.floor(share * len(right) + 0.5))  # half up: round() gave 12 of 25 but 14 of 27 at 50%
        cut = conf[keep - 1]
        above = conf > cut
        tied = conf == cut
        taken_tied = keep - int(above.sum())  # how many of the tied questions the share takes
        total = right[above].sum() + taken_tied * right[tied].mean()
        out[f"{share:.0%}"] = float(total / keep)
    return out


def summarize(probabilities: Sequence[Sequence[float]], gold: Sequence[int],
              answers: Sequence[int] | None = None) -> dict[str, Any]:
    """Every calibration figure of one method on one set of questions. `answers` (option indices) are the ones
    the method gave: pass them where they exist, as the argmax of the probabilities may differ from them at a
    near-tie (probabilities rounded, or equal in floating point while the scores they came from are not); without
    them the argmax stands in."""
    confidence = [max(p) for p in probabilities]
    if answers is None:
        answers = [int(np.argmax(p)) for p in probabilities]
    correct = [float(a == g) for a, g in zip(answers, gold, strict=True)]
    return {"n": len(gold), "accuracy": float(np.mean(correct)) if correct else float("nan"),
            "ece": ece(confidence, correct), "brier": brier(probabilities, gold), "nll": nll(probabilities, gold),
            "coverage_accuracy": coverage_accuracy(confidence, correct),
            "reliability": reliability(confidence, correct)}


# Fitting --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scored:
    """One validation question: its per-option scores and the key's index."""

    scores: mcq.OptionScores
    gold: int
    id: str = ""


SCORE_FIELDS = ("letter", "cloze", "cloze_norm", "answer_prior")


def non_finite(items: Sequence[Scored]) -> list[Scored]:
    """The questions with a score that is not finite (an option the engine found impossible, or a NaN): no fit can
    use them, as the gradient through -inf is NaN and L-BFGS would stop where it started without a word."""
    return [item for item in items
            if any(not math.isfinite(v) for f in SCORE_FIELDS for v in (getattr(item.scores, f) or ()))]


def letter_prior(items: Sequence[Scored]) -> dict[str, list[float]]:
    """Per option count, the mean letter distribution over the questions: the position habit to remove."""
    sums: dict[int, np.ndarray] = {}
    for item in items:
        if item.scores.letter is None:
            continue
        k = len(item.scores.letter)
        sums[k] = sums.get(k, np.zeros(k)) + np.exp(item.scores.letter)
    return {str(k): [float(x) for x in sums[k] / sums[k].sum()] for k in sorted(sums)}


def _matrices(items: Sequence[Scored], features: Sequence[str],
              prior: Mapping[str, list[float]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The questions grouped by option count: per group, features (questions x options x features) and keys."""
    record = mcq.MCQCalibration(method="letter_debiased", weights={features[0]: 1.0}, letter_prior=dict(prior))
    groups: dict[int, tuple[list[np.ndarray], list[int]]] = {}
    for item in items:
        columns = [mcq.feature_values(item.scores, f, record if f == "letter" else None) for f in features]
        x = np.asarray(columns, float).T  # options x features
        xs, golds = groups.setdefault(len(x), ([], []))
        xs.append(x)
        golds.append(item.gold)
    return [(np.stack(xs), np.asarray(golds)) for xs, golds in groups.values()]


def _nll_and_grad(weights: np.ndarray, data: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, np.ndarray]:
    total, grad, count = 0.0, np.zeros_like(weights), 0
    for x, gold in data:
        logits = x @ weights  # questions x options
        logits = logits - logits.max(axis=1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        rows = np.arange(len(gold))
        total -= log_probs[rows, gold].sum()
        probs = np.exp(log_probs)
        grad -= (x[rows, gold] - np.einsum("qo,qof->qf", probs, x)).sum(axis=0)
        count += len(gold)
    return total / count, grad / count


def fit_weights(items: Sequence[Scored], features: Sequence[str],
                prior: Mapping[str, list[float]] | None = None) -> dict[str, float]:
    """Weights on the features minimizing NLL (multinomial logistic regression without biases; with one feature
    this is temperature scaling, the weight being 1/T)."""
    from scipy.optimize import minimize

    data = _matrices(items, features, prior or {})
    result = minimize(_nll_and_grad, np.ones(len(features)), args=(data,), jac=True, method="L-BFGS-B")
    return {f: float(w) for f, w in zip(features, result.x, strict=True)}


def fit_scaling(items: Sequence[Scored], record: mcq.MCQCalibration) -> dict[str, float]:
    """Per-question sharpness on top of the record's weights: logits * exp(b . confidence_features), b minimizing
    NLL (starting from b = 0, the record as it is). A factor shared by all options never changes the answer."""
    from scipy.optimize import minimize

    # The question-domain features only where every question has its domain computed (a record fitted without
    # them scores as before).
    names = mcq.CONFIDENCE_FEATURES if all(i.scores.domain is not None for i in items) \
        else mcq.SCORE_CONFIDENCE_FEATURES
    groups: dict[int, tuple[list[list[float]], list[list[float]], list[int]]] = {}
    for item in items:
        logits = mcq.combined_logits(item.scores, record.weights, record)
        features = mcq.confidence_features(item.scores)
        s, phi, gold = groups.setdefault(len(logits), ([], [], []))
        s.append(logits)
        phi.append([features[f] for f in names])
        gold.append(item.gold)
    data = [(np.asarray(s), np.asarray(phi), np.asarray(g)) for s, phi, g in groups.values()]
    count = sum(len(g) for _, _, g in data)

    def nll_and_grad(b: np.ndarray) -> tuple[float, np.ndarray]:
        total, grad = 0.0, np.zeros_like(b)
        for s, phi, gold in data:
            factor = np.exp(np.clip(phi @ b, -50, 50))  # per question
            z = s * factor[:, None]
            z = z - z.max(axis=1, keepdims=True)
            log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
            rows = np.arange(len(gold))
            total -= log_probs[rows, gold].sum()
            onehot = np.zeros_like(z)
            onehot[rows, gold] = 1.0
            inner = ((np.exp(log_probs) - onehot) * s).sum(axis=1) * factor  # dNLL/d(phi . b) per question
            grad += phi.T @ inner
        return total / count, grad / count

    result = minimize(nll_and_grad, np.zeros(len(names)), jac=True, method="L-BFGS-B")
    return {f: float(w) for f, w in zip(names, result.x, strict=True)}


def fit_question_domain(embeddings: Mapping[str, Any], fitted: Mapping[str, Any] | None = None,
                        c: float = 1.0) -> mcq.QuestionDomain:
    """The question-domain head: a multinomial logistic regression (C = 1, scikit-learn's default, not tuned;
    balanced class weights, since the sets differ fifteenfold in size) over each class's training-split question
    embeddings.
    `fitted` (splits, counts) is kept in the head for whoever reads the record."""
    from sklearn.linear_model import LogisticRegression

    if set(embeddings) != set(mcq.QUESTION_DOMAINS):
        raise ValueError(f"the head needs embeddings of {', '.join(mcq.QUESTION_DOMAINS)}, got {sorted(embeddings)}")
    x = np.vstack([np.asarray(embeddings[name], float) for name in mcq.QUESTION_DOMAINS])
    y = np.concatenate([[k] * len(embeddings[name]) for k, name in enumerate(mcq.QUESTION_DOMAINS)])
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000).fit(x, y)
    return mcq.QuestionDomain(classes=list(mcq.QUESTION_DOMAINS), coef=model.coef_.tolist(),
                              intercept=model.intercept_.tolist(), fitted={**(fitted or {}), "C": c})


# The candidates `auto` may become: the method name reported, the features it reads, whether the letter prior is
# removed. `letter_debiased` and `combined` remove it; `letter` keeps the model's raw letter.
CANDIDATES: dict[str, tuple[tuple[str, ...], bool]] = {
    "letter": (("letter",), False),
    "letter_debiased": (("letter",), True),
    "cloze": (("cloze",), False),
    "cloze_norm": (("cloze_norm",), False),
    "cloze_pmi": (("cloze", "cloze_norm", "answer_prior"), False),
    "combined": (("letter", "cloze", "cloze_norm"), True),
}


def _distribution(plan: mcq.Plan, item: Scored) -> tuple[list[float], int]:
    """The plan's probabilities for one question and its answer, as an option index."""
    probs, answer = plan.distribution(item.scores)
    return list(probs.values()), list(probs).index(answer)


def evaluate(record: mcq.MCQCalibration, items: Sequence[Scored]) -> dict[str, Any]:
    plan = mcq.plan("auto", record)
    given = [_distribution(plan, i) for i in items]
    return summarize([p for p, _ in given], [i.gold for i in items], [a for _, a in given])


def _record(name: str, weights: dict[str, float], prior: dict[str, list[float]]) -> mcq.MCQCalibration:
    return mcq.MCQCalibration(method=name, weights=weights, letter_prior=prior)


def _fitted(items: Sequence[Scored], name: str, prior: dict[str, list[float]]) -> mcq.MCQCalibration:
    """The candidate's weights, then (when it reads cloze) its per-question sharpness."""
    features, debias = CANDIDATES[name]
    record = _record(name, fit_weights(items, features, prior if debias else None), prior)
    if any(f.startswith("cloze") for f in features) and all(i.scores.option_chars for i in items):
        record = record.model_copy(update={"scaling": fit_scaling(items, record)})
    return record


def held_out(items: Sequence[Scored], name: str, folds: int, seed: int = 0) -> list[tuple[list[float], int]]:
    """Per question, the probabilities and the answer (an option index) of the candidate fitted on every fold but
    the question's own."""
    _, debias = CANDIDATES[name]
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    given: list[tuple[list[float], int]] = [([], 0) for _ in items]
    for fold in range(folds):
        held = set(order[fold::folds])
        train = [item for i, item in enumerate(items) if i not in held]
        plan = mcq.plan("auto", _fitted(train, name, letter_prior(train) if debias else {}))
        for i in held:
            given[i] = _distribution(plan, items[i])
    return given


def cross_validated(items: Sequence[Scored], name: str, folds: int, seed: int = 0) -> dict[str, Any]:
    """The candidate fitted on all folds but one and measured on that one, for every fold: figures for questions
    the fit never saw, so the choice between candidates is not a choice of what fits its own data best."""
    given = held_out(items, name, folds, seed)
    return summarize([p for p, _ in given], [item.gold for item in items], [a for _, a in given])


def left_out_sets(scored: Mapping[str, Sequence[Scored]], name: str) -> dict[str, dict[str, Any]]:
    """Per set, the candidate's weights and sharpness fitted on the other sets' questions alone and measured on
    that one: nearer what its confidence is worth on a new benchmark or course than the cross-validated figures,
    which only hold out questions of sets the fit also learned from. Not all of the record is blind to the set
    left out: the method, the answer cue and the demonstrations were chosen with every set in view, and the
    question-domain head learned each set's training split but SciQ's. Empty with fewer than two sets."""
    _, debias = CANDIDATES[name]
    figures: dict[str, dict[str, Any]] = {}
    if len(scored) < 2:
        return figures
    for held, items in scored.items():
        train = [item for other, rest in scored.items() if other != held for item in rest]
        plan = mcq.plan("auto", _fitted(train, name, letter_prior(train) if debias else {}))
        given = [_distribution(plan, item) for item in items]
        figures[held] = summarize([p for p, _ in given], [item.gold for item in items], [a for _, a in given])
        figures[held]["confidence"] = float(np.mean([max(p) for p, _ in given]))
    return figures


def fit(items: Sequence[Scored], folds: int = 5) -> tuple[mcq.MCQCalibration, dict[str, dict[str, Any]]]:
    """Every candidate, measured by `folds`-fold cross-validation on `items`; the record keeps the most accurate
    (the combination only when it gains COMBINED_MIN_GAIN over the best single method, which costs fewer engine
    requests), fitted on all of `items`, and each single method's temperature. Returns the record and each
    candidate's figures: raw (every feature at weight 1: for cloze_pmi the answer prior is then added, not taken
    away, so `raw` is no PMI), cross-validated, and fitted (in-sample)."""
    if bad := non_finite(items):
        raise ValueError(f"{len(bad)} question(s) have a score that is not finite "
                         f"({', '.join(repr(i.id) for i in bad[:3])}): leave them out before fitting")
    have_letter = all(i.scores.letter is not None for i in items)
    have_cloze = all(i.scores.cloze is not None for i in items)
    have_prior = all(i.scores.answer_prior is not None for i in items)
    prior = letter_prior(items) if have_letter else {}
    figures: dict[str, dict[str, Any]] = {}
    fitted: dict[str, mcq.MCQCalibration] = {}
    for name, (features, _) in CANDIDATES.items():
        if (("letter" in features and not have_letter) or ("answer_prior" in features and not have_prior)
                or (any(f.startswith("cloze") for f in features) and not have_cloze)):
            continue
        record = _fitted(items, name, prior)
        fitted[name] = record
        figures[name] = {"weights": record.weights, "scaling": record.scaling,
                         "raw": evaluate(_record(name, {f: 1.0 for f in features}, prior), items),
                         "cross_validated": cross_validated(items, name, folds) if len(items) >= 2 * folds else None,
                         "fitted": evaluate(record, items)}
    if not fitted:
        raise ValueError("no method could be fitted: the validation questions carry neither letter nor cloze scores")

    def accuracy(name: str) -> float:
        return (figures[name]["cross_validated"] or figures[name]["fitted"])["accuracy"]

    best = max((n for n in fitted if n != "combined"), key=accuracy)
    if "combined" in fitted and accuracy("combined") >= accuracy(best) + COMBINED_MIN_GAIN:
        best = "combined"
    # A named method keeps its answer: its temperature alone (its weight, fitted before any per-question
    # sharpness), and none where the fit turned the scores' order around (a negative weight).
    temperatures = {name: 1.0 / fitted[name].weights[name] for name in ("letter", "cloze")
                    if name in fitted and fitted[name].weights[name] > 0}
    record = fitted[best].model_copy(update={
        "weights": {f: w for f, w in fitted[best].weights.items() if w}, "temperatures": temperatures,
        "validation": {"n": len(items), "chosen_by": f"{folds}-fold cross-validated accuracy"
                       if len(items) >= 2 * folds else "in-sample accuracy (too few questions to cross-validate)",
                       "candidates": {n: {"weights": f["weights"], "scaling": f["scaling"], **{
                           f"{stage}_{k}": f[stage][k] for stage in ("raw", "cross_validated", "fitted") if f[stage]
                           for k in ("accuracy", "nll", "ece")}} for n, f in figures.items()}}})
    return record, figures
