"""What the experiment scripts share: Fashion-MNIST arrays and the markdown report helpers."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jfusion.workflow.data import load_dataset


@dataclasses.dataclass
class Data:
    xtr: np.ndarray
    ytr: np.ndarray
    xte: np.ndarray
    yte: np.ndarray


def load_data(train_subsample: int | None = None, test_subsample: int | None = None) -> Data:
    """Fashion-MNIST (Debian's IDX files), optionally a class-balanced subsample of each split."""
    d = load_dataset("fashion_mnist")
    xtr, ytr, xte, yte = d.train_images, d.train_labels, d.test_images, d.test_labels
    if train_subsample:
        xtr, ytr = stratified(xtr, ytr, train_subsample)
    if test_subsample:
        xte, yte = stratified(xte, yte, test_subsample)
    return Data(xtr, ytr, xte, yte)


def stratified(x: np.ndarray, y: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n // 10`` random examples of each of the ten classes, in their original order."""
    rng = np.random.default_rng(0)
    per = n // 10
    idx = np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per] for c in range(10)]))
    return x[idx], y[idx]


def pick(tree: Any, k: int) -> Any:
    """Model ``k`` of a pytree stacked along a leading model axis."""
    return jax.tree.map(lambda a: a[k], tree)


def activation_batch(data: Data, n: int, seed: int) -> jax.Array:
    """``n`` random training images (all classes) for activation supports."""
    idx = np.random.default_rng(10_000 + seed).choice(len(data.ytr), size=n, replace=False)
    return jnp.asarray(data.xtr[np.sort(idx)])


def mean_std(values: Sequence[float] | np.ndarray, digits: int = 2, ddof: int = 1) -> str:
    v = np.asarray(values, np.float64)
    if v.size == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=ddof):.{digits}f}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_seconds(s: float) -> str:
    return f"{s:.0f} s ({s / 60:.1f} min)"


def command_line(script: str, argv: Sequence[str]) -> str:
    return " ".join(["python", f"examples/{script}", *argv])
