"""Train the paper's low-rank activation predictors: per layer
``x -> (x @ w_in) @ w_out + bias``, sigmoid.

Trained on one layer's FFN inputs and "active" labels from calibration with Adam and a binary
cross-entropy whose positives are up-weighted by negatives/positives (active neurons are rare in
ReLU-family models; without balancing the predictor learns to say "inactive"). Inputs are
standardised while training and the scaling is folded back into the weights, so the runtime computes
two small matmuls, an add and a compare.

Choices, compared on relu2-8m and SmolLM2 (calibrated on the built-in Austen sample, tested on
WikiText-2):
- Non-gated FFNs start from the rank-r principal directions of the up pre-activations
  ``x @ up.T`` (activity is a threshold on them); from a random start the predictor fits the
  calibration text better but generalises worse. Gated FFNs start at random: starting from the
  gate's directions did worse.
- A hidden ReLU between the two matmuls did not help.
- The cut: a predictor fitted on one text is less sure on another (at probability 0.5 its recall
  is lower on WikiText than on held-back Austen), so the cut is calibrated per layer on held-back
  tokens to predict a fixed share: ``margin`` times the active share (the conversion picks 1.3 for
  natural zeros, where a miss costs quality and an extra neuron only I/O, and 1.0 for a target
  sparsity, so the predictor skips what the target says).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from mlx_flash.runtime.manifest import Manifest

EPOCHS = 4
BATCH = 1024
LEARNING_RATE = 2e-3
INIT_LOGIT_SCALE = 4.0  # a start of one standard deviation of pre-activation = logit 4
STORE_DTYPE = mx.float16

# w_in [d_model, rank], w_out [rank, d_ffn], bias [d_ffn]
Weights = tuple[mx.array, mx.array, mx.array]


def auto_ranks(manifest: Manifest) -> list[int]:
    """Rank per layer: about d_model/4 (a power of two in 32..128; the paper used 128 at
    d_model 4096), 4x that (at most d_model/2) for the last eighth of the layers, which the
    paper found hardest."""
    base = int(min(128, max(32, 2 ** round(np.log2(manifest.d_model / 4)))))
    last = max(1, manifest.n_layers // 8)
    hard = min(4 * base, max(base, manifest.d_model // 2))
    return [hard if i >= manifest.n_layers - last else base for i in range(manifest.n_layers)]


class _LowRank(nn.Module):
    def __init__(self, d_model: int, rank: int, d_ffn: int):
        super().__init__()
        self.w_in = nn.Linear(d_model, rank, bias=False)
        self.w_out = nn.Linear(rank, d_ffn)

    def __call__(self, x: mx.array) -> mx.array:
        return self.w_out(self.w_in(x))


def _orthonormal(y: np.ndarray) -> np.ndarray:
    """Orthonormal columns spanning ``y``'s, by Cholesky QR done twice (matmuls and a small
    Cholesky: numpy's QR and eigh crawl when BLAS threads compete for the cores)."""
    for _ in range(2):
        y = y @ np.linalg.inv(np.linalg.cholesky(y.T @ y)).T
    return y


def principal_directions(
    up: np.ndarray, cov: np.ndarray, rank: int, iterations: int = 8, seed: int = 0
) -> np.ndarray:
    """An orthonormal basis [d_ffn, rank] of the top-``rank`` principal subspace of the
    pre-activations, whose covariance is ``up @ cov @ up.T``, by subspace iteration (never forms the
    d_ffn x d_ffn matrix)."""
    q = _orthonormal(np.random.default_rng(seed).normal(size=(up.shape[0], min(up.shape[0], rank))))
    for _ in range(iterations):
        q = _orthonormal(up @ (cov @ (up.T @ q)))
    return q


