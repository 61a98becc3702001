"""EasyQuant (quant/easyquant.py): the paper's numerics on random weights, option checks, and both checkpoint forms
end to end on a tiny random Llama (int4 compressed-tensors reloaded by transformers; dequantized bf16)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from quant.easyquant import (
    EasyQuantConfig,
    easyquant,
    find_outliers,
    optimize_scale,
    quantize_model,
    reconstruction_error,
    rtn,
    scale_gradient,
    unpacked_linears,
)
from zephyr.registry import copy_tokenizer_files

STD = 0.2  # the default model's weights have a standard deviation of ~0.2; the default lr is sized for that


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny tensors: OpenMP threads only add contention on a shared 2-core machine (40x slower when it is busy).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gaussian(rows: int = 128, cols: int = 512, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=generator) * STD).to(dtype)


def with_outliers(rows: int = 128, cols: int = 512, share: float = 0.003, seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian weights with `share` of them replaced by values of 8 to 20 sigma, either sign; returns the weight
    and the injected positions (flat)."""
    weight = gaussian(rows, cols, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    positions = torch.randperm(rows * cols, generator=generator)[: int(share * rows * cols)]
    magnitude = (8 + 12 * torch.rand(len(positions), generator=generator)) * STD
    sign = torch.where(torch.rand(len(positions), generator=generator) < 0.5, -1.0, 1.0)
    weight.view(-1)[positions] = magnitude * sign
    return weight.to(dtype), positions


# ---------------------------------------------------------------------------------------------------------------
# Numerics


@pytest.mark.parametrize("kind", ["outliers", "gaussian"])
@pytest.mark.parametrize("group_size", [64, None])
def test_easyquant_beats_rtn(kind, group_size):
    weight = with_outliers()[0] if kind == "outliers" else gaussian()
    config = EasyQuantConfig(group_size=group_size)
    rtn_error = reconstruction_error(weight, rtn(weight, 4, group_size))
    eq_error = reconstruction_error(weight, easyquant(weight, config), with_outliers=True)
    assert eq_error < rtn_error
    if kind == "outliers":  # large outliers stretch RTN's ranges; isolating them is a big win
        assert eq_error < 0.5 * rtn_error


def test_outliers_are_restored_bit_exactly_and_the_rest_lies_on_the_grid():
    weight, injected = with_outliers(dtype=torch.bfloat16)
    qw = easyquant(weight, EasyQuantConfig(steps=50))
    rows, cols = weight.shape

    assert qw.q.dtype == torch.int8 and qw.q.shape == (rows, cols)
    assert int(qw.q.min()) >= -8 and int(qw.q.max()) <= 7
    assert qw.scale.dtype == torch.float32 and qw.scale.shape == (rows, cols // 64)
    assert torch.equal(qw.scale.to(torch.bfloat16).float(), qw.scale)  # storable as the bf16 checkpoint stores it
    assert qw.zero_point is None
    assert qw.outlier_index.dtype == torch.long and qw.outlier_index.shape == (qw.num_outliers, 2)
    assert qw.outlier_value.dtype == torch.bfloat16

    mask = qw.outlier_mask()
    assert mask.view(-1)[injected].all()  # every injected outlier is found...
    assert qw.num_outliers < 0.01 * weight.numel()  # ...and outliers stay under 1%, as in the paper
    expected_mask = (weight.float() - weight.float().mean()).abs() >= 3 * weight.float().std(correction=0)
    assert torch.equal(mask, expected_mask)  # the paper's (n sigma) rule over the whole matrix, n = 3

    restored = qw.dequantize()
    assert restored.dtype == torch.bfloat16
    assert torch.equal(restored[mask].view(torch.int16), weight[mask].view(torch.int16))  # bit for bit

    grid = (qw.q.float().reshape(rows, -1, 64) * qw.scale.unsqueeze(-1)).reshape(rows, cols)
    assert torch.equal(qw.dequantize(dtype=torch.float32)[~mask], grid[~mask])
    assert torch.equal(restored[~mask], grid.to(torch.bfloat16)[~mask])
    # Without outliers (the int4 form) every value is on the grid, the outliers clamped into their group's range.
    assert torch.equal(qw.dequantize(with_outliers=False, dtype=torch.float32), grid)
    assert reconstruction_error(weight, qw, with_outliers=True) < reconstruction_error(weight, qw, False)


def test_scale_optimization_lowers_the_error_of_the_min_max_scale():
    weight = gaussian()
    no_isolation = dict(keep_outliers=False, group_size=64)
    start = reconstruction_error(weight, easyquant(weight, EasyQuantConfig(steps=0, **no_isolation)))
    optimized = reconstruction_error(weight, easyquant(weight, EasyQuantConfig(steps=100, **no_isolation)))
    assert start == pytest.approx(reconstruction_error(weight, rtn(weight, 4, 64)))  # steps=0 is min-max RTN
    assert optimized < 0.95 * start

    x = weight.reshape(128, -1, 64)
    keep = torch.ones_like(x, dtype=torch.bool)
    scale0 = x.abs().amax(-1, keepdim=True) / 7
    scale, history = optimize_scale(x, scale0, None, keep, bits=4, steps=100, lr=1e-3)
    final = float(scale_gradient(x, scale, None, keep, 4)[0].sum())
    assert final <= min(history) and final < history[0]  # keep_best: the best scale seen, never worse than start
    assert (scale > 0).all()


def test_scale_gradient_is_the_papers_derivative():
    x = torch.randn(16, 4, 64, dtype=torch.float64)
    keep = torch.rand(x.shape) > 0.05
    scale = (x.abs().amax(-1, keepdim=True) / 7) * 0.8  # some values clip
    error, grad = scale_gradient(x, scale, None, keep, 4)

    # torch autograd with the integer level detached (zero gradient through round), the paper's eq. 2
    s = scale.clone().requires_grad_(True)
    level = torch.clamp(torch.round(x / s), -8, 7).detach()
    ((s * level - x) * keep).square().sum().backward()
    assert torch.allclose(grad, s.grad)
    assert torch.allclose(error.sum(), ((scale * level - x) * keep).square().sum())

    # and the true derivative: a tiny change of s flips no rounding
    h = scale * 1e-9
    plus, _ = scale_gradient(x, scale + h, None, keep, 4)
    minus, _ = scale_gradient(x, scale - h, None, keep, 4)
    assert torch.allclose((plus - minus) / (2 * h), grad, rtol=1e-4, atol=1e-6)


def test_outlier_scope_channel_uses_per_row_statistics():
    weight = gaussian(8, 256)
    weight[0] *= 10  # a loud channel: whole-matrix statistics flag much of it, per-row statistics do not
    tensor_mask = find_outliers(weight, 3.0, "tensor")
    channel_mask = find_outliers(weight, 3.0, "channel")
    assert tensor_mask[0].sum() > 20 and channel_mask[0].sum() < 10
    # a constant matrix or row (zero-initialised, pruned) has no outliers: all of it was flagged, and stored whole
    weight[1] = 0.5
    assert not find_outliers(torch.zeros(4, 64)).any() and not find_outliers(weight, 3.0, "channel")[1].any()
    assert easyquant(torch.zeros(4, 64), EasyQuantConfig(steps=2)).num_outliers == 0


def test_asymmetric_and_other_bit_widths_round_trip():
    weight = gaussian(32, 128) + 0.1
    for bits in (2, 3, 8):
        qw = easyquant(weight, EasyQuantConfig(bits=bits, symmetric=False, steps=20))
        assert qw.zero_point is not None and qw.zero_point.shape == (32, 2)
        low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        assert int(qw.q.min()) >= low and int(qw.q.max()) <= high
        assert reconstruction_error(weight, qw) <= reconstruction_error(weight, rtn(weight, bits, 64, False))


# ---------------------------------------------------------------------------------------------------------------
# Options


def test_group_size_that_does_not_divide_names_the_layer_and_the_sizes():
    weight = gaussian(16, 576)
    with pytest.raises(ValueError) as error:
        easyquant(weight, EasyQuantConfig(group_size=128), name="model.layers.0.self_attn.q_proj")
    message = str(error.value)
    assert "group size 128 does not divide 576 input features of model.layers.0.self_attn.q_proj" in message
    assert "choose 32 or 64" in message and "group_size=None" in message
    with pytest.raises(ValueError, match="group size 100 does not divide 576"):
        rtn(weight, 4, 100, name="w")


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 4.0])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 8"):
        EasyQuantConfig(bits=bits)
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 8"):
        rtn(gaussian(4, 64), bits, 64)


