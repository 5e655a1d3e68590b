"""Mixture-of-experts models: per-expert Linear modules, and calibration of every expert.

transformers 5 stores a layer's experts fused (`gate_up_proj` [E, 2I, H], `down_proj`
[E, H, I]), which no Linear-based quantizer sees. `linearize_experts` replaces each such
module with `LinearExperts`: one `gate_proj` / `up_proj` / `down_proj` nn.Linear per expert
(Mixtral, MiniMax-M2: `w1` / `w3` / `w2`), the names vLLM reads from compressed-tensors checkpoints,
computing exactly what the fused module computed.

The router sends few or no calibration tokens to some experts. With `calibrate_all` on
(the `calibrate_all_experts` context), every expert also runs on every token during
calibration (its output for tokens the router did not pick is discarded), so each gets
activation statistics and a Hessian; with it off an expert that saw no token falls back to
weight-only statistics (GPTQ -> RTN). `expert_token_counts` / `log_expert_coverage` report
how many tokens the router actually sent to each expert. `expert_of(name)` tells an expert's
projection (`<experts>.<e>.<proj>`) from any other Linear (GPTQ solves experts batched).

transformers 5 also renames some MoE blocks in memory (Mixtral, MiniMax-M2:
`block_sparse_moe` -> `mlp`); Nemotron-H's experts are ungated (`up_proj` / `down_proj`
only). `checkpoint_name` maps a module / tensor name back to the
checkpoint convention that transformers' `save_pretrained` writes and vLLM / SGLang load
(`model.layers.L.block_sparse_moe.experts.E.w1`, `...block_sparse_moe.gate`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

log = logging.getLogger(__name__)

_NAMES = {"mixtral": ("w1", "w3", "w2"), "minimax_m2": ("w1", "w3", "w2")}
_DEFAULT_NAMES = ("gate_proj", "up_proj", "down_proj")
# model_type -> (in-memory pattern, checkpoint replacement) of transformers 5's renames.
_EXPERT_LINEAR = re.compile(r"^(.*\.experts)\.(\d+)\.([^.]+)$")
_MIXTRAL_RENAMES = ((re.compile(r"(^|\.)(layers\.\d+)\.mlp\."), r"\1\2.block_sparse_moe."),)
_CHECKPOINT_RENAMES: dict[str, tuple[tuple[re.Pattern, str], ...]] = {
    "mixtral": _MIXTRAL_RENAMES,
    "minimax_m2": _MIXTRAL_RENAMES,  # transformers maps MiniMax-M2 as Mixtral (+ its bias)
}


def checkpoint_name(name: str, model_type: str | None) -> str:
    """A module or tensor name as the model's checkpoints spell it (see the module docstring)."""
    for pattern, repl in _CHECKPOINT_RENAMES.get(model_type or "", ()):
        name = pattern.sub(repl, name)
    return name


def expert_of(name: str) -> tuple[str, int] | None:
    """(experts module name, expert index) of an expert's projection name
    (`model.layers.0.mlp.experts.3.gate_proj` -> ('model.layers.0.mlp.experts', 3)), else None."""
    match = _EXPERT_LINEAR.match(name)
    return (match.group(1), int(match.group(2))) if match else None


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x)) with named Linear projections; without a gate
    (Nemotron-H's ungated experts) down(act(up(x)))."""

    def __init__(self, gate: nn.Linear | None, up: nn.Linear, down: nn.Linear, act, names) -> None:
        super().__init__()
        self.names = tuple(names) if gate is not None else tuple(names[1:])
        modules = (gate, up, down) if gate is not None else (up, down)
        for name, module in zip(self.names, modules):
            self.add_module(name, module)
        self.act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.names) == 2:
            up, down = (getattr(self, n) for n in self.names)
            return down(self.act_fn(up(x)))
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


