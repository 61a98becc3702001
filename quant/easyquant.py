"""EasyQuant: data-free weight-only quantization (Tang et al., 2024, arXiv 2403.02775), from the paper.

The method as the paper states it, the choices it leaves open and how this module makes them, and the measured
errors on SmolLM2-135M are in docs/quantization.md ("EasyQuant: the method as implemented"); the unit tests check
the closed-form scale gradient against torch autograd.

This module runs in the main environment: it imports torch, transformers, safetensors and compressed-tensors
(for its packing and config schema), never vLLM or llm-compressor.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from zephyr.registry import copy_tokenizer_files

__all__ = [
    "EasyQuantConfig",
    "QuantizedWeight",
    "easyquant",
    "find_outliers",
    "optimize_scale",
    "quantize_model",
    "reconstruction_error",
    "rtn",
    "scale_gradient",
]

# Group sizes we suggest when the requested one does not divide a layer's input features.
COMMON_GROUP_SIZES = (32, 64, 128, 256)
WEIGHTS_FILE = "model.safetensors"


# --------------------------------------------------------------------------------------------------------------
# Configuration and validation


def check_bits(bits: Any) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8 (codes are stored as int8), got {bits!r}")


def check_group_size(group_size: int | None, in_features: int, name: str = "weight") -> None:
    """Raise ValueError unless `group_size` (None: one group per output channel) splits `in_features` evenly."""
    if group_size is None:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group size must be a positive integer or None (per output channel), got {group_size!r}")
    if in_features % group_size:
        fits = [g for g in COMMON_GROUP_SIZES if in_features % g == 0]
        hint = (f"choose {' or '.join(map(str, fits))} ({'they divide' if len(fits) > 1 else 'it divides'} "
                f"{in_features})") if fits else f"choose a divisor of {in_features}"
        raise ValueError(f"group size {group_size} does not divide {in_features} input features of {name}; {hint}, "
                         "or group_size=None for one scale per output channel")


@dataclass(frozen=True)
class EasyQuantConfig:
    """EasyQuant settings; the defaults are the paper's except `group_size` (see the module docstring).

    bits: integer code width, 2..8 (the served int4 form needs 4).
    group_size: input features sharing one scale; None = one scale per output channel (the paper's setting).
    symmetric: symmetric grid without zero point (the paper's choice; the int4 form needs it).
    keep_outliers: isolate the (n sigma) outliers and keep them at full precision (`dequantize()` restores them
        bit for bit; the int4 form clamps them). False = no isolation: the range is fitted to every weight, which is
        the paper's "range optimisation only" ablation (its figure 2, left).
    outlier_sigma: the paper's n in |W - mean(W)| >= n * sigma(W).
    outlier_scope: statistics over the whole matrix ("tensor", the paper's eq. 3) or per output channel ("channel").
    steps, lr: Adam iterations and learning rate on the scales, in the scales' own units (paper: 100 and 1e-3 for
        BLOOM, 500 and 1e-4 for LLaMA; see the module docstring); steps=0 keeps the min-max scales of the
        non-outliers.
    keep_best: keep each group's best scale seen instead of the last one (never worse than the start).
    """

    bits: int = 4
    group_size: int | None = 64
    symmetric: bool = True
    keep_outliers: bool = True
    outlier_sigma: float = 3.0
    outlier_scope: Literal["tensor", "channel"] = "tensor"
    steps: int = 100
    lr: float = 1e-3
    keep_best: bool = True

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or self.group_size <= 0):
            raise ValueError(f"group size must be a positive integer or None (per output channel), "
                             f"got {self.group_size!r}")
        if not (isinstance(self.outlier_sigma, int | float) and math.isfinite(self.outlier_sigma)
                and self.outlier_sigma > 0):
            raise ValueError(f"outlier_sigma must be a positive number (the paper uses 2.5 to 3), "
                             f"got {self.outlier_sigma!r}; set keep_outliers=False to turn isolation off")
        if self.outlier_scope not in ("tensor", "channel"):
            raise ValueError(f"outlier_scope must be 'tensor' or 'channel', got {self.outlier_scope!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {self.steps!r}")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")


def qrange(bits: int) -> tuple[int, int]:
    """The signed integer grid: [-2^(bits-1), 2^(bits-1) - 1] (int4: -8..7)."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


# --------------------------------------------------------------------------------------------------------------
# The quantized weight


@dataclass
class QuantizedWeight:
    """A weight [out, in] as integer codes, scales and (optionally) exact full-precision outliers.

    q: int8 codes [out, in] in [-2^(bits-1), 2^(bits-1) - 1]. At outlier positions q holds the clamped code
        clamp(round(w / s)), i.e. what the int4 form serves.
    scale: float32 [out, in // group_size] (one column when per channel); values representable in `dtype`.
    zero_point: int8 [out, groups] for asymmetric grids, None when symmetric. Value = (q - zero_point) * scale.
    outlier_index: long [k, 2] (row, column) of the kept outliers, row-major order; empty when none.
    outlier_value: [k] exact copies of the original values, in the weight's dtype.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    outlier_index: torch.Tensor
    outlier_value: torch.Tensor
    bits: int
    group_size: int | None
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]

    @property
    def num_outliers(self) -> int:
        return int(self.outlier_index.shape[0])

    def outlier_mask(self) -> torch.Tensor:
        mask = torch.zeros(self.shape, dtype=torch.bool)
        mask[self.outlier_index[:, 0], self.outlier_index[:, 1]] = True
        return mask

    def grid_values(self) -> torch.Tensor:
        """(q - zero_point) * scale in float32 [out, in]: every weight as the quantizer represents it, outliers
        clamped. Exact in float32 (a code of at most 8 bits times a scale of at most 24 significant bits)."""
        rows, cols = self.shape
        groups = self.scale.shape[1]
        levels = self.q.to(torch.float32).reshape(rows, groups, cols // groups)
        if self.zero_point is not None:
            levels = levels - self.zero_point.to(torch.float32).unsqueeze(-1)
        return (levels * self.scale.unsqueeze(-1)).reshape(rows, cols)

    def dequantize(self, with_outliers: bool = True, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight in `dtype` (default: the original dtype). with_outliers=True puts the original outlier values
        back bit for bit (the paper's eq. 4); False gives the int4 form's values (outliers clamped)."""
        dtype = dtype or self.dtype
        out = self.grid_values().to(dtype)
        if with_outliers and self.num_outliers:
            out[self.outlier_index[:, 0], self.outlier_index[:, 1]] = self.outlier_value.to(dtype)
        return out


# --------------------------------------------------------------------------------------------------------------
# Core numerics (float32, weights viewed as [out, groups, group_size])


def _grouped(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    rows, cols = weight.shape
    size = group_size or cols
    return weight.detach().to(torch.float32).reshape(rows, cols // size, size)


def _check_weight(weight: torch.Tensor, bits: int, group_size: int | None, name: str) -> None:
    check_bits(bits)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D weight [out, in], got {getattr(weight, 'shape', type(weight))}")
    if not weight.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point weight, got {weight.dtype}")
    if not torch.isfinite(weight).all():  # NaN hides every outlier (its std is NaN) and an inf makes an inf scale
        raise ValueError(f"{name}: holds NaN or infinite weights; the parent checkpoint is damaged")
    check_group_size(group_size, weight.shape[1], name)


def find_outliers(weight: torch.Tensor, sigma: float = 3.0, scope: Literal["tensor", "channel"] = "tensor"
                  ) -> torch.Tensor:
    """Boolean mask of the (n sigma) outliers: |W - mean| >= sigma * std, statistics over the whole matrix (the
    paper's eq. 3) or per output channel (scope="channel"). Population standard deviation, in float32."""
    w = weight.detach().to(torch.float32)
    if scope == "tensor":
        mean, std = w.mean(), w.std(correction=0)
    elif scope == "channel":
        mean, std = w.mean(dim=1, keepdim=True), w.std(dim=1, keepdim=True, correction=0)
    else:
        raise ValueError(f"scope must be 'tensor' or 'channel', got {scope!r}")
    return ((w - mean).abs() >= sigma * std) & (std > 0)  # a constant matrix (or row) has no outliers, not all


def _initial_scale(x: torch.Tensor, keep: torch.Tensor, bits: int, symmetric: bool
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max scale (and zero point) per group over the kept elements; groups with nothing kept fall back to all
    elements, constant-zero groups to scale 1."""
    qmin, qmax = qrange(bits)
    has_kept = keep.any(dim=-1, keepdim=True)
    keep = keep | ~has_kept
    absmax_all = x.abs().amax(dim=-1, keepdim=True)
    fallback = torch.where(absmax_all > 0, absmax_all / qmax, torch.ones_like(absmax_all))
    if symmetric:
        absmax = x.abs().masked_fill(~keep, 0).amax(dim=-1, keepdim=True)
        scale = absmax / qmax
        return torch.where(scale > 0, scale, fallback), None
    low = x.masked_fill(~keep, math.inf).amin(dim=-1, keepdim=True).clamp(max=0)
    high = x.masked_fill(~keep, -math.inf).amax(dim=-1, keepdim=True).clamp(min=0)
    scale = (high - low) / (qmax - qmin)
    scale = torch.where(scale > 0, scale, fallback)
    zero_point = (qmin - torch.round(low / scale)).clamp(qmin, qmax)
    return scale, zero_point


def _levels(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Integer levels (code - zero_point) as float: clamp(round(x / s) + z, qmin, qmax) - z."""
    qmin, qmax = qrange(bits)
    if zero_point is None:
        return torch.clamp(torch.round(x / scale), qmin, qmax)
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax) - zero_point


def scale_gradient(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, keep: torch.Tensor,
                   bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group reconstruction error r = sum_keep (Q[x] - x)^2 and its gradient w.r.t. the scale, the paper's
    eq. 2: dr/ds = 2 * sum_keep (Q[x] - x) * level, level = clamp(round(x/s)) (- zero point). Shapes: x, keep
    [out, groups, size]; scale, zero_point [out, groups, 1]; returns (error, gradient), both [out, groups, 1].
    Equal to torch autograd of r with the integer level detached (zero gradient through round)."""
    level = _levels(x, scale, zero_point, bits)
    residual = (scale * level - x) * keep
    return residual.square().sum(dim=-1, keepdim=True), 2 * (residual * level).sum(dim=-1, keepdim=True)


def optimize_scale(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, keep: torch.Tensor, *,
                   bits: int, steps: int, lr: float, keep_best: bool = True) -> tuple[torch.Tensor, list[float]]:
    """Adam on the per-group scales with the paper's gradient (eq. 2). Returns the scales (the best seen per group
    when keep_best, else the last) and the total error before each step and after the last."""
    start = scale.detach().clone()
    floor = start * 1e-3  # keeps every scale positive
    param = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([param], lr=lr)
    best_scale, best_error = start.clone(), None
    history: list[float] = []
    for step in range(steps + 1):
        with torch.no_grad():
            error, grad = scale_gradient(x, param.detach(), zero_point, keep, bits)
        history.append(float(error.sum()))
        if best_error is None:
            best_error = error
        elif keep_best:
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_scale = torch.where(better, param.detach(), best_scale)
        if step == steps:
            break
        param.grad = grad
        optimizer.step()
        with torch.no_grad():
            param.copy_(torch.maximum(param, floor))
    return (best_scale if keep_best else param.detach().clone()), history


def _representable(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The scale rounded to what `dtype` stores (bf16/fp16 checkpoints store scales in the model dtype)."""
    if dtype in (torch.bfloat16, torch.float16):
        rounded = scale.to(dtype).to(torch.float32)
        return torch.where(rounded > 0, rounded, scale)
    return scale


def _finish(weight: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
            outliers: torch.Tensor | None, bits: int, group_size: int | None) -> QuantizedWeight:
    rows, cols = weight.shape
    level = _levels(x, scale, zero_point, bits)
    code = level if zero_point is None else level + zero_point
    index = outliers.nonzero() if outliers is not None else torch.zeros((0, 2), dtype=torch.long)
    return QuantizedWeight(
        q=code.reshape(rows, cols).to(torch.int8),
        scale=scale.squeeze(-1).contiguous(),
        zero_point=None if zero_point is None else zero_point.squeeze(-1).to(torch.int8),
        outlier_index=index,
        outlier_value=weight.detach()[index[:, 0], index[:, 1]].clone(),
        bits=bits,
        group_size=group_size,
        dtype=weight.dtype,
    )


def rtn(weight: torch.Tensor, bits: int = 4, group_size: int | None = 64, symmetric: bool = True, *,
        name: str = "weight") -> QuantizedWeight:
    """Round-to-nearest baseline: min-max (symmetric: absmax / (2^(bits-1) - 1)) scale per group over every weight,
    no outliers kept. Scales are rounded to the weight's dtype, as EasyQuant's are."""
    _check_weight(weight, bits, group_size, name)
    x = _grouped(weight, group_size)
    scale, zero_point = _initial_scale(x, torch.ones_like(x, dtype=torch.bool), bits, symmetric)
    scale = _representable(scale, weight.dtype)
    if zero_point is not None:  # re-derive the zero point for the rounded scale
        zero_point = _zero_point_for(x, scale, bits)
    return _finish(weight, x, scale, zero_point, None, bits, group_size)


def _zero_point_for(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    qmin, qmax = qrange(bits)
    low = x.amin(dim=-1, keepdim=True).clamp(max=0)
    return (qmin - torch.round(low / scale)).clamp(qmin, qmax)


def easyquant(weight: torch.Tensor, config: EasyQuantConfig | None = None, *, name: str = "weight"
              ) -> QuantizedWeight:
    """Quantize one weight [out, in] with EasyQuant: isolate the (n sigma) outliers, optimise the per-group scales
    on the rest with the paper's gradient, quantize. `name` only labels error messages."""
    config = config or EasyQuantConfig()
    _check_weight(weight, config.bits, config.group_size, name)
    x = _grouped(weight, config.group_size)
    outliers = None
    keep = torch.ones_like(x, dtype=torch.bool)
    if config.keep_outliers:
        outliers = find_outliers(weight, config.outlier_sigma, config.outlier_scope)
        keep = ~outliers.reshape(x.shape)
    start, zero_point = _initial_scale(x, keep, config.bits, config.symmetric)
    scale, _ = optimize_scale(x, start, zero_point, keep, bits=config.bits, steps=config.steps, lr=config.lr,
                              keep_best=config.keep_best)
    # Round to the storage dtype, then keep per group whichever of (optimised, min-max start) does better.
    scale, start = _representable(scale, weight.dtype), _representable(start, weight.dtype)
    if config.keep_best:
        error, _ = scale_gradient(x, scale, zero_point, keep, config.bits)
        error_start, _ = scale_gradient(x, start, zero_point, keep, config.bits)
        scale = torch.where(error_start < error, start, scale)
    return _finish(weight, x, scale, zero_point, outliers, config.bits, config.group_size)


def reconstruction_error(weight: torch.Tensor, qw: QuantizedWeight, with_outliers: bool = True,
                         relative: bool = False) -> float:
    """The paper's r(W) = ||Q[W] - W||^2: the sum of squared errors over all weights, in float32, with Q[W] the
    float32 dequantized weight (before any cast to the weight's dtype). with_outliers=True restores the kept
    outliers (zero error there: the dequantized form); False clamps them (the int4 form). relative=True divides by
    ||W||^2."""
    w = weight.detach().to(torch.float32)
    error = (qw.dequantize(with_outliers, dtype=torch.float32) - w).square().sum()
    if relative:
        error = error / w.square().sum().clamp(min=torch.finfo(torch.float32).tiny)
    return float(error)


# --------------------------------------------------------------------------------------------------------------
# Whole checkpoints


def decoder_linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """Every nn.Linear inside the decoder layers, by full name (lm_head and embeddings are outside them)."""
    names = {id(module): name for name, module in model.named_modules()}
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder `layers` found (expected a LlamaForCausalLM-like model)")
    found = []
    for layer in layers:
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                found.append((names[id(module)], module))
    return found


def _check_model_options(config: EasyQuantConfig, form: str, quantize_embedding: bool) -> None:
    if form not in ("int4", "dequantized"):
        raise ValueError(f"form must be 'int4' (compressed-tensors pack-quantized, served by vLLM) or "
                         f"'dequantized' (the parent's dtype, the paper's numerics), got {form!r}")
    if form == "int4":
        if config.bits != 4 or not config.symmetric:
            raise ValueError(f"form='int4' writes symmetric 4-bit codes: use bits=4, symmetric=True "
                             f"(got bits={config.bits}, symmetric={config.symmetric}), or form='dequantized'")
        if quantize_embedding:
            raise ValueError(
                "quantize_embedding=True cannot be served in the int4 form by vLLM 0.32: (1) the model ties lm_head "
                "to the embedding, and vLLM ties them by pointing lm_head at `embed_tokens.weight`, which a "
                "pack-quantized embedding does not have (it holds weight_packed/weight_scale), so loading fails; "
                "(2) vLLM's pack-quantized embedding lookup (CompressedTensorsEmbeddingWNA16Int) is a Triton kernel, "
                "and vLLM CPU has no Triton backend. Use form='dequantized' to study the quantized embedding's "
                "numerics, or leave the embedding in bf16 (as GPTQ/AWQ here do)")


def unpacked_linears(model: torch.nn.Module, packed: Iterable[str]) -> list[str]:
    """The model's Linears left in full precision (lm_head, or a head named otherwise, as GPT-NeoX's `embed_out`):
    the config's `ignore`, which must name each, or vLLM looks for packed weights there that were never written."""
    packed = set(packed)
    return sorted(name for name, module in model.named_modules()
                  if isinstance(module, torch.nn.Linear) and name not in packed)


def _ct_quantization_config(config: EasyQuantConfig, ignore: list[str]) -> Any:
    """compressed-tensors' own schema for what we write: W4A16, symmetric int, group (or channel) strategy."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, preset_name_to_scheme

    scheme = preset_name_to_scheme("W4A16", ["Linear"])
    if config.group_size is None:
        scheme.weights = scheme.weights.model_copy(update={"strategy": "channel", "group_size": None})
    else:
        scheme.weights.group_size = config.group_size
    return QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                              quantization_status=QuantizationStatus.COMPRESSED, ignore=ignore)


def packed_tensors(name: str, qw: QuantizedWeight, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The compressed-tensors pack-quantized tensors of one Linear, packed with compressed-tensors' own
    pack_to_int32: <name>.weight_packed int32 [out, in * bits / 32], <name>.weight_scale [out, groups] in the
    model dtype, <name>.weight_shape int64 [2]."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    if qw.zero_point is not None:
        raise ValueError(f"{name}: the int4 form is symmetric; got an asymmetric quantization")
    scale = qw.scale.to(scale_dtype)
    if not torch.equal(scale.to(torch.float32), qw.scale):
        raise ValueError(f"{name}: scales are not representable in {scale_dtype}")
    return {
        f"{name}.weight_packed": pack_to_int32(qw.q, qw.bits).contiguous(),
        f"{name}.weight_scale": scale.contiguous(),
        f"{name}.weight_shape": torch.tensor(qw.shape, dtype=torch.int64),
    }


def _write_int4(model: torch.nn.Module, tensors: dict[str, dict[str, torch.Tensor]], config: EasyQuantConfig,
                out_dir: Path) -> None:
    from compressed_tensors.compressors import ModelCompressor
    from safetensors.torch import save_file

    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        if value.data_ptr() in seen:  # a tied copy (lm_head -> embed_tokens): stored once, as save_pretrained does
            continue
        seen.add(value.data_ptr())
        state[key] = value
    for name, packed in tensors.items():
        del state[f"{name}.weight"]
        state.update(packed)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    model.config.save_pretrained(out_dir)
    # compressed-tensors' own writer adds `quantization_config` (quant_method, format, config_groups, ignore, ...).
    quantization = _ct_quantization_config(config, unpacked_linears(model, tensors))
    ModelCompressor(quantization_config=quantization).update_config(str(out_dir))


def quantize_model(model_dir: Path, out_dir: Path, config: EasyQuantConfig | None = None, *,
                   form: Literal["int4", "dequantized"] = "int4", quantize_embedding: bool = False,
                   progress: bool = True) -> dict[str, Any]:
    """Quantize every nn.Linear in the decoder layers of the checkpoint in `model_dir` with EasyQuant and write a
    complete model folder (weights, config, tokenizer, chat template) to `out_dir`.

    form="int4": compressed-tensors pack-quantized (vLLM serves it natively), which holds no full-precision
        outliers: a config that keeps them has them clamped into range (`zephyr quantize` keeps none there, and fits
        the range over every weight); 16-bit (an fp32 parent is cast to bf16).
    form="dequantized": weights dequant(q, s) in the parent's dtype with the outliers restored exactly (the paper's
        numerics).
    quantize_embedding: also quantize the output head (on a tied model that is the embedding matrix too); only the
        dequantized form can hold it (see the error).
    Returns statistics: layers, weights, outliers and their share, mean relative reconstruction errors
    ||W_hat - W||^2 / ||W||^2 over the layers for RTN, EasyQuant (outliers restored) and EasyQuant clamped (the
    int4 form's values), seconds, the config, and the same per layer."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    # The int4 form holds no outliers: its default fits the range over every weight, as `zephyr quantize` does.
    config = config or EasyQuantConfig(keep_outliers=form != "int4")
    _check_model_options(config, form, quantize_embedding)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.resolve() == model_dir.resolve():
        raise ValueError(f"out_dir must differ from model_dir ({model_dir})")
    # An earlier save's shards would stay beside the new weights (the int4 writer replaces only its own file), and
    # vLLM loads the files a stale index names.
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"out_dir {out_dir} is not an empty folder; remove it or choose another")
    started = time.monotonic()
    # In the parent's own dtype (it was always bf16: an fp16 parent lost 3 mantissa bits in every weight EasyQuant
    # leaves alone, and the errors were measured against the cast); the int4 form keeps 16-bit scales and
    # activations, as vLLM's compressed-tensors kernels take them, so an fp32 parent is cast to bf16 there.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    parent_dtype = model.dtype
    if form == "int4" and parent_dtype not in (torch.bfloat16, torch.float16):
        model = model.to(torch.bfloat16)
        model.config.dtype = torch.bfloat16  # `to` leaves the config saying float32, and vLLM would serve it so
    targets: list[tuple[str, torch.nn.Module]] = list(decoder_linears(model))
    head_tied = False
    if quantize_embedding:
        # The output head, as the other methods' --quantize-lm-head: on a tied model it is the embedding matrix
        # itself, so both sides are quantized (the stats say so); an untied model keeps its 16-bit embedding.
        head = model.get_output_embeddings()
        head_tied = head.weight is model.get_input_embeddings().weight
        targets.append(({id(m): n for n, m in model.named_modules()}[id(head)], head))
    for name, module in targets:  # fail before any work on a layer the group size does not fit
        check_group_size(config.group_size, module.weight.shape[1], name)
    out_dir.mkdir(parents=True, exist_ok=True)  # now: a place that cannot be written fails before the work

    per_layer: list[dict[str, Any]] = []
    packed: dict[str, dict[str, torch.Tensor]] = {}
    for name, module in tqdm(targets, desc=f"EasyQuant {config.bits}-bit", unit="layer", disable=not progress):
        weight = module.weight.data
        qw = easyquant(weight, config, name=name)
        baseline = rtn(weight, config.bits, config.group_size, config.symmetric, name=name)
        per_layer.append({
            "name": name,
            "shape": list(weight.shape),
            "outliers": qw.num_outliers,
            "rtn_rel_error": reconstruction_error(weight, baseline, relative=True),
            "easyquant_rel_error": reconstruction_error(weight, qw, with_outliers=True, relative=True),
            "easyquant_clamped_rel_error": reconstruction_error(weight, qw, with_outliers=False, relative=True),
        })
        if form == "int4":
            packed[name] = packed_tensors(name, qw, weight.dtype)
        else:
            module.weight.data = qw.dequantize(with_outliers=True)

    if form == "int4":
        _write_int4(model, packed, config, out_dir)
    else:
        model.save_pretrained(out_dir)
    copy_tokenizer_files(model_dir, out_dir)

    total = sum(layer["shape"][0] * layer["shape"][1] for layer in per_layer)
    outliers = sum(layer["outliers"] for layer in per_layer)

    def mean(key: str) -> float:
        return sum(layer[key] for layer in per_layer) / max(len(per_layer), 1)

    return {
        "method": "easyquant",
        "form": form,
        "layers": len(per_layer),
        "weights": total,
        "outliers": outliers,
        "outlier_share": outliers / max(total, 1),
        "rtn_rel_error": mean("rtn_rel_error"),
        "easyquant_rel_error": mean("easyquant_rel_error"),
        "easyquant_clamped_rel_error": mean("easyquant_clamped_rel_error"),
        "seconds": round(time.monotonic() - started, 2),
        "dtype": str(model.dtype).removeprefix("torch."),
        "parent_dtype": str(parent_dtype).removeprefix("torch."),
        "config": asdict(config),
        "quantize_embedding": quantize_embedding,
        "lm_head_tied_to_embedding": head_tied if quantize_embedding else None,
        "per_layer": per_layer,
    }
