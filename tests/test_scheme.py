"""QuantArgs / QuantScheme / Recipe schema, presets and compressed-tensors compatibility."""

import json

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from quantscale.errors import QuantscaleError
from quantscale.scheme import (
    PRESETS,
    QuantArgs,
    Recipe,
    load_recipe,
    match_pattern,
    preset_recipe,
    preset_scheme,
    recipe_from_dict,
)


def test_strategy_inference_and_validation():
    assert QuantArgs().strategy == "tensor"
    assert QuantArgs(group_size=128).strategy == "group"
    assert QuantArgs(group_size=-1).strategy == "channel"
    assert QuantArgs(strategy="BLOCK", block_structure="128x64").block_structure == [128, 64]
    with pytest.raises(ValidationError):
        QuantArgs(strategy="group")
    with pytest.raises(ValidationError):
        QuantArgs(strategy="token")  # static token
    with pytest.raises(ValidationError):
        QuantArgs(strategy="block")
    with pytest.raises(ValidationError):
        QuantArgs(strategy="group", group_size=16, dynamic="local")
    with pytest.raises(ValidationError):
        QuantArgs(bogus=1)


# GGUF k-quants (superblock scales) have no compressed-tensors form: --format gguf writes them
CT_PRESETS = [n for n in PRESETS if "superblock" not in PRESETS[n]["weights"]]


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "Q4_K_M"])
def test_kquant_recipes_round_trip_through_our_quantization_config(name):
    recipe = load_recipe(name)
    cfg = recipe.to_quantization_config()
    assert cfg["config_groups"]["group_0"]["weights"]["superblock"] == 256
    assert Recipe.from_quantization_config(cfg).config_groups == recipe.config_groups
    with pytest.raises(ValidationError, match="GGUF k-quants"):
        QuantArgs(num_bits=4, group_size=128, superblock=256)


@pytest.mark.parametrize("name", CT_PRESETS)
def test_presets_validate_in_compressed_tensors(name):
    ct = pytest.importorskip("compressed_tensors.quantization")
    cfg = load_recipe(name).to_quantization_config()
    parsed = ct.QuantizationConfig.model_validate(json.loads(json.dumps(cfg)))
    ours = preset_scheme(name)
    theirs = parsed.config_groups["group_0"]
    assert theirs.weights.num_bits == ours.weights.num_bits
    assert theirs.weights.strategy == ours.weights.strategy
    assert theirs.format == ours.format
    assert Recipe.from_quantization_config(cfg).config_groups == {"group_0": ours}


def test_preset_lookup_is_case_and_dash_insensitive():
    assert load_recipe("w4a16-asym").config_groups["group_0"].weights.symmetric is False
    assert load_recipe("Nvfp4A16").config_groups["group_0"].weights.is_nvfp4
    with pytest.raises(QuantscaleError, match="unknown|neither"):
        load_recipe("W3A99")


def test_preset_contents():
    assert preset_scheme("W8A8").input_activations.dynamic is False
    assert preset_scheme("W8A8_DYNAMIC").input_activations.strategy == "token"
    w4 = preset_scheme("W4A16").weights
    assert (w4.num_bits, w4.group_size, w4.symmetric) == (4, 128, True)
    assert preset_scheme("FP8_BLOCK").weights.block_structure == [128, 128]
    assert preset_scheme("NVFP4").input_activations.dynamic == "local"
    assert preset_scheme("MXFP4A16").weights.is_mx


def test_default_ignore_and_overrides():
    r = recipe_from_dict(
        {"scheme": "W4A16", "overrides": {"re:.*down_proj$": "W8A16", "*.o_proj": None}}
    )
    assert r.scheme_for("model.layers.0.mlp.down_proj").weights.num_bits == 8
    assert r.scheme_for("model.layers.0.mlp.up_proj").weights.num_bits == 4
    assert r.scheme_for("model.layers.0.mlp.gate_proj") is not None
    for skipped in (
        "lm_head",
        "model.embed_tokens",
        "model.layers.0.input_layernorm",
        "model.norm",
        "model.layers.0.mlp.gate",
        "model.layers.0.self_attn.o_proj",
    ):
        assert r.scheme_for(skipped) is None, skipped


