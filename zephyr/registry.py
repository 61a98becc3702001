"""The model registry: `$ZEPHYR_HOME/models/<name>/`, each a plain Hugging Face folder plus `zephyr.json`."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import re
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from zephyr.clock import utc
from zephyr.mcq import MCQCalibration
from zephyr.paths import fresh_aside, write_text_atomic

MANIFEST = "zephyr.json"
log = logging.getLogger("zephyr.registry")
METHODS = ("base", "sft", "rm", "dpo", "kto", "rs", "grpo", "gptq", "awq", "w8a8", "easyquant", "bnb", "imported")
Method = Literal["base", "sft", "rm", "dpo", "kto", "rs", "grpo", "gptq", "awq", "w8a8", "easyquant", "bnb",
                 "imported"]
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}\Z")  # no '/', no leading '.', no trailing newline
NAME_RULE = "lowercase letters, digits, '.', '_' or '-', starting with a letter or digit (max 64)"


def _unstage(source: Path, staging: Path, *, renamed: bool) -> None:
    """Undo a failed add: a copy is deleted (its source is whole: a move across filesystems deletes the source only
    once the entry is in); a folder renamed in is the only copy of its weights, and is renamed back."""
    if not renamed:
        shutil.rmtree(staging, ignore_errors=True)
        return
    (staging / MANIFEST).unlink(missing_ok=True)
    try:
        staging.rename(source)
    except OSError as exc:
        raise RegistryError(f"adding {source} failed, and its folder could not be moved back ({exc}): it is in "
                            f"{staging}; move it back to {source} before adding it again") from None


class RegistryError(Exception):
    """A registry operation that cannot be done; the message says what to do instead."""


def check_name(name: str) -> str:
    """The one check every model name passes before it becomes part of a path (registry folders, staging folders,
    quantization and training run folders, eval results): the name itself, or RegistryError. A name such as
    `../..` or `/abs/dir` would otherwise make a file operation (even a folder deletion) reach outside its folder."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise RegistryError(f"model name {name!r} must be {NAME_RULE}")
    return name


class ModelManifest(BaseModel):
    name: str
    parent: str | None = None
    method: Method
    recipe: dict[str, Any] | None = None
    recipe_digest: str | None = None
    data_digest: str | None = None
    source: str | None = None
    stats: dict[str, Any] = {}  # what making it measured: time, sizes (quantization), ...
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    evals: dict[str, Any] = {}
    mcq_calibration: MCQCalibration | None = None  # `zephyr eval calibrate`: how /mcq's `auto` answers
    # True when the record is the one shipped with the code (zephyr/calibrations/), which `models prepare` brings up
    # to date after an upgrade; False for an operator's own `zephyr eval calibrate`, which is never replaced.
    mcq_calibration_shipped: bool = False

    @property
    def created_at_utc(self) -> datetime:
        """`created_at` in UTC (a hand-written manifest's naive time read as UTC). Kept as written in the field:
        results and training folders saved earlier compare with it."""
        return utc(self.created_at)

    @property
    def revision(self) -> str:
        """Which weights this entry holds, as generation rows record it (`model_revision`): the bundled base
        model's GGUF digest (the same bytes wherever it is prepared), else when the entry was made, to the second
        (a copied registry folder keeps it; an entry remade under its name gets another)."""
        if self.method == "base" and self.data_digest:
            return self.data_digest
        return f"made:{self.created_at_utc.replace(microsecond=0).isoformat()}"


class RegistryEntry(BaseModel):
    manifest: ModelManifest
    path: Path

    @property
    def name(self) -> str:
        return self.manifest.name

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


# Files that make a folder a complete model beside its weights and config (save_pretrained and the quantizers
# write only the model): the tokenizer, its chat template and generation defaults.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "generation_config.json", "vocab.json", "merges.txt",
                   "added_tokens.json")


