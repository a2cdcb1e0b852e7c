"""A one-minute demonstration on scikit-learn's bundled digits: train, fuse, compare.

``num_models`` MLPs are trained from different seeds (different initialisations and batch
orders) at once with :func:`jfusion.train.train_models`, then fused by every method in
``methods`` -- by default vanilla averaging, OT fusion (exact, Sinkhorn, by activations),
barycenter fusion and partial fusion -- and each fused model's test accuracy, size and
fusion time are tabulated next to the parents and their prediction ensemble. Without
alignment, averaging independently initialised networks mixes unrelated neurons; OT fusion
matches them first (Singh & Jaggi 2020).

Run it with ``python -m jfusion.workflow.demo``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from jfusion.methods.baselines import ensemble_apply, vanilla_average
from jfusion.workflow.data import load_dataset
from jfusion.methods.barycenter import barycenter_fuse
from jfusion.methods.fuse import fuse
from jfusion.methods.partial import partial_fuse
from jfusion.models import MLP, mlp_spec
from jfusion.core.spec import Spec
from jfusion.core.support import ByActivations
from jfusion.workflow.train import evaluate, train_models
from jfusion.core.tree import PyTree

# ``method(module, models, spec, inputs) -> fused``: ``models`` are the parents' variables
# stacked along a leading K axis, ``inputs`` a batch of training images (for activation
# alignment), ``module`` the parents' flax module. The fused model may be wider (partial fusion).
FusionMethod = Callable[[MLP, PyTree, Spec, jax.Array], PyTree]

FUSION_METHODS: tuple[tuple[str, FusionMethod], ...] = (
    ("vanilla average", lambda module, models, spec, inputs: vanilla_average(models).params),
    ("OT fusion (exact)", lambda module, models, spec, inputs: fuse(models, spec, solver="exact").params),
    ("OT fusion (Sinkhorn)", lambda module, models, spec, inputs: fuse(models, spec, solver="sinkhorn").params),
    (
        "OT fusion (activations)",
        lambda module, models, spec, inputs: fuse(
            models, spec, alignment=ByActivations.from_module(module), inputs=inputs
        ).params,
    ),
    ("barycenter fusion", lambda module, models, spec, inputs: barycenter_fuse(models, spec).params),
    ("partial fusion a=0.5", lambda module, models, spec, inputs: partial_fuse(models, spec, 0.5).params),
)


@dataclasses.dataclass(frozen=True)
class DemoRow:
    """One line of the demo's table.

    Attributes:
      name: the model or method.
      accuracy: test accuracy in [0, 1].
      parameters: the model's parameter count (the ensemble's: all its members').
      first_call_s: seconds of the first (jitted) call of the method: tracing, XLA compile
        and the run. None for the parents and the ensemble.
      warm_s: seconds of a second call of the compiled method (the fusion alone).
      nonzero_parameters: how many of the parameters are non-zero: what a sparse layout
        stores (a partial fusion's isolated neurons of different models never connect).
    """

    name: str
    accuracy: float
    parameters: int
    first_call_s: float | None = None
    warm_s: float | None = None
    nonzero_parameters: int | None = None


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def _num_parameters(variables: PyTree) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(variables))


def _num_nonzero(variables: PyTree) -> int:
    return sum(int(np.count_nonzero(x)) for x in jax.tree.leaves(variables))


def format_table(rows: Sequence[DemoRow]) -> str:
    """The rows as an aligned plain-text table."""
    width = max(len("method"), *(len(r.name) for r in rows))

    def ms(s: float | None) -> str:
        return "-" if s is None else f"{1000 * s:.1f}"

    def count(n: int | None) -> str:
        return "-" if n is None else str(n)

    lines = [
        f"{'method':<{width}}  {'test acc':>8}  {'params':>7}  {'non-zero':>8}  {'first call ms':>13}  {'warm ms':>8}"
    ]
    lines.append("-" * len(lines[0]))
    for r in rows:
        lines.append(
            f"{r.name:<{width}}  {100 * r.accuracy:>7.2f}%  {r.parameters:>7}  {count(r.nonzero_parameters):>8}  "
            f"{ms(r.first_call_s):>13}  {ms(r.warm_s):>8}"
        )
    return "\n".join(lines)


def run_demo(
    *,
    num_models: int = 3,
    epochs: int = 20,
    seed: int = 0,
    features: Sequence[int] = (64, 64, 10),
    batch_size: int = 32,
    methods: Sequence[tuple[str, FusionMethod]] = FUSION_METHODS,
    print_fn: Callable[[str], Any] | None = print,
) -> list[DemoRow]:
    """Train ``num_models`` MLPs on digits, fuse them with each of ``methods``, tabulate.

    Args:
      num_models: parents, trained from seeds ``seed, seed + 1, ...``.
      epochs: training epochs of every parent.
      seed: the first parent's seed.
      features: the MLP's layer widths (the last is the 10 classes).
      batch_size: training batch size.
      methods: ``(name, method)`` pairs, each a row of the table (see ``FusionMethod``).
      print_fn: where the table goes (None: nowhere).

    Returns:
      The table's rows: each parent, the logit-averaging ensemble, then each method.
      Fusion times are of ``jax.jit(method)``: the first call includes compilation, the
      warm call is the compiled fusion alone.
    """
    data = load_dataset("digits")
    model = MLP(tuple(features))
    spec = mlp_spec(len(features))
    seeds = [seed + k for k in range(num_models)]
    start = time.perf_counter()
    parents = train_models(
        model, (data.train_images, data.train_labels), seeds, epochs=epochs, batch_size=batch_size
    )
    jax.block_until_ready(parents)
    train_s = time.perf_counter() - start

    def scored(name: str, variables: PyTree, *times: float) -> DemoRow:
        # Read the widths off the kernels: a partial fusion is wider than its parents.
        layers = variables["params"]
        module = MLP(tuple(layers[f"Dense_{i}"]["kernel"].shape[1] for i in range(len(layers))))
        accuracy = evaluate(module, variables, data.test_images, data.test_labels)
        return DemoRow(name, accuracy, _num_parameters(variables), *times, nonzero_parameters=_num_nonzero(variables))

    rows = [scored(f"model {k} (seed {s})", jax.tree.map(lambda a: a[k], parents)) for k, s in enumerate(seeds)]
    logits = jax.jit(lambda models, x: ensemble_apply(model.apply, models, x))(parents, data.test_images)
    rows.append(
        DemoRow(
            "ensemble (logits)",
            float(np.mean(np.argmax(logits, -1) == data.test_labels)),
            _num_parameters(parents),
            nonzero_parameters=_num_nonzero(parents),
        )
    )

    inputs = jax.numpy.asarray(data.train_images[:200])
    for name, method in methods:
        fused_fn = jax.jit(lambda models, x, method=method: method(model, models, spec, x))
        fused, first = _timed(lambda: fused_fn(parents, inputs))
        _, warm = _timed(lambda: fused_fn(parents, inputs))
        rows.append(scored(name, fused, first, warm))

    if print_fn is not None:
        print_fn(
            f"jfusion demo: {num_models} MLPs "
            f"{'-'.join(map(str, (int(np.prod(data.train_images.shape[1:])), *features)))} on digits "
            f"({len(data.train_labels)} train / {len(data.test_labels)} test images), "
            f"{epochs} epochs, trained together in {train_s:.1f} s (including compilation)\n"
        )
        print_fn(format_table(rows))
        print_fn(
            "\nfirst call: jax.jit(method) traced, compiled and run; warm: the compiled fusion "
            f"alone. Backend: {jax.default_backend()}."
        )
    return rows


if __name__ == "__main__":
    from jfusion.workflow.compile_cache import enable_compile_cache

    enable_compile_cache()  # off with JFUSION_NO_COMPILE_CACHE=1
    run_demo()
