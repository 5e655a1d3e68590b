"""Mamba / Mamba2 Linear layers as compressed-tensors (`quantize DIR OUT --scheme W8A8_DYNAMIC
--format compressed-tensors`): the LLM path quantizes in_proj / out_proj (and Mamba1's
x_proj), keeps conv1d, dt_proj (Mamba1), norms, A_log, D, dt_bias, embeddings and lm_head
float; transformers reloads the file through compressed-tensors; Quamba-only settings are
refused; `validate --runtime vllm` names what vLLM cannot load (docs/formats.md, "Mamba as
compressed-tensors").

Tolerance: our reader and transformers decode the same codes and scales in float32 and
quantize static / FP8 activations with the same formulas, so they agree to rounding (1e-4;
measured 0 here, as on the hybrids). Dynamic int8 is the exception: compressed-tensors 0.20
computes the per-token scale as amax / 127.5 (its symmetric range 255 / 2) where we and vLLM
use amax / 127, so its logits are close to ours but not equal (pinned below).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from quantscale import cli
from quantscale.checkpoint.runtimes import runtime_refusals
from quantscale.errors import QuantscaleError
from quantscale.orchestrator import quantize_checkpoint

TOL = 1e-4
VOCAB = 64
CT = "compressed-tensors"
QUANTIZED = {
    "mamba": ("in_proj", "x_proj", "out_proj"),
    "mamba2": ("in_proj", "out_proj"),
}
FLOAT = {
    "mamba": (
        "mixer.conv1d.weight",
        "mixer.dt_proj.weight",
        "mixer.A_log",
        "mixer.D",
        "norm.weight",
    ),
    "mamba2": (
        "mixer.conv1d.weight",
        "mixer.dt_bias",
        "mixer.A_log",
        "mixer.D",
        "mixer.norm.weight",
    ),
}
CODES = {"W8A8": torch.int8, "W8A8_DYNAMIC": torch.int8, "FP8_DYNAMIC": torch.float8_e4m3fn}


def _model(kind: str):
    """Tiny random models; `mamba2-16h`: 16 heads of 4, so in_proj has 2 * 64 + 2 * 2 * 8 +
    16 = 176 rows (16 mod 32, as the Mamba2 fixture's 656)."""
    from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    if kind == "mamba":
        return MambaForCausalLM(
            MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8)
        )
    heads = {"mamba2": 8, "mamba2-16h": 16}[kind]
    cfg = Mamba2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        state_size=8,
        expand=2,
        head_dim=64 // heads,
        num_heads=heads,
        n_groups=2,
        chunk_size=16,
    )
    return Mamba2ForCausalLM(cfg)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("mamba-ct")


def _source(root, kind: str):
    src = root / kind
    if not (src / "config.json").exists():
        _model(kind).save_pretrained(src)
    return src


def _ids(seed: int, n: int = 4, length: int = 32) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _export(root, kind: str, scheme: str):
    out = root / f"{kind}-{scheme}"
    if not (out / "config.json").exists():
        quantize_checkpoint(
            _source(root, kind), out, scheme, method="rtn", fmt=CT, calib_data=_ids(0, 8)
        )
    return out


