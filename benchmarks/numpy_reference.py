"""OT fusion as a plain NumPy + POT layer loop: the reference jfusion is measured against.

The same algorithm as ``jfusion.fuse`` with weight alignment (OTFusion, Singh & Jaggi 2020,
Algorithm 1), written the way the original PyTorch code is: one layer at a time, one model
at a time, ``ot.emd`` (network simplex) or ``ot.sinkhorn`` per layer, float64 NumPy.

A network is a list of ``(kernel, bias)`` in Flax layout -- Dense ``(in, out)``, Conv
``(H, W, in, out)`` -- where each layer reads the previous one's output features; a Dense
after a Conv reads the flattened ``(positions, channels)`` feature map. The last layer's
outputs are not aligned.

``importance="l1"`` / ``"l2"`` is OTFusion's ``--importance``: each neuron's mass is the norm
of its support row plus 1e-9 (OTFusion's ``_get_neuron_importance_histogram``), normalised to
sum to one, on both sides. The row is the neuron's past-corrected incoming weights and bias,
as jfusion's support (OTFusion's models have no biases, and it takes the uncorrected kernel,
the same norm when the previous plan is a permutation).
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import ot

Layer = tuple[np.ndarray, np.ndarray]


def _input_corrected(kernel: np.ndarray, to_input: np.ndarray, channels: int) -> np.ndarray:
    """Past correction: re-express a kernel's input axis in the target's neurons."""
    if kernel.ndim == 2 and kernel.shape[0] != channels:  # dense reading a flattened conv map
        view = kernel.reshape(-1, channels, kernel.shape[1])
        view = np.einsum("sco,cm->smo", view, to_input)
        return view.reshape(-1, kernel.shape[1])
    return np.moveaxis(np.tensordot(kernel, to_input, axes=([-2], [0])), -1, -2)


def _measure(rows: np.ndarray, importance: str) -> np.ndarray:
    if importance == "uniform":
        return np.full(len(rows), 1.0 / len(rows))
    mass = np.linalg.norm(rows, ord=1 if importance == "l1" else 2, axis=1) + 1e-9
    return mass / mass.sum()


def _plan(cost: np.ndarray, a: np.ndarray, b: np.ndarray, solver: str, epsilon: float, threshold: float) -> np.ndarray:
    if solver == "exact":
        return ot.emd(a, b, cost)
    return ot.sinkhorn(
        a, b, cost, reg=epsilon * cost.mean(), method="sinkhorn_log", numItermax=5000, stopThr=threshold
    )


def fuse_layers(
    models: Sequence[Sequence[Layer]],
    solver: Literal["exact", "sinkhorn"] = "exact",
    epsilon: float = 0.01,
    threshold: float = 1e-4,
    target: int = 0,
    importance: Literal["uniform", "l1", "l2"] = "uniform",
) -> list[Layer]:
    """Fuse K networks onto model ``target``'s neurons with uniform model weights."""
    num_models, num_layers = len(models), len(models[target])
    to_input = [None] * num_models  # each model's previous-layer plan, row-normalised
    fused = []
    for layer in range(num_layers):
        last = layer == num_layers - 1
        target_kernel, target_bias = (np.asarray(x, np.float64) for x in models[target][layer])
        width = target_kernel.shape[-1]
        target_rows = np.concatenate([target_kernel.reshape(-1, width).T, target_bias[:, None]], 1)
        aligned = []
        for k in range(num_models):
            kernel, bias = (np.asarray(x, np.float64) for x in models[k][layer])
            if to_input[k] is not None:
                kernel = _input_corrected(kernel, to_input[k], to_input[k].shape[0])
            if last:
                aligned.append((kernel, bias))
                continue
            n = kernel.shape[-1]
            if k == target:
                plan = np.eye(n) / n
            else:
                rows = np.concatenate([kernel.reshape(-1, n).T, bias[:, None]], 1)
                cost = np.sqrt(np.maximum(ot.dist(rows, target_rows, metric="sqeuclidean"), 0.0))
                plan = _plan(cost, _measure(rows, importance), _measure(target_rows, importance), solver, epsilon, threshold)
            to_output = plan / plan.sum(0, keepdims=True)
            to_input[k] = plan / plan.sum(1, keepdims=True)
            aligned.append((np.tensordot(kernel, to_output, axes=([-1], [0])), bias @ to_output))
        fused.append(tuple(np.mean([a[i] for a in aligned], axis=0) for i in range(2)))
    return fused
