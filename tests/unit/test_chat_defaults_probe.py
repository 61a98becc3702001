"""How a free-text answer is read against the question's options (`offline.benchmarks.answer_verdict`: the text
suite's names_key / names_distractor, the chat-answer pairs and tools.chat_defaults_probe), and the probe's settings
(its engine part runs on demand only)."""

from __future__ import annotations

from offline.benchmarks import answer_verdict as judge
from tools.chat_defaults_probe import parse_settings

OPTIONS = ["oxygen", "carbon dioxide", "helium", "neon"]


def test_an_answer_is_right_only_when_it_names_the_key_and_no_distractor():
    assert judge("Plants take in Carbon-Dioxide from the air.", OPTIONS, 1) == "right"
    assert judge("They take in oxygen.", OPTIONS, 1) == "wrong"
    assert judge("Oxygen, or maybe carbon dioxide.", OPTIONS, 1) == "both"
    assert judge("Plants are green.", OPTIONS, 1) == "neither"
    assert judge("Neonatal plants grow.", OPTIONS, 1) == "neither"  # whole words only
    assert judge("Carbon dioxide!", OPTIONS + ["?!"], 1) == "right"  # an option without words is never named
    assert judge("", OPTIONS, 0) == "neither"


def test_settings_are_temperature_top_p_and_repetition_penalty():
    assert parse_settings("1.0/1.0/1.0,0.3/0.9/1.1") == [(1.0, 1.0, 1.0), (0.3, 0.9, 1.1)]


def test_bad_settings_and_a_missing_out_folder_are_refused_before_any_engine_loads(tmp_path):
    import pytest
    import typer

    from tools import check_out_folder
    from tools.chat_defaults_probe import parse_settings

    assert parse_settings("1.0/1.0/1.0,0.3/0.9/1.1") == [(1.0, 1.0, 1.0), (0.3, 0.9, 1.1)]
    with pytest.raises(typer.BadParameter, match="'0.3/0.9' is not temperature/top_p/repetition_penalty"):
        parse_settings("1.0/1.0/1.0,0.3/0.9")
    check_out_folder(tmp_path / "answers.json")
    check_out_folder(None)
    with pytest.raises(SystemExit, match="--out: the folder .*nodir does not exist"):
        check_out_folder(tmp_path / "nodir" / "answers.json")
