"""Tiny random mixture-of-experts models of mlx-lm's MoE architectures, built from its own classes.

d_model 64, 8 routed experts, top-2, expert width 64 (a multiple of 64, so 4-bit affine group 64
applies); 2 layers, or 3 for the DeepSeek family and GLM-4 MoE, whose first layer is a dense FFN.
Shared experts where the architecture has them. Float32, or quantized with mlx-lm's own
``quantize_model`` (its ``quant_predicate`` applies: qwen3_moe's and gpt_oss's routers get 8 bits),
or for gpt_oss also mxfp4, the mode of OpenAI's checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_map_with_path
from mlx_lm.utils import _get_classes, quantize_model, save_config, save_model

from mlx_flash.tiny import write_tiny_tokenizer

D, FFN, EXPERT_FFN, VOCAB = 64, 128, 64, 256
N_EXPERTS, TOP_K = 8, 2

_COMMON = dict(
    hidden_size=D,
    num_hidden_layers=2,
    intermediate_size=FFN,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    vocab_size=VOCAB,
    max_position_embeddings=256,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    num_experts_per_tok=TOP_K,
)
# DeepSeek's multi-head latent attention, tiny
_MLA = dict(
    kv_lora_rank=32,
    q_lora_rank=32,
    qk_rope_head_dim=8,
    v_head_dim=16,
    qk_nope_head_dim=16,
    num_key_value_heads=4,
)
# the DeepSeek family: one leading dense layer, then MoE layers with one shared expert
_DEEPSEEK = dict(
    num_hidden_layers=3,
    n_routed_experts=N_EXPERTS,
    n_shared_experts=1,
    moe_intermediate_size=EXPERT_FFN,
    first_k_dense_replace=1,
)

CONFIGS: dict[str, dict] = {
    "qwen3_moe": dict(
        _COMMON,
        model_type="qwen3_moe",
        num_experts=N_EXPERTS,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        moe_intermediate_size=EXPERT_FFN,
        norm_topk_prob=True,
    ),
    "qwen2_moe": dict(
        _COMMON,
        model_type="qwen2_moe",
        num_experts=N_EXPERTS,
        moe_intermediate_size=EXPERT_FFN,
        shared_expert_intermediate_size=FFN,
    ),
    "mixtral": dict(
        _COMMON, model_type="mixtral", num_local_experts=N_EXPERTS, intermediate_size=EXPERT_FFN
    ),
    "olmoe": dict(
        _COMMON,
        model_type="olmoe",
        num_experts=N_EXPERTS,
        intermediate_size=EXPERT_FFN,
        norm_topk_prob=False,
    ),
    "gpt_oss": dict(
        _COMMON,
        model_type="gpt_oss",
        num_local_experts=N_EXPERTS,
        intermediate_size=EXPERT_FFN,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        rope_scaling=None,
    ),
    "deepseek_v3": dict(
        _COMMON,
        **_MLA,
        **_DEEPSEEK,
        model_type="deepseek_v3",
        moe_layer_freq=1,
        n_group=2,
        topk_group=1,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        rope_scaling=None,
    ),
    "deepseek_v2": dict(
        _COMMON,
        **_MLA,
        **_DEEPSEEK,
        model_type="deepseek_v2",
        moe_layer_freq=1,
        topk_method="group_limited_greedy",
        n_group=2,
        topk_group=1,
        routed_scaling_factor=1.0,
        rope_scaling={
            "type": "yarn",
            "factor": 1.0,
            "original_max_position_embeddings": 256,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 0,
        },
    ),
    "glm4_moe": dict(
        _COMMON,
        **_DEEPSEEK,
        model_type="glm4_moe",
        n_group=1,
        topk_group=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        use_qk_norm=True,
        attention_bias=True,
        partial_rotary_factor=0.5,
        rope_scaling=None,
    ),
}
ROUTING_BIASES = ("e_score_correction_bias", "router.bias")
REQUIRED = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "gpt_oss", "deepseek_v3")
QUANT = {
    "f32": None,
    "q4": dict(group_size=64, bits=4, mode="affine"),
    "mxfp4": dict(group_size=32, bits=4, mode="mxfp4"),
}


def build_moe(arch: str, seed: int = 0, **overrides):
    """A randomly initialised float32 mlx-lm model of ``arch`` and its config."""
    config = {**CONFIGS[arch], **overrides}
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    mx.random.seed(seed)

    def init(path: str, p: mx.array) -> mx.array:
        # small routing biases, so that the tokens (not the biases) choose the experts
        scale = 0.01 if path.endswith(ROUTING_BIASES) else 0.2
        return mx.random.normal(p.shape, dtype=mx.float32) * scale

    model.update(tree_map_with_path(init, model.parameters()))
    mx.eval(model.parameters())
    return model, config


def save_tiny_moe(arch: str, path: Path, variant: str = "f32", seed: int = 0, **overrides) -> Path:
    """Write a tiny random MoE model (``variant``: f32, q4 or mxfp4) as an mlx-lm directory."""
    model, config = build_moe(arch, seed, **overrides)
    if QUANT[variant] is not None:
        model, config = quantize_model(model, config, **QUANT[variant])
    mx.eval(model.parameters())
    path.mkdir(parents=True, exist_ok=True)
    save_model(path, model)
    save_config({**config, "torch_dtype": "float32"}, path / "config.json")
    write_tiny_tokenizer(path)
    return path
