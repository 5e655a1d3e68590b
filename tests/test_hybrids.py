"""Hybrid models (attention + Mamba / linear attention / conv, often MoE) through the LLM
pipeline: `quantscale quantize` on tiny random models of each architecture the pinned
transformers has, the compressed-tensors export reloaded by transformers and compared with our
own reader's fake-quant model, which modules were quantized and which stayed float, and the
`validate` findings for transformers and vLLM (docs/hybrid.md has the table).

Tolerance: both loaders decode the same codes and scales in float32 and quantize activations
with the same formulas, so they agree to rounding (measured: exactly 0 on every non-MoE row);
1e-4 is two orders below what quantization itself moves the logits here (0.008 to 0.13).
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import HYBRID_CONFIGS, make_tiny_hybrid, save_word_tokenizer, word_text

from quantscale import cli
from quantscale.checkpoint.runtimes import runtime_refusals

TOL = 1e-4
ARCHS = list(HYBRID_CONFIGS)
# Per architecture: modules that must be quantized, tensors that must stay plain float.
QUANTIZED = {
    "jamba": [
        "model.layers.1.self_attn.q_proj",
        "model.layers.0.mamba.in_proj",
        "model.layers.0.mamba.x_proj",
        "model.layers.0.mamba.out_proj",
        "model.layers.0.feed_forward.down_proj",
        "model.layers.1.feed_forward.experts.3.gate_proj",
    ],
    "bamba": [
        "model.layers.1.self_attn.o_proj",
        "model.layers.0.mamba.in_proj",
        "model.layers.2.mamba.out_proj",
        "model.layers.0.feed_forward.up_proj",
    ],
    "granitemoehybrid": [
        "model.layers.1.self_attn.k_proj",
        "model.layers.0.mamba.in_proj",
        "model.layers.0.shared_mlp.input_linear",
        "model.layers.2.block_sparse_moe.experts.0.down_proj",
    ],
    "nemotron_h": [
        "model.layers.0.mixer.in_proj",
        "model.layers.0.mixer.out_proj",
        "model.layers.1.mixer.up_proj",
        "model.layers.2.mixer.q_proj",
        "model.layers.3.mixer.experts.1.up_proj",
        "model.layers.3.mixer.shared_experts.down_proj",
    ],
    "zamba2": [
        "model.layers.0.mamba.in_proj",
        "model.layers.1.linear",
        "model.layers.1.mamba_decoder.mamba.out_proj",
        "model.layers.3.shared_transformer.self_attn.q_proj",
        "model.layers.3.shared_transformer.feed_forward.gate_up_proj",
    ],
    "falcon_h1": [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mamba.in_proj",
        "model.layers.1.feed_forward.down_proj",
    ],
    "qwen3_next": [
        "model.layers.0.linear_attn.in_proj_qkvz",
        "model.layers.0.linear_attn.in_proj_ba",
        "model.layers.2.linear_attn.out_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.experts.2.up_proj",
        "model.layers.1.mlp.shared_expert.gate_proj",
    ],
    "lfm2": [
        "model.layers.0.conv.in_proj",
        "model.layers.0.conv.out_proj",
        "model.layers.1.self_attn.out_proj",
        "model.layers.2.feed_forward.w2",
    ],
}
FLOAT = {
    "jamba": [
        "model.layers.0.mamba.dt_proj.weight",
        "model.layers.0.mamba.conv1d.weight",
        "model.layers.0.mamba.A_log",
        "model.layers.1.feed_forward.router.weight",
    ],
    "bamba": ["model.layers.0.mamba.conv1d.weight", "model.layers.0.mamba.dt_bias"],
    "granitemoehybrid": [
        "model.layers.0.block_sparse_moe.router.weight",
        "model.layers.0.mamba.conv1d.weight",
    ],
    "nemotron_h": ["model.layers.3.mixer.gate.weight", "model.layers.0.mixer.A_log"],
    "zamba2": [
        "model.layers.1.shared_transformer.feed_forward.gate_up_proj_adapter_list.0.0.weight"
    ],
    "falcon_h1": ["model.layers.0.mamba.D", "model.layers.1.mamba.conv1d.weight"],
    "qwen3_next": [
        "model.layers.0.mlp.gate.weight",
        "model.layers.0.mlp.shared_expert_gate.weight",
        "model.layers.0.linear_attn.conv1d.weight",
    ],
    "lfm2": ["model.layers.0.conv.conv.weight"],
}
MOE = {"jamba", "granitemoehybrid", "nemotron_h", "qwen3_next"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("hybrids")
    (path / "calib.txt").write_text(word_text())
    return path


def _source(root, arch: str):
    src = root / arch
    if not (src / "config.json").exists():
        save_word_tokenizer(src)
        make_tiny_hybrid(arch).to(torch.bfloat16).save_pretrained(src)
    return src


def _quantize(root, arch: str, scheme: str, *extra: str):
    out = root / f"{arch}-{scheme}{'-'.join(extra).replace('/', '')}"
    argv = ["-q", "quantize", str(_source(root, arch)), str(out), "--scheme", scheme]
    argv += ["--calib-samples", "8", "--calib-seq-len", "32"]
    argv += ["--calib-data", str(root / "calib.txt"), "--overwrite", *extra]
    assert cli.main(argv) == 0
    return out


def _stored(out) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def _logits(out) -> tuple[torch.Tensor, torch.Tensor]:
    """(our reader's logits, transformers' compressed-tensors logits) on the same tokens."""
    from transformers import AutoModelForCausalLM

    from quantscale.models.quantized import load_quantized_checkpoint

    ids = torch.randint(1, 19, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = load_quantized_checkpoint(out, torch.float32)(ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)(ids).logits
    return ours, theirs


@pytest.mark.parametrize("arch", ARCHS)
def test_w4a16_gptq_reloads_in_transformers(root, arch):
    """Weight-only GPTQ: the right modules quantized, SSM parameters / routers / gates float,
    and transformers' compressed-tensors model gives our logits (Granite-4's experts excepted:
    transformers drops them, which validate says)."""
    out = _quantize(root, arch, "W4A16", "--method", "gptq", "--group-size", "32")
    stored = _stored(out)
    for module in QUANTIZED[arch]:
        assert f"{module}.weight_packed" in stored and f"{module}.weight" not in stored, module
    for name in FLOAT[arch]:
        assert name in stored and stored[name].is_floating_point(), name
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert r"re:.*\.shared_expert_gate$" in qc["ignore"] and r"re:.*\.conv1d$" in qc["ignore"]
    if arch == "jamba":
        assert r"re:.*\.mamba\.dt_proj$" in qc["ignore"]
    ours, theirs = _logits(out)
    refusals = runtime_refusals(str(out), "transformers")
    if arch == "granitemoehybrid":
        assert refusals and all("experts" in r.tensor for r in refusals)
        assert (ours - theirs).abs().max() > 100 * TOL  # what the refusal says happens
    else:
        assert not refusals
        assert (ours - theirs).abs().max() < TOL


@pytest.mark.parametrize("arch", ["bamba", "lfm2", "falcon_h1", "zamba2"])
@pytest.mark.parametrize("scheme", ["W8A8", "FP8_DYNAMIC"])
def test_activation_schemes_reload_in_transformers(root, arch, scheme):
    """Static int8 and dynamic FP8 activations on the non-MoE hybrids: the same logits."""
    ours, theirs = _logits(_quantize(root, arch, scheme))
    assert (ours - theirs).abs().max() < TOL


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["jamba", "nemotron_h", "qwen3_next"])
@pytest.mark.parametrize("scheme", ["W8A8", "FP8"])
def test_static_activation_experts_are_flagged_for_transformers(root, arch, scheme):
    """Experts with static input scales: validate says transformers gets them wrong, and it
    does (the load fails, or the logits are not ours)."""
    out = _quantize(root, arch, scheme)
    reasons = {r.reason for r in runtime_refusals(str(out), "transformers")}
    assert reasons and all("static" in r for r in reasons), reasons
    try:
        ours, theirs = _logits(out)
    except RuntimeError as err:  # Jamba / Qwen3-Next INT8: the conversion error named
        assert scheme == "W8A8" and "conversion" in str(err)
        return
    assert (ours - theirs).abs().max() > 10 * TOL


def test_jamba_vllm_findings(root):
    """vLLM builds Jamba's Mamba1 projections unquantized: validate names exactly those."""
    out = _quantize(root, "jamba", "W4A16", "--method", "gptq", "--group-size", "32")
    found = {r.tensor for r in runtime_refusals(str(out), "vllm")}
    assert found == {
        f"model.layers.{i}.mamba.{p}.weight_packed"
        for i in (0, 2)
        for p in ("in_proj", "x_proj", "out_proj")
    }
    kept = _quantize(
        root,
        "jamba",
        "W4A16",
        "--group-size",
        "32",
        "--method",
        "rtn",
        "--ignore",
        r"re:.*\.mamba\..*",
    )
    assert not runtime_refusals(str(kept), "vllm")
    assert "model.layers.0.mamba.in_proj.weight" in _stored(kept)


