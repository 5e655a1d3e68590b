"""What a parameter name says about its module: kind (attention q/k/v/o, experts, router...)
and whether quantization leaves it alone by default."""

from __future__ import annotations

import fnmatch
import functools
import re
from collections import defaultdict

# (kind, regex on the module path, i.e. the parameter name without its last component)
_KINDS: list[tuple[str, str]] = [
    ("embeddings", r"(^|\.)(embed_tokens|wte|wpe|embeddings?|word_embeddings)$"),
    ("lm_head", r"(^|\.)(lm_head|output|embed_out)$"),
    ("norm", r"(norm|ln_\w+|layernorm|ln_f)$"),
    ("router", r"(^|\.)(gate|router|e_score_correction_bias)$"),
    ("attention.q", r"\.(q_proj|wq|q_a_proj|q_b_proj)$"),
    ("attention.k", r"\.(k_proj|wk)$"),
    ("attention.v", r"\.(v_proj|wv)$"),
    ("attention.qkv", r"\.(qkv_proj|query_key_value|c_attn|kv_a_proj_with_mqa|kv_b_proj)$"),
    ("attention.o", r"\.(o_proj|wo|dense|c_proj|out_proj)$"),
    ("experts.w1", r"experts\.\d+\.(w1|gate_proj)$"),
    ("experts.w2", r"experts\.\d+\.(w2|down_proj)$"),
    ("experts.w3", r"experts\.\d+\.(w3|up_proj)$"),
    ("mlp.gate", r"\.(gate_proj|w1)$"),
    ("mlp.up", r"\.(up_proj|w3)$"),
    ("mlp.down", r"\.(down_proj|w2)$"),
    ("mamba.in_proj", r"mixer\.in_proj$"),
    ("mamba.x_proj", r"mixer\.x_proj$"),
    ("mamba.dt_proj", r"mixer\.dt_proj$"),
    ("mamba.conv1d", r"mixer\.conv1d$"),
]
_COMPILED = [(kind, re.compile(pattern)) for kind, pattern in _KINDS]

# Modules that FP8 / weight quantization skips unless asked (matched against the module path).
DEFAULT_IGNORE = (
    "*embed_tokens*",
    "*embeddings*",
    "lm_head",
    "*.lm_head",
    "*norm*",
    "*.gate",
    "*.router",
    "*e_score_correction_bias*",
    "*.conv1d",
    "*.shared_expert_gate",
)

# Hybrid (attention + Mamba / linear-attention) and Mamba1 architectures: Linears kept float on
# top of DEFAULT_IGNORE, by config.json model_type, with the reason (docs/hybrid.md has the whole
# per-mixer table). The SSM parameters (A_log, D, dt_bias), conv1d, norms and routers are not
# Linears or are default-ignored already.
_MAMBA1_DT = (
    "transformers' Mamba1 forward multiplies dt_proj.weight directly (no module call), so a "
    "quantized dt_proj would run on its dequantized weight with float inputs; vLLM builds "
    "Mamba1 mixers without a quantization config"
)
HYBRID_FLOAT: dict[str, dict[str, str]] = {
    "jamba": {
        "*.mamba.dt_proj": "Jamba's forward multiplies dt_proj.weight directly (no module call) "
        "unless config._is_quantized is set, so a calibrated dt_proj sees no input; vLLM builds "
        "Mamba1 mixers without a quantization config",
    },
    "mamba": {"*.mixer.dt_proj": _MAMBA1_DT},
    "falcon_mamba": {"*.mixer.dt_proj": _MAMBA1_DT},
    "zamba2": {
        "*.gate_up_proj_adapter_list.*": "each hybrid layer holds the low-rank adapters of "
        "every use of its shared block and runs only its own, so the others see no input",
    },
}


def model_ignore(model_type: str | None) -> list[str]:
    """The patterns `HYBRID_FLOAT` keeps float for a config.json `model_type`."""
    return list(HYBRID_FLOAT.get(model_type or "", {}))


def module_path(param_name: str) -> str:
    """`model.layers.0.self_attn.q_proj.weight` -> `model.layers.0.self_attn.q_proj`."""
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


# Tensor leaves the layouts store for one module (weights, codes, qparams), not module names.
_LEAF = re.compile(r"\.(bias|(weight|input|output)(_[a-z0-9_]+)?)$")


def module_kind(param_name: str) -> str:
    """Kind of the module owning a tensor (`weight`, `weight_packed`, `input_scale`...) or of
    a module path; "other" if unknown."""
    path = module_path(param_name) if _LEAF.search(param_name) else param_name
    if param_name.endswith("e_score_correction_bias"):
        return "router"
    if param_name.endswith((".k_scale", ".v_scale")):
        return "kv_cache"
    for kind, pattern in _COMPILED:
        if pattern.search(path):
            return kind
    return "other"


def matches_any(module: str, patterns: list[str] | tuple[str, ...]) -> bool:
    """True if a module path matches a glob pattern, a `re:` regex, or a path component name.

    A bare name such as `gate` or `self_attn` matches any module with that component, the way
    `modules_to_not_convert` entries are read by transformers.
    """
    parts = module.split(".")
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.search(pattern[3:], module):
                return True
        elif fnmatch.fnmatchcase(module, pattern) or pattern in parts:
            return True
    return False


def is_ignored(module: str, extra: list[str] | tuple[str, ...] = ()) -> bool:
    """Whether a module is skipped by default or by the user's extra patterns."""
    return _ignored(module, tuple(extra))


@functools.lru_cache(maxsize=65536)
def _ignored(module: str, extra: tuple[str, ...]) -> bool:
    return matches_any(module, DEFAULT_IGNORE) or matches_any(module, extra)


_FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


def fused_siblings(name: str) -> list[str]:
    """Names of the projections a runtime fuses with `name` (itself included), e.g. q/k/v."""
    parent, _, leaf = name.rpartition(".")
    for group in _FUSED:
        if leaf in group:
            return [f"{parent}.{m}" if parent else m for m in group]
    return [name]


# ------------------------------------------------------------------ summaries

_INDEX = re.compile(r"\.(layers|experts|h|blocks)\.(\d+)(?=\.)")


def group_names(names: list[str], limit: int = 6) -> str:
    """Summarize tensor names: `model.layers.*.self_attn.q_proj.weight in 62 layers`."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name in names:
        groups[_INDEX.sub(lambda m: f".{m.group(1)}.*", name)].append(name)
    parts = [_describe(pattern, members) for pattern, members in list(groups.items())[:limit]]
    if len(groups) > limit:
        parts.append(f"and {len(groups) - limit} more patterns")
    return "; ".join(parts)


def _describe(pattern: str, members: list[str]) -> str:
    if len(members) == 1:
        return members[0]
    indices: dict[str, set[str]] = defaultdict(set)
    for name in members:
        for key, idx in _INDEX.findall(name):
            indices[key].add(idx)
    counts = " x ".join(
        f"{len(v)} {k if len(v) > 1 else k.rstrip('s')}" for k, v in indices.items()
    )
    return f"{pattern} in {counts}"
