"""Per-architecture facts about the FFN: where it lives, what its weights are called, its
activation.

One table, one row per mlx-lm ``model_type``. Everything else in the package reads FFN facts from
here, so supporting a new architecture means adding a row (and a round-trip test).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .errors import UnsupportedModelError


def relu_squared(x: mx.array) -> mx.array:
    return mx.square(nn.relu(x))


ACTIVATIONS: dict[str, Callable[[mx.array], mx.array]] = {
    "silu": nn.silu,
    "gelu": nn.gelu,
    "gelu_approx": nn.gelu_approx,
    "relu": nn.relu,
    "relu2": relu_squared,
}


@dataclass(frozen=True)
class FFNSpec:
    """How one architecture's FFN is built.

    ``gate``/``up``/``down`` are the Linear attribute names inside the FFN module; ``gate`` is None
    for non-gated FFNs (act(up) -> down). ``fused_gate_up`` names a single Linear whose output is
    [gate | up] (phi3). ``activation`` is a key of ``ACTIVATIONS`` applied to the gate (gated) or
    to up (non-gated).
    """

    ffn_attr: str
    up: str
    down: str
    activation: str
    gate: str | None = None
    fused_gate_up: str | None = None

    @property
    def gated(self) -> bool:
        return self.gate is not None or self.fused_gate_up is not None


_LLAMA = FFNSpec("mlp", gate="gate_proj", up="up_proj", down="down_proj", activation="silu")
_LLAMA_FF = FFNSpec(
    "feed_forward", gate="gate_proj", up="up_proj", down="down_proj", activation="silu"
)
_W123 = FFNSpec("feed_forward", gate="w1", up="w3", down="w2", activation="silu")
_FUSED = FFNSpec(  # one Linear whose output is [gate | up]
    "mlp", fused_gate_up="gate_up_proj", up="gate_up_proj", down="down_proj", activation="silu"
)
_GEMMA2 = FFNSpec("mlp", gate="gate_proj", up="up_proj", down="down_proj", activation="gelu_approx")

ARCHITECTURES: dict[str, FFNSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "olmo2": _LLAMA,
    "gemma": FFNSpec("mlp", gate="gate_proj", up="up_proj", down="down_proj", activation="gelu"),
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA2,
    "gemma3": _GEMMA2,
    "phi3": _FUSED,
    "phi": FFNSpec("mlp", up="fc1", down="fc2", activation="gelu_approx"),
    "gpt2": FFNSpec("mlp", up="c_fc", down="c_proj", activation="gelu_approx"),
    "gpt_neox": FFNSpec("mlp", up="dense_h_to_4h", down="dense_4h_to_h", activation="gelu_approx"),
    "starcoder2": FFNSpec("mlp", up="c_fc", down="c_proj", activation="gelu"),
    "nemotron": FFNSpec("mlp", up="up_proj", down="down_proj", activation="relu2"),
    "internlm2": _W123,
    "granite": _LLAMA,
    "cohere": _LLAMA,
    "cohere2": _LLAMA,
    "exaone": FFNSpec("mlp", gate="c_fc_0", up="c_fc_1", down="c_proj", activation="silu"),
    "exaone4": _LLAMA,
    "smollm3": _LLAMA,
    "olmo3": _LLAMA,
    "minicpm": _LLAMA,
    "stablelm": _LLAMA,
    "glm4": _FUSED,
    "helium": _LLAMA,
    "ernie4_5": _LLAMA,
    "seed_oss": _LLAMA,
    "hunyuan_v1_dense": _LLAMA,
    "lfm2": _W123,
    "internlm3": _LLAMA,
    "mimo": _LLAMA,
    "plamo": _LLAMA,
    "nanbeige": _LLAMA,
    "telechat3": _LLAMA,
    "youtu_llm": _LLAMA,
    "iquestloopcoder": _LLAMA,
    "muse_glimmer": _LLAMA,
    "ministral3": _LLAMA,
    "baichuan_m1": _LLAMA,
    "llama4_text": _LLAMA_FF,
    "spark2_5": FFNSpec("mlp", gate="gate_proj", up="up_proj", down="down_proj", activation="gelu"),
    "qwen": FFNSpec("mlp", gate="w2", up="w1", down="c_proj", activation="silu"),
    "talkie": FFNSpec("mlp", gate="mlp_gate", up="mlp_linear", down="mlp_resid", activation="silu"),
    "glm": _FUSED,
    "plamo3": _FUSED,
    "gpt_bigcode": FFNSpec("mlp", up="c_fc", down="c_proj", activation="gelu"),
    "gptj": FFNSpec("mlp", up="fc_in", down="fc_out", activation="gelu_approx"),
    "nanochat": FFNSpec("mlp", up="c_fc", down="c_proj", activation="relu2"),
    "minicpm3": _LLAMA,
    "afm7": _LLAMA,
    "falcon_h1": _LLAMA_FF,
    "recurrent_gemma": FFNSpec(
        "mlp_block", gate="gate_proj", up="up_proj", down="down_proj", activation="gelu_approx"
    ),
    "plamo2": _FUSED,
    "olmo_hybrid": _LLAMA,
    "xverse": _LLAMA,  # mlx-lm builds these as llama
    "iquestcoder": _LLAMA,
}


# Mixture-of-experts model types: mlx-lm runs their experts through ``SwitchGLU``, which the runtime
# replaces (``experts.py``); routers, shared experts and dense layers stay in the trunk.
MOE_ARCHITECTURES = (
    "qwen3_moe",
    "qwen2_moe",
    "mixtral",
    "olmoe",
    "gpt_oss",
    "deepseek_v3",
    "deepseek_v2",
    "glm4_moe",
)


_MOE = "mixture of experts, not among the MoE architectures the runtime streams"
_MULTIMODAL = (
    "a multimodal wrapper: its FFN is the one of text_config's model type, and this table is keyed "
    "by the outer one"
)

# mlx-lm model types that are refused, and why (what the FFN spec cannot express).
REFUSED: dict[str, str] = {
    "afmoe": _MOE,
    "apertus": "its activation (xIELU) has learned per-layer parameters",
    "bailing_hybrid": _MOE,
    "bailing_moe": _MOE,
    "bailing_moe_linear": _MOE,
    "bailing_moe_v3": _MOE,
    "bitnet": "its FFN is BitLinear: ternary packed weights, per-tensor scales, not Linear rows",
    "dbrx": _MOE,
    "deepseek": _MOE,
    "deepseek_v32": _MOE,
    "deepseek_v41": _MOE,
    "dots1": _MOE,
    "ernie4_5_moe": _MOE,
    "exaone_moe": _MOE,
    "gear": "its activation is chosen per checkpoint (hidden_activation), not per model type",
    "gemma3n": (
        "its activation keeps a token's neurons above the mean + k std of the whole layer (it "
        "needs every neuron), and FFN widths vary per layer"
    ),
    "gemma4": _MULTIMODAL,
    "gemma4_text": (
        "FFN widths vary per layer (double-wide in KV-shared layers), and a layer may add an "
        "expert block beside its MLP"
    ),
    "glm4_moe_lite": _MOE,
    "glm_moe_dsa": _MOE,
    "granitemoe": _MOE,
    "granitemoehybrid": _MOE,
    "hunyuan": _MOE,
    "jamba": _MOE,
    "kimi_k25": _MULTIMODAL,
    "kimi_k3": _MOE,
    "kimi_linear": _MOE,
    "kimi_vl": _MULTIMODAL,
    "Klear": _MOE,
    "laguna": _MOE,
    "lfm2-vl": _MULTIMODAL,
    "lfm2_moe": _MOE,
    "lille-130m": "its FFN module applies its own learned RMSNorm before gate and up",
    "llama4": _MOE,
    "longcat_flash": _MOE,
    "longcat_flash_ngram": _MOE,
    "mamba": "no FFN: state-space layers only",
    "mamba2": "no FFN: state-space layers only",
    "mellum": _MOE,
    "mimo_v2_flash": _MOE,
    "minimax": _MOE,
    "minimax_m3_vl": _MOE,
    "mistral3": _MULTIMODAL,
    "mistral4": _MOE,
    "muse_spark": _MOE,
    "nemotron-nas": "FFN widths vary per layer; some layers have no FFN or a single Linear instead",
    "nemotron_h": _MOE,
    "olmo": "its FFN is computed inline in the transformer block: there is no module to replace",
    "openelm": "FFN widths vary per layer (ffn_multipliers)",
    "phi3small": "its GeGELU clamps both halves and reads gate and up from interleaved columns",
    "phimoe": _MOE,
    "phixtral": _MOE,
    "pixtral": _MULTIMODAL,
    "prism_hadamard_qwen35": "Hadamard-rotated quantized Linears (and a multimodal wrapper)",
    "qwen2_vl": _MULTIMODAL,
    "qwen3_5": _MULTIMODAL,
    "qwen3_5_moe": _MOE,
    "qwen3_next": _MOE,
    "qwen3_vl": _MULTIMODAL,
    "qwen3_vl_moe": _MOE,
    "rwkv7": "its FFN (channel mixing) mixes in the previous token with learned weights first",
    "solar_open": _MOE,
    "step3p5": _MOE,
}


def is_moe(model_type: str) -> bool:
    """Whether the model's experts stream (a MoE store) rather than its FFN neurons."""
    return model_type in MOE_ARCHITECTURES


