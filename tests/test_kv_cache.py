"""FP8 KV cache with static scales: calibrated on the post-RoPE keys and the values the cache
stores, applied in every forward, written as compressed-tensors' kv_cache_scheme and read back."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import make_tiny_llama

from quantscale.checkpoint.read import Checkpoint
from quantscale.errors import QuantscaleError
from quantscale.export import export_model
from quantscale.formats.fp8 import E4M3, E4M3_MAX
from quantscale.models.quantized import load_quantized_checkpoint
from quantscale.orchestrator import quantize_model, set_kv_cache
from quantscale.runtime.kv_cache import attention_modules, fp8_kv_args
from quantscale.scheme import load_recipe

TOKENS = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))


def _quantized(strategy: str = "tensor"):
    model = make_tiny_llama(96, 128, 256, max_position_embeddings=64)
    recipe = load_recipe("FP8_DYNAMIC")
    recipe.kv_cache_scheme = fp8_kv_args(strategy)
    quantize_model(model, recipe, TOKENS, method="rtn", batch_size=2)
    return model


def _reference_amax(model, strategy: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Post-RoPE key / value amax per attention module, from k_proj / v_proj outputs and the
    model's own rotary embedding (not through the attention function)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    found: dict[str, list[torch.Tensor]] = {}
    hooks = []

    def hook(name, module, args, kwargs):
        h = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = kwargs["position_embeddings"]
        shape = (*h.shape[:-1], -1, module.head_dim)
        q = module.q_proj(h).view(shape).transpose(1, 2)
        k = module.k_proj(h).view(shape).transpose(1, 2)
        v = module.v_proj(h).view(shape).transpose(1, 2)
        _, k = apply_rotary_pos_emb(q, k, cos, sin)
        dims = (0, 2, 3) if strategy == "attn_head" else (0, 1, 2, 3)
        pair = [t.abs().amax(dim=dims) for t in (k, v)]
        old = found.get(name)
        found[name] = pair if old is None else [torch.maximum(a, b) for a, b in zip(old, pair)]

    for name, m in attention_modules(model).items():
        hooks.append(
            m.register_forward_pre_hook(lambda m, a, k, n=name: hook(n, m, a, k), with_kwargs=True)
        )
    with torch.no_grad():
        for ids in TOKENS.split(2):
            model.model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return {n: (k, v) for n, (k, v) in found.items()}


@pytest.mark.parametrize("strategy", ["tensor", "attn_head"])
def test_scales_are_the_post_rope_amax_over_448(strategy):
    model = _quantized(strategy)
    modules = attention_modules(model)
    stored = {n: (m.k_scale.clone(), m.v_scale.clone()) for n, m in modules.items()}
    for m in modules.values():  # observe the cache's inputs without quantizing them
        del m._buffers["k_scale"], m._buffers["v_scale"]
    ref = _reference_amax(model, strategy)
    for name, (k, v) in stored.items():
        shape = (2, 1, 1) if strategy == "attn_head" else (1,)
        assert k.shape == shape and v.shape == shape
        torch.testing.assert_close(
            k.flatten(), ref[name][0].flatten() / E4M3_MAX, rtol=1e-5, atol=0
        )
        torch.testing.assert_close(
            v.flatten(), ref[name][1].flatten() / E4M3_MAX, rtol=1e-5, atol=0
        )


def test_forward_quantizes_keys_and_values_on_the_fp8_grid():
    model = _quantized()
    seen = {}
    from quantscale.runtime import kv_cache

    inner = kv_cache._KVState.fake_quant

    def spy(x, scale):
        out = inner(x, scale)
        seen.setdefault("pair", (out, scale))
        return out

    with torch.no_grad():
        on = model(input_ids=TOKENS).logits
        kv_cache._KVState.fake_quant = staticmethod(spy)
        try:
            model(input_ids=TOKENS[:1])
        finally:
            kv_cache._KVState.fake_quant = staticmethod(inner)
        for m in attention_modules(model).values():
            del m._buffers["k_scale"], m._buffers["v_scale"]
        off = model(input_ids=TOKENS).logits
    out, scale = seen["pair"]
    codes = out.float() / scale
    # every key is an E4M3 code times its scale (to float32 rounding of the product)
    torch.testing.assert_close(codes, codes.to(E4M3).float(), rtol=1e-6, atol=0)
    assert codes.abs().max() <= E4M3_MAX
    rel = ((on - off).norm() / off.norm()).item()
    assert 0 < rel < 0.05


@pytest.mark.parametrize("strategy", ["tensor", "attn_head"])
def test_compressed_tensors_export_round_trip(tmp_path, strategy):
    ct = pytest.importorskip("compressed_tensors.quantization")
    model = _quantized(strategy)
    out = export_model(model, tmp_path / "ct", "compressed-tensors")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    kv = ct.QuantizationConfig.model_validate(qc).kv_cache_scheme
    assert kv is not None and kv.num_bits == 8 and kv.type == "float"
    assert kv.strategy == strategy and kv.dynamic is False
    ckpt = Checkpoint(out)
    for name, m in attention_modules(model).items():
        assert torch.equal(ckpt.get(f"{name}.k_scale"), m.k_scale)
        assert torch.equal(ckpt.get(f"{name}.v_scale"), m.v_scale)
    loaded = load_quantized_checkpoint(out)
    with torch.no_grad():
        ref, got = model(input_ids=TOKENS).logits, loaded(input_ids=TOKENS).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    for name, m in attention_modules(loaded).items():
        assert torch.equal(m.k_scale, ckpt.get(f"{name}.k_scale"))


def test_missing_scales_and_other_paths_are_refused(tmp_path):
    model = _quantized()
    out = export_model(model, tmp_path / "ct", "compressed-tensors")
    from safetensors.torch import load_file, save_file

    shard = next(out.glob("*.safetensors"))
    tensors = load_file(shard)
    del tensors["model.layers.1.self_attn.v_scale"]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(QuantscaleError, match="layers.1.self_attn.v_scale are missing"):
        load_quantized_checkpoint(out)
    recipe = load_recipe("W8A8")
    with pytest.raises(QuantscaleError, match="compressed-tensors' kv_cache_scheme only"):
        set_kv_cache(recipe, "fp8", "modelopt", False)
    with pytest.raises(QuantscaleError, match="omit --stream"):
        set_kv_cache(load_recipe("W8A8"), "fp8-head", "compressed-tensors", True)
    with pytest.raises(QuantscaleError, match="need calibration batches"):
        recipe = load_recipe("W4A16")
        recipe.kv_cache_scheme = fp8_kv_args()
        quantize_model(make_tiny_llama(96, 128, 256), recipe, None, method="rtn")


def test_inspect_names_the_kv_cache_scales():
    from quantscale.naming import module_kind

    assert module_kind("model.layers.3.self_attn.k_scale") == "kv_cache"
    assert module_kind("model.layers.3.self_attn.v_scale") == "kv_cache"
    assert module_kind("model.layers.3.self_attn.k_proj.weight_scale") == "attention.k"
