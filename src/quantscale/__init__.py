"""quantscale: post-training quantization for LLMs."""

__version__ = "0.1.0"