def test_exact_name_beats_pattern_beats_class():
    r = Recipe.model_validate(
        {
            "config_groups": {
                "a": {"targets": ["Linear"], "weights": {"num_bits": 8}},
                "b": {"targets": ["re:.*q_proj"], "weights": {"num_bits": 6}},
                "c": {"targets": ["m.q_proj"], "weights": {"num_bits": 4}},
            },
            "ignore": [],
        }
    )
    assert r.scheme_for("m.q_proj").weights.num_bits == 4
    assert r.scheme_for("x.q_proj").weights.num_bits == 6
    assert r.scheme_for("x.k_proj").weights.num_bits == 8
    assert r.scheme_for("x.k_proj", module_type="Conv1d") is None


def test_overrides_round_trip_through_quantization_config():
    ct = pytest.importorskip("compressed_tensors.quantization")
    r = recipe_from_dict(
        {"scheme": "W4A16", "overrides": {"*.down_proj": "W8A16", "*.v_proj": None}}
    )
    cfg = r.to_quantization_config()
    ct.QuantizationConfig.model_validate(cfg)
    assert any(p.startswith("re:") and "v_proj" in p for p in cfg["ignore"])
    assert cfg["format"] == "pack-quantized"
    back = Recipe.from_quantization_config(cfg)
    for name in ("l.0.down_proj", "l.0.up_proj", "l.0.v_proj", "lm_head"):
        a, b = r.scheme_for(name), back.scheme_for(name)
        assert (a is None) == (b is None), name
        assert a is None or a.weights == b.weights


def test_mixed_formats_give_mixed_precision():
    r = recipe_from_dict({"scheme": "NVFP4A16", "overrides": {"re:.*down_proj": "FP8_DYNAMIC"}})
    assert r.to_quantization_config()["format"] == "mixed-precision"


def test_match_pattern_forms():
    assert match_pattern("model.lm_head", "lm_head")
    assert not match_pattern("model.lm_head_x", "lm_head")
    assert match_pattern("a.b.q_proj", "*.q_proj")
    assert match_pattern("a.b.q_proj", "re:.*proj")
    assert match_pattern("x", "Linear", "Linear")


def test_load_recipe_from_yaml_and_json(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text("scheme: w8a8\nignore: [lm_head]\noverrides:\n  're:.*down_proj': null\n")
    r = load_recipe(y)
    assert r.ignore == ["lm_head"]
    assert r.scheme_for("model.embed_tokens") is not None  # default ignore replaced
    assert r.scheme_for("l.down_proj") is None
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"quantization_config": load_recipe("FP8").to_quantization_config()}))
    assert load_recipe(j).config_groups["group_0"] == preset_scheme("FP8")
    bad = tmp_path / "bad.yaml"
    bad.write_text("config_groups: {g: {weights: {num_bits: 4, strategy: group}}}\n")
    with pytest.raises(QuantscaleError, match="bad.yaml"):
        load_recipe(bad)
    with pytest.raises(QuantscaleError, match="neither"):
        load_recipe(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("role", "observer", "kwargs", "ct_name", "ct_kwargs"),
    [
        ("input_activations", "minmax", {}, "static_minmax", {}),
        ("input_activations", "ema", {"sigma": 0.1}, "minmax", {"averaging_constant": 0.1}),
        ("input_activations", "mse", {}, "mse", {"norm": 2.0, "patience": 10}),
        ("input_activations", "percentile", {"alpha": 0.999}, "percentile", {"alpha": 0.999}),
        ("weights", "minmax", {}, "memoryless_minmax", {}),
        ("weights", "mse", {"grid": 50}, "memoryless_mse", {"norm": 2.0, "patience": 10}),
    ],
)
def test_saved_observer_names_are_llm_compressors(role, observer, kwargs, ct_name, ct_kwargs):
    """The exported config names the llm-compressor observer with the same statistic, and
    reads back as ours."""
    scheme = preset_scheme("W8A8")
    update = {"observer": observer, "observer_kwargs": kwargs}
    args = getattr(scheme, role).model_copy(update=update)
    recipe = Recipe(config_groups={"g": scheme.model_copy(update={role: args})})
    written = recipe.to_quantization_config()["config_groups"]["g"][role]
    assert written["observer"] == ct_name
    assert ct_kwargs.items() <= written.get("observer_kwargs", {}).items()
    assert Recipe.from_quantization_config(recipe.to_quantization_config()).config_groups == {
        "g": recipe.config_groups["g"]
    }


