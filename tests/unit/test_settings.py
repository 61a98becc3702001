"""Engine settings the server and evals share: what reaches vLLM."""

from __future__ import annotations

import pytest

from zephyr.settings import Settings


def test_engine_kwargs_carry_a_block_size_small_enough_to_cache_the_system_prompt(monkeypatch, default_model):
    assert Settings().vllm_engine_kwargs(default_model.path)["block_size"] == 32
    monkeypatch.setenv("ZEPHYR_BLOCK_SIZE", "64")
    assert Settings().vllm_engine_kwargs(default_model.path)["block_size"] == 64


def test_bad_block_size_is_refused_with_the_setting_named(monkeypatch):
    monkeypatch.setenv("ZEPHYR_BLOCK_SIZE", "0")
    with pytest.raises(ValueError, match="block_size"):
        Settings()


def test_vllm_gets_every_cpu_core_unless_told_otherwise(monkeypatch):
    monkeypatch.setattr("zephyr.settings.container_cpu_quota", lambda: None)
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    assert Settings().vllm_environment() == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    monkeypatch.setenv("ZEPHYR_CPU_RESERVED_CORES", "1")
    assert Settings().vllm_environment() == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}
    # vLLM's own variable, set explicitly by an operator, wins.
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    monkeypatch.setenv("ZEPHYR_CPU_RESERVED_CORES", "0")
    assert Settings().vllm_environment() == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}
    assert Settings().cpu_reserved_cores_in_effect == "1"


@pytest.mark.parametrize(("files", "quota"), [
    ({"cpu.max": "200000 100000\n"}, 2.0),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "150000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1.5),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
    ({"cpu.max": "garbage"}, None),
])
def test_the_containers_cpu_quota_is_read_from_cgroup_v2_or_v1(tmp_path, files, quota):
    from zephyr.settings import container_cpu_quota

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert container_cpu_quota(tmp_path) == quota


def test_under_a_cpu_quota_smaller_than_the_cpu_set_vllm_threads_are_sized_to_the_quota(monkeypatch):
    import zephyr.settings as settings_module
    from zephyr import memory

    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(memory, "kv_cache_on_host", lambda: True)
    monkeypatch.setattr(settings_module.os, "sched_getaffinity", lambda _pid: set(range(64)))
    monkeypatch.setattr(settings_module, "container_cpu_quota", lambda: 2.5)
    assert Settings().vllm_environment() == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
                                             "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "2"}
    # A quota as large as the CPU set (the static CPU manager's exclusive cores) leaves vLLM's binding alone.
    monkeypatch.setattr(settings_module.os, "sched_getaffinity", lambda _pid: {0, 1})
    monkeypatch.setattr(settings_module, "container_cpu_quota", lambda: 2.0)
    assert Settings().vllm_environment() == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    # So do a GPU build (whose worker sets its own threads) and an operator's own binding or thread count.
    monkeypatch.setattr(settings_module.os, "sched_getaffinity", lambda _pid: set(range(64)))
    monkeypatch.setattr(settings_module, "container_cpu_quota", lambda: 2.5)
    monkeypatch.setattr(memory, "kv_cache_on_host", lambda: False)
    assert Settings().vllm_environment() == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    monkeypatch.setattr(memory, "kv_cache_on_host", lambda: True)
    for name, value in (("VLLM_CPU_OMP_THREADS_BIND", "0-1"), ("OMP_NUM_THREADS", "4")):
        with monkeypatch.context() as operator:
            operator.setenv(name, value)
            assert Settings().vllm_environment() == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


@pytest.mark.parametrize(("name", "value"), [("ZEPHYR_REVIEW_SESSION_HOURS", "1e9"), ("ZEPHYR_LOG_QUEUE_SIZE", "0"),
                                             ("ZEPHYR_PORT", "70000"), ("ZEPHYR_MAX_MODEL_LEN", "0"),
                                             ("ZEPHYR_DTYPE", "fp8"),
                                             ("ZEPHYR_REVIEW_CANDIDATE_MODEL", "m" * 129)])  # the log's column
def test_settings_out_of_their_bounds_are_refused_at_start(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name.removeprefix("ZEPHYR_").lower()):
        Settings()


@pytest.mark.parametrize("value", ["600 a minute", "0/minute", "5/minute;100/hour"])
def test_a_limit_is_one_positive_item_or_empty(monkeypatch, value):
    """A limit that does not parse would fail the server as it builds its limiters, "0/minute" would refuse every
    request with a 429 to retry, and a second item would be silently ignored."""
    monkeypatch.setenv("ZEPHYR_SIGN_IN_LIMIT", value)
    with pytest.raises(ValueError, match="ZEPHYR_SIGN_IN_LIMIT .*600/minute"):
        Settings()
    for kept in ("", "5/second", "30 per hour"):
        monkeypatch.setenv("ZEPHYR_SIGN_IN_LIMIT", kept)
        assert Settings().sign_in_limit == kept


def test_a_refused_setting_never_quotes_its_value(monkeypatch):
    monkeypatch.setenv("ZEPHYR_SESSION_SECRET", "too-short-but-a-real-secret")
    monkeypatch.setenv("ZEPHYR_API_KEYS", "admin:sup3r-secret-key")
    with pytest.raises(ValueError) as refused:
        Settings()
    assert "session_secret" in str(refused.value)
    assert "too-short-but-a-real-secret" not in str(refused.value) and "sup3r" not in str(refused.value)


