"""The calibration activations between two decoder layers: one hidden-state tensor per batch.

`Boundary(directory, budget)` keeps the inputs of the layer being calibrated and writes the
outputs of that layer, batch by batch as they come, to `boundary-<k>.bin` in `directory`
(raw bytes of each tensor in turn, fsynced, then renamed into place), so that a killed run can
resume from the last finished layer. Within `budget` bytes (inputs and outputs both resident)
the outputs also stay in memory; past it they are read back memory-mapped from the file (the
page cache holds them, not the process), so host memory does not grow with the number of
calibration samples. Tensors keep their dtype (the model's, bfloat16 by default).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from quantscale.errors import CheckpointError

PREFIX = "boundary-"


@dataclass(frozen=True)
class BoundaryFile:
    """What the progress record says about a saved boundary."""

    name: str
    dtype: str
    shapes: list[list[int]]

    @property
    def nbytes(self) -> int:
        size = getattr(torch, self.dtype).itemsize
        return sum(math.prod(s) * size for s in self.shapes)

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shapes": self.shapes}

    @classmethod
    def from_json(cls, obj: dict) -> BoundaryFile:
        return cls(obj["name"], obj["dtype"], [list(s) for s in obj["shapes"]])


def parse_bytes(text: str) -> int:
    """'8GB', '512MiB', '1e9' -> bytes (decimal units; KiB/MiB/GiB/TiB binary)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    units.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    try:
        value = float(num) * units[s[len(num) :]]
    except (KeyError, ValueError) as err:
        raise ValueError(f"{text!r}: expected a size such as 8GB, 512MiB or 1e9") from err
    if value < 0:
        raise ValueError(f"{text!r}: a size cannot be negative")
    return int(value)


class Boundary:
    """Saved hidden states between layers; see the module docstring."""

    def __init__(self, directory: str | os.PathLike, budget: int | None = None) -> None:
        self.dir = Path(directory)
        self.budget = budget
        self.spilled = False

    def resident(self, nbytes: int) -> bool:
        """Whether inputs and outputs of `nbytes` each fit the budget together."""
        return self.budget is None or 2 * nbytes <= self.budget

    def save(self, index: int, outputs: Iterable[torch.Tensor]) -> tuple[BoundaryFile, list]:
        """Write `outputs` (one tensor per batch, computed lazily) as boundary `index`;
        returns its record and the tensors (in memory or memory-mapped from the file)."""
        name = f"{PREFIX}{index}.bin"
        tmp = self.dir / f".{name}.tmp"
        kept: list[torch.Tensor] | None = []
        shapes: list[list[int]] = []
        dtype, nbytes = None, 0
        with open(tmp, "wb") as f:
            for t in outputs:
                t = t.detach().to("cpu").contiguous()
                dtype = dtype or t.dtype
                shapes.append(list(t.shape))
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
                nbytes += t.numel() * t.element_size()
                if kept is not None and self.resident(nbytes):
                    kept.append(t)
                else:
                    kept = None  # over budget: read back mapped
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / name)
        record = BoundaryFile(name, str(dtype or torch.float32).removeprefix("torch."), shapes)
        return record, kept if kept is not None else self.load(record)

    def load(self, record: BoundaryFile) -> list[torch.Tensor]:
        """The tensors of a saved boundary: read into memory within the budget, else mapped."""
        path = self.dir / record.name
        dtype = getattr(torch, record.dtype)
        total = sum(math.prod(s) for s in record.shapes)
        size = path.stat().st_size if path.exists() else -1
        if size != total * dtype.itemsize:
            raise CheckpointError(
                f"{path}: saved activations hold {size} bytes; the progress record says "
                f"{total * dtype.itemsize} ({len(record.shapes)} {record.dtype} batches)"
            )
        flat = torch.from_file(str(path), shared=False, size=total, dtype=dtype)
        if self.resident(record.nbytes):
            flat = flat.clone()
        else:
            self.spilled = True
        out, at = [], 0
        for shape in record.shapes:
            n = math.prod(shape)
            out.append(flat[at : at + n].view(shape))
            at += n
        return out

    def prune(self, keep: str | None) -> None:
        """Remove saved boundaries other than `keep` (and unfinished temporaries)."""
        for path in self.dir.glob(f"*{PREFIX}*"):
            if path.name != keep:
                path.unlink(missing_ok=True)
