"""A one-minute demonstration on scikit-learn's bundled digits: train, fuse, compare.

``num_models`` MLPs are trained from different seeds (different initialisations and batch
orders) at once with :func:`jfusion.train.train_models`, then fused by every method in
``methods`` -- by default vanilla averaging, OT fusion (exact, Sinkhorn, by activations),
barycenter fusion and partial fusion -- and each fused model's test accuracy, size and
fusion time are tabulated next to the parents and their prediction ensemble. Without
alignment, averaging independently initialised networks mixes unrelated neurons; OT fusion
matches them first (Singh & Jaggi 2020).

Rows are printed as they finish and progress goes to stderr; ``out=DIR`` (``jfusion demo
--out DIR``) also writes ``DIR/demo.json`` and ``DIR/demo.png`` (:mod:`jfusion.workflow.results`).

Run it with ``jfusion demo`` or ``python -m jfusion.workflow.demo``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from jfusion.methods.baselines import ensemble_apply, vanilla_average
from jfusion.workflow.data import load_dataset
from jfusion.methods.barycenter import barycenter_fuse
from jfusion.methods.fuse import fuse
from jfusion.methods.partial import partial_fuse
from jfusion.models import MLP, mlp_spec
from jfusion.models.widths import module_for
from jfusion.pytrees import take_model
from jfusion.core.spec import Spec
from jfusion.core.support import ByActivations
from jfusion.workflow.progress import Progress, log
from jfusion.workflow.results import check_writable, results_document, write_chart, write_json
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
      kind: ``"parent"``, ``"baseline"`` (the ensemble, vanilla averaging) or ``"fused"``.
    """

    name: str
    accuracy: float
    parameters: int
    first_call_s: float | None = None
    warm_s: float | None = None
    nonzero_parameters: int | None = None
    kind: str = "fused"


# Methods whose rows are baselines rather than fusions (the chart colours them apart).
BASELINES = ("vanilla average",)

# What ``run_demo(out=DIR)`` writes into DIR.
JSON_NAME, CHART_NAME = "demo.json", "demo.png"


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def _num_parameters(variables: PyTree) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(variables))


def _num_nonzero(variables: PyTree) -> int:
    return sum(int(np.count_nonzero(x)) for x in jax.tree.leaves(variables))


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{1000 * s:.1f}"


def _count(n: int | None) -> str:
    return "-" if n is None else str(n)


def table_header(width: int) -> str:
    """The table's header line and rule for a name column ``width`` wide."""
    header = f"{'method':<{width}}  {'test acc':>8}  {'params':>7}  {'non-zero':>8}  {'first call ms':>13}  {'warm ms':>8}"
    return f"{header}\n{'-' * len(header)}"


def format_row(row: DemoRow, width: int) -> str:
    """One row of the table, its name column ``width`` wide."""
    return (
        f"{row.name:<{width}}  {100 * row.accuracy:>7.2f}%  {row.parameters:>7}  {_count(row.nonzero_parameters):>8}  "
        f"{_ms(row.first_call_s):>13}  {_ms(row.warm_s):>8}"
    )


def format_table(rows: Sequence[DemoRow]) -> str:
    """The rows as an aligned plain-text table."""
    width = max(len("method"), *(len(r.name) for r in rows))
    return "\n".join([table_header(width), *(format_row(r, width) for r in rows)])