def copy_tokenizer_files(source: Path, target: Path, *, replace: bool = True) -> list[str]:
    """Copies whichever of TOKENIZER_FILES `source` has into `target`; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file() and (replace or not (target / name).is_file()):
            shutil.copy2(source / name, target / name)
            copied.append(name)
    return copied


def check_hf_folder(path: Path) -> None:
    """Raise RegistryError unless `path` holds what vLLM needs: config, tokenizer with chat template, weights."""
    if not path.is_dir():
        raise RegistryError(f"{path} is not a folder")
    if not (path / "config.json").is_file():
        raise RegistryError(f"{path} has no config.json: give a Hugging Face model folder")
    if not any(path.glob("*.safetensors")):
        raise RegistryError(f"{path} has no *.safetensors weights (convert .bin weights with save_pretrained)")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file():
        raise RegistryError(f"{path} has no tokenizer.json or tokenizer.model")
    has_template = (path / "chat_template.jinja").is_file() or "chat_template" in _read_json(
        path / "tokenizer_config.json"
    )
    if not has_template:
        raise RegistryError(f"{path} has no chat template (tokenizer_config.json chat_template or chat_template.jinja)")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text())
    except ValueError as exc:  # bad JSON or not UTF-8
        raise RegistryError(f"{path} is not valid JSON ({exc}); fix or replace it") from None
    if not isinstance(content, dict):
        raise RegistryError(f"{path} holds a JSON {type(content).__name__}, not an object; fix or replace it")
    return content


# `zephyr quantize`'s methods, as a manifest's `method` names them: an entry made by one holds its parent's weights,
# compressed, and is measured and asked as its parent is.
QUANT_METHODS = ("gptq", "awq", "w8a8", "easyquant", "bnb")


def quantization_config(model: RegistryEntry | Path) -> dict[str, Any] | None:
    """The `quantization_config` of a model folder's config.json (None for an unquantized model)."""
    path = model.path if isinstance(model, RegistryEntry) else Path(model)
    return _read_json(path / "config.json").get("quantization_config")


def not_a_full_precision_chat_model(entry: RegistryEntry) -> str | None:
    """Why `entry` cannot be what quantizing or training starts from, or None: a quantized checkpoint (a copy of its
    parent's weights, compressed), or no causal language model (loaded as one, a reward model loses its score head
    and would be registered as a chat model)."""
    config = _read_json(entry.path / "config.json")
    if config.get("quantization_config") or entry.manifest.method in QUANT_METHODS:
        # EasyQuant's dequantized form holds plain 16-bit weights: only its manifest says they were quantized.
        how = (config.get("quantization_config") or {}).get("quant_method") or entry.manifest.method
        return f"{entry.name} is already quantized ({how}); start from its unquantized parent" + (
            f", {entry.manifest.parent}" if entry.manifest.parent else "")
    architectures = config.get("architectures") or []
    if entry.manifest.method == "rm" or not any(a.endswith("ForCausalLM") for a in architectures):
        return (f"{entry.name} is no causal language model ({entry.manifest.method} entry, "
                f"{', '.join(architectures) or 'no architectures in config.json'}); start from a chat model")
    return None


# Heads that score a text instead of continuing it (a reward model is a sequence classifier). Only these are
# refused for serving: vLLM serves chat models under many names (GPT2LMHeadModel, Gemma3ForConditionalGeneration).
SCORING_HEADS = ("ForSequenceClassification", "ForTokenClassification", "RewardModel", "ForRewardModeling")


def is_bitsandbytes(model: RegistryEntry | Path) -> bool:
    return (quantization_config(model) or {}).get("quant_method") == "bitsandbytes"


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def is_weight_only_int4(model: RegistryEntry | Path) -> bool:
    """A compressed-tensors checkpoint with 4-bit weights and unquantized activations (W4A16: gptq, awq and
    easyquant's packed form)."""
    config = quantization_config(model) or {}
    if config.get("quant_method") != "compressed-tensors":
        return False
    groups = (config.get("config_groups") or {}).values()
    return any((group.get("weights") or {}).get("num_bits") == 4 and not group.get("input_activations")
               for group in groups)


@functools.cache
def vllm_cpu_lacks_int4_kernel() -> str | None:
    """The CPU's instruction set where vLLM's CPU build runs here without its 4-bit weight-only GEMM, else None.
    vLLM ships that kernel (`cpu_gemm_wna16`) only in its AVX-512 library: on an AVX2 CPU a W4A16 engine starts
    and dies at its first forward pass."""
    try:
        import torch
        from vllm.platforms import current_platform
    except ImportError:
        return None
    if not current_platform.is_cpu():
        return None
    import vllm._custom_ops  # noqa: F401  (loads the CPU build's kernel library for this CPU)

    return None if hasattr(torch.ops._C, "cpu_gemm_wna16") else torch.backends.cpu.get_cpu_capability()