@pytest.mark.parametrize("options", [dict(group_size=0), dict(outlier_sigma=0), dict(steps=-1), dict(lr=0),
                                     dict(outlier_scope="row")])
def test_other_bad_options(options):
    with pytest.raises(ValueError):
        EasyQuantConfig(**options)


# ---------------------------------------------------------------------------------------------------------------
# Whole checkpoints on a tiny random Llama

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
CONFIG = EasyQuantConfig(steps=20, lr=1e-4)  # the tiny model's weights have std 0.02
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(509)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def original_linears(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    weights = {f"model.layers.{i}.{name}": model.get_submodule(f"model.layers.{i}.{name}").weight.data.clone()
               for i in range(2) for name in LINEARS}
    weights["model.embed_tokens"] = model.model.embed_tokens.weight.data.clone()
    return weights


def check_complete_folder(folder: Path) -> None:
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "generation_config.json"} <= names
    assert (folder / "chat_template.jinja").read_text() == CHAT_TEMPLATE


def test_int4_form_is_a_compressed_tensors_checkpoint_that_transformers_loads(tiny_llama, tmp_path):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "int4"
    stats = quantize_model(tiny_llama, out, CONFIG, form="int4", progress=False)
    assert stats["layers"] == 14 and stats["weights"] == 2 * (2 * 128 * 128 + 2 * 64 * 128 + 3 * 256 * 128)
    assert 0 < stats["outliers"] < 0.01 * stats["weights"] and stats["outlier_share"] < 0.01
    assert stats["easyquant_rel_error"] < stats["rtn_rel_error"]
    assert stats["config"]["group_size"] == 64 and stats["seconds"] >= 0
    check_complete_folder(out)

    quantization = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quantization["quant_method"] == "compressed-tensors" and quantization["format"] == "pack-quantized"
    assert quantization["ignore"] == ["lm_head"] and quantization["quantization_status"] == "compressed"
    (group,) = quantization["config_groups"].values()
    assert group["targets"] == ["Linear"] and group["input_activations"] is None
    assert {k: group["weights"][k] for k in ("num_bits", "type", "symmetric", "strategy", "group_size")} == {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}

    originals = original_linears(tiny_llama)
    expected = {name: easyquant(weight, CONFIG, name=name) for name, weight in originals.items()
                if name != "model.embed_tokens"}
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys  # tied to the embedding, stored once
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        for name, qw in expected.items():
            assert f"{name}.weight" not in keys
            packed, scale, shape = (f.get_tensor(f"{name}.{k}") for k in ("weight_packed", "weight_scale",
                                                                           "weight_shape"))
            rows, cols = qw.shape
            assert packed.dtype == torch.int32 and packed.shape == (rows, cols // 8)
            assert scale.dtype == torch.bfloat16 and scale.shape == (rows, cols // 64)
            assert shape.dtype == torch.int64 and shape.tolist() == [rows, cols]
            assert torch.equal(unpack_from_int32(packed, 4, shape), qw.q)
            assert torch.equal(scale.float(), qw.scale)

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    model(torch.tensor([[1, 5, 6]]))  # compressed-tensors decompresses on the first forward pass
    for name, qw in expected.items():
        loaded = model.get_submodule(name).weight.data
        assert torch.equal(loaded, qw.dequantize(with_outliers=False))  # q * scale, outliers clamped
        assert torch.equal(loaded, (qw.q.float() * qw.scale.repeat_interleave(64, dim=1)).to(torch.bfloat16))


def test_the_int4_config_ignores_every_linear_left_unpacked():
    """`ignore` named only `lm_head`: a model whose head is named otherwise (GPT-NeoX's `embed_out`), or with a
    Linear outside the decoder layers, was written declaring packed weights it does not have."""
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))])
    model.embed_out = torch.nn.Linear(4, 8)
    model.projector = torch.nn.Linear(4, 4)
    assert unpacked_linears(model, ["layers.0.0", "layers.0.1"]) == ["embed_out", "projector"]


