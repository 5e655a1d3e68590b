"""What a runtime refuses or mishandles in a checkpoint: the record every runtime rule returns
(`checkpoint.runtimes` for transformers / vLLM, `checkpoint.llama_cpp` for llama.cpp)."""

from __future__ import annotations

from typing import NamedTuple

LLAMA_CPP, LLAMA_CPP_CONVERT = "llama.cpp", "llama.cpp convert_hf_to_gguf.py"


class Refusal(NamedTuple):
    tensor: str
    runtime: str
    version: str
    reason: str
