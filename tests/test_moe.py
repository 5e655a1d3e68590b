"""MoE: per-expert Linears compute what the fused experts computed; experts the router never
picks still get valid scales (calibrated on all tokens, or RTN), and it is logged."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from quantscale.algorithms.gptq import GPTQ
from quantscale.export.compressed_tensors import read_compressed_tensors, save_compressed_tensors
from quantscale.models.moe import (
    LinearExperts,
    calibrate_all_experts,
    expert_token_counts,
    linearize_experts,
    log_expert_coverage,
)
from quantscale.orchestrator import quantize_model
from quantscale.runtime.qlinear import quant_linears

TOKENS = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))


def _qwen_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    return Qwen3MoeForCausalLM(config).eval()


def _starve_experts(model, allowed=(0, 1)):
    """Make every router pick only `allowed` experts (experts 2, 3 never see a token)."""
    for layer in model.model.layers:
        gate = layer.mlp.gate
        forward = gate.forward

        def routed(hidden, forward=forward):
            logits, _, _ = forward(hidden)
            n = hidden.reshape(-1, hidden.shape[-1]).shape[0]
            index = torch.tensor(allowed).expand(n, len(allowed))
            return logits, torch.full((n, len(allowed)), 1 / len(allowed)), index

        gate.forward = routed


def test_linearized_experts_compute_the_same():
    model = _qwen_moe()
    with torch.inference_mode():
        ref = model(input_ids=TOKENS).logits
    names = linearize_experts(model)
    assert names == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, LinearExperts) and experts[3].down_proj.weight.shape == (64, 32)
    with torch.inference_mode():
        got = model(input_ids=TOKENS).logits
        with calibrate_all_experts(model):
            all_tokens = model(input_ids=TOKENS).logits
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(all_tokens, ref)
    assert sum(expert_token_counts(model).values()) == 2 * 2 * TOKENS.numel()  # 2 layers, top-2


def test_starved_experts_calibrated_on_all_tokens(caplog):
    model = _qwen_moe()
    linearize_experts(model)
    _starve_experts(model)
    with caplog.at_level(logging.WARNING), calibrate_all_experts(model):
        linears = quantize_model(model, "NVFP4", TOKENS, method="gptq", batch_size=2)
        starved = log_expert_coverage(model, all_tokens=True)
    assert len(starved) == 4 and "mlp.experts.3" in starved[-1]
    assert "calibrated on all tokens" in caplog.text
    for name in (
        "model.layers.1.mlp.experts.3.gate_proj",
        "model.layers.1.mlp.experts.3.down_proj",
    ):
        ql = linears[name]
        assert torch.isfinite(ql.weight_scale).all() and (ql.weight_scale > 0).all()
        assert torch.isfinite(ql.input_global_scale).all() and ql.input_global_scale.item() > 0


def test_starved_experts_fall_back_to_rtn(caplog):
    model = _qwen_moe()
    linearize_experts(model)
    _starve_experts(model)
    algo = GPTQ()
    from quantscale.algorithms.base import ALGORITHMS

    with caplog.at_level(logging.WARNING), calibrate_all_experts(model, enabled=False):
        original = ALGORITHMS["gptq"]
        ALGORITHMS["gptq"] = lambda **kw: algo
        try:
            quantize_model(model, "NVFP4A16", TOKENS, method="gptq", batch_size=2)
        finally:
            ALGORITHMS["gptq"] = original
        log_expert_coverage(model, all_tokens=False)
    rtn = {m for r in algo.report if r["method"] == "rtn" for m in r["modules"]}
    assert rtn == {
        f"model.layers.{i}.mlp.experts.{e}.{p}"
        for i in (0, 1)
        for e in (2, 3)
        for p in ("gate_proj", "up_proj", "down_proj")
    }
    assert "RTN instead of GPTQ" in caplog.text and "weight-only statistics" in caplog.text
    ql = quant_linears(model)["model.layers.0.mlp.experts.2.up_proj"]
    assert torch.isfinite(ql.weight_scale).all() and ql.weight_global_scale.item() > 0


def test_moe_exports_per_expert_tensors(tmp_path):
    model = _qwen_moe()
    linearize_experts(model)
    with calibrate_all_experts(model):
        quantize_model(model, "NVFP4A16", TOKENS, method="gptq", batch_size=2)
    out = save_compressed_tensors(model, tmp_path / "moe")
    dense = read_compressed_tensors(out)
    w = "model.layers.0.mlp.experts.3.gate_proj.weight"
    assert torch.equal(dense[w], quant_linears(model)[w[:-7]].weight.float())
    assert "model.layers.0.mlp.gate.weight" in dense  # the router stays unquantized
    ref = copy.deepcopy(model)
    with torch.inference_mode():
        assert torch.isfinite(ref(input_ids=TOKENS).logits).all()


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=3,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    return MixtralForCausalLM(config).eval()


def test_mixtral_names():
    model = _mixtral()
    with torch.inference_mode():
        ref = model(input_ids=TOKENS).logits
    linearize_experts(model)
    names = {n for n, _ in model.named_modules()}
    assert "model.layers.0.mlp.experts.2.w3" in names
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=TOKENS).logits, ref)


_SUFFIXES = ("weight_global_scale", "weight_scale_2", "weight_scale", "weight_packed", "weight")


def _module_paths(path, glob: str = "*.safetensors") -> set[str]:
    from safetensors import safe_open

    out = set()
    for file in path.glob(glob):
        if file.stem.endswith("_scales") != glob.endswith("_scales.safetensors"):
            continue
        with safe_open(str(file), "pt") as f:
            out |= {k.rsplit(".", 1)[0] if k.endswith(_SUFFIXES) else k for k in f.keys()}
    return out


@pytest.mark.parametrize("fmt", ["compressed-tensors", "modelopt", "pseudo"])
def test_mixtral_exports_use_the_checkpoint_names(tmp_path, fmt):
    """Exported names = what transformers' save_pretrained writes for a fresh Mixtral (the
    `block_sparse_moe.experts.E.w1/w2/w3` layout vLLM loads), not transformers 5's `mlp.`."""
    from transformers import AutoModelForCausalLM

    from quantscale.export import export_model

    model = _mixtral()
    model.save_pretrained(tmp_path / "ref")
    expected = _module_paths(tmp_path / "ref") - {"lm_head"}
    assert "model.layers.0.block_sparse_moe.experts.2.w1" in expected
    linearize_experts(model)
    quantize_model(model, "NVFP4A16")
    out = export_model(model, tmp_path / fmt, fmt)
    assert _module_paths(out) - {"lm_head"} == expected
    if fmt == "pseudo":  # a plain fp16 checkpoint: transformers loads it as a Mixtral
        scales = {p.rsplit(".", 1)[0] for p in _module_paths(out, "*_scales.safetensors")}
        assert "model.layers.0.block_sparse_moe.experts.2.w2" in scales and scales < expected
        loaded = AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.inference_mode():
            want = model(input_ids=TOKENS).logits
            got = loaded(input_ids=TOKENS).logits.float()
        assert ((got - want).norm() / want.norm()).item() < 1e-2


