"""The FFN's math on any subset of its neurons, given their rows.

A neuron's *rows* are its gate row, up row and down column (and per-neuron biases; for quantized
stores the packed words, scales and biases of each), as the store holds them and the neuron buffers
keep them: ``parts[name]`` is [neurons, width]. Computing over a subset and summing the partial
outputs gives the dense FFN exactly when the subsets cover every neuron once.
"""

from __future__ import annotations

import mlx.core as mx

from .adapters import ACTIVATIONS
from .manifest import Quantization

Parts = dict[str, mx.array]


def project_in(x: mx.array, parts: Parts, name: str, quant: Quantization | None) -> mx.array:
    """``x`` times the rows of part ``name`` ("gate" or "up"), plus that part's per-neuron bias."""
    if quant is None:
        y = x @ parts[name].T
    else:
        y = mx.quantized_matmul(
            x,
            parts[name],
            parts[f"{name}.scales"],
            parts[f"{name}.biases"],
            transpose=True,
            group_size=quant.group_size,
            bits=quant.bits,
        )
    bias = parts.get(f"{name}_bias")
    return y if bias is None else y + bias[:, 0]


def hidden(
    x: mx.array,
    parts: Parts,
    activation: str,
    gated: bool,
    quant: Quantization | None,
    gate: mx.array | None = None,
) -> mx.array:
    """The activations ``act(gate)*up`` (gated) or ``act(up)`` of the neurons in ``parts``.

    ``gate``: act(gate) of these neurons when already computed exactly (the gate selector keeps
    the gate matrix in DRAM), so ``parts`` need not hold the gate rows.
    """
    act = ACTIVATIONS[activation]
    if not gated:
        return act(project_in(x, parts, "up", quant))
    if gate is None:
        gate = act(project_in(x, parts, "gate", quant))
    return gate * project_in(x, parts, "up", quant)


def partial_output(
    x: mx.array,
    parts: Parts,
    activation: str,
    gated: bool,
    quant: Quantization | None,
    gate: mx.array | None = None,
) -> mx.array:
    """The FFN's output restricted to the neurons in ``parts`` (without the down bias)."""
    return project_out(hidden(x, parts, activation, gated, quant, gate), parts, quant)


def project_out(h: mx.array, parts: Parts, quant: Quantization | None) -> mx.array:
    """Activations ``h`` [tokens, neurons] through the neurons' down columns."""
    if quant is None:
        return h @ parts["down"]
    return mx.quantized_matmul(
        h,
        parts["down"],
        parts["down.scales"],
        parts["down.biases"],
        transpose=False,
        group_size=quant.group_size,
        bits=quant.bits,
    )


def dense_rows(parts: Parts, name: str, quant: Quantization | None) -> mx.array:
    """Part ``name``'s rows as floats (dequantized when the store is quantized)."""
    if quant is None:
        return parts[name]
    return mx.dequantize(
        parts[name],
        parts[f"{name}.scales"],
        parts[f"{name}.biases"],
        group_size=quant.group_size,
        bits=quant.bits,
    )
