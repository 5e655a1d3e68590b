"""`QuantLinear`: a fake-quantized Linear carrying its quantization parameters as buffers.

- `weight` holds the *fake-quantized* weight dequantize(quantize(W)) in the model's dtype once
  `set_weight` has been called (before that: the float weight, unquantized). Exact codes are
  recovered by re-quantizing it with `weight_qparams()`.
- Buffers (float32, all optional, created when set or when loaded): `weight_scale`,
  `weight_zero_point`, `weight_global_scale`, `weight_g_idx` (int32); static activations
  `input_scale`, `input_zero_point`, `input_global_scale`, and `output_scale`,
  `output_zero_point`. They keep float32 under `model.to(dtype)` and survive state_dict
  save/load (loading creates them with the stored shapes).
- forward: input activations fake-quantized with the static scales (dynamic schemes compute
  them from x; a static scheme not yet calibrated passes x through), F.linear, then the
  output activations likewise. With `use_int8 = True` and a W8A8 scheme
  (`runtime.int8.supports_int8`) the matmul is a real INT8 x INT8 -> INT32 one.
- `compute_dtype(torch.bfloat16)`: a context in which every QuantLinear runs its matmul in
  that dtype (activation fake-quant stays in the input's dtype, the output is cast back).
  On CPUs with AVX512-BF16 a bf16 GEMM is about 4x a float32 one; calibration uses it for
  its forwards (`quantscale calibrate --calib-dtype bfloat16`).
- `matmul_kernel("onednn")`: a context in which float32 CPU matmuls run through oneDNN
  (`torch.ops.mkldnn._linear_pointwise`) instead of F.linear's BLAS (MKL): about 2x on an
  AMD EPYC (a [4096, 576] x [576, 1536] product: 60 ms against 121 ms), still float32
  products and sums, but summed in another order, so outputs differ from F.linear's in the
  last bits (about 1e-6 of the largest output); not the default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from quantscale.errors import QuantscaleError
from quantscale.qdq import (
    ACTIVATION,
    QParams,
    compute_qparams,
    fake_quantize,
    fake_quantize_dynamic,
    lsq_fake_quantize,
    quantize,
    reduce_minmax,
)
from quantscale.runtime.hadamard import add_online_hadamard, has_online_hadamard
from quantscale.runtime.int8 import int8_linear, supports_int8
from quantscale.scheme import QuantArgs, QuantScheme, Recipe

QPARAM_FIELDS = ("scale", "zero_point", "global_scale")
ROLES = ("weight", "input", "output")
BUFFERS = tuple(f"{r}_{f}" for r in ROLES for f in QPARAM_FIELDS) + ("weight_g_idx",)

_COMPUTE_DTYPE: ContextVar[torch.dtype | None] = ContextVar("qlinear_compute_dtype", default=None)
MATMUL_KERNELS = ("aten", "onednn")
_MATMUL_KERNEL: ContextVar[str] = ContextVar("qlinear_matmul_kernel", default="aten")


@contextmanager
def compute_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """QuantLinear matmuls in `dtype` inside the block (None: the input's dtype)."""
    token = _COMPUTE_DTYPE.set(dtype)
    try:
        yield
    finally:
        _COMPUTE_DTYPE.reset(token)


@contextmanager
def matmul_kernel(name: str) -> Iterator[None]:
    """QuantLinear float32 CPU matmuls through `name` ('aten': F.linear; 'onednn') inside
    the block; see the module docstring."""
    if name not in MATMUL_KERNELS:
        raise QuantscaleError(f"matmul kernel {name!r}: expected one of {MATMUL_KERNELS}")
    if name == "onednn" and not torch.backends.mkldnn.is_available():
        raise QuantscaleError("matmul kernel 'onednn': this torch build has no oneDNN")
    token = _MATMUL_KERNEL.set(name)
    try:
        yield
    finally:
        _MATMUL_KERNEL.reset(token)


def _onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor | None:
    """x @ weight.T + bias by oneDNN, or None where it does not apply (not float32 on the
    CPU, or a gradient wanted: the op has no backward)."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")


class QuantLinear(nn.Module):
    """A Linear layer quantized per `scheme`; see the module docstring."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        scheme: QuantScheme | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if scheme is None:
            raise QuantscaleError("QuantLinear needs a QuantScheme")
        self.in_features, self.out_features = in_features, out_features
        self.scheme = scheme
        w = torch.empty(out_features, in_features, device=device, dtype=dtype)
        self.weight = nn.Parameter(w, False)
        b = torch.empty(out_features, device=device, dtype=dtype) if bias else None
        self.bias = None if b is None else nn.Parameter(b, False)
        self.use_int8 = False
        self._w_int8: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: QuantScheme) -> QuantLinear:
        """Wrap `linear` (its parameters are shared, not copied) with `scheme`."""
        ql = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme, "meta")
        ql.weight = linear.weight
        ql.bias = linear.bias
        if has_online_hadamard(linear):
            add_online_hadamard(ql)
        return ql

    # ------------------------------------------------------------------ qparams

    def _set_qparams(self, role: str, qp: QParams | None) -> None:
        for f in QPARAM_FIELDS:
            value = None if qp is None else getattr(qp, f)
            name = f"{role}_{f}"
            if value is None:
                self._buffers.pop(name, None)
                continue
            value = value.detach().to(device=self.weight.device, dtype=torch.float32)
            self.register_buffer(name, value.clone().reshape(value.shape or (1,)))

    def _qparams(self, role: str) -> QParams | None:
        scale = self._buffers.get(f"{role}_scale")
        if scale is None:
            return None
        return QParams(
            scale,
            self._buffers.get(f"{role}_zero_point"),
            self._buffers.get(f"{role}_global_scale"),
        )

    def set_weight(
        self, w_hat: torch.Tensor, qparams: QParams, g_idx: torch.Tensor | None = None
    ) -> None:
        """Install a fake-quantized weight and the qparams that produced it."""
        if tuple(w_hat.shape) != tuple(self.weight.shape):
            raise QuantscaleError(
                f"set_weight: shape {tuple(w_hat.shape)} != weight {tuple(self.weight.shape)}"
            )
        dev, dtype = self.weight.device, self.weight.dtype
        self.weight = nn.Parameter(w_hat.detach().to(device=dev, dtype=dtype), False)
        self._set_qparams("weight", qparams)
        self._buffers.pop("weight_g_idx", None)
        if g_idx is not None:
            self.register_buffer("weight_g_idx", g_idx.detach().to(dev, torch.int32).clone())
        self._w_int8 = None

    def weight_qparams(self) -> QParams | None:
        """The weight's qparams, or None while the weight is unquantized."""
        return self._qparams("weight")

    def set_input_qparams(self, qp: QParams | None) -> None:
        """Static input-activation qparams (None removes them)."""
        self._set_qparams("input", qp)

    def input_qparams(self) -> QParams | None:
        return self._qparams("input")

    def set_input_global_scale(self, global_scale: torch.Tensor | None) -> None:
        """Static global scale of dynamic 'local' (NVFP4) input activations."""
        self._buffers.pop("input_global_scale", None)
        if global_scale is not None:
            gs = global_scale.detach().to(self.weight.device, torch.float32).reshape(1)
            self.register_buffer("input_global_scale", gs.clone())

    def set_output_qparams(self, qp: QParams | None) -> None:
        """Static output-activation qparams (None removes them)."""
        self._set_qparams("output", qp)

    def output_qparams(self) -> QParams | None:
        return self._qparams("output")

    def set_activation_qparams(self, role: str, qp: QParams) -> None:
        """Calibrated qparams of the 'input' or 'output' activations: the static scale, or
        only the global scale when the scheme's input is dynamic 'local' (NVFP4)."""
        args = self.scheme.input_activations if role == "input" else None
        if args is not None and args.dynamic == "local":
            self.set_input_global_scale(qp.global_scale)
        elif role == "input":
            self.set_input_qparams(qp)
        else:
            self.set_output_qparams(qp)

    # ------------------------------------------------------------------ forward

    def _act(self, x: torch.Tensor, args: QuantArgs | None, role: str) -> torch.Tensor:
        if args is None:
            return x
        if args.dynamic:
            return fake_quantize_dynamic(x, args, self._buffers.get(f"{role}_global_scale"))
        qp = self._qparams(role)
        if qp is None:  # static scheme, not calibrated yet
            return x
        if qp.scale.requires_grad and torch.is_grad_enabled():  # scales being learned
            return lsq_fake_quantize(x, args, qp)
        return fake_quantize(x, args, qp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_int8 and self._int8_ready():
            out = self._forward_int8(x)
        else:
            x = self._act(x, self.scheme.input_activations, "input")
            out = self._linear(x)
        return self._act(out, self.scheme.output_activations, "output")

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _COMPUTE_DTYPE.get()
        if dtype is None or dtype == x.dtype:
            if _MATMUL_KERNEL.get() == "onednn":
                out = _onednn_linear(x, self.weight, self.bias)
                if out is not None:
                    return out
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.weight.to(dtype), bias).to(x.dtype)

    def _int8_ready(self) -> bool:
        a = self.scheme.input_activations
        if a is None or not supports_int8(self.scheme) or self.weight_qparams() is None:
            return False
        return bool(a.dynamic) or self.input_qparams() is not None

    def _quantized_weight(self) -> tuple[QuantArgs, QParams]:
        args, qp = self.scheme.weights, self.weight_qparams()
        if args is None or qp is None:
            raise QuantscaleError("QuantLinear: the weight is not quantized (set_weight first)")
        return args, qp

    def int8_weight(self) -> torch.Tensor:
        """The int8 weight codes (cached), re-quantized from the fake-quantized weight."""
        if self._w_int8 is None or self._w_int8.device != self.weight.device:
            self._w_int8 = quantize(self.weight.detach(), *self._quantized_weight())
        return self._w_int8

    def _forward_int8(self, x: torch.Tensor) -> torch.Tensor:
        args = self.scheme.input_activations
        qp: QParams | None
        if args is not None and args.dynamic:
            qp = compute_qparams(args, *reduce_minmax(x, args, ACTIVATION))
        else:
            qp = self.input_qparams()
        if args is None or qp is None:
            raise QuantscaleError("QuantLinear: int8 matmul without input activation qparams")
        q_x = quantize(x, args, qp)
        w_scale = self._quantized_weight()[1].scale
        out = int8_linear(q_x, qp.scale, self.int8_weight(), w_scale, self.bias)
        return out.to(x.dtype)

    # ------------------------------------------------------------------ state

    def _load_from_state_dict(
        self, state_dict: dict[str, torch.Tensor], prefix: str, *args: object, **kwargs: object
    ) -> None:
        for name in BUFFERS:
            value = state_dict.get(prefix + name)
            if value is not None:
                self.register_buffer(name, torch.empty_like(value, device=self.weight.device))
        self._w_int8 = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(
        self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
    ) -> QuantLinear:
        """Move like any module, but keep the qparam buffers' dtypes (float32 / int32)."""
        kept = {n: b for n, b in self._buffers.items() if n in BUFFERS and b is not None}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        self._w_int8 = None
        return self

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}"]
        for role, args in (
            ("w", self.scheme.weights),
            ("in", self.scheme.input_activations),
            ("out", self.scheme.output_activations),
        ):
            if args is not None:
                kind = "dyn" if args.dynamic else "static"
                parts.append(f"{role}={args.type}{args.num_bits}/{args.strategy}/{kind}")
        return ", ".join(parts)


def replace_linears(model: nn.Module, recipe: Recipe) -> dict[str, QuantLinear]:
    """Swap every nn.Linear the recipe targets for a QuantLinear, in place; name -> module.
    GGUF k-quant recipes first get llama.cpp's per-module types (`Recipe.place_ggml_blocks`,
    added to the recipe as exact-name overrides, so that the saved recipe says them)."""
    replaced: dict[str, QuantLinear] = {}
    widths = {n: m.in_features for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    recipe.place_ggml_blocks(widths)
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or not name:
            continue
        scheme = recipe.scheme_for(name, "Linear")
        if scheme is None:
            continue
        ql = QuantLinear.from_linear(module, scheme)
        model.set_submodule(name, ql)
        replaced[name] = ql
    return replaced


def quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    """Name -> QuantLinear for every QuantLinear in `model`."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
