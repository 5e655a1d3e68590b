"""`validate --runtime vllm / vllm-cpu` on our own exports (checkpoint.runtimes vLLM rules).

The refusals were seen serving SmolLM2 exports in vLLM CPU 0.32.0 (vLLM does not run here):
W4A16 g128 on 576-wide layers refused at load on every build; FP8 block 128x128 served with
k / v scales on the wrong rows (fused qkv_proj; 64x128 served right) as W8A16 on AMX (refused
without AMX), NVFP4A16 / NVFP4 / MXFP4 (no FP4 kernel), W8A16 (no 8-bit WNA16 kernel) and FP8
static (stub requantize op) refused; static W8A8 served as dynamic (AMX) or stalled (no AMX),
FP8 dynamic stalled in torch._scaled_mm; bf16, W8A8 dynamic and W4A16 g64 served (the
module docstring of checkpoint.runtimes). Each test exports with our exporters and checks
that the rule names the tensors on the bad case and stays silent on the good one.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from tiny_models import make_tiny_llama

from quantscale.checkpoint.fp8_quantize import quantize_checkpoint_fp8
from quantscale.checkpoint.runtimes import (
    VLLM,
    VLLM_CPU,
    runtime_refusals,
    selects,
    vllm_group_rule,
)
from quantscale.checkpoint.validate import validate_checkpoint
from quantscale.cli import main
from quantscale.errors import QuantscaleError
from quantscale.export import export_model
from quantscale.orchestrator import quantize_model
from quantscale.scheme import load_recipe, with_group_size

CALIB = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))
WIDE = 576  # SmolLM2-135M's hidden size: group 128 does not divide it, 64 does
RAGGED = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"}  # in_features 576


def _export(tmp_path, scheme, fmt: str = "compressed-tensors", hidden: int = 128):
    model = make_tiny_llama(96, hidden, 256, torch.bfloat16)
    quantize_model(model, scheme, CALIB)
    return export_model(model, tmp_path / "out", fmt)


def _modules(report, runtime: str) -> set[str]:
    """The tensors of the runtime-refuses findings of `runtime` (by message prefix)."""
    found = [f for f in report.findings if f.code == "runtime-refuses"]
    return {t for f in found if f.message.startswith(f"{runtime} 0.32") for t in f.tensors}


def test_ragged_groups_refused_on_every_vllm_build(tmp_path, capsys):
    out = _export(tmp_path, "W4A16", hidden=WIDE)
    report = validate_checkpoint(out, runtime="vllm")
    assert not report.ok
    named = _modules(report, VLLM)
    assert {t.split(".")[-2] for t in named} == RAGGED
    assert "model.layers.1.self_attn.q_proj.weight_packed" in named
    assert len(named) == 12  # 6 ragged modules x 2 layers; down_proj (256 in) divides
    message = report.errors[0].message
    assert "vLLM 0.32.0" in message and "input_size_per_partition=576" in message
    assert "group_size=128" in message and "e.g. 64" in message
    # the CLI: exit 1, stdout is JSON only
    capsys.readouterr()
    assert main(["validate", str(out), "--runtime", "vllm", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    tensors = {t for f in data["findings"] for t in f["tensors"]}
    assert "model.layers.0.mlp.up_proj.weight_packed" in tensors
    assert "model.layers.0.mlp.down_proj.weight_packed" not in tensors


def test_a_dividing_group_is_served_as_w4a8_on_cpu(tmp_path):
    """W4A16 g64 loads on every build; vLLM CPU on AMX runs it W4A8 (SmolLM2: 34.00 vs 32.69)
    unless VLLM_CPU_INT4_W4A8=0, which the CPU rule says."""
    out = _export(tmp_path, with_group_size(load_recipe("W4A16"), 64), hidden=WIDE)
    assert validate_checkpoint(out, runtime="vllm").findings == []
    cpu = runtime_refusals(out, "vllm-cpu")
    assert len(cpu) == 14 and all("VLLM_CPU_INT4_W4A8=0" in r.reason for r in cpu)
    assert "model.layers.0.mlp.down_proj.weight_packed" in {r.tensor for r in cpu}


def test_quantize_group_size_flag_fixes_the_refusal(tmp_path):
    """`quantize --group-size 64`: the exported groups divide 576, vLLM and compressed-tensors
    rules stay silent; the config and scales say 64."""
    from safetensors import safe_open

    src = tmp_path / "wide"
    make_tiny_llama(96, WIDE, 256, torch.bfloat16).save_pretrained(src)
    out = tmp_path / "g64"
    argv = ["quantize", str(src), str(out), "--scheme", "W4A16", "--method", "rtn"]
    assert main([*argv, "--group-size", "64"]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert [g["weights"]["group_size"] for g in qc["config_groups"].values()] == [64]
    with safe_open(out / "model.safetensors", "pt") as f:
        scale = f.get_slice("model.layers.0.self_attn.q_proj.weight_scale").get_shape()
    assert scale[1] == WIDE // 64
    assert runtime_refusals(out) == []


@pytest.mark.parametrize(
    ("scheme", "words"), [("NVFP4A16", "fixed at 16"), ("W8A16", "no integer group")]
)
def test_group_size_refused_where_it_cannot_apply(scheme, words):
    with pytest.raises(QuantscaleError, match=words):
        with_group_size(load_recipe(scheme), 64)
    with pytest.raises(QuantscaleError, match="positive"):
        with_group_size(load_recipe("W4A16"), 0)


@pytest.mark.parametrize(
    ("fmt", "scheme"),
    [
        ("compressed-tensors", "NVFP4A16"),
        ("compressed-tensors", "NVFP4"),
        ("compressed-tensors", "MXFP4"),
        ("modelopt", "NVFP4A16"),
        ("compressed-tensors", "FP8_BLOCK"),
    ],
)
def test_cpu_build_refuses_fp4_and_fp8_block(tmp_path, fmt, scheme):
    out = _export(tmp_path, scheme, fmt)
    cpu = validate_checkpoint(out, runtime="vllm-cpu")
    named = _modules(cpu, VLLM_CPU)
    assert "model.layers.0.self_attn.q_proj" in {t.rsplit(".", 1)[0] for t in named}
    assert len(named) == 14  # every quantized Linear of the 2 layers
    message = next(f.message for f in cpu.errors if f.message.startswith(VLLM_CPU))
    assert "CPU build only" in message
    assert ("amx_tile" if scheme == "FP8_BLOCK" else "FP4") in message
    # GPU builds serve it (FP8 block: but the 64-row k_proj fused into qkv_proj, the merged
    # rule); without --runtime the CPU-build rules stay quiet
    merged = _modules(validate_checkpoint(out, runtime="vllm"), VLLM)
    ragged = {f"model.layers.{i}.self_attn.k_proj.weight" for i in (0, 1)}
    assert merged == (ragged if scheme == "FP8_BLOCK" else set())
    assert {f.code for f in validate_checkpoint(out).findings} <= {"runtime-refuses"}
    assert not _modules(validate_checkpoint(out), VLLM_CPU)


def _hf_fp8(tmp_path, hidden: int, block: tuple[int, int] = (128, 128), **config):
    src = tmp_path / "bf16"
    make_tiny_llama(96, hidden, 256, torch.bfloat16, **config).save_pretrained(src)
    return quantize_checkpoint_fp8(src, tmp_path / "fp8", block=block)


def test_fp8_block_on_the_cpu_build_depends_on_amx(tmp_path):
    """Refused without AMX tiles (an AMD host), W8A16 with them (SmolLM2 on a Xeon with
    amx_tile loaded): the rule names the host feature; a K block other than 128 is refused."""
    refusals = runtime_refusals(_hf_fp8(tmp_path, 128, num_key_value_heads=4), "vllm-cpu")
    assert {r.runtime for r in refusals} == {VLLM_CPU}
    assert "model.layers.1.mlp.down_proj.weight" in {r.tensor for r in refusals}
    reason = refusals[0].reason
    assert "amx_tile" in reason and "W8A16" in reason and "128x128" in reason
    odd = runtime_refusals(
        _hf_fp8(tmp_path / "b", 128, (128, 64), num_key_value_heads=4), "vllm-cpu"
    )
    assert odd and all("K block of 128" in r.reason for r in odd)


def test_merged_fp8_block_shards_named(tmp_path):
    """SmolLM2's shapes (q 576, k / v 192 rows): vLLM fuses qkv_proj and places k's and v's
    block scales off their rows (SmolLM2 FP8 block 128x128 in vLLM CPU: 28.80 against our
    23.01); a block N dividing every shard (64) fixes it."""
    shapes = {"num_attention_heads": 9, "num_key_value_heads": 3}
    out = _hf_fp8(tmp_path, WIDE, **shapes)
    refusals = [r for r in runtime_refusals(out, "vllm") if r.runtime == VLLM]
    assert {r.tensor.split(".")[-2] for r in refusals} == {"k_proj", "v_proj"}
    assert len(refusals) == 4 and "q_proj has 576" in refusals[0].reason
    assert "--block 64x128" in refusals[0].reason
    fixed = _hf_fp8(tmp_path / "fixed", WIDE, (64, 128), **shapes)
    assert [r for r in runtime_refusals(fixed, "vllm-cpu") if r.runtime == VLLM] == []


def test_compressed_tensors_fp8_block_shards_refused(tmp_path):
    """The compressed-tensors FP8_BLOCK export of SmolLM2's shapes: vLLM refuses q_proj and
    k_proj at load (`Weight output_partition_size = 576 is not divisible by weight
    quantization block_n = 128`, run on vLLM CPU); transformers fails on the 576-wide
    activation groups."""
    model = make_tiny_llama(
        96, WIDE, 256, torch.bfloat16, num_attention_heads=9, num_key_value_heads=3
    )
    quantize_model(model, "FP8_BLOCK", CALIB)
    out = export_model(model, tmp_path / "out", "compressed-tensors")
    vllm = [r for r in runtime_refusals(out, "vllm") if r.runtime == VLLM]
    assert {r.tensor.split(".")[-2] for r in vllm} == {"q_proj", "k_proj"}
    q = next(r for r in vllm if "q_proj" in r.tensor)
    assert (
        "output_partition_size = 576 is not divisible by weight quantization block_n = 128"
        in q.reason
    )
    tf = [r for r in runtime_refusals(out, "transformers") if "unflatten" in r.reason]
    assert {r.tensor.split(".")[-2] for r in tf} == RAGGED  # in_features 576; down_proj 256
    assert "Provided sizes [5, 128]" in tf[0].reason


@pytest.mark.parametrize("streamed", [True, False])
def test_quantize_warns_on_misplaced_fp8_block_shards(tmp_path, caplog, streamed):
    """Both FP8 block exports (the streamed fp8-block scheme, the FP8_BLOCK preset) warn
    before writing what the merged-shard rule will flag."""
    shapes = {"num_attention_heads": 9, "num_key_value_heads": 3}
    with caplog.at_level(logging.WARNING, logger="quantscale.checkpoint.runtimes"):
        if streamed:
            _hf_fp8(tmp_path, WIDE, **shapes)
        else:
            model = make_tiny_llama(96, WIDE, 256, torch.bfloat16, **shapes)
            quantize_model(model, "FP8_BLOCK", CALIB)
    warned = [r.getMessage() for r in caplog.records if "mis-scale" in r.getMessage()]
    assert len(warned) == 1 and "4 modules" in warned[0] and "--block 64x128" in warned[0]


def test_static_int8_activations_stall_the_cpu_build(tmp_path):
    out = _export(tmp_path, "W8A8")
    named = _modules(validate_checkpoint(out, runtime="vllm-cpu"), VLLM_CPU)
    assert "model.layers.0.self_attn.o_proj.input_scale" in named
    assert len(named) == 14 and all(t.endswith(".input_scale") for t in named)
    reason = runtime_refusals(out, "vllm-cpu")[0].reason
    assert "dynamic activations for vLLM CPU" in reason


@pytest.mark.parametrize(
    ("scheme", "words"),
    [("FP8_DYNAMIC", "torch._scaled_mm"), ("FP8", "_C::static_scaled_fp8_quant()")],
)
def test_fp8_matmuls_named_for_the_cpu_build(tmp_path, scheme, words):
    """FP8 weights on CPUs without AMX-FP8: torch._scaled_mm's reference kernel (SmolLM2 FP8
    dynamic timed out in vLLM CPU here); per-tensor weights are refused at load (SmolLM2 FP8
    static: the CPU build's requantizing op is a stub)."""
    out = _export(tmp_path, scheme)
    refusals = runtime_refusals(out, "vllm-cpu")
    assert len(refusals) == 14 and {r.runtime for r in refusals} == {VLLM_CPU}
    assert "model.layers.1.mlp.down_proj.weight" in {r.tensor for r in refusals}
    assert all(words in r.reason for r in refusals)
    assert runtime_refusals(out, "vllm") == [] and runtime_refusals(out) == []


@pytest.mark.parametrize("strategy", ["tensor", "attn_head"])
def test_per_head_kv_cache_scales_named_for_the_cpu_build(tmp_path, strategy):
    """vLLM CPU's attention takes one float k / v scale per layer: per-head scales become their
    max; per-tensor ones load as written (kv_cache_dtype='fp8' served SmolLM2 with them)."""
    from quantscale.runtime.kv_cache import fp8_kv_args

    recipe = load_recipe("W8A8_DYNAMIC")
    recipe.kv_cache_scheme = fp8_kv_args(strategy)
    out = _export(tmp_path, recipe)
    refusals = runtime_refusals(out, "vllm-cpu")
    if strategy == "tensor":
        assert refusals == []
        return
    assert {r.tensor for r in refusals} == {
        f"model.layers.{i}.self_attn.{kv}_scale" for i in (0, 1) for kv in "kv"
    }
    assert all(r.runtime == VLLM_CPU and "their maximum" in r.reason for r in refusals)
    assert runtime_refusals(out, "vllm") == []


def test_cpu_build_refuses_8bit_weight_only(tmp_path):
    """W8A16 (uint8b128 pack-quantized): no CPU WNA16 kernel takes 8-bit weights (SmolLM2
    W8A16 refused at engine start-up); GPU builds and transformers are not concerned."""
    out = _export(tmp_path, "W8A16")
    refusals = runtime_refusals(out, "vllm-cpu")
    assert len(refusals) == 14 and {r.runtime for r in refusals} == {VLLM_CPU}
    assert "model.layers.1.mlp.down_proj.weight_packed" in {r.tensor for r in refusals}
    assert all("(uint8b128) not supported" in r.reason for r in refusals)
    assert runtime_refusals(out, "vllm") == [] and runtime_refusals(out) == []


@pytest.mark.parametrize("scheme", ["W8A8_DYNAMIC"])
def test_what_vllm_cpu_served_is_not_refused(tmp_path, scheme):
    out = _export(tmp_path, scheme)
    assert runtime_refusals(out, "vllm-cpu") == []
    assert validate_checkpoint(out, runtime="vllm-cpu").findings == []


def test_mamba1_models_named_for_the_cpu_build(tmp_path):
    """vLLM CPU loads a Mamba1 model and fails at its first forward (no selective_scan_fwd);
    Mamba2 models are served: only the first gets the CPU rule."""
    from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

    small = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1}
    MambaForCausalLM(MambaConfig(**small)).save_pretrained(tmp_path / "m1")
    m2 = Mamba2Config(**small, num_heads=4, head_dim=16, n_groups=1, state_size=16)
    Mamba2ForCausalLM(m2).save_pretrained(tmp_path / "m2")
    found = runtime_refusals(tmp_path / "m1", "vllm-cpu")
    assert [(r.tensor, r.runtime) for r in found] == [("config.json model_type", VLLM_CPU)]
    assert "selective_scan_fwd" in found[0].reason
    assert runtime_refusals(tmp_path / "m1", "vllm") == []
    assert runtime_refusals(tmp_path / "m2", "vllm-cpu") == []