def vllm_serving_problem(model: RegistryEntry | Path, name: str | None = None) -> str | None:
    """Why vLLM cannot serve this checkpoint on this machine, or None. Checked before vLLM starts, so the
    message names the way out instead of an engine traceback a minute later."""
    name = name or (model.name if isinstance(model, RegistryEntry) else Path(model).name)
    path = model.path if isinstance(model, RegistryEntry) else Path(model)
    architectures = _read_json(path / "config.json").get("architectures") or []
    if architectures and all(a.endswith(SCORING_HEADS) for a in architectures):  # no text to generate or score
        return (f"model {name} is a reward or classification model ({', '.join(architectures)}): it scores answers "
                "(`zephyr eval run --reward-model`); serve, evaluate or sample from a chat model")
    if is_weight_only_int4(model) and (capability := vllm_cpu_lacks_int4_kernel()):
        return (f"model {name} has 4-bit weights, and vLLM's CPU build has no 4-bit kernel for this CPU "
                f"({capability}; vLLM builds it for AVX-512 only). Serve it on a CPU with AVX-512 or a GPU, or "
                "serve a w8a8 or `easyquant --form dequantized` variant here")
    if not is_bitsandbytes(model) or cuda_available():
        return None
    config = quantization_config(model) or {}
    bits = "8-bit" if config.get("load_in_8bit") else "4-bit"
    return (f"model {name} is a bitsandbytes {bits} checkpoint; vLLM serves bitsandbytes only on CUDA GPUs. "
            "Serve a compressed-tensors variant (gptq, awq, w8a8, easyquant) on this machine or evaluate it "
            "with `zephyr eval run` (transformers)")