def _calibrate_layers(model, recipe: str, algo: GPTQ, passes: bool = False) -> dict:
    """GPTQ layer by layer (`GPTQ.passes` per layer when `passes`); the QuantLinears."""
    from quantscale.calibration.sequential import batched, layerwise
    from quantscale.runtime.qlinear import replace_linears
    from quantscale.scheme import preset_recipe

    linears = replace_linears(model, preset_recipe(recipe))
    for step in layerwise(model, batched(TOKENS, 2)):
        mine = {n: m for n, m in linears.items() if n.startswith(step.name + ".")}
        for part in algo.passes(mine) if passes else [mine]:
            algo.start_layer(part)
            step.run()
            algo.finish_layer(part)
    return linears


def _weights(linears: dict) -> dict:
    return {n: (q.weight.clone(), q.weight_scale.clone()) for n, q in linears.items()}


class _Unbatched(GPTQ):
    """GPTQ as it was before batching: every group solved on its own, stacks whole."""

    def _batchable(self, names, acc):
        return False


@pytest.mark.parametrize("recipe", ["W4A16", "NVFP4A16"])
@pytest.mark.parametrize("all_tokens", [False, True])
def test_batched_experts_equal_one_at_a_time(all_tokens, recipe):
    got = {}
    for key, algo in (("batched", GPTQ()), ("single", GPTQ(expert_batch=1)), ("old", _Unbatched())):
        model = _qwen_moe()
        linearize_experts(model)
        with calibrate_all_experts(model, enabled=all_tokens):
            got[key] = (_weights(_calibrate_layers(model, recipe, algo)), algo.report)
    batched, report = got["batched"]
    for other in ("single", "old"):  # bitwise here; the tolerance of test_gptq
        for name, (w, scale) in got[other][0].items():
            assert torch.equal(batched[name][0], w), (other, name)
            assert torch.equal(batched[name][1], scale), (other, name)
    for proj in ("gate_proj", "down_proj"):
        mine = [r for r in report if r["modules"][0].endswith(f"experts.3.{proj}")]
        assert [r["batch"] for r in mine] == [4, 4]  # 4 experts in one solve, per layer
        assert len(mine[0]["modules"]) == (2 if proj == "gate_proj" else 1)  # with up_proj
    assert all(r["batch"] == 1 for r in got["single"][1])
    attn = [r for r in report if "self_attn" in r["modules"][0]]
    assert attn and all(r["batch"] == 1 for r in attn)


