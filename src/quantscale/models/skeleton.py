"""A causal LM without weights, filled one part (embeddings, a decoder layer, the head) at a time.

`Skeleton.build(config, dtype)` builds the transformers model of a config.json dict with its
parameters on the meta device (no memory) and its buffers (rotary tables) real, as
`from_pretrained(dtype=...)` would build them. `load(prefix, source, device)` reads the
parameters and persistent buffers of the submodule `prefix` from a tensor source (anything with
`names()` and `get(name, dtype)`, e.g. `checkpoint.source.TensorSource`), each in the dtype
the model gave it, onto `device`; `release(prefix)` puts them back on the meta device. A
parameter the model ties to another one (lm_head to the embeddings) is read under the name the
source stores. MoE experts are linearized (`models.moe.linearize_experts`) before any weight
is read, so each expert's projections load from their own checkpoint tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from quantscale.errors import CheckpointError
from quantscale.models.loader import tied_embeddings
from quantscale.models.moe import checkpoint_name, linearize_experts


class Source(Protocol):
    """What `Skeleton.load` reads from (see `checkpoint.source.TensorSource`)."""

    def names(self) -> list[str]: ...

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor: ...


@dataclass
class Skeleton:
    """The weightless model and the names each of its parameters goes by."""

    model: nn.Module
    tied: bool
    aliases: dict[str, list[str]] = field(default_factory=dict)
    where: str = "the source"
    model_type: str | None = None

    @classmethod
    def build(cls, config: dict[str, Any], dtype: torch.dtype, name_or_path: str = "") -> Skeleton:
        """The model of config.json `config`, parameters on the meta device."""
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

        # config.json spells inf / nan {"__float__": "Infinity"} (Bamba's time_step_limit);
        # from_pretrained decodes them, for_model does not
        config = PretrainedConfig._decode_special_floats(config)
        hf_config = AutoConfig.for_model(**config)
        hf_config._name_or_path = name_or_path
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        model.tie_weights()  # as from_pretrained does (from_config on meta leaves them apart)
        linearize_experts(model)  # per-expert Linears, named as the checkpoints name them
        names: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), []).append(name)
        aliases = {n: group for group in names.values() for n in group}
        where = name_or_path or "the source"
        return cls(model.eval(), tied_embeddings(model), aliases, where, config.get("model_type"))

    def load(
        self,
        prefix: str,
        source: Source,
        device: torch.device | str = "cpu",
        keep: Callable[[str], bool] | None = None,
    ) -> None:
        """Fill submodule `prefix` ('' for the whole model) from `source` onto `device`
        (only the tensors whose full names `keep` accepts)."""
        known = set(source.names())
        for full, module, local, tensor in self._tensors(prefix, keep):
            names = self.aliases.get(full, [full])
            names = [*names, *(checkpoint_name(n, self.model_type) for n in names)]
            stored = next((n for n in names if n in known), None)
            if stored is None:
                raise CheckpointError(
                    f"{self.where}: no tensor {full!r} ({tensor.dtype}{list(tensor.shape)}), "
                    "which the model of its config.json has"
                )
            value = source.get(stored, dtype=tensor.dtype)
            if tuple(value.shape) != tuple(tensor.shape):
                raise CheckpointError(
                    f"{self.where}: tensor {stored!r} has shape {list(value.shape)}; the model "
                    f"of its config.json expects {list(tensor.shape)}"
                )
            _set(module, local, value.to(device))

    def release(self, prefix: str, keep: Callable[[str], bool] | None = None) -> None:
        """Put submodule `prefix`'s parameters and persistent buffers back on the meta device."""
        for _full, module, local, tensor in self._tensors(prefix, keep):
            _set(module, local, torch.empty_like(tensor, device="meta"))

    def _tensors(
        self, prefix: str, keep: Callable[[str], bool] | None = None
    ) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
        """(full name, owner, local name, tensor) of every parameter and persistent buffer."""
        root = self.model.get_submodule(prefix) if prefix else self.model
        head = f"{prefix}." if prefix else ""
        for path, module in root.named_modules():
            base = f"{head}{path}." if path else head
            for local, t in _own_tensors(module):
                if keep is None or keep(base + local):
                    yield base + local, module, local, t


def _own_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """A module's own parameters and persistent buffers."""
    for local, param in module._parameters.items():
        if param is not None:
            yield local, param
    for local, buf in module._buffers.items():
        if buf is not None and local not in module._non_persistent_buffers_set:
            yield local, buf


def _set(module: nn.Module, local: str, value: torch.Tensor) -> None:
    if local in module._parameters:
        old = module._parameters[local]
        grad = bool(old is not None and old.requires_grad) and value.is_floating_point()
        module._parameters[local] = nn.Parameter(value, requires_grad=grad)
    else:
        module._buffers[local] = value


def materialized(module: nn.Module) -> bool:
    """Whether no parameter of `module` is left on the meta device."""
    return not any(p.is_meta for p in module.parameters())