def digest_file(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


class Registry:
    def __init__(self, models_dir: Path):
        self.models_dir = Path(models_dir)

    def path_of(self, name: str) -> Path:
        """A model's folder; every file operation on the registry goes through here (RegistryError for a name
        that is not a registry name)."""
        return self.models_dir / check_name(name)

    def _staging_of(self, name: str) -> Path:
        return self.path_of(name).with_name(f".{name}.incoming")

    def _has_manifest(self, folder: Path) -> bool:
        """Whether `folder` holds an entry's manifest; a folder that cannot be looked into (another account's, mode
        000: Python 3.11 raises there rather than say False) is a RegistryError, not a traceback."""
        try:
            return (folder / MANIFEST).is_file()
        except OSError as exc:
            raise RegistryError(f"cannot look into {folder} ({exc.strerror or exc}); give this account access to it, "
                                "or delete it") from None

    def _folders(self) -> list[Path]:
        """The entries' folders: not staging or replaced ones (hidden), nor a folder without a manifest. A folder
        that cannot be looked into is one when its name is a model's (it may be a child: `children_of` must not pass
        it over), and skipped with a warning when it is not (`lost+found` on a volume's root)."""
        if not self.models_dir.is_dir():
            return []
        folders = []
        for folder in sorted(self.models_dir.iterdir()):
            if folder.name.startswith("."):
                continue
            try:
                if self._has_manifest(folder):
                    folders.append(folder)
            except RegistryError as exc:
                if NAME_PATTERN.fullmatch(folder.name):
                    folders.append(folder)
                else:
                    log.warning("skipping a folder: %s", exc)
        return folders

    def list(self) -> list[RegistryEntry]:
        entries = []
        for folder in self._folders():
            try:
                entries.append(self._load(folder))
            except RegistryError as exc:  # one damaged manifest must not hide every other model
                log.warning("skipping a model: %s", exc)
        return entries

    def get(self, name: str) -> RegistryEntry:
        folder = self.path_of(name)
        if not self._has_manifest(folder):
            known = ", ".join(e.name for e in self.list()) or "none yet"
            raise RegistryError(f"no model {name!r} in the registry ({self.models_dir}); known: {known}")
        return self._load(folder)

    def exists(self, name: str) -> bool:
        return self._has_manifest(self.path_of(name))

    def _load(self, folder: Path) -> RegistryEntry:
        try:
            manifest = ModelManifest.model_validate_json((folder / MANIFEST).read_text())
        except ValueError as exc:
            raise RegistryError(f"{folder / MANIFEST} cannot be read ({str(exc).splitlines()[0]}); restore it, or "
                                f"delete the folder {folder}") from None
        except OSError as exc:  # another account's folder, a disk error: one line, not a traceback
            raise RegistryError(f"{folder / MANIFEST} cannot be read ({exc.strerror or exc}); give this account "
                                f"access to {folder}, or delete it") from None
        # The manifest's name is the model's identity for every later write (its results, its evals, its
        # calibration): a folder copied by hand, or a name edited in, would write them into another model's place.
        if manifest.name != folder.name:
            raise RegistryError(f"{folder / MANIFEST} names the model {manifest.name!r}, not {folder.name!r} as its "
                                f"folder does: set \"name\" to {folder.name!r} (a copied model), or delete the folder")
        if manifest.parent is not None:
            try:
                check_name(manifest.parent)
            except RegistryError:
                raise RegistryError(f"{folder / MANIFEST} names the parent {manifest.parent!r}, which is no model "
                                    f"name ({NAME_RULE}); restore it, or delete the folder {folder}") from None
        return RegistryEntry(manifest=manifest, path=folder)

    def add(
        self, source: Path, manifest: ModelManifest, *, move: bool = False, overwrite: bool = False,
        parent_revision: str | None = None,
    ) -> RegistryEntry:
        """Copy (or move) a Hugging Face folder into the registry under manifest.name, atomically. `parent_revision`:
        the parent's `revision` when the new weights were made from it, refused if its name now holds others (a
        retrain with --overwrite during a long quantize run)."""
        target = self.path_of(manifest.name)  # the name is checked before anything else
        if manifest.method not in METHODS:
            raise RegistryError(f"method {manifest.method!r} must be one of {', '.join(METHODS)}")
        source = Path(source)
        check_hf_folder(source)
        self._check_parent(manifest, parent_revision)  # before anything is made on disk
        with self._writing():
            # again under the lock: a removal or replacement of the parent may have come first
            self._check_parent(manifest, parent_revision)
            self.check_free(manifest.name, overwrite)  # again under the lock: another writer may have taken it
            staging = self._staging_of(manifest.name)
            shutil.rmtree(staging, ignore_errors=True)
            renamed = False
            try:
                if move:
                    try:
                        source.rename(staging)  # one filesystem: the folder itself moves, nothing is copied
                        renamed = True
                    except OSError:  # another one: copied, and the source deleted only once the entry is in
                        shutil.copytree(source, staging)
                else:
                    shutil.copytree(source, staging, ignore=shutil.ignore_patterns(MANIFEST, ".git"))
                (staging / MANIFEST).write_text(manifest.model_dump_json(indent=2))
            except (OSError, shutil.Error) as exc:  # a dangling link, a full disk: no hidden half-copy left
                _unstage(source, staging, renamed=renamed)
                failed = exc.args[0] if isinstance(exc, shutil.Error) and isinstance(exc.args[0], list) else []
                detail = str(failed[0][2]) if failed else str(exc)  # shutil.Error: [(source, target, why)]
                verb = "moving" if move else "copying"
                raise RegistryError(f"{verb} {source} into the registry failed: {detail[:300]}") from None
            if target.exists():
                # Aside first, then the new folder in, then the old one deleted: a stop part way never leaves a
                # half-deleted model under the name.
                replaced = fresh_aside(self.models_dir, manifest.name, "replaced")
                target.rename(replaced)
                staging.rename(target)
                shutil.rmtree(replaced, ignore_errors=True)
            else:
                staging.rename(target)
            if move and not renamed:
                shutil.rmtree(source, ignore_errors=True)  # copied across filesystems: the entry holds it now
            return self._load(target)

    def _check_parent(self, manifest: ModelManifest, parent_revision: str | None = None) -> None:
        if manifest.parent is not None and not self.exists(manifest.parent):
            raise RegistryError(f"parent model {manifest.parent!r} is not in the registry")
        if parent_revision is not None and manifest.parent is not None and \
                (now := self.get(manifest.parent).manifest.revision) != parent_revision:
            raise RegistryError(f"parent model {manifest.parent!r} was replaced while {manifest.name!r} was made from "
                                f"it (its weights were {parent_revision}, now {now}): the new model would name as "
                                "its parent weights it was not made from; make it again from the current one")
        if manifest.parent == manifest.name:
            raise RegistryError(f"model {manifest.name!r} cannot replace its own parent; give the new model another "
                                "name")

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """One writer of the registry's names at a time, across processes and pods sharing the volume (each
        replica's init container prepares the model): two adds of one name would share its staging folder, each
        deleting the other's copy, and the entry could end up with both writers' weight files."""
        self.models_dir.mkdir(parents=True, exist_ok=True)
        with (self.models_dir / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield  # closing the file releases the lock

    def check_free(self, name: str, overwrite: bool) -> None:
        """Whether a new entry may be written under `name`: the one rule `add` applies, asked before hours of
        training or quantization rather than after them."""
        target = self.path_of(name)
        if target.exists() and not self._has_manifest(target):
            # `remove` no longer leaves such a folder, but an older version's stopped removal or a copy by hand can.
            raise RegistryError(f"{target} holds no {MANIFEST}, so it is no model, yet it takes the name {name!r} "
                                "(a removal or copy stopped part way); delete that folder, or choose another name")
        if target.exists() and not overwrite:
            raise RegistryError(f"model {name!r} already exists; remove it, pass --overwrite, or choose another name")
        if target.exists():
            self.check_replaceable(name)

    def children_of(self, name: str) -> list[str]:
        """The entries made from `name`. A manifest that cannot be read is not passed over (`list` skips it): its
        parent is read from its JSON, and a manifest that is not even JSON is an error, since it may be a child."""
        children = []
        for folder in self._folders():
            try:
                parent = self._load(folder).manifest.parent
            except RegistryError as exc:
                try:
                    raw = json.loads((folder / MANIFEST).read_text())
                    parent = raw.get("parent") if isinstance(raw, dict) else None
                except (OSError, ValueError):
                    raise RegistryError(f"cannot tell whether {folder.name!r} was made from {name!r}: {exc}") from None
            if parent == name:
                children.append(folder.name)
        return children

    def check_replaceable(self, name: str) -> None:
        """An entry other entries were made from (trained on or quantized from its weights) is never replaced:
        they would go on naming as their parent weights they were not made from, and be compared with them."""
        children = self.children_of(name)
        if children:
            raise RegistryError(f"model {name!r} is the parent of {', '.join(children)}, made from its weights; "
                                "remove those first or give the new model another name")

    def remove(self, name: str) -> None:
        self.path_of(name)  # the name is checked before anything is touched
        with self._writing():
            entry = self.get(name)
            children = self.children_of(name)
            if children:
                raise RegistryError(f"model {name!r} is the parent of {', '.join(children)}; remove those first")
            # Aside in one rename, then deleted: a stop part way leaves a hidden folder, never a half-deleted model
            # that is still listed and served, nor a folder without a manifest holding the name.
            removing = fresh_aside(self.models_dir, name, "removing")
            entry.path.rename(removing)
            shutil.rmtree(removing)

    def record_eval(self, name: str, key: str, result: Any, made_at: datetime | None = None) -> None:
        """`made_at`: the `created_at` of the entry that was measured; refused if the name now holds another."""
        with self._updating(name, made_at) as entry:
            entry.manifest.evals[key] = result
            self._save(entry)

    def record_calibration(self, name: str, calibration: MCQCalibration | None, shipped: bool = False,
                           made_at: datetime | None = None) -> bool:
        """Whether it was written: a shipped record never replaces an operator's own, as read under the lock (one
        may have been recorded since the caller looked)."""
        with self._updating(name, made_at) as entry:
            current = entry.manifest
            if shipped and current.mcq_calibration is not None and not current.mcq_calibration_shipped:
                return False
            entry.manifest.mcq_calibration = calibration
            entry.manifest.mcq_calibration_shipped = shipped
            self._save(entry)
            return True

    @contextlib.contextmanager
    def _updating(self, name: str, made_at: datetime | None = None) -> Iterator[RegistryEntry]:
        """The entry read under the registry's lock, held until its manifest is written back: two processes
        recording at once (an eval run beside a calibration) would each write back what they read, and the later one
        drop the other's change. The lock is the one `add` and `remove` take (a lock on the entry's folder was not:
        an `--overwrite` between the read and the write put the old manifest on the new weights; and a directory's
        lock does not reach an NFS server). With `made_at`, the entry must still be the one made then: an hour's
        measurement must not land in weights trained or quantized under the name meanwhile (`--overwrite`)."""
        self.path_of(name)  # the name is checked before anything is touched (the lock file made)
        with self._writing():
            entry = self.get(name)
            if made_at is not None and entry.manifest.created_at != made_at:
                raise RegistryError(f"model {name!r} was made again while it was measured (the measured entry was "
                                    f"made {made_at.isoformat()}, the one under the name now "
                                    f"{entry.manifest.created_at.isoformat()}); its result is not recorded: measure "
                                    "it again")
            yield entry

    def _save(self, entry: RegistryEntry) -> None:
        write_text_atomic(entry.path / MANIFEST, entry.manifest.model_dump_json(indent=2))