def test_dequantized_form_keeps_the_outliers_exactly(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "dequantized"
    stats = quantize_model(tiny_llama, out, CONFIG, form="dequantized", quantize_embedding=True, progress=False)
    assert stats["layers"] == 15 and stats["form"] == "dequantized"
    check_complete_folder(out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    for name, weight in original_linears(tiny_llama).items():
        qw = easyquant(weight, CONFIG, name=name)
        loaded = model.get_submodule(name).weight.data
        assert torch.equal(loaded, qw.dequantize())  # bf16(q * scale), outliers in place
        mask = qw.outlier_mask()
        assert mask.any() and torch.equal(loaded[mask], weight[mask])
        assert not torch.equal(loaded, weight)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)  # still tied


def test_an_untied_model_gets_its_output_head_quantized_not_its_embedding(tiny_llama, tmp_path):
    """--quantize-lm-head names the head; on an untied model EasyQuant used to quantize the embedding instead."""
    from transformers import AutoModelForCausalLM

    untied = tmp_path / "untied"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16)
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone() * 0.5)
    model.config.tie_word_embeddings = False
    model.save_pretrained(untied)
    copy_tokenizer_files(tiny_llama, untied)
    out = tmp_path / "out"
    stats = quantize_model(untied, out, CONFIG, form="dequantized", quantize_embedding=True, progress=False)
    assert stats["lm_head_tied_to_embedding"] is False and stats["per_layer"][-1]["name"] == "lm_head"
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)  # left in 16 bits
    head = model.lm_head.weight.data
    assert torch.equal(loaded.lm_head.weight, easyquant(head, CONFIG, name="lm_head").dequantize())


