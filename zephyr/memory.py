"""How much memory an engine needs, and whether it fits, before vLLM is asked for it.

vLLM's `gpu_memory_utilization` is a share of the *whole* host's RAM on CPU: a server and an evaluation on one box
each asked for 35% of it for their KV caches, and the second engine was killed by the kernel with nothing but
`EngineDeadError` to show. Here the KV cache is sized by what the settings can use at once (`max_model_len` tokens
for each of `max_num_seqs` sequences), capped by the share, and an engine that would not fit in the memory
available now is refused in one line that says what to set."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from zephyr.numerics import config_dtype, is_quantized, resolve_dtype
from zephyr.settings import CGROUP_ROOT

GIB = 2**30
# What an engine holds beside its weights and KV cache (Python, torch, vLLM's processes and buffers): measured for
# the server on SmolLM2-135M as 2.8 GiB for server + EngineCore + worker minus weights (docs/operations.md).
ENGINE_OVERHEAD_BYTES = int(2.5 * GIB)
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}


class EngineSizing(Protocol):
    max_model_len: int
    max_num_seqs: int
    memory_share: float
    kv_cache_gib: float | None
    dtype: str


class EngineWontStart(RuntimeError):
    """An engine these settings would not start here; the message says what to set."""


class NotEnoughMemory(EngineWontStart):
    """An engine that would not fit in the memory available now; the message says what to set."""


@dataclass(frozen=True)
class MemoryPlan:
    kv_cache_bytes: int
    weights_bytes: int
    needed_bytes: int  # weights + KV cache + the engine's own overhead
    available_bytes: int | None  # what the host (or the container's memory limit) has free now; None: unknown

    @property
    def problem(self) -> str | None:
        if self.available_bytes is None or self.needed_bytes <= self.available_bytes:
            return None
        return (f"the engine needs about {self.needed_bytes / GIB:.1f} GiB (KV cache {self.kv_cache_bytes / GIB:.1f}, "
                f"weights {self.weights_bytes / GIB:.1f}, runtime {ENGINE_OVERHEAD_BYTES / GIB:.1f}) but "
                f"{self.available_bytes / GIB:.1f} GiB is available: lower ZEPHYR_KV_CACHE_GIB, ZEPHYR_MAX_NUM_SEQS or "
                "ZEPHYR_MAX_MODEL_LEN, or stop another engine on this machine")


def kv_bytes_per_token(model_path: Path, dtype: str = "auto") -> int:
    """Keys and values of every layer for one token, from the model's config.json."""
    whole = json.loads((Path(model_path) / "config.json").read_text())
    config = whole.get("text_config", whole)
    missing = [key for key in ("num_hidden_layers", "num_attention_heads", "hidden_size") if key not in config]
    if missing:  # another architecture's names (n_layer, n_head): no size to reckon with
        raise ValueError(f"{Path(model_path) / 'config.json'} has no {', '.join(missing)}, so the KV cache cannot be "
                         "sized from it; set ZEPHYR_KV_CACHE_GIB")
    layers = config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    name = resolve_dtype(whole, dtype)
    return 2 * layers * kv_heads * head_dim * DTYPE_BYTES.get(name, 2)