@torch.no_grad()
def _logits(out, ids) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(our reader's, transformers' compressed-tensors, the float source's) logits."""
    from transformers import AutoModelForCausalLM

    from quantscale.models.quantized import load_quantized_checkpoint

    ours = load_quantized_checkpoint(out, torch.float32)(ids).logits
    theirs = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)(ids).logits
    src = out.parent / out.name.rpartition("-")[0]
    base = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)(ids).logits
    return ours, theirs, base


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
@pytest.mark.parametrize("scheme", ["W8A8", "W8A8_DYNAMIC", "FP8_DYNAMIC"])
def test_linear_layers_export_and_reload_in_transformers(root, kind, scheme):
    """The projections stored as codes + scales (static: an input_scale), every SSM part float,
    a config compressed-tensors' own schema accepts, and transformers' logits equal ours
    (dynamic int8: close, see the module docstring)."""
    from compressed_tensors.quantization import QuantizationConfig

    out = _export(root, kind, scheme)
    stored = load_file(out / "model.safetensors")
    for i in range(2):
        for proj in QUANTIZED[kind]:
            name = f"backbone.layers.{i}.mixer.{proj}"
            assert stored[f"{name}.weight"].dtype == CODES[scheme], name
            assert stored[f"{name}.weight_scale"].dtype == torch.float32, name
            assert (f"{name}.input_scale" in stored) == (scheme == "W8A8"), name
        for part in FLOAT[kind]:
            name = f"backbone.layers.{i}.{part}"
            assert stored[name].is_floating_point() and stored[name].dtype != CODES[scheme]
            assert f"{name.rpartition('.')[0]}.weight_scale" not in stored, name
    assert stored["backbone.embeddings.weight"].dtype == torch.bfloat16  # --dtype's default
    assert stored.get("lm_head.weight", torch.zeros(1)).is_floating_point()  # absent: tied
    assert "lm_head.weight_scale" not in stored
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    QuantizationConfig.model_validate(qc)
    assert qc["quant_method"] == CT and r"re:.*\.conv1d$" in qc["ignore"]
    assert "lm_head" in qc["ignore"] and r"re:.*norm.*$" in qc["ignore"]
    assert (r"re:.*\.mixer\.dt_proj$" in qc["ignore"]) == (kind == "mamba")
    acts = qc["config_groups"]["group_0"]["input_activations"]
    assert acts["dynamic"] == (scheme != "W8A8")
    ours, theirs, base = _logits(out, _ids(1, 2))
    quant_effect = (ours - base).abs().max()
    gap = (ours - theirs).abs().max()
    if scheme == "W8A8_DYNAMIC":
        assert 0 < gap < quant_effect, (gap, quant_effect)
    else:
        assert gap < TOL < quant_effect, (gap, quant_effect)


def test_dynamic_int8_gap_is_the_per_token_scale():
    """Why W8A8_DYNAMIC differs under transformers: compressed-tensors' per-token scale is
    amax / 127.5; ours (and vLLM's) is amax / 127 (a Linear with int8 codes, same input)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import calculate_qparams

    from quantscale.qdq import compute_qparams, reduce_minmax
    from quantscale.scheme import preset_scheme

    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(2))
    args = preset_scheme("W8A8_DYNAMIC").input_activations
    assert args is not None
    ours = compute_qparams(args, *reduce_minmax(x, args, "activation")).scale
    ct_args = QuantizationArgs(
        num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True
    )
    theirs, _ = calculate_qparams(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), ct_args)
    amax = x.abs().amax(-1, keepdim=True)
    torch.testing.assert_close(ours.reshape(amax.shape), amax / 127)
    torch.testing.assert_close(theirs, amax / 127.5)


def test_cli_writes_the_mamba2_linears(root):
    """`quantscale quantize DIR OUT --scheme W8A8_DYNAMIC --method rtn --format
    compressed-tensors` (no calibration data needed) writes the export."""
    out = root / "cli"
    argv = ["-q", "quantize", str(_source(root, "mamba2")), str(out), "--scheme", "W8A8_DYNAMIC"]
    assert cli.main([*argv, "--method", "rtn", "--format", CT]) == 0
    stored = load_file(out / "model.safetensors")
    assert stored["backbone.layers.1.mixer.out_proj.weight"].dtype == torch.int8


def test_quamba_only_settings_are_refused(root, tmp_path):
    """What compressed-tensors cannot hold is refused before any work, naming why."""
    src = _source(root, "mamba2")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: quamba2\n")
    with pytest.raises(QuantscaleError, match="SSM-input.*no compressed-tensors field"):
        quantize_checkpoint(src, tmp_path / "a", str(recipe), fmt=CT)
    with pytest.raises(QuantscaleError, match="out_proj Hadamard.*does not record"):
        quantize_checkpoint(src, tmp_path / "b", "W8A8", fmt=CT, rotate="hadamard")
    with pytest.raises(QuantscaleError, match="compressed-tensors; not --format gguf"):
        quantize_checkpoint(src, tmp_path / "c", "W8A8", fmt="gguf")
    assert not any((tmp_path / n).exists() for n in "abc")


def test_vllm_findings(root):
    """vLLM builds Mamba1 mixers without a quantization config: validate names every
    quantized Mamba1 projection; a Mamba2 W8A8_DYNAMIC export has no vLLM finding (vLLM
    quantizes in_proj / out_proj and keeps conv1d float, as we write), its FP8 one the CPU
    build's slow FP8 matmul."""
    mamba1 = runtime_refusals(str(_export(root, "mamba", "W8A8_DYNAMIC")), "vllm")
    assert {r.tensor for r in mamba1} == {
        f"backbone.layers.{i}.mixer.{p}.weight" for i in range(2) for p in QUANTIZED["mamba"]
    }
    assert all("mamba_mixer.py" in r.reason and "no attribute 'data'" in r.reason for r in mamba1)
    assert all(r.version == "0.32.0" for r in mamba1)  # run, not read from the source
    assert runtime_refusals(str(_export(root, "mamba2", "W8A8_DYNAMIC")), "vllm-cpu") == []
    fp8 = runtime_refusals(str(_export(root, "mamba2", "FP8_DYNAMIC")), "vllm-cpu")
    assert {r.tensor for r in fp8} == {
        f"backbone.layers.{i}.mixer.{p}.weight" for i in range(2) for p in QUANTIZED["mamba2"]
    }
    assert all("_scaled_mm" in r.reason for r in fp8)