def test_streamed_hybrid_writes_the_in_memory_tensors(root):
    """--stream on a hybrid (per-kind layer arguments captured on the meta device) writes
    the same tensors as the in-memory path."""
    memory = _stored(_quantize(root, "bamba", "W8A8"))
    streamed = _stored(_quantize(root, "bamba", "W8A8", "--stream"))
    assert memory.keys() == streamed.keys()
    assert all(torch.equal(memory[k], streamed[k]) for k in memory)


def test_each_layer_gets_its_own_mask_and_arguments():
    """Attention layers get the causal mask, Mamba layers theirs (None without padding);
    before, every layer reused layer 0's arguments (a Mamba layer's: no mask, so eager
    attention ran non-causal). Zamba2 passes each layer its index positionally."""
    from quantscale.calibration.sequential import capture_layer_arguments

    ids = [torch.randint(1, 19, (2, 16))]
    jamba = make_tiny_hybrid("jamba", attn_implementation="eager")
    args = capture_layer_arguments(jamba, jamba.model.layers, ids)
    masks = [a[0][1].get("attention_mask") for a in args]
    assert masks[0] is None and masks[2] is None
    assert masks[1] is not None and masks[1].shape[-2:] == (16, 16)
    zamba = make_tiny_hybrid("zamba2")
    args = capture_layer_arguments(zamba, zamba.model.layers, ids)
    assert [a[0][0][2] for a in args] == [0, 1, 2, 3]


