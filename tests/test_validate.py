"""validate: a clean MiniMax-M2-shaped checkpoint passes; each injected mistake is found and
names the right tensors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantscale.checkpoint import validate as qvalidate
from quantscale.checkpoint.read import INDEX_NAME, Checkpoint
from quantscale.checkpoint.synthetic import write_llama_like, write_minimax_like
from quantscale.checkpoint.validate import group_names, skip_rules, validate_checkpoint
from quantscale.cli import main
from quantscale.formats.fp8 import dequantize_fp8_block

L0 = "model.layers.0"
L1 = "model.layers.1"
Edit = Callable[[torch.Tensor], torch.Tensor | None]


@pytest.fixture(scope="module")
def minimax(tmp_path_factory) -> Path:
    return write_minimax_like(tmp_path_factory.mktemp("mm") / "ckpt", 2, 4, 2)


def mutate(
    src: Path,
    dst: Path,
    edits: dict[str, Edit | None] | None = None,
    config: Callable[[dict], None] | None = None,
    add: dict[str, Callable[[dict], torch.Tensor]] | None = None,
) -> Path:
    """Copy `src` to `dst` with edits: shards no edit touches are symlinked, the others are
    rewritten. `edits[name]` maps a tensor to its replacement (None deletes it); `add[name]`
    computes a new tensor from the shard's tensors."""
    ckpt = Checkpoint(src)
    edits, add = edits or {}, add or {}
    dst.mkdir()
    touched = {ckpt.tensors[n].shard for n in list(edits) + [n[: -len("_scale_inv")] for n in add]}
    weight_map = {}
    for shard in ckpt.shards:
        if shard not in touched:
            (dst / shard).symlink_to(src / shard)
            weight_map.update({n: shard for n in ckpt.names(shard)})
            continue
        tensors = load_file(src / shard)
        for name, fn in edits.items():
            if name in tensors:
                new = None if fn is None else fn(tensors[name])
                tensors.pop(name) if new is None else tensors.__setitem__(name, new)
        for name, fn in add.items():
            if name[: -len("_scale_inv")] in tensors:
                tensors[name] = fn(tensors)
        save_file(tensors, dst / shard)
        weight_map.update({n: shard for n in tensors})
    (dst / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = dict(ckpt.config)
    cfg["quantization_config"] = dict(cfg["quantization_config"])
    if config:
        config(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def only(report, code):
    found = [f for f in report.findings if f.code == code]
    assert len(found) == 1, [f.code for f in report.findings]
    return found[0]


def test_clean(minimax):
    report = validate_checkpoint(minimax)
    assert report.ok and report.findings == [], [f.message for f in report.findings]


def test_self_attn_in_modules_to_not_convert(minimax, tmp_path):
    bad = mutate(
        minimax,
        tmp_path / "c",
        config=lambda c: c["quantization_config"]["modules_to_not_convert"].append("self_attn"),
    )
    report = validate_checkpoint(bad)
    f = only(report, "skip-list-quantized")
    assert f.severity == "error" and not report.ok
    assert sorted(f.tensors) == sorted(
        f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qkvo"
    )
    assert "'self_attn'" in f.message and "[48] vs [6144]" in f.message
    assert "model.layers.*.self_attn.q_proj.weight in 2 layers" in group_names(f.tensors)
    assert report.codes() == {"skip-list-quantized"}


def test_substring_skip_entry_is_a_warning(minimax, tmp_path):
    """'w' is a substring of no module component but of `...w1`: older loaders skip those."""
    bad = mutate(
        minimax,
        tmp_path / "c",
        config=lambda c: c["quantization_config"]["modules_to_not_convert"].append("xperts.0.w"),
    )
    f = only(validate_checkpoint(bad), "skip-list-quantized")
    assert f.severity == "warning"
    assert sorted(f.tensors) == sorted(
        f"model.layers.{i}.block_sparse_moe.experts.0.w{k}.weight"
        for i in range(2)
        for k in (1, 2, 3)
    )


def test_skip_rules():
    module = "model.layers.0.block_sparse_moe.gate"
    assert set(skip_rules(module, ["gate"])) == {"component", "transformers>=5", "substring"}
    assert set(skip_rules("model.layers.0.self_attn.q_proj", ["self_attn"])) == {
        "component",
        "substring",
    }
    assert set(skip_rules("model.layers.0.mlp.gate_proj", ["gate"])) == {"substring"}
    assert skip_rules("lm_head", ["gate"]) == {}
    assert "transformers>=5" in skip_rules("model.layers.1.mlp", ["model.layers.1"])
    assert "transformers>=5" not in skip_rules("model.layers.11.mlp", ["model.layers.1"])


def test_removed_scale(minimax, tmp_path):
    name = f"{L1}.self_attn.k_proj.weight"
    report = validate_checkpoint(mutate(minimax, tmp_path / "c", {name + "_scale_inv": None}))
    f = only(report, "fp8-without-scale")
    assert f.severity == "error" and f.tensors == [name]
    assert report.codes() == {"fp8-without-scale"}


def test_scale_of_wrong_shape(minimax, tmp_path):
    name = f"{L0}.block_sparse_moe.experts.2.w2.weight_scale_inv"
    report = validate_checkpoint(
        mutate(minimax, tmp_path / "c", {name: lambda s: s.T.contiguous()})
    )
    f = only(report, "scale-shape")
    assert f.severity == "error" and f.tensors == [name]
    assert "[12, 24]" in f.message and "[24, 12]" in f.message and "transposed" in f.message


def test_inverted_scales(minimax, tmp_path):
    name = f"{L0}.self_attn.q_proj.weight_scale_inv"
    report = validate_checkpoint(mutate(minimax, tmp_path / "c", {name: lambda s: 1.0 / s}))
    f = only(report, "scale-inverted")
    assert f.severity == "error" and f.tensors == [name]
    assert "reciprocal" in f.message


def test_inverted_scales_seen_in_sampled_tiles(minimax, tmp_path):
    """Dequantized tiles of a sampled weight are checked too (values ~1e4..1e6)."""
    name = f"{L0}.block_sparse_moe.experts.0.w1.weight_scale_inv"
    bad = mutate(minimax, tmp_path / "c", {name: lambda s: 1.0 / s})
    ctx = qvalidate._context(Checkpoint(bad))
    weight = name.removesuffix("_scale_inv")
    amax = qvalidate._tile_amax(ctx, weight, Checkpoint(bad).get(name))
    assert min(amax) > 1e3
    good = qvalidate._tile_amax(ctx, weight, Checkpoint(minimax).get(name))
    assert max(good) < 1


def test_bf16_weight_in_converted_module(minimax, tmp_path):
    name = f"{L1}.self_attn.o_proj.weight"

    def dequant(t: torch.Tensor) -> torch.Tensor:
        return dequantize_fp8_block(t, Checkpoint(minimax).get(name + "_scale_inv"))

    bad = mutate(minimax, tmp_path / "c", {name: dequant, name + "_scale_inv": None})
    report = validate_checkpoint(bad)
    f = only(report, "unquantized-in-converted")
    assert f.severity == "warning" and f.tensors == [name] and report.ok
    assert "BF16" in f.message and "modules_to_not_convert" in f.message


def test_scale_kept_for_bf16_weight(minimax, tmp_path):
    name = f"{L0}.block_sparse_moe.experts.3.w3.weight"
    bad = mutate(minimax, tmp_path / "c", {name: lambda t: t.to(torch.bfloat16)})
    report = validate_checkpoint(bad)
    f = only(report, "scale-without-fp8")
    assert f.severity == "error" and f.tensors == [name + "_scale_inv"]


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("quant_method", "fp4", "quant_method"),
        ("fmt", "e5m2", "fmt"),
        ("activation_scheme", "static", "activation_scheme"),
        ("weight_block_size", [128], "weight_block_size"),
        ("weight_block_size", [128, "128"], "weight_block_size"),
        ("modules_to_not_convert", "lm_head", "modules_to_not_convert"),
    ],
)
def test_bad_config_fields(minimax, tmp_path, field, value, words):
    bad = mutate(
        minimax, tmp_path / "c", config=lambda c: c["quantization_config"].__setitem__(field, value)
    )
    report = validate_checkpoint(bad)
    f = only(report, "config-field")
    assert f.severity == "error" and words in f.message and repr(value) in f.message