def _linear(weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    return lin


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    """A tensor attribute (parameter or buffer) of a fused experts module."""
    t = getattr(module, name)
    assert isinstance(t, torch.Tensor), f"{type(module).__name__}.{name} is not a tensor"
    return t


class LinearExperts(nn.ModuleList):
    """Drop-in replacement of a fused experts module (a list of `ExpertMLP`, so that expert
    e's projections are named `<experts>.<e>.gate_proj` etc.); see the module docstring."""

    def __init__(self, fused: nn.Module, names: tuple[str, str, str] = _DEFAULT_NAMES) -> None:
        down = _tensor(fused, "down_proj")
        if isinstance(getattr(fused, "gate_up_proj", None), torch.Tensor):
            gate_up = _tensor(fused, "gate_up_proj")
            inter = gate_up.shape[1] // 2
            gates: list[nn.Linear | None] = [_linear(g[:inter]) for g in gate_up]
            ups = [_linear(g[inter:]) for g in gate_up]
        else:  # ungated experts: up_proj [E, I, H]
            gates = [None] * down.shape[0]
            ups = [_linear(u) for u in _tensor(fused, "up_proj")]
        super().__init__(
            ExpertMLP(gates[e], ups[e], _linear(down[e]), fused.act_fn, names)
            for e in range(down.shape[0])
        )
        self.num_experts = down.shape[0]
        self.calibrate_all = False
        self.routed_tokens: torch.Tensor
        self.register_buffer(
            "routed_tokens", torch.zeros(self.num_experts, dtype=torch.long), False
        )

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token, slot = torch.where(top_k_index == e)
            self.routed_tokens[e] += token.numel()
            if self.calibrate_all:
                y = expert(hidden_states)[token]
            elif token.numel():
                y = expert(hidden_states[token])
            else:
                continue
            y = y * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def _is_fused_experts(module: nn.Module) -> bool:
    """gate_up_proj [E, 2I, H] (or, ungated, up_proj [E, I, H]) and down_proj [E, H, I]."""
    up = getattr(module, "gate_up_proj", None)
    if up is None:
        up = getattr(module, "up_proj", None)
    down = getattr(module, "down_proj", None)
    return (
        isinstance(up, torch.Tensor)
        and isinstance(down, torch.Tensor)
        and up.ndim == 3
        and down.ndim == 3
    )


def linearize_experts(model: nn.Module) -> list[str]:
    """Replace every fused experts module by `LinearExperts`, in place; their names."""
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    names = _NAMES.get(model_type, _DEFAULT_NAMES)
    done = []
    for name, module in list(model.named_modules()):
        if name and _is_fused_experts(module):
            model.set_submodule(name, LinearExperts(module, names))
            done.append(name)
    return done


def expert_modules(model: nn.Module) -> dict[str, LinearExperts]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LinearExperts)}


@contextmanager
def calibrate_all_experts(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block every expert runs on every token (routed outputs unchanged), and the
    routed-token counters start from zero."""
    mods = expert_modules(model)
    for m in mods.values():
        m.calibrate_all = enabled
        m.routed_tokens.zero_()
    try:
        yield
    finally:
        for m in mods.values():
            m.calibrate_all = False


def expert_token_counts(model: nn.Module) -> dict[str, int]:
    """`<experts>.<e>` -> tokens the router sent to that expert since counting began."""
    return {
        f"{name}.{e}": int(n)
        for name, m in expert_modules(model).items()
        for e, n in enumerate(m.routed_tokens.tolist())
    }


def log_expert_coverage(model: nn.Module, all_tokens: bool, min_tokens: int = 1) -> list[str]:
    """Log (and return) the experts the router sent fewer than `min_tokens` tokens (counted
    over every forward pass; `all_tokens`: whether calibration ran them on all tokens)."""
    counts = expert_token_counts(model)
    starved = [name for name, n in counts.items() if n < min_tokens]
    for name in starved:
        how = (
            "calibrated on all tokens" if all_tokens else "weights use weight-only statistics (RTN)"
        )
        log.warning("%s: router sent %d calibration tokens; %s", name, counts[name], how)
    return starved