def test_ignore_reaches_the_calibrated_path(root):
    """`quantize --ignore` was read by fp8-block only; now a calibrated scheme honours it."""
    out = _quantize(root, "lfm2", "W8A8_DYNAMIC", "--ignore", "re:.*conv\\.in_proj$")
    stored = _stored(out)
    assert "model.layers.0.conv.in_proj.weight_scale" not in stored
    assert "model.layers.0.conv.out_proj.weight_scale" in stored


def test_bamba_fixture_spec_has_both_layer_kinds():
    """The trained hybrid fixture's spec builds a Bamba model with attention and Mamba2 layers
    whose projection widths the W4A16 group size of docs/hybrid.md (64) divides."""
    from quantscale.mamba.fixtures import FIXTURES, build_model

    model = build_model(FIXTURES["bamba"])
    kinds = [
        type(layer.mamba if hasattr(layer, "mamba") else layer.self_attn).__name__
        for layer in model.model.layers
    ]
    assert kinds == ["BambaMixer", "BambaMixer", "BambaAttention", "BambaMixer"]
    widths = {m.in_features for m in model.model.modules() if isinstance(m, torch.nn.Linear)}
    assert widths == {128, 256, 384}
    assert all(w % 64 == 0 for w in widths)


def test_bamba_fixture_training_is_deterministic():
    """Two steps of the fixture trainer on a small Bamba config give identical weights."""
    import dataclasses

    from quantscale.mamba.fixtures import FIXTURES, train_model

    spec = FIXTURES["bamba"]
    small = {**spec.config, "num_hidden_layers": 2, "attn_layer_indices": [1], "vocab_size": 64}
    spec = dataclasses.replace(spec, config=small, steps=2, batch_size=2, seq_len=32)
    stream = torch.randint(0, 64, (2000,), generator=torch.Generator().manual_seed(0))
    (m1, log1), (m2, log2) = train_model(spec, stream), train_model(spec, stream)
    assert log1["losses"] == log2["losses"] and log1["losses"][1] != log1["losses"][0]
    for (name, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), name


def test_fixture_bamba_goes_through_the_llm_path(root, monkeypatch):
    """`quantize fixture:bamba` resolves the cached fixture and quantizes it as an LLM
    (compressed-tensors, attention and Mamba2 projections), not the Quamba way; the Mamba-only
    fixtures still route to Quamba. A tiny random Bamba stands in for the trained one."""
    from quantscale.errors import QuantscaleError
    from quantscale.mamba import fixtures
    from quantscale.orchestrator import is_mamba

    assert is_mamba("fixture:mamba2") and not is_mamba("fixture:bamba")
    with pytest.raises(QuantscaleError, match="unknown fixture kind 'jamba'"):
        is_mamba("fixture:jamba")
    source = _source(root, "bamba")
    monkeypatch.setattr(fixtures, "fixture_checkpoint", {"bamba": source}.__getitem__)
    out = root / "fixture-bamba-W8A8"
    argv = ["-q", "quantize", "fixture:bamba", str(out), "--scheme", "W8A8", "--overwrite"]
    argv += [
        "--calib-samples",
        "8",
        "--calib-seq-len",
        "32",
        "--calib-data",
        str(root / "calib.txt"),
    ]
    assert cli.main(argv) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    stored = _stored(out)
    for module in QUANTIZED["bamba"]:
        assert stored[f"{module}.weight"].dtype == torch.int8, module
        assert f"{module}.input_scale" in stored, module


def _bamba_cached() -> bool:
    from quantscale.cache import cache_dir
    from quantscale.mamba.fixtures import FIXTURES

    return (cache_dir() / "models" / FIXTURES["bamba"].name / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not _bamba_cached(), reason="fixture:bamba not trained (14 min on 2 cores)")
def test_trained_bamba_fixture_w8a8_moves_perplexity_a_little(tmp_path):
    """The trained hybrid through `quantize` (static W8A8) and `eval`: perplexity changes,
    by well under 1% (docs/hybrid.md: +0.04% with the full calibration)."""
    from quantscale.eval.runner import evaluate
    from quantscale.orchestrator import load_evaluated, load_model

    model, tokenizer = load_model("fixture:bamba")
    base = evaluate(model, tokenizer, ["ppl"], n_tokens=4096)["ppl"]
    out = tmp_path / "bamba-w8a8"
    argv = ["-q", "quantize", "fixture:bamba", str(out), "--scheme", "W8A8", "--method", "rtn"]
    assert cli.main([*argv, "--calib-samples", "16", "--calib-seq-len", "256"]) == 0
    quantized = evaluate(load_evaluated(out), tokenizer, ["ppl"], n_tokens=4096)["ppl"]
    assert quantized != base and abs(quantized / base - 1) < 0.01
