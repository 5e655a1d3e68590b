import torch
from tiny_models import make_tiny_gemma3

from quantscale.calibration.sequential import (
    batched,
    capture_layer_arguments,
    layer_output,
    layerwise,
    linear_stages,
)
from quantscale.models.adapter import decoder_layers, layer_linears


def test_layer_inputs_match_full_forward(tiny_llama):
    tokens = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = tiny_llama(input_ids=tokens, output_hidden_states=True).hidden_states
    seen = []
    for step in layerwise(tiny_llama, batched(tokens, 4)):
        got = torch.cat([args[0] for args, _ in step.inputs])
        torch.testing.assert_close(got, ref[step.index])
        seen.append(step.name)
    assert seen == ["model.layers.0", "model.layers.1"]


def test_changes_to_a_layer_reach_the_next_layer_inputs(tiny_llama):
    tokens = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = tiny_llama(input_ids=tokens, output_hidden_states=True).hidden_states
    for step in layerwise(tiny_llama, batched(tokens, 2)):
        if step.index == 0:
            with torch.no_grad():
                step.layer.mlp.down_proj.weight.zero_()
        else:
            got = step.inputs[0][0][0]
            assert not torch.allclose(got, ref[1])


def test_quantizable_linears_skip_lm_head_and_norms(tiny_llama):
    prefix, layers = decoder_layers(tiny_llama)
    assert prefix == "model.layers" and len(layers) == 2
    per_layer = layer_linears(tiny_llama)
    names = sorted(per_layer[0])
    assert names == sorted(
        f"model.layers.0.{m}"
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    )


def _step0(model, tokens):
    return next(iter(layerwise(model, batched(tokens, 2))))


def test_stages_follow_the_layer_dependency_order(tiny_llama):
    tokens = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(3))
    step = _step0(tiny_llama, tokens)
    stages = linear_stages(step, layer_linears(tiny_llama)[0])
    short = [[n.rsplit(".", 1)[1] for n in s.names] for s in stages]
    assert short == [
        ["q_proj", "k_proj", "v_proj"],
        ["o_proj"],
        ["gate_proj", "up_proj"],
        ["down_proj"],
    ]
    assert [s.last.rsplit(".", 1)[1] for s in stages] == [
        "v_proj",
        "o_proj",
        "up_proj",
        "down_proj",
    ]


def test_run_until_stops_after_the_module(tiny_llama):
    tokens = torch.randint(0, 128, (4, 8), generator=torch.Generator().manual_seed(4))
    step = _step0(tiny_llama, tokens)
    attn, mlp = step.layer.self_attn, step.layer.mlp
    calls = {"o_proj": 0, "gate_proj": 0}
    hooks = [
        getattr(m, n).register_forward_hook(lambda *_a, n=n: calls.__setitem__(n, calls[n] + 1))
        for m, n in ((attn, "o_proj"), (mlp, "gate_proj"))
    ]
    step.run_until(attn.o_proj)
    assert calls == {"o_proj": 2, "gate_proj": 0}  # 2 batches, the MLP never ran
    step.run_until(None)
    assert calls == {"o_proj": 4, "gate_proj": 2}
    for h in hooks:
        h.remove()


def test_gemma3_sliding_and_full_layers_get_their_own_arguments():
    model = make_tiny_gemma3()
    tokens = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(4))
    _, layers = decoder_layers(model)
    sliding, full, _ = capture_layer_arguments(model, layers, batched(tokens, 2))
    (_, s_kw), (_, f_kw) = sliding[0], full[0]
    assert not torch.equal(s_kw["position_embeddings"][0], f_kw["position_embeddings"][0])
    s_mask, f_mask = s_kw["attention_mask"], f_kw["attention_mask"]
    assert s_mask is not None and (f_mask is None or not torch.equal(s_mask, f_mask))
    with torch.inference_mode():
        ref = model(input_ids=tokens, output_hidden_states=True).hidden_states
        # a sliding layer given the full layer's arguments computes something else
        args, _ = sliding[0]
        wrong = layer_output(layers[0](*args, **f_kw))
        assert not torch.allclose(wrong, ref[1][:2], atol=1e-4)
    for step in layerwise(model, batched(tokens, 2)):  # each layer's input: the float forward's
        got = torch.cat([args[0] if args else kw["hidden_states"] for args, kw in step.inputs])
        torch.testing.assert_close(got, ref[step.index])
        outputs = torch.cat(step.run())
        if step.index + 1 < len(ref) - 1:
            torch.testing.assert_close(outputs, ref[step.index + 1])


def test_gemma3_quantized_w8a16_stays_close_to_float():
    from quantscale.orchestrator import quantize_model

    model = make_tiny_gemma3()
    tokens = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ref = model(input_ids=tokens).logits
    quantize_model(model, "W8A16", tokens, method="gptq", batch_size=2)
    with torch.inference_mode():
        got = model(input_ids=tokens).logits
    assert 0 < (got - ref).norm() / ref.norm() < 0.02


def _count_down_proj(monkeypatch) -> dict[int, int]:
    """Forwards of each down_proj (the only QuantLinear reading 128 features in the tiny
    Llama), by module, in the order they first ran (layer 0 first)."""
    from quantscale.runtime.qlinear import QuantLinear

    runs: dict[int, int] = {}
    forward = QuantLinear.forward

    def counted(self, x):
        if self.in_features == 128:
            runs[id(self)] = runs.get(id(self), 0) + 1
        return forward(self, x)

    monkeypatch.setattr(QuantLinear, "forward", counted)
    return runs


@torch.inference_mode()
def _full_observe(step, needed) -> None:
    for args, kwargs in step.inputs:
        step.layer(*args, **kwargs)


def test_calibration_pass_stops_at_the_last_observed_input(monkeypatch):
    """A W8A8 static pass forwards each batch only up to down_proj's input (after the first
    batch, which runs whole to check each Linear runs once): down_proj's matmul runs in the
    propagation pass only, and the result equals full forwards bit for bit."""
    from tiny_models import make_tiny_llama

    from quantscale.calibration.sequential import LayerStep
    from quantscale.orchestrator import quantize_model

    tokens = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(5))
    fast = make_tiny_llama()
    runs = _count_down_proj(monkeypatch)
    quantize_model(fast, "W8A8", tokens, batch_size=2)
    # 4 batches: the first whole + 4 propagated (layer 0); the first only in the last layer
    assert list(runs.values()) == [5, 1]
    monkeypatch.undo()
    monkeypatch.setattr(LayerStep, "observe", _full_observe)
    full = make_tiny_llama()
    runs = _count_down_proj(monkeypatch)
    quantize_model(full, "W8A8", tokens, batch_size=2)
    assert list(runs.values()) == [8, 4]
    a, b = fast.state_dict(), full.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_observe_runs_whole_when_a_needed_module_runs_twice(tiny_llama):
    """A module called twice per forward (its second input matters) disables stopping."""
    tokens = torch.randint(0, 128, (4, 8), generator=torch.Generator().manual_seed(4))
    step = _step0(tiny_llama, tokens)
    mlp = step.layer.mlp
    forward = mlp.forward
    mlp.forward = lambda x: forward(x) + 0 * mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)))
    seen = []
    hook = mlp.down_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0].shape))
    step.observe({mlp.down_proj: False})
    hook.remove()
    assert len(seen) == 2 * len(step.inputs)  # both calls of every batch observed