def test_passes_hold_a_bounded_number_of_expert_hessians():
    from quantscale.models.moe import expert_of

    held = []

    class Probe(GPTQ):
        def finish_layer(self, linears):
            assert self._tracker is not None
            held.append({expert_of(n) for n in self._tracker.acc if expert_of(n)})
            super().finish_layer(linears)

    results = []
    for passes in (False, True):
        model = _qwen_moe()
        linearize_experts(model)
        held.clear()
        with calibrate_all_experts(model, enabled=False):
            results.append(
                _weights(_calibrate_layers(model, "W4A16", Probe(expert_batch=3), passes))
            )
    assert len(held) == 2 * 3  # per layer: experts 0-2, expert 3, then attention
    assert max(len(h) for h in held) == 3 and not held[2]
    for name, (w, scale) in results[0].items():
        assert torch.equal(results[1][name][0], w) and torch.equal(results[1][name][1], scale)


def test_passes_sized_by_the_memory_budget():
    model = _qwen_moe()
    linearize_experts(model)
    from quantscale.runtime.qlinear import replace_linears
    from quantscale.scheme import preset_recipe

    linears = replace_linears(model, preset_recipe("W4A16"))
    layer = {n: q for n, q in linears.items() if n.startswith("model.layers.0.")}
    one_expert = 4 * (64 * 64 + 32 * 32)  # gate/up [64, 64] and down [32, 32] float32
    sizes = [len(p) for p in GPTQ(memory_budget=2 * one_expert).passes(layer)]
    assert sizes == [6, 6, 4]  # 2 experts x 3 projections, twice; then q/k/v/o
    assert [len(p) for p in GPTQ().passes(layer)] == [16]  # all fit: one pass
    # float64 sums (torchrun's default) hold twice the bytes: one expert per pass
    wide = GPTQ(memory_budget=2 * one_expert, hessian_dtype="float64").passes(layer)
    assert [len(p) for p in wide] == [3, 3, 3, 3, 4]


def test_starved_experts_rtn_and_the_others_batched(caplog):
    model = _qwen_moe()
    linearize_experts(model)
    _starve_experts(model)
    algo = GPTQ()
    with caplog.at_level(logging.WARNING), calibrate_all_experts(model, enabled=False):
        _calibrate_layers(model, "NVFP4A16", algo, passes=True)
        starved = log_expert_coverage(model, all_tokens=False)
    assert len(starved) == 4 and "weight-only statistics" in caplog.text
    by_method = {r["method"]: set() for r in algo.report}
    for r in algo.report:
        if ".experts." in r["modules"][0]:
            by_method[r["method"]].add((r["modules"][0].split(".experts.")[1][0], r["batch"]))
    assert by_method["rtn"] == {("2", 1), ("3", 1)}
    assert by_method["gptq"] == {("0", 2), ("1", 2)}


