"""A small multilayer perceptron trained with numpy: standardise, ReLU hidden layers, softmax.

The network is ``features -> (x * inv_std + offset) -> [Dense + ReLU]* -> Dense -> softmax``.
The standardisation is part of the model (devices feed raw sensor units), kept as its own
per-feature affine step rather than folded into the first layer, so that int8 exports can
quantize the *standardised* input with one per-tensor scale (see :mod:`models.quantize`).

Training is full float64 Adam on softmax cross-entropy with seeded mini-batches. The trained
weights are rounded to a 2**-20 grid before they become float32: tiny BLAS-dependent differences
of float64 arithmetic between machines vanish in that rounding, so a rebuild elsewhere gives the
same weights bit for bit. :func:`forward` is the exact float64 reference of the fp32 network.

This module does not export or quantize anything and does no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# weights land on this grid before becoming float32 (see module docstring)
_WEIGHT_GRID = 2.0**-20


@dataclass(frozen=True)
class Dense:
    w: np.ndarray  # [in, out] float32
    b: np.ndarray  # [out] float32
    relu: bool


@dataclass(frozen=True)
class MLP:
    inv_std: np.ndarray  # [F] float32: standardised = x * inv_std + offset
    offset: np.ndarray  # [F] float32
    layers: tuple[Dense, ...]

    @property
    def n_features(self) -> int:
        return int(self.inv_std.shape[0])

    @property
    def n_classes(self) -> int:
        return int(self.layers[-1].b.shape[0])


@dataclass(frozen=True)
class TrainConfig:
    seed: int
    hidden: tuple[int, ...] = (32, 16)
    epochs: int = 40
    batch_size: int = 128
    learning_rate: float = 0.01
    weight_decay: float = 1e-3

    def to_dict(self) -> dict[str, object]:
        return {
            "seed": self.seed,
            "hidden": list(self.hidden),
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "weight_decay": self.weight_decay,
            "optimizer": "adam",
        }


def _on_grid(a: np.ndarray) -> np.ndarray:
    return (np.round(a / _WEIGHT_GRID) * _WEIGHT_GRID).astype(np.float32)


def standardised(mlp: MLP, x: np.ndarray) -> np.ndarray:
    """The first step of the network, in float64."""
    return x.astype(np.float64) * mlp.inv_std.astype(np.float64) + mlp.offset.astype(np.float64)


def activations(mlp: MLP, x: np.ndarray) -> list[np.ndarray]:
    """Float64 outputs of every step: standardised input, each layer (after ReLU), then logits."""
    h = standardised(mlp, x)
    out = [h]
    for layer in mlp.layers:
        h = h @ layer.w.astype(np.float64) + layer.b.astype(np.float64)
        if layer.relu:
            h = np.maximum(h, 0.0)
        out.append(h)
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=-1, keepdims=True))


def forward(mlp: MLP, x: np.ndarray) -> np.ndarray:
    """Class probabilities [n, C] in float64: the exact reference of the fp32 network."""
    return softmax(activations(mlp, x)[-1])


def train(x: np.ndarray, y: np.ndarray, n_classes: int, config: TrainConfig) -> MLP:
    """Train on raw features ``x`` [n, F] and labels ``y`` [n]; deterministic for a config."""
    rng = np.random.default_rng(config.seed)
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=0)
    std = x64.std(axis=0)
    std = np.where(std > 0.0, std, 1.0)
    inv_std = _on_grid(1.0 / std)
    offset = _on_grid(-mean / std)
    xs = x64 * inv_std.astype(np.float64) + offset.astype(np.float64)
    onehot = np.eye(n_classes)[y]

    sizes = (x.shape[1], *config.hidden, n_classes)
    params: list[np.ndarray] = []
    for fan_in, fan_out in zip(sizes, sizes[1:], strict=False):
        params.append(rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(fan_in, fan_out)))  # He
        params.append(np.zeros(fan_out))
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    n = x.shape[0]
    steps_per_epoch = -(-n // config.batch_size)
    total = config.epochs * steps_per_epoch
    t = 0
    for _ in range(config.epochs):
        order = rng.permutation(n)
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]
            grads = _gradients(params, xs[idx], onehot[idx], config.weight_decay)
            t += 1
            # cosine decay to 5% of the initial rate over the run
            lr = config.learning_rate * (0.05 + 0.95 * 0.5 * (1.0 + np.cos(np.pi * t / total)))
            for i, g in enumerate(grads):
                m[i] = beta1 * m[i] + (1.0 - beta1) * g
                v[i] = beta2 * v[i] + (1.0 - beta2) * g * g
                m_hat = m[i] / (1.0 - beta1**t)
                v_hat = v[i] / (1.0 - beta2**t)
                params[i] = params[i] - lr * m_hat / (np.sqrt(v_hat) + eps)

    n_layers = len(sizes) - 1
    layers = tuple(
        Dense(w=_on_grid(params[2 * i]), b=_on_grid(params[2 * i + 1]), relu=i < n_layers - 1)
        for i in range(n_layers)
    )
    return MLP(inv_std=inv_std, offset=offset, layers=layers)


def _gradients(
    params: list[np.ndarray], x: np.ndarray, onehot: np.ndarray, weight_decay: float
) -> list[np.ndarray]:
    """Gradients of mean cross-entropy (+ L2 on weights) for [w0, b0, w1, b1, ...]."""
    hs = [x]
    n_layers = len(params) // 2
    h = x
    for i in range(n_layers):
        h = h @ params[2 * i] + params[2 * i + 1]
        if i < n_layers - 1:
            h = np.maximum(h, 0.0)
        hs.append(h)
    delta = (softmax(hs[-1]) - onehot) / x.shape[0]
    grads: list[np.ndarray] = [np.empty(0)] * len(params)
    for i in reversed(range(n_layers)):
        grads[2 * i] = hs[i].T @ delta + weight_decay * params[2 * i]
        grads[2 * i + 1] = delta.sum(axis=0)
        if i > 0:
            delta = (delta @ params[2 * i].T) * (hs[i] > 0.0)
    return grads


def accuracy(probabilities: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(probabilities, axis=1) == y))