@pytest.mark.parametrize(
    ("rows", "cols", "refused"),
    [(656, 128, True), (176, 32, True), (48, 128, True), (640, 128, False), (3352, 768, False)],
)
def test_int8_sgl_pack_rule(rows, cols, refused):
    """Rows a multiple of 16 but not 32 (with cols a multiple of 32) fail vLLM CPU's AMX int8
    packing: 656 x 128 and 48 x 128 failed `convert_weight_packed` in vLLM CPU 0.32, 640 x 128
    packed; 3352 rows (a Mamba2-130m in_proj) take the oneDNN path instead."""
    from quantscale.checkpoint.runtimes import int8_sgl_pack_rule

    reason = int8_sgl_pack_rule(rows, cols)
    assert (reason is not None) == refused
    assert reason is None or "Expected N == BLOCK_N" in reason


@pytest.mark.parametrize("scheme", ["W8A8", "W8A8_DYNAMIC"])
def test_vllm_cpu_names_the_in_proj_its_int8_packing_refuses(root, scheme):
    """A Mamba2 whose in_proj has 176 rows: `validate --runtime vllm-cpu` names exactly the
    in_proj weights (static W8A8 adds its input-scale rule); out_proj (32 rows) is fine."""
    out = _export(root, "mamba2-16h", scheme)
    found = runtime_refusals(str(out), "vllm-cpu")
    packing = {r.tensor for r in found if "BLOCK_N" in r.reason}
    assert packing == {f"backbone.layers.{i}.mixer.in_proj.weight" for i in range(2)}
    assert all("BLOCK_N" in r.reason or r.tensor.endswith("input_scale") for r in found)
    assert runtime_refusals(str(out), "vllm") == []  # a CPU-build rule


@pytest.mark.parametrize(("intermediate", "flagged"), [(48, set()), (40, {"gate_proj", "up_proj"})])
def test_int8_sgl_rule_counts_the_rows_vllm_fuses(tmp_path, intermediate, flagged):
    """vLLM packs q/k/v and gate/up as one layer: a Llama with 16-row k / v (4 heads of 16,
    1 KV head: 64 + 16 + 16 = 96 rows) and 48-row gate / up (96 fused) passes; gate / up of
    40 rows each (80 fused) is named, both of them; down_proj (40 inputs) takes oneDNN."""
    from tiny_models import make_tiny_llama

    from quantscale.export import export_model
    from quantscale.orchestrator import quantize_model

    model = make_tiny_llama(96, 64, intermediate, num_key_value_heads=1)
    quantize_model(model, "W8A8_DYNAMIC", None, method="rtn")
    out = export_model(model, tmp_path / "llama", CT)
    found = {r.tensor for r in runtime_refusals(str(out), "vllm-cpu") if "BLOCK_N" in r.reason}
    assert found == {f"model.layers.{i}.mlp.{p}.weight" for i in range(2) for p in flagged}


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_transformers_dynamic_int8_rule(root, kind):
    """`validate --runtime transformers` names every projection of a W8A8 dynamic export (the
    amax / 127.5 grid), none of a static or FP8 one; without --runtime it stays quiet."""
    dynamic = str(_export(root, kind, "W8A8_DYNAMIC"))
    named = {r.tensor for r in runtime_refusals(dynamic, "transformers") if "127.5" in r.reason}
    assert named == {
        f"backbone.layers.{i}.mixer.{p}.weight" for i in range(2) for p in QUANTIZED[kind]
    }
    assert not [r for r in runtime_refusals(dynamic) if "127.5" in r.reason]
    for scheme in ("W8A8", "FP8_DYNAMIC"):
        assert runtime_refusals(str(_export(root, kind, scheme)), "transformers") == []