def check_supported(model_type: str) -> None:
    """A clear error listing what is supported, unless ``model_type`` is (dense or MoE)."""
    if not is_moe(model_type):
        spec_for(model_type)


def spec_for(model_type: str) -> FFNSpec:
    """The FFN spec of a dense mlx-lm model type, or a clear error listing what is supported."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        why = f" ({REFUSED[model_type]})" if model_type in REFUSED else ""
        raise UnsupportedModelError(
            f"architecture {model_type!r} is not supported{why}; supported: "
            f"{', '.join(sorted(ARCHITECTURES))}; mixture-of-experts: "
            f"{', '.join(sorted(MOE_ARCHITECTURES))}"
        ) from None


def ffn_modules(model: nn.Module, spec: FFNSpec) -> list[nn.Module]:
    """The FFN module of every transformer layer, in layer order."""
    return [getattr(layer, spec.ffn_attr) for layer in model.layers]


def ffn_prefixes(model: nn.Module, spec: FFNSpec) -> list[str]:
    """Weight-name prefix of every layer's FFN (e.g. ``model.layers.3.mlp``), found by identity."""
    wanted = {id(m): i for i, m in enumerate(ffn_modules(model, spec))}
    prefixes: list[str | None] = [None] * len(wanted)
    for name, module in model.named_modules():
        i = wanted.get(id(module))
        if i is not None and prefixes[i] is None:
            prefixes[i] = name
    if any(p is None for p in prefixes):
        raise UnsupportedModelError("could not locate every FFN module in the model tree")
    return prefixes  # type: ignore[return-value]


def set_ffn(model: nn.Module, spec: FFNSpec, layer: int, module: nn.Module) -> None:
    """Replace the FFN module of one layer."""
    setattr(model.layers[layer], spec.ffn_attr, module)


def model_classes(config: dict) -> tuple[type, type]:
    """mlx-lm's (Model, ModelArgs) for ``config``: the one place using mlx-lm's private lookup."""
    from mlx_lm.utils import _get_classes

    try:
        return _get_classes(config)
    except ValueError as e:
        raise UnsupportedModelError(
            f"mlx-lm has no model type {config.get('model_type')!r} ({e})"
        ) from e


def build_model(config: dict) -> nn.Module:
    """A fresh mlx-lm model for ``config``; its parameters stay lazy, so nothing is allocated."""
    model_class, args_class = model_classes(config)
    return model_class(args_class.from_dict(config))