def test_old_and_llm_compressor_observer_names_read_as_ours():
    cfg = load_recipe("W8A8").to_quantization_config()
    acts = cfg["config_groups"]["group_0"]["input_activations"]
    for written, ours in [("minmax", "minmax"), ("static_minmax", "minmax"), ("mse", "mse")]:
        acts.update(observer=written, observer_kwargs={})
        back = Recipe.from_quantization_config(cfg).config_groups["group_0"]
        assert back.input_activations.observer == ours
    acts.update(observer="minmax", observer_kwargs={"averaging_constant": 0.05})
    back = Recipe.from_quantization_config(cfg).config_groups["group_0"].input_activations
    assert (back.observer, back.observer_kwargs) == ("ema", {"sigma": 0.05})


def test_saved_ignore_list_is_plain_names_and_simple_regexes():
    """The ignore list written to config.json: no atomic groups or inline flags (Python 3.11+
    only, written by no other tool), and compressed-tensors' own matcher reads it as our globs."""
    from compressed_tensors.utils.match import match_name

    from quantscale.naming import DEFAULT_IGNORE

    ignore = preset_recipe("W4A16").to_quantization_config()["ignore"]
    assert ignore == [
        "re:.*embed_tokens.*$",
        "re:.*embeddings.*$",
        "lm_head",
        r"re:.*\.lm_head$",
        "re:.*norm.*$",
        r"re:.*\.gate$",
        r"re:.*\.router$",
        "re:.*e_score_correction_bias.*$",
        r"re:.*\.conv1d$",
        r"re:.*\.shared_expert_gate$",
    ]
    names = [
        "model.embed_tokens",
        "lm_head",
        "model.lm_head",
        "model.layers.0.input_layernorm",
        "model.layers.3.mlp.gate",
        "model.layers.3.mlp.shared_expert_gate",
        "model.layers.3.mlp.gate_proj",
        "model.layers.3.mlp.experts.7.down_proj",
        "backbone.layers.1.mixer.conv1d",
        "model.layers.1.self_attn.q_proj",
    ]
    for name in names:  # a bare name is a suffix match to us, exact to them: the list agrees
        theirs = any(match_name(name, written) for written in ignore)
        assert theirs == any(match_pattern(name, glob) for glob in DEFAULT_IGNORE), name
    assert [n for n in names if any(match_name(n, w) for w in ignore)] == names[:6] + names[8:9]


@settings(max_examples=300, deadline=None)
@given(
    glob=st.text(alphabet="ab.*?[]!_0", min_size=1, max_size=8),
    name=st.text(alphabet="ab._0[]!*?", max_size=10),
)
@example(glob="[!]", name="")  # a '[' whose only ']' is a member: literal (CI found it)
@example(glob="[!]]", name="a")
@example(glob="[[]", name="[")
def test_glob_to_regex_matches_fnmatch(glob, name):
    """Any glob, written as a `re:` pattern, matches exactly the names fnmatch matches."""
    import fnmatch
    import re

    from quantscale.scheme import _to_ct_pattern

    written = _to_ct_pattern(glob)
    if not written.startswith("re:"):
        assert written == glob
        return
    assert "(?" not in written
    assert (re.match(written[3:], name) is not None) == fnmatch.fnmatchcase(name, glob)