def test_int4_form_refuses_what_vllm_cannot_serve(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="ties lm_head to the embedding"):
        quantize_model(tiny_llama, tmp_path / "x", CONFIG, form="int4", quantize_embedding=True, progress=False)
    with pytest.raises(ValueError, match="bits=4, symmetric=True"):
        quantize_model(tiny_llama, tmp_path / "x", EasyQuantConfig(bits=8), form="int4", progress=False)
    with pytest.raises(ValueError, match="form must be"):
        quantize_model(tiny_llama, tmp_path / "x", CONFIG, form="int8", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="group size 48 does not divide 128 input features of model.layers.0"):
        quantize_model(tiny_llama, tmp_path / "x", EasyQuantConfig(group_size=48), form="int4", progress=False)
    assert not (tmp_path / "x").exists()


def test_quantize_registers_an_easyquant_entry_and_a_failed_overwrite_keeps_the_old_one(tmp_path, default_model,
                                                                                        monkeypatch):
    """quant.run.quantize end to end on the tiny Llama, as `zephyr quantize --method easyquant` runs it (the served
    int4 configuration): the entry's manifest, the run folder, and an --overwrite that fails."""
    from quant import run
    from tests.unit.tiny_llama import TINY, make_tiny_llama
    from zephyr.registry import Registry
    from zephyr.settings import Settings

    settings = Settings(home=tmp_path)
    registry = Registry(settings.models_dir)
    make_tiny_llama(registry, default_model)
    options = run.QuantOptions(model=TINY, method="easyquant", easyquant_steps=2)
    result = run.quantize(options, settings, say=lambda _: None)
    entry = registry.get(f"{TINY}-easyquant")
    assert result.entry.name == entry.name and entry.manifest.parent == TINY and entry.manifest.method == "easyquant"
    assert entry.manifest.recipe == options.recipe() and entry.manifest.recipe["group_size"] == 64
    assert entry.manifest.stats["seconds_total"] >= 0 and "per_layer" not in entry.manifest.stats
    # What the served int4 form holds: no outliers isolated, and (keep_best) never worse than plain rounding.
    assert entry.manifest.stats["outliers"] == 0
    assert entry.manifest.stats["easyquant_clamped_rel_error"] <= entry.manifest.stats["rtn_rel_error"]
    assert json.loads((entry.path / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    runs = settings.home / "quant-runs" / entry.name
    first = (runs / "stats.json").read_text()
    assert (runs / "options.json").is_file() and not list(runs.parent.glob(".*"))  # no run folder left aside

    def broken(_options, _parent, out_dir):
        (out_dir / "model.safetensors").parent.mkdir(parents=True)
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise run.QuantError("the run broke")

    monkeypatch.setattr(run, "_easyquant", broken)
    with pytest.raises(run.QuantError, match="the run broke"):
        run.quantize(run.QuantOptions(model=TINY, method="easyquant", easyquant_steps=3, overwrite=True), settings)
    failed = runs.with_name(f".{entry.name}.incoming")  # its records kept to look at, not the weights half written
    assert (failed / "options.json").is_file() and not (failed / "output").exists()
    kept = registry.get(entry.name)
    assert kept.manifest.recipe == entry.manifest.recipe and (runs / "stats.json").read_text() == first
    monkeypatch.undo()
    again = run.quantize(run.QuantOptions(model=TINY, method="easyquant", easyquant_steps=3, overwrite=True), settings,
                         say=lambda _: None)
    assert again.entry.manifest.recipe["steps"] == 3 and (runs / "stats.json").read_text() != first
    assert not [p.name for p in runs.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(("parent", "form", "written"), [(torch.float16, "dequantized", torch.float16),
                                                          (torch.float32, "dequantized", torch.float32),
                                                          (torch.float32, "int4", torch.bfloat16)])
def test_the_parents_dtype_is_kept_where_the_form_can_hold_it(tiny_llama, tmp_path, parent, form, written):
    """Every parent was loaded as bf16: an fp16 one lost 3 mantissa bits in each weight EasyQuant leaves alone."""
    import shutil

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    source = tmp_path / "parent"
    shutil.copytree(tiny_llama, source)
    AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).to(parent).save_pretrained(source)
    stats = quantize_model(source, tmp_path / "out", CONFIG, form=form, progress=False)
    assert (stats["parent_dtype"], stats["dtype"]) == (str(parent)[6:], str(written)[6:])
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == written  # left alone, in the parent's dtype
    # what vLLM reads to choose the dtype it serves in: an fp32 parent's int4 form said float32
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == str(written)[6:]


def test_a_second_run_of_one_name_is_refused_while_the_first_runs(tmp_path, default_model):
    """It deleted the first run's folder as it started, and the two registered each other's half-written weights."""
    import fcntl

    from quant import run
    from tests.unit.tiny_llama import TINY, make_tiny_llama
    from zephyr.registry import Registry
    from zephyr.settings import Settings

    settings = Settings(home=tmp_path)
    make_tiny_llama(Registry(settings.models_dir), default_model)
    options = run.QuantOptions(model=TINY, method="easyquant", easyquant_steps=2)
    (settings.home / ".locks").mkdir()
    with (settings.home / ".locks" / f"quantize-{TINY}-easyquant.lock").open("a") as first:
        fcntl.flock(first, fcntl.LOCK_EX)  # as the first run holds it
        with pytest.raises(run.QuantError, match="another `zephyr quantize` run is making"):
            run.quantize(options, settings, say=lambda _: None)
    assert run.quantize(options, settings, say=lambda _: None).entry.name == f"{TINY}-easyquant"


def test_a_parent_replaced_during_the_run_is_not_named_as_the_result_s_parent(tmp_path, default_model, monkeypatch):
    """`zephyr train --output P --overwrite` finishing during a long quantize run of P: the result would name P as
    its parent, be compared with the new P's weights and copy its calibration, though made from the old one."""
    import shutil
    from datetime import timedelta

    from quant import run
    from tests.unit.tiny_llama import TINY, make_tiny_llama
    from zephyr.registry import MANIFEST, Registry
    from zephyr.settings import Settings

    settings = Settings(home=tmp_path)
    registry = Registry(settings.models_dir)
    make_tiny_llama(registry, default_model)
    quantize_model = run._easyquant

    def retrained_meanwhile(options, parent, out_dir):
        stats = quantize_model(options, parent, out_dir)
        replacement = tmp_path / "retrained"
        shutil.copytree(parent.path, replacement, ignore=shutil.ignore_patterns(MANIFEST))
        registry.add(replacement, parent.manifest.model_copy(update={"created_at": parent.manifest.created_at
                                                                     + timedelta(seconds=5)}), overwrite=True)
        return stats

    monkeypatch.setattr(run, "_easyquant", retrained_meanwhile)
    with pytest.raises(run.QuantError, match=f"parent model '{TINY}' was replaced while '{TINY}-easyquant' was made"):
        run.quantize(run.QuantOptions(model=TINY, method="easyquant", easyquant_steps=2), settings, say=lambda _: None)
    assert not registry.exists(f"{TINY}-easyquant")


def test_a_folder_holding_files_is_refused_before_any_work(tiny_llama, tmp_path):
    """The int4 writer replaces only its own file: an earlier save's shards and index stayed beside it, and vLLM
    loads the files a stale index names."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(ValueError, match="is not an empty folder; remove it or choose another"):
        quantize_model(tiny_llama, out, CONFIG, form="int4", progress=False)
    assert [p.name for p in out.iterdir()] == ["model.safetensors.index.json"]


def test_nan_or_inf_weights_are_refused_not_quantized():
    """A NaN made the matrix's std NaN (no outliers anywhere) and its group's scale 1; an inf made an inf scale."""
    for bad in (math.nan, math.inf):
        weight = gaussian(8, 64)
        weight[3, 5] = bad
        with pytest.raises(ValueError, match="layer.q: holds NaN or infinite weights"):
            easyquant(weight, EasyQuantConfig(steps=1), name="layer.q")


def test_the_int4_forms_default_isolates_no_outliers(tiny_llama, tmp_path):
    """int4 clamps the outliers it isolated into range, worse than plain rounding on the default model
    (docs/quantization.md): its default is the range fitted over every weight, as `zephyr quantize` runs it."""
    stats = quantize_model(tiny_llama, tmp_path / "int4", form="int4", progress=False)
    assert stats["outliers"] == 0 and stats["config"]["keep_outliers"] is False
    assert stats["easyquant_clamped_rel_error"] <= stats["rtn_rel_error"]


def test_a_registered_model_is_reported_so_when_only_its_run_records_cannot_move(tmp_path, default_model, monkeypatch):
    """The run folder's rename after the entry was registered (a busy file on NFS) raised a raw OSError: the user
    read a failed run, and a rerun was told the name already exists."""
    from quant import run
    from tests.unit.tiny_llama import TINY, make_tiny_llama
    from zephyr.registry import Registry
    from zephyr.settings import Settings

    settings = Settings(home=tmp_path)
    registry = Registry(settings.models_dir)
    make_tiny_llama(registry, default_model)
    real_rename = Path.rename

    def busy(self, target):
        if self.name.endswith(".incoming") and self.parent.name == "quant-runs":
            raise OSError(16, "Device or resource busy")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", busy)
    said: list[str] = []
    result = run.quantize(run.QuantOptions(model=TINY, method="easyquant", easyquant_steps=1), settings,
                          say=said.append)
    assert registry.exists(result.entry.name)
    incoming = settings.home / "quant-runs" / f".{result.entry.name}.incoming"
    assert said == [f"warning: {result.entry.name} is registered, but its run records could not be moved to "
                    f"{settings.home / 'quant-runs' / result.entry.name} ([Errno 16] Device or resource busy); "
                    f"they are in {incoming}"]
    assert (incoming / "stats.json").is_file()