def test_both_fmt_spellings_accepted(minimax, tmp_path):
    ok = mutate(
        minimax, tmp_path / "c", config=lambda c: c["quantization_config"].update(fmt="e4m3")
    )
    assert validate_checkpoint(ok).findings == []


def test_ue8m0(tmp_path):
    args = dict(hidden=256, intermediate=384, layers=1, vocab=64, fp8=True)
    good = write_llama_like(tmp_path / "pow2", scale_fmt="ue8m0", **args)
    assert validate_checkpoint(good).findings == []
    plain = write_llama_like(tmp_path / "plain", **args)
    cfg = json.loads((plain / "config.json").read_text())
    cfg["quantization_config"]["scale_fmt"] = "ue8m0"
    (plain / "config.json").write_text(json.dumps(cfg))
    f = only(validate_checkpoint(plain), "scale-not-ue8m0")
    assert len(f.tensors) == 7 and all(t.endswith("weight_scale_inv") for t in f.tensors)


def test_stale_config_after_dequantize(tmp_path):
    """bf16 tensors under an fp8 quantization_config (DeepSeek fp8_cast_bf16's leftover)."""
    path = write_llama_like(tmp_path / "bf16", 256, 384, 1, 64)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps(cfg))
    report = validate_checkpoint(path)
    assert only(report, "config-stale").severity == "error"
    assert len(only(report, "unquantized-in-converted").tensors) == 7


