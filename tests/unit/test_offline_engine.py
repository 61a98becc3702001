"""Offline engines are built with vLLM's core in process, and the environment is left as it was found, whether the
build succeeds or fails, so a server started later as a process of its own keeps vLLM's default."""

from __future__ import annotations

import contextlib
import os

import pytest

from offline.engine import IN_PROCESS_FLAG, _engine_core_in_process


@pytest.mark.parametrize("previous", [None, "1", "0"])
@pytest.mark.parametrize("fails", [False, True])
def test_the_flag_holds_while_the_engine_is_built_and_is_restored_after(previous, fails, monkeypatch):
    if previous is None:
        monkeypatch.delenv(IN_PROCESS_FLAG, raising=False)
    else:
        monkeypatch.setenv(IN_PROCESS_FLAG, previous)
    with pytest.raises(RuntimeError) if fails else contextlib.nullcontext():
        with _engine_core_in_process():
            assert os.environ[IN_PROCESS_FLAG] == "0"
            if fails:
                raise RuntimeError("the engine failed to start")
    assert os.environ.get(IN_PROCESS_FLAG) == previous