def test_runtime_selection():
    assert selects("vllm", VLLM) and not selects("vllm", VLLM_CPU)
    assert selects("vllm-cpu", VLLM_CPU) and selects("vLLM CPU", VLLM) and selects("vllm_cpu", VLLM)
    assert selects(None, VLLM) and not selects(None, VLLM_CPU)
    assert not selects("transformers", VLLM)


def test_group_rule_suggests_a_dividing_group():
    assert vllm_group_rule(576, 64) is None and vllm_group_rule(576, 128) is not None
    assert "e.g. 64" in (vllm_group_rule(576, 128) or "")
    assert "e.g. 32" in (vllm_group_rule(96, 128) or "")


def test_quantize_warns_on_ragged_groups(caplog):
    model = make_tiny_llama(96, WIDE, 256, torch.bfloat16)
    with caplog.at_level(logging.WARNING):
        quantize_model(model, "W4A16")
    warned = [
        r.getMessage() for r in caplog.records if "input_size_per_partition" in r.getMessage()
    ]
    assert len(warned) == 1
    assert "12 modules" in warned[0] and "q_proj" in warned[0] and "down_proj" not in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        recipe = with_group_size(load_recipe("W4A16"), 64)
        quantize_model(make_tiny_llama(96, WIDE, 256, torch.bfloat16), recipe)
    assert not [r for r in caplog.records if "input_size_per_partition" in r.getMessage()]
