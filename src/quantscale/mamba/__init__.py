"""Mamba / Mamba2 models quantized the Quamba way (static INT8), one package.

grouping (Quamba2 clustering) < mixers (quantization points, MambaRecipe, reordering) < quamba
(quantized mixers) < fixtures (trained test models, `load_mamba`) < quantize (calibrate, save,
load; `quantize_mamba_checkpoint` for the orchestrator) < evaluate (named settings, sweeps).
"""
