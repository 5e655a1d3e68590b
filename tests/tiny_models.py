"""The tiny random Llama that unit tests build from a config (one place for its settings)."""

from __future__ import annotations

import torch


def make_tiny_llama(
    vocab_size: int = 128,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    dtype: torch.dtype = torch.float32,
    **config,
):
    """A deterministic 2-layer LlamaForCausalLM (4 heads, 2 KV heads) in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    settings = {
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        **config,
    }
    llama = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        **settings,
    )
    return LlamaForCausalLM(llama).to(dtype).eval()


# Tiny hybrid (attention + Mamba / linear-attention / conv) models: both layer kinds present,
# the layer pattern in each config's own field. Hidden 64, 4 heads (2 KV), Mamba2 4 heads x 32.
_MAMBA2 = {"mamba_n_heads": 4, "mamba_d_head": 32, "mamba_n_groups": 1, "mamba_d_state": 16}
HYBRID_CONFIGS: dict[str, tuple[str, dict]] = {
    "jamba": (  # attention every 2nd layer from 1, experts every 2nd layer from 1
        "JambaConfig",
        {
            "num_hidden_layers": 4,
            "attn_layer_period": 2,
            "attn_layer_offset": 1,
            "expert_layer_period": 2,
            "expert_layer_offset": 1,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "mamba_d_state": 8,
            "mamba_dt_rank": 8,
        },
    ),
    "bamba": (
        "BambaConfig",
        {"num_hidden_layers": 3, "attn_layer_indices": [1], "mamba_chunk_size": 16, **_MAMBA2},
    ),
    "granitemoehybrid": (
        "GraniteMoeHybridConfig",
        {
            "num_hidden_layers": 3,
            "layer_types": ["mamba", "attention", "mamba"],
            "intermediate_size": 64,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "shared_intermediate_size": 64,
            "mamba_chunk_size": 16,
            **_MAMBA2,
        },
    ),
    "nemotron_h": (
        "NemotronHConfig",
        {
            "layers_block_type": ["linear_attention", "mlp", "full_attention", "moe"],
            "head_dim": 16,
            "ssm_state_size": 16,
            "mamba_num_heads": 4,
            "mamba_head_dim": 32,
            "n_groups": 1,
            "chunk_size": 16,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 64,
            "moe_shared_expert_intermediate_size": 64,
            "n_group": 1,
            "topk_group": 1,
        },
    ),
    "zamba2": (
        "Zamba2Config",
        {
            "num_hidden_layers": 4,
            "layers_block_type": ["mamba", "hybrid", "mamba", "hybrid"],
            "mamba_d_state": 16,
            "n_mamba_heads": 4,
            "mamba_ngroups": 1,
            "chunk_size": 16,
            "num_mem_blocks": 1,
            "adapter_rank": 8,
        },
    ),
    "falcon_h1": (  # attention and Mamba2 side by side in every layer
        "FalconH1Config",
        {"num_hidden_layers": 2, "mamba_chunk_size": 16, "mamba_d_ssm": None, **_MAMBA2},
    ),
    "qwen3_next": (
        "Qwen3NextConfig",
        {
            "num_hidden_layers": 4,
            "layer_types": ["linear_attention", "full_attention"] * 2,
            "head_dim": 16,
            "linear_key_head_dim": 16,
            "linear_value_head_dim": 16,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 64,
            "shared_expert_intermediate_size": 64,
        },
    ),
    "lfm2": (
        "Lfm2Config",
        {
            "num_hidden_layers": 3,
            "layer_types": ["conv", "full_attention", "conv"],
            "block_auto_adjust_ff_dim": False,
        },
    ),
}
WORDS = "the cat sat on a mat while dogs ran far in green hills and rivers flow to sea".split()


def make_tiny_hybrid(model_type: str, vocab_size: int = len(WORDS) + 1, **overrides):
    """A deterministic tiny random model of `HYBRID_CONFIGS[model_type]`, eval mode."""
    import transformers

    cls, settings = HYBRID_CONFIGS[model_type]
    common = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    }
    config = getattr(transformers, cls)(**{**common, **settings, **overrides})
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def make_tiny_gemma3(vocab_size: int = 128):
    """Gemma-3: sliding (window 4), full, sliding attention layers (each kind changes the
    output at 16 tokens), (1 + weight) RMSNorms, pre/post-feedforward norms; eval mode."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # trained-like norm weights (random init leaves them 0: 1 + 0)
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0, 0.5)
    return model


def save_word_tokenizer(path) -> None:
    """A word-level tokenizer over WORDS (id 0 is <unk>), saved to `path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", *WORDS])}, "<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)


def word_text(n: int = 3000, seed: int = 0) -> str:
    """`n` random WORDS joined by spaces (calibration text for the word tokenizer)."""
    gen = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=gen))
