"""Modules that run quantized: `qlinear.QuantLinear` (fake-quant with static scale buffers)
and the real INT8 x INT8 -> INT32 matmul it uses (`int8`)."""
