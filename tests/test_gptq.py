"""GPTQ: agreement with a plain reference, lazy-block invariance, error below RTN for every
scheme, outputs on the quantization grid, act-order g_idx, layer-wise use on a tiny Llama."""

from __future__ import annotations

import pytest
import torch

from quantscale.algorithms.gptq import (
    GPTQ,
    HessianAccumulator,
    gptq_quantize,
    output_error,
)
from quantscale.algorithms.rtn import rtn_weight
from quantscale.calibration.sequential import batched, layerwise
from quantscale.errors import QuantscaleError
from quantscale.formats.fp8 import E4M3
from quantscale.qdq import QParams, fake_quantize, nvfp4_global_scale
from quantscale.runtime.qlinear import replace_linears
from quantscale.scheme import QuantArgs, preset_recipe, preset_scheme


def _problem(out: int = 48, inp: int = 96, n: int = 512, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    mix = torch.randn(inp, inp, generator=g) * 0.3 + torch.eye(inp)
    x = torch.randn(n, inp, generator=g) @ mix
    acc = HessianAccumulator(inp)
    acc.add(x[: n // 2])
    acc.add(x[n // 2 :])
    return w, acc.hessian()


def _reference_gptq(w: torch.Tensor, h: torch.Tensor, args: QuantArgs, damp: float = 0.01):
    """Textbook GPTQ: one column at a time, the whole remaining weight updated each step."""
    w = w.clone().double()
    h = h.clone().double()
    h.diagonal().add_(damp * h.diagonal().mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    g = args.group_size
    for i in range(w.shape[1]):
        if i % g == 0:
            _, qp = rtn_weight(w[:, i : i + g].float(), args)
        q[:, i] = fake_quantize(w[:, i : i + 1].float(), args, qp)[:, 0].double()
        err = (w[:, i] - q[:, i]) / hinv[i, i]
        w[:, i:] -= err[:, None] * hinv[i, i:][None, :]
    return q.float()


def test_hessian_is_twice_the_mean_outer_product():
    x = torch.randn(3, 5, 8)
    acc = HessianAccumulator(8)
    acc.add(x)
    flat = x.reshape(-1, 8)
    torch.testing.assert_close(acc.hessian(), 2 * flat.t() @ flat / 15)
    assert acc.count == 15


def test_bf16_hessian_is_close_to_float32():
    x = torch.randn(4096, 64, dtype=torch.bfloat16) @ torch.randn(64, 64, dtype=torch.bfloat16)
    fast, exact = HessianAccumulator(64), HessianAccumulator(64, exact=True)
    fast.add(x)
    exact.add(x)
    ref = exact.hessian()
    assert fast.count == exact.count == 4096
    assert (fast.hessian() - ref).abs().max() < 2e-3 * ref.abs().max()


def test_matches_textbook_reference():
    w, h = _problem()
    args = QuantArgs(num_bits=4, group_size=32)
    ours = gptq_quantize(w, h, args, block_size=16, actorder=None).weight
    ref = _reference_gptq(w, h, args)
    agree = torch.isclose(ours, ref, rtol=1e-4, atol=1e-6).float().mean().item()
    assert agree > 0.99, agree  # same rounding decisions (scales differ in the last bits)


def test_lazy_block_size_does_not_change_the_result():
    w, h = _problem()
    args = preset_scheme("NVFP4A16").weights
    a = gptq_quantize(w, h, args, block_size=128).weight
    b = gptq_quantize(w, h, args, block_size=8).weight
    assert torch.isclose(a, b, rtol=1e-4, atol=1e-6).float().mean().item() > 0.99


@pytest.mark.parametrize(
    "preset", ["W4A16", "W4A16_ASYM", "W8A16", "NVFP4A16", "MXFP4A16", "FP8_BLOCK", "FP8"]
)
def test_error_below_rtn_and_output_on_grid(preset):
    w, h = _problem(out=64, inp=128)
    args = preset_scheme(preset).weights
    res = gptq_quantize(w, h, args)
    w_rtn, _ = rtn_weight(w, args)
    assert output_error(w, res.weight, h) < 0.8 * output_error(w, w_rtn, h)
    # the result is exactly representable: re-quantizing it with its qparams is the identity
    torch.testing.assert_close(fake_quantize(res.weight, args, res.qparams), res.weight)
    assert torch.isfinite(res.qparams.scale).all() and (res.qparams.scale > 0).all()


def test_nvfp4_global_scale_fixed_and_block_scales_e4m3():
    w, h = _problem(out=32, inp=64)
    args = preset_scheme("NVFP4A16").weights
    res = gptq_quantize(w, h, args)
    torch.testing.assert_close(res.qparams.global_scale, nvfp4_global_scale(w.abs().amax()))
    s = res.qparams.scale
    assert s.shape == (32, 4)
    torch.testing.assert_close(s.to(E4M3).float(), s, rtol=0, atol=0)


def test_shared_global_scale_is_used():
    w, h = _problem(out=32, inp=64)
    args = preset_scheme("NVFP4A16").weights
    shared = nvfp4_global_scale(w.abs().amax() * 3)
    res = gptq_quantize(w, h, args, global_scale=shared)
    assert torch.equal(res.qparams.global_scale, shared)


def test_actorder_group_gives_g_idx_and_dequantizes():
    w, h = _problem(out=16, inp=64)
    args = QuantArgs(num_bits=4, group_size=16, actorder="group")
    res = gptq_quantize(w, h, args)
    g_idx = res.g_idx
    assert g_idx.shape == (64,) and g_idx.dtype == torch.int32
    assert torch.bincount(g_idx.long()).tolist() == [16, 16, 16, 16]
    order = torch.argsort(h.diagonal(), descending=True)
    assert g_idx[order[:16]].unique().tolist() == [0]  # highest-Hessian columns form group 0
    per_col = QParams(res.qparams.scale[:, g_idx.long()])
    torch.testing.assert_close(fake_quantize(res.weight, args, per_col), res.weight)
    plain = gptq_quantize(w, h, args, actorder=None)
    assert plain.g_idx is None and not torch.equal(plain.weight, res.weight)


def test_actorder_weight_keeps_static_groups():
    w, h = _problem(out=16, inp=64)
    args = QuantArgs(num_bits=4, group_size=16, actorder="weight")
    res = gptq_quantize(w, h, args)
    _, qp_rtn = rtn_weight(w, args)
    assert res.g_idx is None
    torch.testing.assert_close(res.qparams.scale, qp_rtn.scale)
    default = gptq_quantize(w, h, args.model_copy(update={"actorder": None}))
    assert torch.equal(default.weight, res.weight)  # the default when the scheme sets none


@pytest.mark.parametrize("actorder", ["weight", None])
def test_weight_observer_sets_the_gptq_scales(actorder):
    """A scheme's weight observer ('mse': a clipping search) sets GPTQ's group scales as it
    sets RTN's; before, GPTQ always took min-max scales and ignored it."""
    w, h = _problem(out=16, inp=64)
    minmax = QuantArgs(num_bits=4, group_size=16, actorder="weight")
    mse = minmax.model_copy(update={"observer": "mse"})
    res = gptq_quantize(w, h, mse, actorder=actorder)
    _, qp_mse = rtn_weight(w, mse)
    _, qp_minmax = rtn_weight(w, minmax)
    assert not torch.equal(qp_mse.scale, qp_minmax.scale)
    if actorder == "weight":  # static groups: the observer runs once on the original weight
        torch.testing.assert_close(res.qparams.scale, qp_mse.scale)
    assert torch.equal(fake_quantize(res.weight, mse, res.qparams), res.weight)
    assert not torch.equal(res.weight, gptq_quantize(w, h, minmax, actorder=actorder).weight)


@pytest.mark.parametrize("preset", ["W4A16", "NVFP4A16", "W8A16", "FP8"])
def test_clip_search_keeps_each_rows_best_factor(preset):
    """`clip`: every output row is the row of the single-factor solve with the least loss
    (rows are independent in GPTQ), on the grid of the qparams returned; the total loss is
    at most each factor's; a per-tensor scale (FP8) takes one factor for the weight. With
    groups of 128, rows differ in the factor they prefer (int4: 1.0 for some, 0.9 or 0.8 for
    most, on this problem)."""
    w, h = _problem(out=32, inp=256, n=1024)
    args = preset_scheme(preset).weights
    grid = (1.0, 0.9, 0.8)
    res = gptq_quantize(w, h, args, clip=grid)
    single = [gptq_quantize(w, h, args, clip=(f,)) for f in grid]
    assert torch.equal(single[0].weight, gptq_quantize(w, h, args).weight)
    assert res.loss <= min(r.loss for r in single) * (1 + 1e-6)
    assert torch.equal(fake_quantize(res.weight, args, res.qparams), res.weight)
    chosen = [
        [f for f, r in zip(grid, single) if torch.equal(res.weight[i], r.weight[i])]
        for i in range(w.shape[0])
    ]
    assert all(chosen), "each row comes from one of the single-factor solves"
    if args.strategy == "tensor":
        assert any(torch.equal(res.weight, r.weight) for r in single)
    if preset == "W4A16":
        assert len({c[0] for c in chosen}) > 1, "rows chose different factors"
        assert res.loss < 0.95 * single[0].loss


def test_dead_columns_are_kept():
    w, h = _problem(out=8, inp=32)
    h[:, 3] = 0
    h[3, :] = 0
    res = gptq_quantize(w, h, QuantArgs(num_bits=8, strategy="channel"))
    assert res.weight[:, 3].abs().sum() > 0


def _calibrate(model, recipe, tokens, algo):
    linears = replace_linears(model, recipe)
    for step in layerwise(model, batched(tokens, 2)):
        mine = {n: m for n, m in linears.items() if n.startswith(step.name + ".")}
        algo.start_layer(mine)
        step.run()
        algo.finish_layer(mine)
    return linears


def test_layerwise_gptq_shares_hessians_and_global_scales(tiny_llama):
    tokens = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    algo = GPTQ()
    linears = _calibrate(tiny_llama, preset_recipe("NVFP4A16"), tokens, algo)
    groups = sorted(tuple(n.rsplit(".", 1)[1] for n in r["modules"]) for r in algo.report)
    assert groups.count(("q_proj", "k_proj", "v_proj")) == 2
    assert groups.count(("gate_proj", "up_proj")) == 2
    assert all(r["method"] == "gptq" and r["tokens"] == 64 for r in algo.report)
    attn = "model.layers.0.self_attn."
    gs = [linears[attn + p].weight_qparams().global_scale for p in ("q_proj", "k_proj", "v_proj")]
    assert torch.equal(gs[0], gs[1]) and torch.equal(gs[1], gs[2])
    stacked = torch.cat([linears[attn + p].weight for p in ("q_proj", "k_proj", "v_proj")])
    torch.testing.assert_close(gs[0], nvfp4_global_scale(stacked.abs().amax()))
    for ql in linears.values():
        torch.testing.assert_close(
            fake_quantize(ql.weight, ql.scheme.weights, ql.weight_qparams()), ql.weight
        )


def test_unused_linears_fall_back_to_rtn(tiny_llama):
    tokens = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    algo = GPTQ()
    linears = replace_linears(tiny_llama, preset_recipe("W4A16"))
    for step in layerwise(tiny_llama, batched(tokens, 2)):
        mine = {n: m for n, m in linears.items() if n.startswith(step.name + ".")}
        algo.start_layer(mine)  # no step.run(): no tokens reach these linears
        algo.finish_layer(mine)
    assert {r["method"] for r in algo.report} == {"rtn"}
    ql = linears["model.layers.1.mlp.down_proj"]
    assert ql.weight_qparams() is not None and torch.isfinite(ql.weight_scale).all()


def test_quantize_model_with_gptq_beats_rtn_on_the_output(tiny_llama):
    import copy

    from quantscale.orchestrator import quantize_model

    tokens = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = tiny_llama(input_ids=tokens).logits
    errs = {}
    for method in ("rtn", "gptq"):
        model = copy.deepcopy(tiny_llama)
        quantize_model(model, "W4A16_ASYM", tokens, method=method, batch_size=4)
        with torch.inference_mode():
            errs[method] = (model(input_ids=tokens).logits - ref).pow(2).mean().item()
    assert errs["gptq"] < errs["rtn"], errs


def test_scales_of_a_bf16_weight_are_bf16_exact():
    w, h = _problem(out=32, inp=128)
    w = w.bfloat16()
    for preset in ("W4A16", "W4A16_ASYM", "FP8_DYNAMIC"):
        args = preset_scheme(preset).weights
        res = gptq_quantize(w, h, args)
        s = res.qparams.scale
        assert torch.equal(s.bfloat16().float(), s)
        # dequantizing in bf16 arithmetic (as runtimes do) gives the returned weight exactly
        qp16 = QParams(s.bfloat16(), res.qparams.zero_point)
        torch.testing.assert_close(
            fake_quantize(res.weight, args, qp16), res.weight, rtol=0, atol=0
        )
    res32 = gptq_quantize(w.float(), h, preset_scheme("W4A16").weights)
    assert not torch.equal(res32.qparams.scale.bfloat16().float(), res32.qparams.scale)


def _input_hessians(model, tokens, names):
    """Hessians of the inputs the named modules get in a full forward of `model`."""
    accs = {n: HessianAccumulator(model.get_submodule(n).in_features, exact=True) for n in names}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(lambda _m, a, n=n: accs[n].add(a[0]))
        for n in names
    ]
    with torch.inference_mode():
        for ids in batched(tokens, 4):
            model(input_ids=ids)
    for h in hooks:
        h.remove()
    return {n: a.hessian() for n, a in accs.items()}


@pytest.mark.parametrize("sequential", [True, False])
def test_true_sequential_hessians_come_from_quantized_inputs(tiny_llama, sequential):
    import copy

    from quantscale.algorithms.base import ALGORITHMS, register_algorithm
    from quantscale.orchestrator import quantize_model

    seen = {}

    @register_algorithm("gptq-probe")
    class Probe(GPTQ):
        def _quantize_group(self, names, linears, acc, hand_over=False):
            seen[names[0]] = acc.hessian().clone()
            super()._quantize_group(names, linears, acc, hand_over)

    tokens = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(5))
    names = ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"]
    float_h = _input_hessians(copy.deepcopy(tiny_llama), tokens, names)
    try:
        quantize_model(
            tiny_llama, "W4A16", tokens, "gptq-probe", batch_size=4, true_sequential=sequential
        )
    finally:
        ALGORITHMS.pop("gptq-probe")
    quant_h = _input_hessians(tiny_llama, tokens, names)
    for name in names:
        expected, other = (quant_h, float_h) if sequential else (float_h, quant_h)
        scale = expected[name].norm()
        assert (seen[name] - expected[name]).norm() < 1e-5 * scale
        assert (seen[name] - other[name]).norm() > 1e-2 * scale


def _experts(n: int = 5, out: int = 24, inp: int = 64):
    """n weights with Hessians of their own (own act-order permutations; one dead column)."""
    pairs = [_problem(out=out, inp=inp, n=256, seed=10 + e) for e in range(n)]
    w, h = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    h[1, :, 7] = 0
    h[1, 7, :] = 0
    return w, h


def _agree(got: torch.Tensor, want: torch.Tensor, step: torch.Tensor) -> None:
    """The tolerance of a batched solve: its ops are the per-weight ops on a batch, so only
    the batched matmul kernels' rounding may differ, which can move a value that sits on a
    rounding boundary to the neighbouring code: at most 0.1% of the codes differ, none by
    more than one quantization step (bitwise equal on the CPUs we tried)."""
    differ = got != want
    assert differ.float().mean().item() <= 1e-3
    assert ((got - want).abs() <= step + 1e-6).all()


@pytest.mark.parametrize(
    ("preset", "actorder"),
    [
        ("W4A16", "weight"),
        ("W4A16", "group"),
        ("W4A16_ASYM", None),
        ("NVFP4A16", "weight"),
        ("NVFP4A16", None),
        ("FP8_BLOCK", None),
    ],
)
def test_batched_solve_equals_one_at_a_time(preset, actorder):
    from quantscale.algorithms.gptq import gptq_quantize_batch

    args = preset_scheme(preset).weights
    if preset == "FP8_BLOCK":
        args = args.model_copy(update={"block_structure": [16, 16]})
    elif args.strategy == "group":
        args = args.model_copy(update={"group_size": 16})
    w, h = _experts()
    batch = gptq_quantize_batch(w, h, args, actorder=actorder, block_size=16)
    assert len(batch) == w.shape[0]
    for e, got in enumerate(batch):
        want = gptq_quantize(w[e], h[e], args, actorder=actorder, block_size=16)
        step = want.weight.abs().max() / (4 if args.num_bits == 4 else 8)
        _agree(got.weight, want.weight, step)
        torch.testing.assert_close(got.qparams.scale, want.qparams.scale)
        assert (got.g_idx is None) == (want.g_idx is None)
        if want.g_idx is not None:
            assert torch.equal(got.g_idx, want.g_idx)
        assert got.loss == pytest.approx(want.loss, rel=1e-4)
    if actorder == "group":  # each expert follows its own Hessian's order
        assert not torch.equal(batch[0].g_idx, batch[2].g_idx)


def test_batched_factor_retries_only_the_failing_hessian():
    from quantscale.algorithms.gptq import inverse_hessian_factor, inverse_hessian_factors

    _, h = _experts(3)
    h[1] = -h[1]  # negative definite: dampening must grow for this one only
    with pytest.raises(QuantscaleError, match="not positive definite"):
        inverse_hessian_factor(h[1], 0.01)
    h[1] = torch.diag(torch.linspace(-0.5, 1.0, h.shape[-1]))  # PD once damped 10x or 100x
    got = inverse_hessian_factors(h, 0.01)
    for e in range(3):
        torch.testing.assert_close(got[e], inverse_hessian_factor(h[e], 0.01), rtol=0, atol=0)


@pytest.mark.parametrize("actorder", [None, "weight"])
def test_handed_over_hessian_solves_the_same_and_is_consumed(actorder):
    """A Hessian passed as `[h]` (the layer path's `[acc.take()]`) is overwritten and
    released, the result bit for bit the one of a Hessian the solve must not touch."""
    torch.manual_seed(3)
    x = torch.randn(200, 64)
    acc = HessianAccumulator(64)
    acc.add(x)
    kept = acc.hessian()
    original = kept.clone()
    args = preset_scheme("W4A16").weights.model_copy(update={"group_size": 16})
    want = gptq_quantize(torch.randn(8, 64) * 0.02, kept, args, actorder=actorder)
    assert torch.equal(kept, original), "a Hessian passed plainly is left as it was"
    box = [acc.take()]
    assert acc.sum is None, "take() drops the accumulator's sum"
    assert torch.equal(box[0], original), "take() is hessian() computed in place"
    torch.manual_seed(3)
    _ = torch.randn(200, 64)
    got = gptq_quantize(torch.randn(8, 64) * 0.02, box, args, actorder=actorder)
    assert box == [], "the solve took the Hessian out of the list"
    assert torch.equal(got.weight, want.weight)
    assert torch.equal(got.qparams.scale, want.qparams.scale)
    assert got.loss == want.loss


def test_handed_over_hessian_retries_dampening_in_place():
    """An owned Hessian that needs more dampening is re-damped in place (only its diagonal
    changed), giving the factor of the copy-damping path."""
    from quantscale.algorithms.gptq import inverse_hessian_factor, inverse_hessian_factors

    h = torch.diag(torch.linspace(-0.5, 1.0, 32))  # PD only once damped 10x or 100x
    h[0, 1] = h[1, 0] = 0.01
    want = inverse_hessian_factor(h, 0.01)
    got = inverse_hessian_factors(h.clone()[None], 0.01, owned=True)[0]
    assert torch.equal(got, want)


def test_weight_observer_option_reaches_the_checkpoint(tmp_path):
    """`quantize --weight-observer mse` (GPTQOptions.weight_observer): the config names the
    observer, the scales differ from min-max's, the streamed path writes the same tensors;
    an observer that cannot set weight scales is refused by name."""
    import json

    from test_streaming import assert_same_checkpoint, make_checkpoint, run, tensors

    from quantscale.cli import main
    from quantscale.orchestrator import GPTQOptions

    root = make_checkpoint(tmp_path, layers=2)
    argv = ["quantize", str(root / "m"), str(root / "cli"), "--scheme", "W4A16"]
    argv += ["--method", "gptq", "--group-size", "32", "--weight-observer", "mse"]
    argv += ["--calib-data", str(root / "calib.txt"), "--calib-samples", "8"]
    assert main([*argv, "--calib-seq-len", "32"]) == 0
    config = json.loads((root / "cli" / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["observer"] == "memoryless_mse"
    mse = GPTQOptions(group_size=32, weight_observer="mse")
    mem = run(root, "mem", "W4A16", "gptq", gptq=mse)
    assert_same_checkpoint(mem, run(root, "st", "W4A16", "gptq", stream=True, gptq=mse))
    minmax = tensors(run(root, "minmax", "W4A16", "gptq", gptq=GPTQOptions(group_size=32)))
    ours = tensors(mem)
    scales = [n for n in ours if n.endswith("weight_scale")]
    assert scales and any(not torch.equal(ours[n], minmax[n]) for n in scales)
    with pytest.raises(QuantscaleError, match="--weight-observer 'kl'"):
        GPTQOptions(weight_observer="kl").recipe("W4A16")


def test_gptq_clip_option_cli_stream_and_refusal(tmp_path):
    """`quantize --gptq-clip` (the default grid) writes what GPTQOptions(clip=CLIP_GRID)
    writes, in memory and streamed; factors outside (0, 1] are refused by name."""
    from test_streaming import assert_same_checkpoint, make_checkpoint, run, tensors

    from quantscale.algorithms.gptq import CLIP_GRID
    from quantscale.cli import main
    from quantscale.orchestrator import GPTQOptions

    root = make_checkpoint(tmp_path, layers=2)
    argv = ["quantize", str(root / "m"), str(root / "cli"), "--scheme", "W4A16"]
    argv += ["--method", "gptq", "--group-size", "32", "--gptq-clip"]
    argv += ["--calib-data", str(root / "calib.txt"), "--calib-samples", "8"]
    assert main([*argv, "--calib-seq-len", "32", "--calib-batch-size", "4"]) == 0
    options = GPTQOptions(group_size=32, clip=CLIP_GRID)
    mem = run(root, "mem", "W4A16", "gptq", gptq=options)
    assert_same_checkpoint(root / "cli", mem)
    assert_same_checkpoint(mem, run(root, "st", "W4A16", "gptq", stream=True, gptq=options))
    plain = tensors(run(root, "plain", "W4A16", "gptq", gptq=GPTQOptions(group_size=32)))
    assert any(not torch.equal(t, plain[n]) for n, t in tensors(mem).items())
    with pytest.raises(QuantscaleError, match="--gptq-clip 1.2"):
        GPTQOptions(clip=(1.2,)).method_options("gptq")
