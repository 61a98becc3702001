"""bitsandbytes 4-bit (nf4 or fp4) checkpoints: quantized by transformers at load time and saved pre-quantized.

bitsandbytes (0.46 and later) runs 4-bit on CPU as well as on CUDA GPUs, so the checkpoint can be made, evaluated
through transformers (`evals.hf_letter`) and trained with QLoRA here. vLLM serves bitsandbytes checkpoints only on
CUDA GPUs: on CPU serve a compressed-tensors variant (gptq, awq, w8a8, easyquant) instead."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import time
from pathlib import Path
from typing import Any

from zephyr.registry import copy_tokenizer_files

QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
MIN_BITSANDBYTES = "0.46.1"  # the first release with a CPU backend; transformers 5 asks for it too


class BnbUnavailable(RuntimeError):
    """bitsandbytes cannot run on this machine; the message says what is needed."""


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def bnb_available() -> tuple[bool, str]:
    """Whether bitsandbytes 4-bit can run here (quantize, load, QLoRA), and why not or on which devices."""
    from packaging.version import Version

    version = _version("bitsandbytes")
    if version is None:
        return False, (f"bitsandbytes is not installed: pip install 'bitsandbytes>={MIN_BITSANDBYTES}' "
                       "(or the project's `train` extra); it runs 4-bit on CPU and on CUDA GPUs")
    if Version(version) < Version(MIN_BITSANDBYTES):
        return False, (f"bitsandbytes {version} is too old for 4-bit on this platform: "
                       f"pip install -U 'bitsandbytes>={MIN_BITSANDBYTES}'")
    if importlib.util.find_spec("accelerate") is None:
        return False, "transformers needs accelerate to load bitsandbytes checkpoints: pip install accelerate"
    import bitsandbytes
    from transformers.integrations.bitsandbytes import get_available_devices

    supported = set(getattr(bitsandbytes, "supported_torch_devices", set()))
    available = set(get_available_devices())
    usable = sorted(available & supported)
    if not usable:
        return False, (f"bitsandbytes {version} supports the devices {sorted(supported)} but this machine has "
                       f"{sorted(available)}; see https://huggingface.co/docs/bitsandbytes/main/en/installation")
    return True, f"bitsandbytes {version} on {', '.join(usable)}"


def bnb_config(quant_type: str = "nf4", double_quant: bool = True, compute_dtype: str = "bfloat16") -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {', '.join(QUANT_TYPES)}, got {quant_type!r}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {compute_dtype!r}")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, compute_dtype))


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def quantize_bnb(model_dir: Path, out_dir: Path, *, quant_type: str = "nf4", double_quant: bool = True,
                 compute_dtype: str = "bfloat16") -> dict[str, Any]:
    """Load the Hugging Face checkpoint in `model_dir` with bitsandbytes 4-bit and save the pre-quantized
    checkpoint (with tokenizer and chat template) to `out_dir`. Linear layers become 4-bit; embeddings, the
    (tied) output head and norms keep the checkpoint's dtype. Returns what it did and what it cost."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = bnb_config(quant_type, double_quant, compute_dtype)
    ok, reason = bnb_available()
    if not ok:
        raise BnbUnavailable(reason)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: give a Hugging Face model folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; remove it or choose another folder")

    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, dtype="auto",
                                                 device_map=device)
    import bitsandbytes

    quantized = sum(isinstance(m, bitsandbytes.nn.Linear4bit) for m in model.modules())
    if quantized == 0:
        raise RuntimeError(f"bitsandbytes quantized no linear layer of {model_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    copy_tokenizer_files(model_dir, out_dir)
    return {
        "method": "bnb",
        "quant_type": quant_type,
        "double_quant": double_quant,
        "compute_dtype": compute_dtype,
        "device": device,
        "quantized_modules": quantized,
        "seconds": round(time.perf_counter() - started, 2),
        "bytes": _folder_bytes(out_dir),
        "source_bytes": _folder_bytes(model_dir),
        "bitsandbytes": bitsandbytes.__version__,
        "transformers": _version("transformers"),
    }
