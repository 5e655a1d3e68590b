"""Importance-weighted RTN (llama.cpp's "imatrix"): round-to-nearest after a clipping search
weighted by each input channel's mean squared activation.

`collect_importance(model, names, batches)` runs the float model once over the calibration
batches and keeps, per Linear, the per-input-channel mean of x^2; `save_importance` writes
them as a small safetensors file (one float32 vector per module: ~ the model's hidden sizes,
kilobytes to megabytes), `load_importance` reads it back. `ImportanceRTN` (registered as
'rtn-importance'; `quantize --method rtn --importance STATS`) needs no forward: per output
row and weight group it clamps the float weights to the shrink ratio of `awq.CLIP_GRID`
whose rounded weights give the least importance-weighted squared error (`awq.clip_search`
with `awq.importance_error`), then rounds them as RTN does (fused projections sharing global
scales).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from quantscale import distributed
from quantscale.algorithms.awq import CLIP_GRID, NO_CLIP, clip_search, importance_error
from quantscale.algorithms.base import register_algorithm
from quantscale.algorithms.rtn import rtn_quantize_fused
from quantscale.calibration.sequential import run_batches
from quantscale.errors import QuantscaleError
from quantscale.runtime.qlinear import QuantLinear

FORMAT = "quantscale-importance"
STATISTIC = "mean_square"


@torch.inference_mode()
def collect_importance(
    model: nn.Module, names: Sequence[str], batches: Sequence[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """{module name: per-input-channel mean x^2 (float32)} of the Linears `names`, from one
    pass of the float model over `batches`. Sums are float64 (exact for float32 terms in
    practice, so independent of the order they are added in); under torchrun each rank
    runs its share of `batches` (`distributed.rank_slice`) and the sums are added in rank
    order on every rank: the statistics of one process over all the batches."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str) -> Callable:
        def record(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sq = x.pow(2).sum(dim=0).double()
            sums[name] = sq + sums[name] if name in sums else sq
            counts[name] = counts.get(name, 0) + x.shape[0]

        return record

    wanted = set(names)
    handles = [
        module.register_forward_pre_hook(hook(name))
        for name, module in model.named_modules()
        if name in wanted
    ]
    try:
        run_batches(model, distributed.rank_slice(batches))
    finally:
        for handle in handles:
            handle.remove()
    if distributed.active():
        sums, counts = _summed_over_ranks(sums, counts)
    return {n: (s / counts[n]).float().cpu() for n, s in sums.items()}


def _summed_over_ranks(
    sums: dict[str, torch.Tensor], counts: dict[str, int]
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Every rank's sums and counts added in rank order (the same on every rank)."""
    parts = distributed.gather_objects(({n: s.cpu() for n, s in sums.items()}, counts))
    total: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}
    for part_sums, part_counts in parts:
        for name, value in part_sums.items():
            total[name] = total[name] + value if name in total else value
            count[name] = count.get(name, 0) + part_counts[name]
    return total, count


def save_importance(path: str | os.PathLike, stats: Mapping[str, torch.Tensor]) -> Path:
    """Write `collect_importance`'s statistics as safetensors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.float().contiguous() for n, t in stats.items()}
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, partial, metadata={"format": FORMAT, "statistic": STATISTIC})
    os.replace(partial, path)
    return path


def load_importance(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The statistics of `save_importance`; a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise QuantscaleError(f"{path}: no importance statistics file")
    try:
        stats = load_file(path)
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise QuantscaleError(f"{path}: not a safetensors file ({err})") from err
    if meta.get("format") != FORMAT or meta.get("statistic") != STATISTIC:
        raise QuantscaleError(
            f"{path}: expected importance statistics (metadata format={FORMAT!r}, "
            f"statistic={STATISTIC!r}), got {meta}"
        )
    return stats


@register_algorithm("rtn-importance")
class ImportanceRTN:
    """RTN after an importance-weighted clipping search (see the module docstring);
    `importance`: a statistics file or `collect_importance`'s dict. No data needed."""

    needs_data = False
    true_sequential = False

    def __init__(
        self,
        importance: str | os.PathLike | Mapping[str, torch.Tensor],
        grid: Sequence[float] = CLIP_GRID,
    ) -> None:
        self.where = "importance statistics"
        if isinstance(importance, (str, os.PathLike)):
            self.where = os.fspath(importance)
            importance = load_importance(importance)
        self.importance, self.grid = dict(importance), tuple(grid)

    def start_layer(self, linears: dict[str, QuantLinear]) -> None:
        pass

    def finish_layer(self, linears: dict[str, QuantLinear]) -> None:
        with torch.no_grad():
            for name, ql in linears.items():
                args = ql.scheme.weights
                if args is None or name.rsplit(".", 1)[-1] in NO_CLIP:
                    continue
                imp = self.importance.get(name)
                if imp is None or imp.shape != (ql.in_features,):
                    got = "nothing" if imp is None else f"shape {tuple(imp.shape)}"
                    raise QuantscaleError(
                        f"{self.where}: expected a [{ql.in_features}] vector for {name}, "
                        f"got {got} (collect the statistics on this model)"
                    )
                w = ql.weight
                imp = imp.to(w.device)
                w.data.copy_(clip_search(w.detach(), args, importance_error(imp), self.grid))
        rtn_quantize_fused(linears)


def importance_method(method: str | None) -> str:
    """The weight algorithm of `--importance` with `--method method` (rtn or none)."""
    if method not in (None, "rtn", "rtn-importance"):
        raise QuantscaleError(
            f"--importance weights RTN's clipping search; it does not apply to --method {method}"
        )
    return "rtn-importance"


def ensure_importance(
    path: str | os.PathLike,
    model: nn.Module,
    names: Sequence[str],
    batches: Callable[[], Sequence[torch.Tensor]],
) -> Path:
    """`path` if it exists, else the statistics of `names` collected on `batches()` and
    written there (under torchrun: collected by every rank on its share, written by rank 0;
    each rank checks for the file before its share joins the reduction, so all see the
    same answer)."""
    path = Path(path)
    if not path.is_file():
        stats = collect_importance(model, names, batches())
        if distributed.is_writer():
            save_importance(path, stats)
        distributed.barrier()
    return path


def importance_options(path: str | os.PathLike, stream: object) -> dict[str, str]:
    """`ImportanceRTN`'s options for `--importance path`; the streamed path (`stream`) cannot
    collect the statistics, so it needs the file."""
    if stream and not Path(path).is_file():
        raise QuantscaleError(
            f"--importance {os.fspath(path)}: no such file; --stream does not collect it (run "
            "once without --stream, or give an existing statistics file)"
        )
    return {"importance": os.fspath(path)}