@pytest.mark.parametrize(("value", "named"), [
    ('["EMAIL", "PHONE_NUMBER"]', "names 'EMAIL'"),  # misspelt: students' emails would reach the log unredacted
    ("[]", "is empty, so redaction would find nothing"),
])
def test_pii_entities_must_name_what_the_redactor_finds(monkeypatch, value, named):
    monkeypatch.setenv("ZEPHYR_PII_ENTITIES", value)
    with pytest.raises(ValueError, match=named):
        Settings()
    monkeypatch.setenv("ZEPHYR_PII_REDACTION", "false")  # off, an empty list is no mistake
    assert Settings(pii_entities=[]).pii_entities == []


def test_a_student_id_pattern_that_does_not_compile_is_refused_at_start(monkeypatch):
    monkeypatch.setenv("ZEPHYR_STUDENT_ID_PATTERN", "[A-Z")
    with pytest.raises(ValueError, match="ZEPHYR_STUDENT_ID_PATTERN is not a regular expression"):
        Settings()


@pytest.mark.parametrize("pattern", ["", "a*", r"\d{0,3}"])
def test_a_student_id_pattern_that_matches_nothing_at_all_is_refused(monkeypatch, pattern):
    """`ZEPHYR_STUDENT_ID_PATTERN=` compiled, and redacted no student id, silently."""
    monkeypatch.setenv("ZEPHYR_STUDENT_ID_PATTERN", pattern)
    with pytest.raises(ValueError, match="matches the empty string"):
        Settings()


@pytest.mark.parametrize("name", ["LOG_RETENTION_DAYS", "KV_CACHE_GIB", "MCQ_MIN_CONFIDENCE", "SAFETY_THRESHOLD",
                                  "MAX_PROMPT_TOKENS", "MAX_PROMPT_CHARS"])
def test_an_optional_number_left_empty_is_its_default(monkeypatch, name):
    """A chart's `config` value left "" stopped the server: "Input should be a valid integer"."""
    monkeypatch.setenv(f"ZEPHYR_{name}", "")
    assert getattr(Settings(), name.lower()) is None


def test_a_keys_file_saved_with_a_byte_order_mark_reads_as_its_text(tmp_path):
    """Windows editors save UTF-8 with a BOM: line 1 was refused, or the BOM became part of a key's name."""
    keys = tmp_path / "keys"
    keys.write_text("teacher=admin:an-admin-key-000000001\n", encoding="utf-8-sig")
    assert Settings(api_keys_file=keys).api_key_entries == [("admin", "an-admin-key-000000001", "teacher")]


def test_a_key_given_two_roles_is_refused_without_quoting_it(tmp_path):
    """A stale `admin:K` in the keys file would otherwise silently promote a key meant to be a student's."""
    key = "a-student-key-0000001"
    keys = tmp_path / "keys"
    keys.write_text(f"admin:{key}\n")
    with pytest.raises(ValueError, match="ZEPHYR_API_KEYS_FILE line 1 gives the key of ZEPHYR_API_KEYS entry 1") as err:
        _ = Settings(api_keys=f"student:{key}", api_keys_file=keys).api_key_entries
    assert key not in str(err.value)
    keys.write_text(f"student:{key}\n")  # the same entry twice is one entry
    assert Settings(api_keys=f"student:{key}", api_keys_file=keys).api_key_entries == [("student", key, None)]


def test_a_variable_that_names_no_setting_is_named_at_start_with_the_one_meant(monkeypatch):
    """`ZEPHYR_DRAIN_SECOND=120` (or a chart's `config` key misspelt) was ignored without a word: the default
    served. The tools' own variables are not the server's to warn of."""
    from zephyr.settings import unknown_variables

    environ = {"ZEPHYR_DRAIN_SECOND": "120", "zephyr_max_num_seqs": "8", "ZEPHYR_SAFETY_GARD": "false",
               "ZEPHYR_NOTHING_LIKE_IT": "1", "ZEPHYR_LOAD_EVENTS": "e.jsonl", "ZEPHYR_TEST_POSTGRES_URL": "u",
               "ZEPHYR_API_KEY": "k", "ZEPHYR_HELM": "helm", "PATH": "/bin",
               # Kubernetes' service links for a Service named "zephyr" (the chart turns them off)
               "ZEPHYR_SERVICE_HOST": "10.0.0.1", "ZEPHYR_SERVICE_PORT_HTTP": "80", "ZEPHYR_PORT_80_TCP_ADDR": "x"}
    assert unknown_variables(environ) == [
        "ZEPHYR_DRAIN_SECOND is no setting and is ignored; did you mean ZEPHYR_DRAIN_SECONDS?",
        "ZEPHYR_NOTHING_LIKE_IT is no setting and is ignored",
        "ZEPHYR_SAFETY_GARD is no setting and is ignored; did you mean ZEPHYR_SAFETY_GUARD?"]


async def test_the_server_warns_of_them_as_it_starts(monkeypatch, caplog, app_factory):
    import logging

    monkeypatch.setenv("ZEPHYR_DRAIN_SECOND", "120")
    with caplog.at_level(logging.WARNING, logger="zephyr.service"):
        async with app_factory():
            pass
    assert "ZEPHYR_DRAIN_SECOND is no setting and is ignored; did you mean ZEPHYR_DRAIN_SECONDS?" in [
        record.getMessage() for record in caplog.records if record.name == "zephyr.service"]


@pytest.mark.parametrize("value", ["", "   "])
def test_a_blank_system_prompt_is_refused_with_the_way_to_send_none(monkeypatch, value):
    """A chart value left "" sent an empty system turn, which also replaced the chat template's own default."""
    monkeypatch.setenv("ZEPHYR_SYSTEM_PROMPT", value)
    with pytest.raises(ValueError, match="ZEPHYR_SYSTEM_PROMPT_ENABLED=false"):
        Settings()
    monkeypatch.setenv("ZEPHYR_SYSTEM_PROMPT_ENABLED", "false")  # what the message says: then it is never sent
    assert Settings().served_system_prompt is None
