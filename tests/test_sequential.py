import torch

from quantscale.calibration.sequential import batched, layerwise
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
