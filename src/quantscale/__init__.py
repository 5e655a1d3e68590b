"""quantscale: post-training quantization for LLMs.

`import quantscale as qs`: `qs.quantize`, `qs.inspect`, `qs.validate`, `qs.convert` and
`qs.evaluate` (`quantscale.api`) load on first use, so `import quantscale` stays light.
"""

from __future__ import annotations

from typing import Any

from quantscale.version import __version__

API = ("quantize", "inspect", "validate", "convert", "evaluate")
__all__ = ["__version__", *API]


def __getattr__(name: str) -> Any:
    if name in API:
        from quantscale import api

        return getattr(api, name)
    raise AttributeError(f"module 'quantscale' has no attribute {name!r}")