def test_finish_layer_frees_each_batch_of_hessians():
    import gc
    import weakref

    from quantscale.models.moe import expert_of

    alive = []

    class Probe(GPTQ):
        def finish_layer(self, linears):
            assert self._tracker is not None
            accs = [a for n, a in self._tracker.acc.items() if expert_of(n)]
            self._refs = [weakref.ref(a) for a in accs]
            del accs
            super().finish_layer(linears)

        def _quantize_experts(self, jobs, linears):
            gc.collect()
            alive.append(sum(r() is not None for r in self._refs))
            super()._quantize_experts(jobs, linears)

    model = _qwen_moe()
    linearize_experts(model)
    with calibrate_all_experts(model, enabled=False):
        _calibrate_layers(model, "W4A16", Probe(expert_batch=2))
    # per layer: 4 gate/up and 4 down Hessians, solved 2 at a time, each pair then freed
    assert alive == [8, 6, 4, 2] * 2


class _Held(GPTQ):
    """GPTQ recording, per pass, the experts whose Hessians it holds at `finish_layer`."""

    held: list[set] = []

    def finish_layer(self, linears):
        from quantscale.models.moe import expert_of

        assert self._tracker is not None
        self.held.append({expert_of(n) for n in self._tracker.acc if expert_of(n)})
        super().finish_layer(linears)


def _driven(monkeypatch, recipe: str, all_tokens: bool, batch: int | None) -> tuple[dict, list]:
    """quantize_model's GPTQ on the tiny Qwen3-MoE: the QuantLinears' tensors, held experts."""
    import quantscale.orchestrator as q

    model = _qwen_moe()
    linearize_experts(model)
    algo = _Held(expert_batch=batch)
    algo.held = []
    monkeypatch.setattr(q, "get_algorithm", lambda name, **kw: algo)
    with calibrate_all_experts(model, enabled=all_tokens):
        linears = quantize_model(model, recipe, TOKENS, method="gptq", batch_size=2)
    tensors = {f"{n}.{k}": t.clone() for n, m in linears.items() for k, t in m.state_dict().items()}
    return tensors, algo.held


@pytest.mark.parametrize("recipe", ["W4A16", "W8A8"])
@pytest.mark.parametrize("all_tokens", [False, True])
def test_driver_passes_equal_one_pass(monkeypatch, recipe, all_tokens):
    one, held_one = _driven(monkeypatch, recipe, all_tokens, None)
    many, held_many = _driven(monkeypatch, recipe, all_tokens, 1)
    assert [len(h) for h in held_one] == [4] * 2  # all fit: one pass per layer
    assert [len(h) for h in held_many] == [1, 1, 1, 1, 0] * 2  # 5 passes per layer
    assert sorted(one) == sorted(many) and any(".input_scale" in n for n in one) == (
        recipe == "W8A8"
    )
    for name, t in one.items():
        assert torch.equal(t, many[name]), name


@pytest.mark.parametrize("all_experts", [False, True])
def test_streamed_passes_equal_one_pass(tmp_path, monkeypatch, all_experts):
    from test_streaming import assert_same_checkpoint, make_checkpoint, run

    root = make_checkpoint(tmp_path, layers=2, moe=True)
    kw = {"calibrate_all_experts": all_experts}
    one = run(root, "one", "w4a16", "gptq", stream=True, **kw)
    sizes: list[int] = []
    passes = GPTQ.passes

    def one_expert_each(self, linears):
        self.expert_batch = 1
        out = passes(self, linears)
        sizes.append(len(out))
        return out

    monkeypatch.setattr(GPTQ, "passes", one_expert_each)
    many = run(root, "many", "w4a16", "gptq", stream=True, **kw)
    assert max(sizes) >= 3
    assert_same_checkpoint(one, many)
