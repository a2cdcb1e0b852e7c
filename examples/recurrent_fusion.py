"""Fusing recurrent networks: LSTMs and GRUs reading Fashion-MNIST images row by row.

The setting of Akash et al. (2022)'s RNN experiments (row-by-row MNIST; Fashion-MNIST is our
offline stand-in): pairs of one-layer recurrent classifiers (28 steps of 28 pixels, a Dense
readout of the last hidden state) trained from different seeds, fused by vanilla averaging
and by OT fusion. The hidden units are one group carried by the hidden-to-hidden kernels on
both axes: weight alignment's first sweep matches them on the input-to-hidden weights alone
(the FedMA-style baseline Akash et al. improve on); ``ByWeights(sweeps=S)`` then adds the
hidden-to-hidden rows, transported by the previous sweep's plan -- for permutation plans the
fixed-point iteration of their Gromov-Wasserstein cost. GWB (``barycenter_fuse`` with
``GromovWassersteinPlans``) solves that soft fused Gromov-Wasserstein coupling instead, with
``alpha`` weighing the hidden-to-hidden term against the input-to-hidden one, and iterates
the barycenter. Activation alignment uses the hidden states at every step on 200 training
images.

The WB paper's claim is measured too: the loss barrier (``jfusion.loss_barrier``, git-re-basin's
protocol: 25 lambdas, the maximum minus the endpoints' mean) along the segment from model 1 to
model 2 aligned onto it by each method -- the method's fusion with model weights (0, 1), which
is model 2 transported into model 1's basis; for vanilla averaging that is model 2 itself, the
naive barrier -- on ``barrier_images`` test images, with one plot per cell.

    python examples/recurrent_fusion.py                        # the recorded run (~16 min on 2 CPU cores before the GWB rows)
    python examples/recurrent_fusion.py --quick --out /tmp/q   # smoke test, digits, seconds

Writes ``recurrent_fusion_numbers.{md,json}`` and ``recurrent_fusion.png`` to ``--out``; the
reading is ``examples/results/recurrent_fusion.md``, written by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any, Sequence

import jax
import matplotlib.pyplot as plt
import numpy as np
import optax

import jfusion
import kit
from jfusion.models import RecurrentClassifier


@dataclasses.dataclass(frozen=True)
class Config:
    data: str = "fashion_mnist"
    cells: tuple[str, ...] = ("lstm", "gru")
    hidden: int = 128
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4, 5)  # disjoint pairs (0, 1), (2, 3), (4, 5)
    epochs: int = 5
    batch_size: int = 128
    learning_rate: float = 1e-3
    activation_images: int = 200
    sweeps: tuple[int, ...] = (1, 2, 4)
    gwb_alphas: tuple[float, ...] = (0.5, 0.9)  # GWB's weight on the hidden-to-hidden term
    sinkhorn: bool = True  # also the most sweeps with the Sinkhorn solver
    train_subsample: int | None = None
    test_subsample: int | None = None
    barrier_images: int = 2000  # test images of the loss-barrier curves


def quick() -> Config:
    """A smoke test of each kind of method once, on one cell (each fusion program costs seconds of compilation)."""
    return Config(
        data=kit.quick_dataset(), cells=("gru",), hidden=16, seeds=(0, 1), epochs=3, batch_size=32,
        learning_rate=1e-2, activation_images=100, sweeps=(2,), gwb_alphas=(0.5,), sinkhorn=False, train_subsample=3000, test_subsample=1000,
        barrier_images=200,
    )


Fusion = Any  # (pair, inputs, model_weights or None) -> variables


def methods(cfg: Config, model: RecurrentClassifier) -> dict[str, Fusion]:
    """name -> ``fusion(pair, inputs, model_weights) -> variables`` (None: uniform weights)."""
    spec = model.spec()
    out: dict[str, Fusion] = {"vanilla average": lambda pair, inputs, w: jfusion.vanilla_average(pair, model_weights=w).params}
    for sweeps in cfg.sweeps:
        label = "OT, weights (input-to-hidden only)" if sweeps == 1 else f"OT, weights, {sweeps} sweeps (+ hidden-to-hidden)"
        alignment = jfusion.ByWeights(sweeps=sweeps)
        out[label] = lambda pair, inputs, w, a=alignment: jfusion.fuse(pair, spec, alignment=a, model_weights=w).params
    for alpha in cfg.gwb_alphas:
        producer = jfusion.GromovWassersteinPlans(alpha=alpha)
        out[f"GWB, alpha={alpha} (fused Gromov-Wasserstein barycenter)"] = lambda pair, inputs, w, p=producer: jfusion.barycenter_fuse(
            pair, spec, producer=p, model_weights=w
        ).params
    activations = jfusion.ByActivations.from_module(model)
    out[f"OT, activations ({cfg.activation_images} images)"] = lambda pair, inputs, w: jfusion.fuse(
        pair, spec, alignment=activations, inputs=inputs, model_weights=w
    ).params
    if not cfg.sinkhorn:
        return out
    most = jfusion.ByWeights(sweeps=max(cfg.sweeps))
    out[f"OT, weights, {max(cfg.sweeps)} sweeps, Sinkhorn"] = lambda pair, inputs, w: jfusion.fuse(
        pair, spec, alignment=most, solver="sinkhorn", model_weights=w
    ).params
    return out


def run_cell(cfg: Config, cell: str, data: kit.Data) -> dict[str, Any]:
    model = RecurrentClassifier((cfg.hidden,), 10, cell)
    start = time.perf_counter()
    stacked = kit.train_set(
        model, (data.xtr, data.ytr), cfg.seeds, epochs=cfg.epochs, batch_size=cfg.batch_size,
        optimizer=optax.adam(cfg.learning_rate),
    )
    train_s = time.perf_counter() - start
    score = lambda variables: kit.accuracy(kit.predictions(model.apply, variables, data.xte), data.yte)
    rows = [kit.Row(f"parent seed {s}", [score(kit.pick(stacked, k))]) for k, s in enumerate(cfg.seeds)]
    cases = [
        kit.Case([kit.pick(stacked, 2 * p), kit.pick(stacked, 2 * p + 1)], kit.activation_batch(data, cfg.activation_images, p))
        for p in range(len(cfg.seeds) // 2)
    ]
    rows.append(kit.Row("ensemble (logit average)", [kit.ensemble_accuracy(model.apply, c.models, data.xte, data.yte) for c in cases]))
    fusions = methods(cfg, model)
    rows += kit.evaluate_methods({name: lambda pair, inputs, f=f: f(pair, inputs, None) for name, f in fusions.items()}, cases, score)
    curves = kit.barrier_curves(model.apply, {name: jax.jit(f) for name, f in fusions.items()}, cases,
                                data.xte[: cfg.barrier_images], data.yte[: cfg.barrier_images])
    print(f"[{cell}] {len(cases)} pairs done", flush=True)
    return {"rows": rows, "train_s": train_s, "barriers": curves}


def barrier_table(res: dict[str, Any]) -> kit.Table:
    body = []
    for name, results in res["barriers"].items():
        loss = [float(r.barriers["loss"]) for r in results]
        accuracy = [float(r.barriers["accuracy"]) for r in results]
        body.append([name, kit.mean_std(loss, scale=1.0, digits=3), kit.mean_std(accuracy)])
    return kit.Table(["model 2 aligned onto model 1 by", "loss barrier (mean ± std over pairs)", "accuracy barrier, points"], body)


def plot(cfg: Config, results: dict[str, Any]) -> Any:
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (cell, res) in zip(axes[0], results.items()):
        parents = [r.accuracy[0] for r in res["rows"] if r.name.startswith("parent")]
        bars = [("parents", parents)] + [(r.name, r.accuracy) for r in res["rows"] if not r.name.startswith("parent")]
        values = [100 * np.asarray(v) for _, v in bars]
        ax.barh(range(len(bars)), [v.mean() for v in values], xerr=[v.std(ddof=1) if len(v) > 1 else 0.0 for v in values])
        ax.set_yticks(range(len(bars)), [n for n, _ in bars], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("test accuracy %")
        ax.set_title(f"{cell.upper()}, {cfg.hidden} units, {len(cfg.seeds) // 2} pairs")
    fig.tight_layout()
    return fig


def main(argv: Sequence[str] | None = None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny models, 2 epochs, digits unless Fashion-MNIST is installed")
    parser.add_argument("--out", default=None, help="output directory (default examples/results; a temp dir with --quick)")
    args = parser.parse_args(argv)
    cfg = quick() if args.quick else Config()
    start = time.perf_counter()
    data = kit.load_data(cfg.data, cfg.train_subsample, cfg.test_subsample)
    results = {cell: run_cell(cfg, cell, data) for cell in cfg.cells}
    tables = {}
    for cell, res in results.items():
        tables[f"{cell.upper()} ({cfg.hidden} units; trained in {res['train_s']:.0f} s), test accuracy %"] = kit.rows_table(res["rows"], cases="pair")
        tables[f"{cell.upper()}: loss barrier on {cfg.barrier_images} test images, 25 lambdas"] = barrier_table(res)
    out = kit.output_dir(args.out, args.quick, "recurrent_fusion")
    out.mkdir(parents=True, exist_ok=True)
    for cell, res in results.items():  # the first pair's curves
        jfusion.plot_interpolation({name: curves[0] for name, curves in res["barriers"].items()}, out / f"recurrent_fusion_barrier_{cell}.png",
                                   title=f"{cell.upper()}: model 1 to model 2 aligned onto it (first pair)", overwrite=True)
    data_out = {
        cell: {"rows": [dataclasses.asdict(r) for r in res["rows"]],
               "barriers": {name: [{"lambdas": np.asarray(r.lambdas).tolist(), "values": {m: np.asarray(v).tolist() for m, v in r.values.items()},
                                    "barriers": {m: float(v) for m, v in r.barriers.items()}} for r in curves]
                            for name, curves in res["barriers"].items()}}
        for cell, res in results.items()
    }
    return kit.write_report(
        out, "recurrent_fusion", title="Fusing recurrent networks: LSTM and GRU, images read row by row",
        settings=dataclasses.asdict(cfg), tables=tables, data=data_out,
        figures={"recurrent_fusion.png": plot(cfg, results)}, script="recurrent_fusion.py", argv=argv, runtime_s=time.perf_counter() - start,
    )


if __name__ == "__main__":
    main()
