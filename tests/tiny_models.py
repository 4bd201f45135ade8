"""Tiny random models of every supported architecture, built from mlx-lm's own model classes
(``mlx_flash.tiny``: sizes, initialisation, writing)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes

from mlx_flash.tiny import COMMON as _COMMON
from mlx_flash.tiny import FFN, LAYERS, TINY_LLAMA, VOCAB, D, randomize, save_model_dir

_ROPE = {"rope_theta": 10000.0, "rope_type": "default"}

CONFIGS: dict[str, dict] = {
    "llama": TINY_LLAMA,
    "mistral": dict(_COMMON, model_type="mistral"),
    "qwen2": dict(_COMMON, model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(_COMMON, model_type="qwen3"),
    "olmo2": dict(_COMMON, model_type="olmo2"),
    "gemma": dict(_COMMON, model_type="gemma"),
    "gemma2": dict(
        _COMMON,
        model_type="gemma2",
        query_pre_attn_scalar=16,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
    ),
    "gemma3_text": dict(
        _COMMON,
        model_type="gemma3_text",
        query_pre_attn_scalar=16,
        sliding_window=32,
        sliding_window_pattern=2,
    ),
    "phi3": dict(_COMMON, model_type="phi3", num_key_value_heads=4),
    "phi": dict(_COMMON, model_type="phi", num_key_value_heads=4, partial_rotary_factor=0.5),
    "gpt2": dict(
        model_type="gpt2",
        n_ctx=128,
        n_embd=D,
        n_head=4,
        n_layer=LAYERS,
        n_positions=128,
        layer_norm_epsilon=1e-5,
        vocab_size=VOCAB,
    ),
    "gpt_neox": dict(
        _COMMON,
        model_type="gpt_neox",
        num_key_value_heads=4,
        rotary_emb_base=10000,
        rotary_pct=0.25,
        use_parallel_residual=True,
    ),
    "starcoder2": dict(_COMMON, model_type="starcoder2", norm_epsilon=1e-5),
    "nemotron": dict(_COMMON, model_type="nemotron", hidden_act="relu2", partial_rotary_factor=0.5),
    "internlm2": dict(_COMMON, model_type="internlm2", bias=False),
    "granite": dict(
        _COMMON,
        model_type="granite",
        logits_scaling=4.0,
        attention_multiplier=0.25,
        embedding_multiplier=6.0,
        residual_multiplier=0.5,
        attention_bias=False,
        mlp_bias=True,
    ),
    "cohere": dict(_COMMON, model_type="cohere"),
    "cohere2": dict(_COMMON, model_type="cohere2", sliding_window=32, sliding_window_pattern=2),
    "exaone": dict(_COMMON, model_type="exaone", num_layers=LAYERS, layer_norm_epsilon=1e-5),
    "exaone4": dict(
        _COMMON,
        model_type="exaone4",
        rope_scaling=None,
        sliding_window=32,
        sliding_window_pattern="LG",
        layer_types=["sliding_attention", "full_attention"],
    ),
    "smollm3": dict(_COMMON, model_type="smollm3", no_rope_layer_interval=2),
    "olmo3": dict(
        _COMMON,
        model_type="olmo3",
        sliding_window=32,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "minicpm": dict(
        _COMMON, model_type="minicpm", dim_model_base=32, scale_depth=1.4, scale_emb=12.0
    ),
    "stablelm": dict(_COMMON, model_type="stablelm", use_qkv_bias=True, partial_rotary_factor=0.25),
    "glm4": dict(_COMMON, model_type="glm4", attention_bias=True, partial_rotary_factor=0.5),
    "helium": dict(_COMMON, model_type="helium", attention_bias=False, mlp_bias=True),
    "ernie4_5": dict(_COMMON, model_type="ernie4_5", use_bias=True),
    "seed_oss": dict(_COMMON, model_type="seed_oss", mlp_bias=True),
    "hunyuan_v1_dense": dict(_COMMON, model_type="hunyuan_v1_dense"),
    "lfm2": dict(  # a short-convolution layer, then an attention layer
        _COMMON,
        model_type="lfm2",
        conv_bias=False,
        conv_L_cache=3,
        block_dim=D,
        block_multiple_of=64,
        block_ffn_dim_multiplier=1.0,
        block_auto_adjust_ff_dim=False,
        layer_types=["conv", "full_attention"],
    ),
    "internlm3": dict(_COMMON, model_type="internlm3", bias=False),
    "mimo": dict(_COMMON, model_type="mimo"),
    "plamo": dict(_COMMON, model_type="plamo", n_shared_head=2),
    "nanbeige": dict(_COMMON, model_type="nanbeige"),
    "telechat3": dict(_COMMON, model_type="telechat3"),
    "youtu_llm": dict(_COMMON, model_type="youtu_llm"),
    "iquestloopcoder": dict(_COMMON, model_type="iquestloopcoder"),
    "muse_glimmer": dict(_COMMON, model_type="muse_glimmer"),
    "ministral3": dict(
        _COMMON,
        model_type="ministral3",
        rope_parameters=dict(_ROPE, llama_4_scaling_beta=0.1, original_max_position_embeddings=256),
    ),
    "baichuan_m1": dict(
        _COMMON,
        model_type="baichuan_m1",
        sliding_window=32,
        sliding_window_layers=[0],
        conv_window=2,
    ),
    "llama4_text": dict(
        _COMMON,
        model_type="llama4_text",
        intermediate_size_mlp=FFN,
        no_rope_layers=[1, 0],
        use_qk_norm=True,
    ),
    "spark2_5": dict(
        _COMMON,
        model_type="spark2_5",
        sliding_window=32,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": _ROPE, "full_attention": _ROPE},
    ),
    "qwen": dict(
        _COMMON, model_type="qwen", kv_channels=16, intermediate_size=2 * FFN, no_bias=False
    ),
    "talkie": dict(_COMMON, model_type="talkie"),
    "glm": dict(_COMMON, model_type="glm"),
    "plamo3": dict(_COMMON, model_type="plamo3"),
    "gpt_bigcode": dict(
        model_type="gpt_bigcode",
        n_embd=D,
        n_layer=LAYERS,
        n_inner=FFN,
        n_head=4,
        n_positions=128,
        layer_norm_epsilon=1e-5,
        vocab_size=VOCAB,
        tie_word_embeddings=False,
    ),
    "gptj": dict(  # FFN width 4 * n_embd
        model_type="gptj",
        n_embd=D,
        n_layer=LAYERS,
        n_head=4,
        n_positions=128,
        rotary_dim=8,
        layer_norm_epsilon=1e-5,
        vocab_size=VOCAB,
    ),
    "nanochat": dict(_COMMON, model_type="nanochat", num_key_value_heads=4),
    "minicpm3": dict(
        _COMMON,
        model_type="minicpm3",
        dim_model_base=32,
        scale_depth=1.4,
        scale_emb=12.0,
        q_lora_rank=32,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        kv_lora_rank=16,
        rope_scaling={"original_max_position_embeddings": 256},
    ),
    "afm7": dict(  # the last layer reuses an earlier layer's keys and values
        model_type="afm7",
        vocab_size=VOCAB,
        hidden_dim=D,
        num_layers=3,
        num_kv_reuse_layers=1,
        num_heads=4,
        num_kv_heads=2,
        hidden_dim_scale_factor=FFN / D,
    ),
    "falcon_h1": dict(  # attention and a Mamba-2 mixer in parallel in each layer
        _COMMON,
        model_type="falcon_h1",
        mamba_d_ssm=64,
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_d_state=8,
        mamba_n_groups=1,
        mamba_d_conv=4,
    ),
    "recurrent_gemma": dict(  # a recurrent (RG-LRU) layer, then a local-attention layer
        _COMMON,
        model_type="recurrent_gemma",
        attention_bias=False,
        conv1d_width=4,
        intermediate_size=2 * FFN,  # the MLP is half as wide
        logits_soft_cap=30.0,
        attention_window_size=32,
        block_types=["recurrent", "attention"],
    ),
    "plamo2": dict(  # a Mamba layer, then an attention layer
        _COMMON,
        model_type="plamo2",
        hidden_size_per_head=16,
        attention_window_size=32,
        full_attention_idx=[1],
        mamba_d_state=8,
        mamba_num_heads=4,
        mamba_chunk_size=16,
    ),
    "olmo_hybrid": dict(  # a gated-delta linear-attention layer, then full attention
        _COMMON,
        model_type="olmo_hybrid",
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        linear_allow_neg_eigval=True,
        attention_bias=False,
        layer_types=["linear_attention", "full_attention"],
    ),
    "xverse": dict(_COMMON, model_type="xverse"),
    "iquestcoder": dict(_COMMON, model_type="iquestcoder"),
}


def build_model(arch: str, seed: int = 0, tied: bool | None = None):
    """A randomly initialised mlx-lm model of ``arch`` (weights scaled so activations stay sane).

    ``tied``: True for an output head tied to the embedding where the model can have one, as
    mlx-lm decides it: from the config, or (Gemma 3) in ``sanitize`` for weights without a head.
    """
    config = dict(CONFIGS[arch])
    if tied is not None:
        config["tie_word_embeddings"] = tied
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    if tied and hasattr(model, "sanitize"):
        headless = {k: v for k, v in tree_flatten(model.parameters()) if k != "lm_head.weight"}
        model.sanitize(headless)
    randomize(model, seed)
    return model, config


def has_untied_head(model) -> bool:
    """Whether the model has output-head weights of its own (not the embedding's)."""
    names = {k for k, _ in tree_flatten(model.parameters())}
    return bool(names & {"lm_head.weight", "embed_out.weight", "output.weight"})


def save_tiny_model(
    arch: str, path: Path, dtype: mx.Dtype = mx.float32, seed: int = 0, tied: bool | None = None
) -> tuple[Path, dict]:
    """Write a tiny random model as an mlx-lm directory; returns (path, its weights)."""
    model, config = build_model(arch, seed, tied)
    return path, save_model_dir(model, config, path, dtype)
