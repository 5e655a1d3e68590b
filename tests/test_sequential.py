import torch

from quantscale.calibration.sequential import batched, layerwise, linear_stages
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