def total_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# (folder under the root, limit file, usage file, the memory.stat line of reclaimable file cache), v2 then v1
_CGROUP_FILES = (("", "memory.max", "memory.current", "inactive_file"),
                 ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"))


def _cgroup_paths(membership: str) -> tuple[str, str]:
    """This process's memory cgroup in the v2 and the v1 hierarchy, from /proc/self/cgroup ("/" where unnamed)."""
    v2 = v1 = "/"
    for line in membership.splitlines():
        number, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if number == "0" and controllers == "":
            v2 = path or "/"
        elif "memory" in controllers.split(","):
            v1 = path or "/"
    return v2, v1


def _cgroup_free(root: Path = CGROUP_ROOT, membership: str | None = None) -> int | None:
    """The least headroom of this process's memory cgroup and of those above it (cgroup v2, then v1): its limit
    less what it uses, counting as the kubelet does (its working set: the inactive file cache is reclaimed before
    an OOM kill, so a container that has read gigabytes of files is not full). The cgroup is the process's own,
    not only the root's: under systemd's MemoryMax, a batch job or a container without its own cgroup namespace,
    the limit sits below the root. None where no limit applies."""
    if membership is None:
        try:
            membership = Path("/proc/self/cgroup").read_text()
        except OSError:
            membership = ""
    headrooms = []
    for (hierarchy, limit_name, usage_name, cache_line), own in zip(_CGROUP_FILES, _cgroup_paths(membership),
                                                                    strict=True):
        base = root / hierarchy if hierarchy else root
        parts = [part for part in own.split("/") if part and part != ".."]
        for depth in range(len(parts), -1, -1):  # the process's own cgroup first, then each one above it
            folder = base.joinpath(*parts[:depth])
            try:
                limit = (folder / limit_name).read_text().strip()
                usage = int((folder / usage_name).read_text().strip())
            except (OSError, ValueError):
                continue
            if not limit.isdigit() or int(limit) >= total_bytes():
                continue
            try:
                stat = dict(line.split()[:2] for line in (folder / "memory.stat").read_text().splitlines()
                            if len(line.split()) >= 2)
                cache = int(stat.get(cache_line, 0))
            except (OSError, ValueError):
                cache = 0
            headrooms.append(int(limit) - max(usage - cache, 0))
        if headrooms:  # v2 found a limit: v1's files, if any are mounted too, are not this process's
            break
    return min(headrooms) if headrooms else None


def available_bytes() -> int | None:
    """MemAvailable, or the container's headroom where that is smaller; None where neither can be read."""
    host = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                host = int(line.split()[1]) * 1024
    except OSError:
        pass
    container = _cgroup_free()
    known = [v for v in (host, container) if v is not None]
    return min(known) if known else None


@functools.cache
def kv_cache_on_host() -> bool:
    """Whether vLLM keeps weights and KV cache in this host's RAM (its CPU build) rather than in an accelerator's
    memory, where its own `gpu_memory_utilization` sizes the cache and checks that it fits."""
    try:
        from vllm.platforms import current_platform
    except ImportError:  # no vLLM: nothing to size
        return True
    return current_platform.is_cpu()


def kv_cache_bytes(model_path: Path, settings: EngineSizing) -> int | None:
    """ZEPHYR_KV_CACHE_GIB when set; on CPU otherwise what `max_num_seqs` full-length sequences can use, capped by
    `memory_share` of the host's RAM (vLLM's own reading of the share on CPU); on a GPU otherwise None, leaving
    vLLM to give the cache `memory_share` of the device's memory."""
    if settings.kv_cache_gib:
        return int(settings.kv_cache_gib * GIB)
    if not kv_cache_on_host():
        return None
    need = kv_bytes_per_token(model_path, settings.dtype) * settings.max_model_len * settings.max_num_seqs
    return min(need, int(settings.memory_share * total_bytes()))


def weights_bytes(model_path: Path) -> int:
    return sum(p.stat().st_size for p in Path(model_path).glob("*.safetensors")) or \
        sum(p.stat().st_size for p in Path(model_path).glob("*.bin"))


def widening(model_path: Path, dtype: str = "auto") -> float:
    """How much larger an unquantized checkpoint's weights are in memory than on disk: 2 for bf16 computed in fp32
    (a bf16 checkpoint on a CPU without AMX, zephyr.numerics.resolve_dtype)."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    if is_quantized(config):
        return 1.0
    stored = DTYPE_BYTES.get(config_dtype(config), 2)
    return DTYPE_BYTES.get(resolve_dtype(config, dtype), stored) / stored


def plan(model_path: Path, settings: EngineSizing) -> MemoryPlan:
    """What the engine needs of this host's RAM: on a GPU its weights and KV cache live in the device's memory,
    which vLLM checks itself, and only the runtime is counted here."""
    on_host = kv_cache_on_host()
    kv = (kv_cache_bytes(model_path, settings) or 0) if on_host else 0
    weights = int(weights_bytes(model_path) * widening(model_path, settings.dtype)) if on_host else 0
    return MemoryPlan(kv, weights, kv + weights + ENGINE_OVERHEAD_BYTES, available_bytes())


CPU_BLOCK_MULTIPLE = 32  # vLLM's CPU attention backend takes KV blocks of a multiple of 32 tokens


def block_size_problem(block_size: int) -> str | None:
    """Why vLLM here would refuse this KV block size, or None: its CPU backend raises only after the model loaded."""
    if kv_cache_on_host() and block_size % CPU_BLOCK_MULTIPLE:
        return (f"ZEPHYR_BLOCK_SIZE={block_size}: vLLM's CPU backend takes KV cache blocks of a multiple of "
                f"{CPU_BLOCK_MULTIPLE} tokens; set {CPU_BLOCK_MULTIPLE}, {2 * CPU_BLOCK_MULTIPLE}, ...")
    return None


def check_engine(model_path: Path, settings: EngineSizing, block_size: int) -> None:
    """Raise EngineWontStart (NotEnoughMemory for memory) for an engine these settings would not start here, before
    it loads anything."""
    if problem := block_size_problem(block_size):
        raise EngineWontStart(problem)
    if problem := plan(model_path, settings).problem:
        raise NotEnoughMemory(problem)


def oom_kills() -> int | None:
    """The kernel's count of out-of-memory kills in this cgroup (v2 memory.events, v1 memory.oom_control)."""
    for path in ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"):
        try:
            for line in Path(path).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            continue
    return None