def test_runtime_refusals_are_named(minimax, monkeypatch):
    def fake(ckpt, runtime=None):
        return [(f"{L0}.self_attn.q_proj.weight", "transformers (X)", "9.9", "refuses: because")]

    monkeypatch.setattr(qvalidate, "runtime_refusals", fake)
    warn = only(validate_checkpoint(minimax), "runtime-refuses")
    assert warn.severity == "warning" and warn.tensors == [f"{L0}.self_attn.q_proj.weight"]
    assert "transformers (X) 9.9" in warn.message and "because" in warn.message
    err = only(validate_checkpoint(minimax, runtime="transformers"), "runtime-refuses")
    assert err.severity == "error"
    assert validate_checkpoint(minimax, runtime="vllm").findings == []


def test_runtime_edge_tiles_real_rules(tmp_path):
    """With the runtime rules (checkpoint.runtimes): 1000-wide MLP weights get named."""
    path = write_llama_like(tmp_path / "edge", 256, 1000, 1, 64, fp8=True)
    report = validate_checkpoint(path, runtime="transformers")
    found = [f for f in report.findings if f.code == "runtime-refuses"]
    assert found and all(f.severity == "error" and "transformers" in f.message for f in found)
    named = {t.split(".")[-2] for f in found for t in f.tensors}
    assert named == {"gate_proj", "up_proj", "down_proj"}
    assert validate_checkpoint(path).warnings and validate_checkpoint(path).ok


def test_cli_exit_codes(minimax, tmp_path, capsys):
    assert main(["validate", str(minimax)]) == 0
    assert "no problems" in capsys.readouterr().out
    bad = mutate(
        minimax,
        tmp_path / "c",
        config=lambda c: c["quantization_config"]["modules_to_not_convert"].append("self_attn"),
    )
    assert main(["validate", str(bad), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["errors"] == 1
    assert data["findings"][0]["code"] == "skip-list-quantized"
    assert main(["validate", str(tmp_path / "missing")]) == 2


def test_cli_text_names_tensors(minimax, tmp_path, capsys):
    bad = mutate(
        minimax,
        tmp_path / "c",
        config=lambda c: c["quantization_config"]["modules_to_not_convert"].append("self_attn"),
    )
    assert main(["validate", str(bad)]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "[skip-list-quantized]" in out
    assert "model.layers.*.self_attn.q_proj.weight in 2 layers" in out
    assert "1 error(s), 0 warning(s)" in out


def test_group_names():
    names = [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(62)]
    names += [
        f"model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight"
        for i in range(3)
        for e in range(5)
    ]
    names += ["lm_head.weight"]
    assert group_names(names) == (
        "model.layers.*.self_attn.q_proj.weight in 62 layers; "
        "model.layers.*.block_sparse_moe.experts.*.w1.weight in 3 layers x 5 experts; "
        "lm_head.weight"
    )