def run_demo(
    *,
    num_models: int = 3,
    epochs: int = 20,
    seed: int = 0,
    features: Sequence[int] = (64, 64, 10),
    batch_size: int = 32,
    methods: Sequence[tuple[str, FusionMethod]] = FUSION_METHODS,
    print_fn: Callable[[str], Any] | None = print,
    progress: bool | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> list[DemoRow]:
    """Train ``num_models`` MLPs on digits, fuse them with each of ``methods``, tabulate.

    Every row is printed as soon as it is known (the parents and their ensemble after
    training, each method after its fusion is timed and evaluated); what is being done --
    loading, training (a bar over the epochs), compiling and running each method (a bar
    over the methods) -- goes to stderr (:mod:`jfusion.workflow.progress`).

    Args:
      num_models: parents, trained from seeds ``seed, seed + 1, ...``.
      epochs: training epochs of every parent.
      seed: the first parent's seed.
      features: the MLP's layer widths (the last is the 10 classes).
      batch_size: training batch size.
      methods: ``(name, method)`` pairs, each a row of the table (see ``FusionMethod``).
      print_fn: where the table goes (None: nowhere), one line or block per call.
      progress: draw progress bars on stderr: None (default) when stderr is a terminal,
        False never (each step is then a line on stderr), True always.
      out: a directory to write ``demo.json`` (the settings, software versions and every
        number of the table) and ``demo.png`` (a bar chart of the accuracies; only when
        matplotlib is installed) into, atomically (:mod:`jfusion.workflow.results`).
      overwrite: replace ``demo.json`` / ``demo.png`` in ``out`` if jfusion wrote them;
        without it existing files are refused before anything is trained.

    Returns:
      The table's rows: each parent, the logit-averaging ensemble, then each method.
      Fusion times are of ``jax.jit(method)``: the first call includes compilation, the
      warm call is the compiled fusion alone.
    """
    if num_models < 1 or epochs < 0 or batch_size < 1 or len(features) < 2 or min(features) < 1:
        raise ValueError(
            f"run_demo needs num_models >= 1, epochs >= 0, batch_size >= 1 and at least two positive "
            f"features; got {num_models}, {epochs}, {batch_size}, {tuple(features)}"
        )
    paths = None
    if out is not None:
        paths = Path(out) / JSON_NAME, Path(out) / CHART_NAME
        check_writable(paths, overwrite)  # before the work, not after it
    say = print_fn if print_fn is not None else (lambda line: None)
    log("loading digits")
    data = load_dataset("digits")
    model = MLP(tuple(features))
    spec = mlp_spec(len(features))
    seeds = [seed + k for k in range(num_models)]
    width = max(len("method"), len("ensemble (logits)"), *(len(name) for name, _ in methods),
                *(len(f"model {k} (seed {s})") for k, s in enumerate(seeds)))

    start = time.perf_counter()
    with Progress(epochs, f"training {num_models} MLPs", bar=progress) as bar:
        parents = train_models(
            model, (data.train_images, data.train_labels), seeds, epochs=epochs, batch_size=batch_size,
            progress=lambda epoch, total, losses: bar.step("loss " + " ".join(f"{x:.3f}" for x in losses)),
        )
        jax.block_until_ready(parents)
    train_s = time.perf_counter() - start

    def scored(name: str, variables: PyTree, *times: float, kind: str = "fused") -> DemoRow:
        # A partial fusion is wider than its parents: the module of its widths.
        module = module_for(model, variables, spec)
        accuracy = evaluate(module, variables, data.test_images, data.test_labels)
        return DemoRow(
            name, accuracy, _num_parameters(variables), *times, nonzero_parameters=_num_nonzero(variables), kind=kind
        )

    architecture = "-".join(map(str, (int(np.prod(data.train_images.shape[1:])), *features)))
    say(
        f"jfusion demo: {num_models} MLPs {architecture} on digits "
        f"({len(data.train_labels)} train / {len(data.test_labels)} test images), "
        f"{epochs} epochs, trained together in {train_s:.1f} s (including compilation)\n"
    )
    say(table_header(width))
    log("evaluating the parents and their ensemble")
    rows = []
    for k, s in enumerate(seeds):
        rows.append(scored(f"model {k} (seed {s})", take_model(parents, k), kind="parent"))
        say(format_row(rows[-1], width))
    logits = jax.jit(lambda models, x: ensemble_apply(model.apply, models, x))(parents, data.test_images)
    rows.append(
        DemoRow(
            "ensemble (logits)",
            float(np.mean(np.argmax(logits, -1) == data.test_labels)),
            _num_parameters(parents),
            nonzero_parameters=_num_nonzero(parents),
            kind="baseline",
        )
    )
    say(format_row(rows[-1], width))

    inputs = jax.numpy.asarray(data.train_images[:200])
    with Progress(len(methods), "fusing", bar=progress) as bar:
        for name, method in methods:
            fused_fn = jax.jit(lambda models, x, method=method: method(model, models, spec, x))
            bar.status(f"{name}: tracing, compiling and running (first call)")
            fused, first = _timed(lambda: fused_fn(parents, inputs))
            bar.status(f"{name}: running again (warm call)")
            _, warm = _timed(lambda: fused_fn(parents, inputs))
            bar.status(f"{name}: evaluating")
            rows.append(scored(name, fused, first, warm, kind="baseline" if name in BASELINES else "fused"))
            bar.result(format_row(rows[-1], width), print_fn)
            bar.step()

    say(
        "\nfirst call: jax.jit(method) traced, compiled and run; warm: the compiled fusion "
        f"alone. Backend: {jax.default_backend()}."
    )
    if paths is not None:
        _write_results(paths, rows, overwrite, title=f"jfusion demo: {num_models} MLPs {architecture} on digits, "
                       f"{epochs} epochs (backend {jax.default_backend()})", settings={
                           "num_models": num_models, "epochs": epochs, "seed": seed, "features": list(features),
                           "batch_size": batch_size, "methods": [name for name, _ in methods], "data": "digits",
                           "train_images": len(data.train_labels), "test_images": len(data.test_labels),
                           "activation_samples": int(inputs.shape[0]),
                       }, train_s=train_s, say=log)
    return rows


def _write_results(paths, rows, overwrite, *, title, settings, train_s, say) -> None:
    json_path, chart_path = paths
    document = results_document(
        "jfusion demo", settings, [dataclasses.asdict(r) for r in rows],
        training_s=train_s, units={"accuracy": "fraction in [0, 1]", "first_call_s": "s", "warm_s": "s"},
    )
    say(f"writing {write_json(json_path, document, overwrite=overwrite)}")
    chart = write_chart(chart_path, [(r.name, r.accuracy, r.kind) for r in rows], title=title, overwrite=overwrite)
    if chart is None:
        say(f"matplotlib is not installed, so no chart: wrote only {json_path} (pip install matplotlib for {chart_path.name})")
    else:
        say(f"writing {chart}")


if __name__ == "__main__":
    from jfusion.workflow.compile_cache import enable_compile_cache

    enable_compile_cache()  # off with JFUSION_NO_COMPILE_CACHE=1
    run_demo()