def _principal_start(
    model: _LowRank,
    mean: np.ndarray,
    std: np.ndarray,
    cov: np.ndarray,
    up: np.ndarray,
    up_bias: np.ndarray | None,
) -> None:
    """Set the predictor to the best rank-r approximation of the pre-activations
    ``x @ up.T (+ bias)``."""
    up = up.astype(np.float64)
    v = principal_directions(up, cov, model.w_in.weight.shape[0])  # [d_ffn, rank]
    # std of the pre-activations
    spread = np.sqrt(max(np.trace(cov @ (up.T @ up)) / up.shape[0], 1e-24))
    scale = INIT_LOGIT_SCALE / spread
    model.w_in.weight = mx.array(((std[:, None] * (up.T @ v)) * scale).T.astype(np.float32))
    model.w_out.weight = mx.array(v.astype(np.float32))
    offset = mean @ up.T + (0.0 if up_bias is None else up_bias)
    model.w_out.bias = mx.array(((offset @ v @ v.T) * scale).astype(np.float32))


def train_predictor(
    x: np.ndarray,
    active: np.ndarray,
    rank: int,
    *,
    up: np.ndarray | None = None,
    up_bias: np.ndarray | None = None,
    epochs: int = EPOCHS,
    seed: int = 0,
) -> Weights:
    """Predict ``active`` [tokens, d_ffn] from ``x`` [tokens, d_model]; ``up`` [d_ffn, d_model]
    (non-gated FFNs) starts it from the principal directions of the up pre-activations."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    xs = mx.array((x - mean) / std)
    ys = mx.array(active.astype(np.uint8))  # a quarter of float32 labels; cast per batch
    positive = float(np.clip(active.mean(), 1e-4, 1 - 1e-4))
    weight = (1 - positive) / positive

    mx.random.seed(seed)
    model = _LowRank(x.shape[1], rank, active.shape[1])
    if up is not None:
        centered = (x - mean).astype(np.float64)
        _principal_start(model, mean, std, centered.T @ centered / len(x), up, up_bias)
    optimizer = optim.Adam(learning_rate=LEARNING_RATE)

    def loss_fn(m: _LowRank, xb: mx.array, yb: mx.array) -> mx.array:
        yb = yb.astype(mx.float32)
        loss = nn.losses.binary_cross_entropy(m(xb), yb, with_logits=True, reduction="none")
        return (loss * (1 + (weight - 1) * yb)).mean()

    grad_fn = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    def step(xb: mx.array, yb: mx.array) -> mx.array:
        loss, grads = grad_fn(model, xb, yb)
        optimizer.update(model, grads)
        return loss

    step = mx.compile(step, inputs=state, outputs=state)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = mx.array(rng.permutation(len(x)))
        for b in range(0, len(x), BATCH):
            idx = order[b : b + BATCH]
            step(xs[idx], ys[idx])
            mx.eval(state)
    # fold the standardisation in:
    # ((x - mean) / std) @ A @ B + c == x @ (A / std) @ B + (c - (mean / std) @ A @ B)
    a = model.w_in.weight.T / mx.array(std)[:, None]
    b = model.w_out.weight.T
    c = model.w_out.bias - (mx.array(mean) @ a) @ b
    return a.astype(STORE_DTYPE), b.astype(STORE_DTYPE), c.astype(STORE_DTYPE)


def predictor_logits(weights: Weights, x: np.ndarray) -> np.ndarray:
    w_in, w_out, bias = (w.astype(mx.float32) for w in weights)
    return np.array((mx.array(x) @ w_in) @ w_out + bias)


def choose_cut(weights: Weights, x: np.ndarray, active: np.ndarray, margin: float) -> float:
    """The logit above which ``margin`` times the active share of neurons is predicted on ``x``."""
    logits = predictor_logits(weights, x)
    share = min(1.0, margin * float(active.mean()))
    return float(np.quantile(logits, 1.0 - share)) if share < 1.0 else float(logits.min()) - 1.0


def score_predictor(
    weights: Weights, cut: float, x: np.ndarray, active: np.ndarray
) -> dict[str, float]:
    """Recall and precision of ``logit > cut`` against ``active``, and the predicted and active
    shares."""
    predicted = predictor_logits(weights, x) > cut
    hits = float((predicted & active).sum())
    return {
        "recall": hits / max(1.0, float(active.sum())),
        "precision": hits / max(1.0, float(predicted.sum())),
        "predicted": float(predicted.mean()),
        "active": float(active.mean()),
    }
