#!/usr/bin/env python
"""Partial fusion, barycenter fusion into any width and generalized pruning, with jfusion.

Morelli & Eckstein, "Partial Fusion of Neural Networks: Efficient Tradeoffs Between
Ensembles and Weight Aggregation" (ICML 2026), on Fashion-MNIST (installed offline here;
the paper uses MNIST) with the paper's MLP 784-100-100-100-10, ``MLP((100, 100, 100, 10))``.
Two experiments, one report ``partial_fusion.md`` and two figures in ``--out``
(default ``examples/results``):

1. **Specialist pair** (``pair``). A is trained on all of one special class plus 10% of the
   other classes, B on the other 90% without it (``special_class_split``). Accuracy against
   parameters (total and non-zero) of

   * partial fusion ``partial_fuse([A, B], spec, alpha)`` at ``alpha`` in
     {0, .2, .4, .5, .6, .8, 1} (hidden widths ``100 (1 + alpha)``; ``alpha = 0`` is OT
     fusion, ``alpha = 1`` the block-diagonal ensemble network), by weight and by activation
     alignment;
   * the prediction ensemble (logit average) and vanilla averaging;
   * structured pruning (``prune(..., method="delete")``) and generalized pruning by merging
     (``method="merge"``) of the ensemble network ``partial_fuse([A, B], spec, 1.0).params``
     (width 200) back to the same widths ``100 (1 + alpha)``.

   The same sweep also runs on two full-data models C, D (where the ensemble beats both
   parents) and, as a sensitivity check, on a specialist pair for special class 1 (Trouser).

2. **Single-network compression** (``compression``). One MLP trained on all the training
   data compressed with ``prune`` to width multipliers 1.0, 0.9, ..., 0.1 by merging (weight
   and activation supports) and by deleting; beside it, OTFusion §5.2's "fuse the dense model
   into the pruned one" (``fuse([pruned, dense], spec, target=0)``) and barycenter fusion of
   two full-data models into the smaller widths (``barycenter_fuse([C, D], spec,
   widths=multiplier)``).

Every experiment runs over 3 seeds (data split, initialisations and batch orders) and
reports mean ± std. Nothing is retrained after fusion or pruning, and nothing is tuned on the
test set: every setting below is fixed in advance.

Run (about 25 minutes on 2 shared CPU cores; the report states the measured time)::

    python examples/partial_fusion.py

Smoke test on a tiny budget (under a minute; writes to a temporary directory unless ``--out``
is given)::

    python examples/partial_fusion.py --quick

Raw per-seed numbers are saved to ``partial_fusion_results.json``; ``--report-only``
rebuilds the report and figures from it without recomputing.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import tempfile
import time
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import jfusion  # noqa: E402
from jfusion.workflow.data import special_class_split  # noqa: E402
from jfusion.models import MLP, mlp_spec  # noqa: E402
from jfusion.core.support import ModuleActivations  # noqa: E402
from jfusion.workflow.train import fit_models, init_models  # noqa: E402
from common import Data, activation_batch, command_line, fmt_seconds, load_data, md_table, mean_std, pick  # noqa: E402

FEATURES = (100, 100, 100, 10)  # the paper's MNIST MLP, 784-100-100-100-10
SPEC = mlp_spec(len(FEATURES))
HIDDEN = tuple(f"h{i}" for i in range(len(FEATURES) - 1))
SPECIAL = 4  # Fashion-MNIST "Coat"; the paper's special digit is 4 too
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
ALPHAS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0)
MULTIPLIERS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
RESULTS_JSON = "partial_fusion_results.json"


# --- configuration ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    quick: bool = False
    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 0.01
    momentum: float = 0.5
    seeds: tuple[int, ...] = (0, 1, 2)
    act_samples: int = 200
    alphas: tuple[float, ...] = ALPHAS
    multipliers: tuple[float, ...] = MULTIPLIERS
    alignments: tuple[str, ...] = ("weights", "activations")
    extras: bool = True  # fuse-into-pruned and barycenter fusion (experiment 2)
    extra_pairs: bool = True  # experiment 1 also on the generalist pair (C, D) and a second special class
    second_special: int = 1  # Trouser: the sensitivity check's special class
    train_subsample: int | None = None  # quick mode: a stratified subset of the training set
    test_subsample: int | None = None


QUICK = Config(
    quick=True,
    epochs=1,
    seeds=(0, 1),
    # Every distinct width is one XLA compilation (seconds on CPU): keep few.
    alphas=(0.5, 1.0),
    multipliers=(0.5,),
    alignments=("weights",),
    extra_pairs=False,
    train_subsample=3000,
    test_subsample=1000,
)


# --- helpers ------------------------------------------------------------------------------


def features_of(params: Any) -> tuple[int, ...]:
    """The MLP's layer widths, read from its kernels' shapes."""
    p = params["params"]
    return tuple(int(p[f"Dense_{i}"]["kernel"].shape[-1]) for i in range(len(p)))


def count_total(params: Any) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(params)))


def count_nonzero(params: Any) -> int:
    return int(sum(np.count_nonzero(np.asarray(x)) for x in jax.tree.leaves(params)))


@functools.partial(jax.jit, static_argnums=0)
def _predict(features, params, x):
    return jnp.argmax(MLP(features).apply(params, x), axis=-1)


@functools.partial(jax.jit, static_argnums=0)
def _predict_ensemble(features, stacked, x):
    return jnp.argmax(jfusion.ensemble_apply(MLP(features).apply, stacked, x), axis=-1)


def accuracies(pred: Any, data: Data, special: int = SPECIAL) -> tuple[float, float]:
    """(overall, special-class) test accuracy in percent."""
    pred = np.asarray(pred)
    mask = data.yte == special
    return 100.0 * float(np.mean(pred == data.yte)), 100.0 * float(np.mean(pred[mask] == data.yte[mask]))


def mlp_activations_any_width(variables: Any, inputs: jax.Array) -> dict[str, jax.Array]:
    """Pre-activations of an MLP of any widths (rebuilt from the kernel shapes, static under jit).

    Used for the ensemble network (width 200) and every pruned width, so one function serves
    all of them. (Needed as a WORKAROUND only where models of *different* widths are aligned
    in one call -- see the report's "jfusion limitations"; this script avoids that case.)
    """
    return ModuleActivations(MLP(features_of(variables)))(variables, inputs)


ACTIVATIONS = jfusion.Activations(mlp_activations_any_width)


def alignment_kwargs(alignment: str, inputs: jax.Array) -> dict[str, Any]:
    if alignment == "weights":
        return {"alignment": "weights"}
    return {"alignment": ACTIVATIONS, "inputs": inputs}


class Recorder:
    """Per-seed measurements of (method, setting) cells, in insertion order."""

    def __init__(self):
        self.rows: dict[tuple[str, float], dict[str, Any]] = {}

    def add(self, method: str, setting: float, params: Any, acc: tuple[float, float],
            total: int | None = None, nonzero: int | None = None, **info):
        key = (method, float(setting))
        row = self.rows.setdefault(
            key,
            {"method": method, "setting": float(setting), "features": list(features_of(params)),
             "total": [], "nonzero": [], "acc": [], "special": [], "info": []},
        )
        row["total"].append(count_total(params) if total is None else int(total))
        row["nonzero"].append(count_nonzero(params) if nonzero is None else int(nonzero))
        row["acc"].append(acc[0])
        row["special"].append(acc[1])
        row["info"].append(info)

    def as_list(self) -> list[dict[str, Any]]:
        return list(self.rows.values())


# --- training -----------------------------------------------------------------------------


def train_all(cfg: Config, data: Data) -> dict[str, Any]:
    """Specialist A, generalist B and two full-data models C, D per seed (stacked over seeds).

    Models sharing one ``fit_models`` call have subsets of equal size, so every model runs
    exactly ``cfg.epochs`` passes over its own data (``fit_models`` gives every model of one
    call ``max_k n_k // batch`` steps per epoch).
    """
    model = MLP(FEATURES)
    seeds = list(cfg.seeds)
    optimizer = optax.sgd(cfg.learning_rate, momentum=cfg.momentum)
    splits = [special_class_split(data.ytr, SPECIAL, 0.1, seed=s) for s in seeds]
    x0 = data.xtr[:1]
    kw = dict(epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer=optimizer)
    a = fit_models(model, init_models(model, [1000 + s for s in seeds], x0),
                   [(data.xtr[i], data.ytr[i]) for i, _ in splits], seeds, **kw)
    b = fit_models(model, init_models(model, [2000 + s for s in seeds], x0),
                   [(data.xtr[j], data.ytr[j]) for _, j in splits], [100 + s for s in seeds], **kw)
    cd = fit_models(model, init_models(model, [3000 + s for s in seeds] + [4000 + s for s in seeds], x0),
                    (data.xtr, data.ytr), [200 + s for s in seeds] + [300 + s for s in seeds], **kw)
    k = len(seeds)
    models = {
        "A": [pick(a, i) for i in range(k)],
        "B": [pick(b, i) for i in range(k)],
        "C": [pick(cd, i) for i in range(k)],
        "D": [pick(cd, k + i) for i in range(k)],
        "sizes": (len(splits[0][0]), len(splits[0][1]), len(data.ytr)),
    }
    if cfg.extra_pairs:
        # The sensitivity check: the same inits and batch orders, another special class.
        splits2 = [special_class_split(data.ytr, cfg.second_special, 0.1, seed=s) for s in seeds]
        a2 = fit_models(model, init_models(model, [1000 + s for s in seeds], x0),
                        [(data.xtr[i], data.ytr[i]) for i, _ in splits2], seeds, **kw)
        b2 = fit_models(model, init_models(model, [2000 + s for s in seeds], x0),
                        [(data.xtr[j], data.ytr[j]) for _, j in splits2], [100 + s for s in seeds], **kw)
        models["A2"] = [pick(a2, i) for i in range(k)]
        models["B2"] = [pick(b2, i) for i in range(k)]
    return models


def widths_for(alpha: float) -> dict[str, int]:
    """The hidden widths of partial fusion at ``alpha`` for two models of width n: n + round(alpha n)."""
    return {g: FEATURES[i] + int(round(alpha * FEATURES[i])) for i, g in enumerate(HIDDEN)}


# --- experiment 1: the specialist pair ----------------------------------------------------


def origin_share(ensemble_net: Any, pruned: Any) -> list[float]:
    """Per hidden layer, the share of a pruned-by-deletion network's neurons that come from model B.

    The ensemble network's hidden layers are laid out ``[A's 100 | B's 100]``. Deleting keeps a
    neuron's incoming weights (restricted to the kept inputs) and bias unchanged, so each kept
    neuron is identified as the ensemble neuron whose weights it equals, layer by layer.
    """
    shares = []
    kept_inputs = None
    for i in range(len(HIDDEN)):
        full_k = np.asarray(ensemble_net["params"][f"Dense_{i}"]["kernel"], np.float64)
        if kept_inputs is not None:
            full_k = full_k[kept_inputs]
        full = np.concatenate([full_k, np.asarray(ensemble_net["params"][f"Dense_{i}"]["bias"])[None]], 0).T
        part = np.concatenate([np.asarray(pruned["params"][f"Dense_{i}"]["kernel"], np.float64),
                               np.asarray(pruned["params"][f"Dense_{i}"]["bias"])[None]], 0).T
        dist = (part**2).sum(1)[:, None] + (full**2).sum(1)[None, :] - 2.0 * part @ full.T
        kept_inputs = np.argmin(dist, axis=1)
        shares.append(float(np.mean(kept_inputs >= FEATURES[i])))
    return shares


def exp_pair(cfg: Config, data: Data, pair: Sequence[list[Any]], special: int, names: tuple[str, str],
             timings: dict[str, float], tag: str) -> list[dict[str, Any]]:
    """Partial fusion of ``pair = (As, Bs)`` (one model per seed each) and its baselines."""
    rec = Recorder()
    xte = jnp.asarray(data.xte)
    acc = functools.partial(accuracies, data=data, special=special)
    partial_s: list[float] = []
    for i, s in enumerate(cfg.seeds):
        A, B = pair[0][i], pair[1][i]
        inputs = activation_batch(data, cfg.act_samples, s)
        rec.add(names[0], 0.0, A, acc(_predict(FEATURES, A, xte)))
        rec.add(names[1], 0.0, B, acc(_predict(FEATURES, B, xte)))
        pair_stacked = jax.tree.map(lambda *xs: jnp.stack(xs), A, B)
        rec.add("prediction ensemble", 1.0, A, acc(_predict_ensemble(FEATURES, pair_stacked, xte)),
                total=count_total(A) + count_total(B), nonzero=count_nonzero(A) + count_nonzero(B))
        avg = jfusion.vanilla_average([A, B])
        rec.add("vanilla averaging", 0.0, avg, acc(_predict(FEATURES, avg, xte)))
        for alignment in cfg.alignments:
            for alpha in cfg.alphas:
                t = time.perf_counter()
                # The first model aligned onto the second (target=-1, the paper's B); exact partial OT.
                pf = jfusion.partial_fuse([A, B], SPEC, alpha, **alignment_kwargs(alignment, inputs))
                jax.block_until_ready(pf.params)
                if i > 0:
                    partial_s.append(time.perf_counter() - t)
                f = features_of(pf.params)
                assert count_nonzero(pf.params) == int(pf.num_nonzero), "num_nonzero disagrees with a recount"
                assert count_total(pf.params) == int(pf.num_parameters)
                rec.add(f"partial fusion ({alignment})", alpha, pf.params, acc(_predict(f, pf.params, xte)))
        # The block-diagonal ensemble network (alpha = 1: nothing matched, so alignment is moot).
        ensemble_net = jfusion.partial_fuse([A, B], SPEC, 1.0).params
        prune_cells = [("structured pruning (delete)", "delete", "weights")]
        prune_cells += [(f"generalized pruning (merge, {a})", "merge", a) for a in cfg.alignments]
        for alpha in cfg.alphas:
            widths = widths_for(alpha)
            for name, method, alignment in prune_cells:
                pruned = jfusion.prune(ensemble_net, SPEC, widths, method=method, **alignment_kwargs(alignment, inputs))
                f = features_of(pruned)
                info = {"share_B": origin_share(ensemble_net, pruned)} if method == "delete" else {}
                rec.add(name, alpha, pruned, acc(_predict(f, pruned, xte)), **info)
        print(f"[{tag}] seed {s} done", flush=True)
    timings.setdefault("partial_fuse_warm_s", []).extend(partial_s)
    return rec.as_list()


# --- experiment 2: single-network compression ---------------------------------------------


def exact_ok(mult: float) -> bool:
    """Exact OT between uniform measures needs one width to divide the other."""
    widths = [max(1, int(round(mult * n))) for n in FEATURES[:-1]]
    return all(n % w == 0 for n, w in zip(FEATURES[:-1], widths))


def exp_compression(cfg: Config, data: Data, models: dict[str, Any], timings: dict[str, float]) -> list[dict[str, Any]]:
    rec = Recorder()
    xte = jnp.asarray(data.xte)
    solvers = {"Sinkhorn": jfusion.Sinkhorn(), "Exact": jfusion.Exact()}
    bary_s: list[float] = []
    for i, s in enumerate(cfg.seeds):
        C, D = models["C"][i], models["D"][i]
        inputs = activation_batch(data, cfg.act_samples, s)
        rec.add("dense model C", 1.0, C, accuracies(_predict(FEATURES, C, xte), data))
        rec.add("dense model D", 1.0, D, accuracies(_predict(FEATURES, D, xte), data))
        for mult in cfg.multipliers:
            deleted = jfusion.prune(C, SPEC, mult, method="delete")
            f = features_of(deleted)
            rec.add("delete (L1 of incoming weights)", mult, deleted, accuracies(_predict(f, deleted, xte), data))
            for alignment in cfg.alignments:
                merged = jfusion.prune(C, SPEC, mult, method="merge", **alignment_kwargs(alignment, inputs))
                rec.add(f"merge ({alignment})", mult, merged, accuracies(_predict(f, merged, xte), data))
            if not cfg.extras:
                continue
            for sname, solver in solvers.items():
                if sname == "Exact" and not exact_ok(mult):
                    continue
                if cfg.quick and sname == "Sinkhorn":
                    continue
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", jfusion.ConvergenceWarning)
                    # OTFusion §5.2: the dense model fused into the pruned one's architecture.
                    fused = jfusion.fuse([deleted, C], SPEC, target=0, solver=solver)
                    rec.add(f"delete + fuse dense into it ({sname})", mult, fused,
                            accuracies(_predict(f, fused, xte), data), unconverged=len(caught))
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", jfusion.ConvergenceWarning)
                    t = time.perf_counter()
                    bary = jfusion.barycenter_fuse([C, D], SPEC, widths=mult, solver=solver)
                    jax.block_until_ready(bary.params)
                    bary_s.append(time.perf_counter() - t)
                    rec.add(f"barycenter of C, D ({sname})", mult, bary.params,
                            accuracies(_predict(f, bary.params, xte), data),
                            iterations=int(bary.iterations), converged=bool(bary.converged),
                            unconverged=len(caught))
        print(f"[compression] seed {s} done", flush=True)
    timings["barycenter_call_median_s"] = float(np.median(bary_s)) if bary_s else float("nan")
    return rec.as_list()


# --- report -------------------------------------------------------------------------------


def fmt_count(values: Sequence[int]) -> str:
    v = np.asarray(values)
    return f"{int(v[0]):,}" if (v == v[0]).all() else f"{v.mean():,.0f} ({int(v.min()):,}–{int(v.max()):,})"


def rows_of(rows: list[dict[str, Any]], method: str) -> list[dict[str, Any]]:
    return sorted((r for r in rows if r["method"] == method), key=lambda r: r["setting"])


def methods_in(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in rows))


def widths_str(row: dict[str, Any]) -> str:
    return "-".join(str(w) for w in row["features"])


def pair_tables(pair: dict[str, Any]) -> str:
    rows, names, special = pair["rows"], pair["names"], pair["special"]
    header = ["method", "alpha", "widths", "total params", "non-zero params", "test acc %", f"class {special} acc %"]
    base = []
    for m in (*names, "vanilla averaging", "prediction ensemble"):
        for r in rows_of(rows, m):
            alpha = "(≡ 1)" if "ensemble" in m else "–"
            base.append([m, alpha, widths_str(r) if "ensemble" not in m else "2 × 100-100-100-10",
                         fmt_count(r["total"]), fmt_count(r["nonzero"]), mean_std(r["acc"]), mean_std(r["special"])])
    out = ["#### Parents and baselines\n\n" + md_table(header, base)]
    for m in methods_in(rows):
        if m.startswith(("partial", "structured", "generalized")):
            delete = m.startswith("structured")
            body = []
            for r in rows_of(rows, m):
                label = f"{r['setting']:g}" + (" (OT fusion)" if m.startswith("partial") and r["setting"] == 0 else "")
                label += " (ensemble)" if m.startswith("partial") and r["setting"] == 1 else ""
                line = [m, label, widths_str(r), fmt_count(r["total"]), fmt_count(r["nonzero"]),
                        mean_std(r["acc"]), mean_std(r["special"])]
                if delete:
                    shares = np.mean([x["share_B"] for x in r["info"]], axis=0)
                    line.append(" / ".join(f"{100 * v:.0f}%" for v in shares))
                body.append(line)
            extra = [f"kept from {names[1].split(' (')[0]} (h0 / h1 / h2)"] if delete else []
            out.append(f"#### {m}\n\n" + md_table(header + extra, body))
    return "\n\n".join(out)


def compression_table(rows: list[dict[str, Any]]) -> str:
    dense = rows_of(rows, "dense model C")
    main = [m for m in methods_in(rows) if not m.startswith("dense")]
    header = ["multiplier", "widths", "params"] + main
    cells = {}
    for m in main:
        for r in rows_of(rows, m):
            cells[(m, r["setting"])] = r
    settings = sorted({r["setting"] for r in rows if not r["method"].startswith("dense")}, reverse=True)
    body = []
    for st in settings:
        any_row = next(cells[(m, st)] for m in main if (m, st) in cells)
        line = [f"{st:g}", widths_str(any_row), fmt_count(any_row["total"])]
        for m in main:
            r = cells.get((m, st))
            line.append(mean_std(r["acc"]) if r else "–")
        body.append(line)
    d = dense[0]
    intro = (f"Dense model C (multiplier 1, {fmt_count(d['total'])} params): {mean_std(d['acc'])}; "
             f"dense model D: {mean_std(rows_of(rows, 'dense model D')[0]['acc'])}. "
             "Every compressed network here is dense (total = non-zero parameters). Test accuracy %, "
             "mean ± std over seeds.")
    return intro + "\n\n" + md_table(header, body)


def barycenter_notes(rows: list[dict[str, Any]]) -> str:
    lines = []
    for m in methods_in(rows):
        if not m.startswith("barycenter"):
            continue
        parts = []
        for r in rows_of(rows, m):
            its = [x["iterations"] for x in r["info"]]
            conv = sum(x["converged"] for x in r["info"])
            parts.append(f"{r['setting']:g}: {min(its)}–{max(its)} it., {conv}/{len(its)} converged")
        lines.append(f"- {m}: " + "; ".join(parts))
    for m in methods_in(rows):
        if m.startswith("delete + fuse"):
            bad = sum(x.get("unconverged", 0) for r in rows_of(rows, m) for x in r["info"])
            lines.append(f"- {m}: {bad} ConvergenceWarning(s) from the solver")
    return "\n".join(lines)


COLORS = {
    "partial fusion (weights)": "tab:blue",
    "partial fusion (activations)": "tab:cyan",
    "structured pruning (delete)": "tab:red",
    "generalized pruning (merge, weights)": "tab:green",
    "generalized pruning (merge, activations)": "tab:olive",
    "delete (L1 of incoming weights)": "tab:red",
    "merge (weights)": "tab:green",
    "merge (activations)": "tab:olive",
    "delete + fuse dense into it (Sinkhorn)": "tab:purple",
    "delete + fuse dense into it (Exact)": "tab:purple",
    "barycenter of C, D (Sinkhorn)": "tab:brown",
    "barycenter of C, D (Exact)": "tab:brown",
}


def _err(ax, rows, key_x, key_y, label, color, marker="o", ls="-", annotate=False):
    x = np.array([np.mean(r[key_x]) for r in rows])
    y = np.array([np.mean(r[key_y]) for r in rows])
    e = np.array([np.std(r[key_y], ddof=1) if len(r[key_y]) > 1 else 0.0 for r in rows])
    ax.errorbar(x, y, yerr=e, label=label, color=color, marker=marker, ls=ls, ms=4, capsize=3, lw=1.3)
    if annotate:
        for r, xi, yi in zip(rows, x, y):
            ax.annotate(f"{r['setting']:g}", (xi, yi), textcoords="offset points", xytext=(3, -10), fontsize=7, color=color)


def plot_pair(pair: dict[str, Any], path: str) -> str:
    rows, names, special = pair["rows"], pair["names"], pair["special"]
    fig, axes = plt.subplots(2, 2, figsize=(15, 10.5))
    panels = [("nonzero", "acc", "test accuracy % vs non-zero parameters", False),
              ("nonzero", "acc", "the same, zoomed on the top", True),
              ("total", "acc", "test accuracy % vs total parameters", False),
              ("nonzero", "special", f"class {special} ({CLASS_NAMES[special]}) accuracy % vs non-zero parameters", False)]
    for ax, (kx, ky, title, zoom) in zip(axes.flat, panels):
        for m in methods_in(rows):
            if m.startswith(("partial", "structured", "generalized")):
                ls = "-" if m.startswith("partial") else "--"
                _err(ax, rows_of(rows, m), kx, ky, m, COLORS.get(m, None), ls=ls,
                     annotate=m == ("partial fusion (activations)" if zoom else "partial fusion (weights)"))
        points = [(names[0], "k", "v"), (names[1], "k", "^"),
                  ("vanilla averaging", "tab:gray", "X"), ("prediction ensemble", "tab:orange", "*")]
        for m, c, mk in points:
            r = rows_of(rows, m)
            if r:
                _err(ax, r, kx, ky, m, c, marker=mk, ls="none")
        if zoom:
            top = max(np.mean(r["acc"]) for r in rows)
            ax.set_ylim(top - 12.0, top + 1.5)
            title += " (labels: alpha of partial fusion (activations))"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("non-zero parameters" if kx == "nonzero" else "total parameters")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("accuracy % (mean ± std over seeds)")
    axes[1, 0].set_ylabel("accuracy % (mean ± std over seeds)")
    axes[0, 0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{pair['title']}, Fashion-MNIST MLP 784-100-100-100-10, no retraining:\npartial fusion "
                 "(labels: alpha) vs pruning the ensemble network to the same widths", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_compression(rows: list[dict[str, Any]], path: str) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, log in zip(axes, (False, True)):
        for m in methods_in(rows):
            if m.startswith("dense"):
                continue
            exact = m.endswith("(Exact)")
            # Exact exists only at 4 multipliers: markers only, no line drawn between them.
            _err(ax, rows_of(rows, m), "nonzero", "acc", m, COLORS.get(m), marker="s" if exact else "o",
                 ls="none" if exact else "-")
        for m, ls in (("dense model C", "-"),):
            r = rows_of(rows, m)
            if r:
                ax.axhline(np.mean(r[0]["acc"]), color="k", ls=ls, lw=0.8, label="dense model C (uncompressed)")
        ax.axhline(10.0, color="gray", ls=":", lw=0.8)
        ax.set_xlabel("parameters (all dense: total = non-zero)")
        ax.grid(alpha=0.3)
        if log:
            ax.set_xscale("log")
            ax.set_title("same, log x-axis", fontsize=10)
        else:
            ax.set_title("single-network compression to width multipliers 1.0 ... 0.1 (no retraining)", fontsize=10)
    axes[0].set_ylabel("test accuracy % (mean ± std over seeds)")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def settings_block(cfg: dict[str, Any], sizes: Sequence[int]) -> str:
    seeds = cfg["seeds"]
    return "\n".join([
        f"- data: Fashion-MNIST (Debian's IDX files via `jfusion.data.load_dataset('fashion_mnist')`), "
        f"{'a stratified subset: ' if cfg['quick'] else ''}{sizes[2]} training / {cfg['n_test']} test images, "
        "pixels in [0, 1], no augmentation, no validation-based choices",
        f"- model: `MLP({FEATURES})` (784-100-100-100-10, ReLU, biases, no BatchNorm)",
        f"- training: optax SGD, lr {cfg['learning_rate']}, momentum {cfg['momentum']}, batch {cfg['batch_size']}, "
        f"{cfg['epochs']} epochs over each model's own data, no weight decay or schedule (OTFusion's MNIST "
        "defaults, as in `examples/otfusion_experiments.py`); no retraining after any fusion or pruning",
        f"- specialist pair: `special_class_split(train_labels, special={SPECIAL}, fraction=0.1, seed=s)`; "
        f"A = all of class {SPECIAL} ({CLASS_NAMES[SPECIAL]}) + 10% of every other class ({sizes[0]} images), "
        f"B = the other 90% without class {SPECIAL} ({sizes[1]} images)"
        + (f"; the sensitivity check's A', B' likewise with special class {cfg['second_special']} "
           f"({CLASS_NAMES[cfg['second_special']]})" if cfg.get("extra_pairs") else ""),
        f"- seeds s = {seeds}: the split, A's init (1000+s) and batch order (s), B's init (2000+s) and order "
        "(100+s) (A', B' the same); the full-data models C (init 3000+s, order 200+s) and D (init 4000+s, "
        "order 300+s)",
        "- partial fusion: `jfusion.partial_fuse([A, B], spec, alpha, alignment=...)`, A aligned onto B "
        "(target=-1), exact partial OT (`Exact()`: Hungarian on the sink-padded cost), Euclidean ground metric, "
        "uniform model weights (logits averaged with 1/2 each); hidden widths 100 + round(100 alpha)",
        f"- alignment: {', '.join(cfg['alignments'])}. 'weights' = incoming weights with OTFusion's past "
        f"correction; 'activations' = pre-activations on {cfg['act_samples']} random training images "
        "(all classes, drawn per seed; `jfusion.Activations` of an MLP rebuilt from the kernel shapes)",
        "- ensemble network = `partial_fuse([A, B], spec, 1.0).params` (block-diagonal, width 200, computes the "
        "logit average exactly); pruned back to widths 100 + round(100 alpha) with `jfusion.prune(..., "
        "method='delete')` (keeps the neurons of largest incoming-weight L1 norm) or `method='merge'` (k-means, 20 "
        "Lloyd iterations, on weight or activation supports)",
        "- prediction ensemble: `jfusion.ensemble_apply` (logit average), counted as 2 × the single model's "
        "parameters; vanilla averaging: `jfusion.vanilla_average([A, B])`",
        "- compression: model C pruned with `jfusion.prune(C, spec, multiplier, method=...)`; 'delete + fuse "
        "dense into it' = `jfusion.fuse([prune(C, m, 'delete'), C], spec, target=0, solver=...)` (OTFusion §5.2, "
        "weights alignment, uniform weights); barycenter = `jfusion.barycenter_fuse([C, D], spec, widths=m, "
        "solver=...)` (initialised from C merged to the widths, weights alignment, ≤ 100 iterations, tol 1e-5). "
        "Exact OT needs one width to divide the other, so the Exact variants exist only at multipliers whose "
        "widths divide 100; the Sinkhorn variants (`Sinkhorn()`: epsilon 0.01 relative to the mean cost) run "
        "at every multiplier",
        "- parameter counts: 'total' = every entry of the arrays, 'non-zero' = `np.count_nonzero` (checked "
        "equal to `PartialFusion.num_nonzero`); mean ± std = sample std (ddof = 1) over the seeds",
        f"- jfusion {getattr(jfusion, '__version__', '0.1.0')}, JAX {jax.__version__}, backend {jax.default_backend()}",
    ])


def pair_checks(pair: dict[str, Any]) -> list[str]:
    """Computed statements about one pair that the reading relies on."""
    rows, names = pair["rows"], pair["names"]
    lines = []
    ens = np.mean(rows_of(rows, "prediction ensemble")[0]["acc"])
    best = max(np.mean(rows_of(rows, n)[0]["acc"]) for n in names)
    lines.append(f"- prediction ensemble {ens:.2f} vs the better parent {best:.2f} (mean)")
    for m in methods_in(rows):
        if not m.startswith("partial"):
            continue
        r = rows_of(rows, m)
        acc = [np.mean(x["acc"]) for x in r]
        mono = all(b >= a - 0.3 for a, b in zip(acc, acc[1:]))
        lines.append(
            f"- {m}: mean accuracy from alpha={r[0]['setting']:g} to {r[-1]['setting']:g}: "
            + " → ".join(f"{a:.1f}" for a in acc)
            + f" (non-decreasing within 0.3 points: {'yes' if mono else 'no'}); alpha=1 vs prediction ensemble: "
            f"{acc[-1]:.2f} vs {ens:.2f}"
        )
    for a in ("weights", "activations"):
        pf = {x["setting"]: x for x in rows_of(rows, f"partial fusion ({a})")}
        mg = {x["setting"]: x for x in rows_of(rows, f"generalized pruning (merge, {a})")}
        dl = {x["setting"]: x for x in rows_of(rows, "structured pruning (delete)")}
        inner = [s for s in pf if 0 < s < 1 and s in mg and s in dl]
        if not inner:
            continue
        beats_m = sum(np.mean(pf[s]["acc"]) > np.mean(mg[s]["acc"]) for s in inner)
        beats_d = sum(np.mean(pf[s]["acc"]) > np.mean(dl[s]["acc"]) for s in inner)
        m_vs_d = sum(np.mean(mg[s]["acc"]) > np.mean(dl[s]["acc"]) for s in inner)
        lines.append(
            f"- at the {len(inner)} interior alphas ({a} supports): partial fusion > merge at {beats_m}, partial "
            f"fusion > delete at {beats_d}, merge > delete at {m_vs_d} (same widths; delete keeps more zeros)"
        )
    return lines


def summary_checks(pairs: dict[str, Any], comp: list[dict[str, Any]]) -> str:
    """Computed statements the reading relies on (so a rerun with other numbers shows it)."""
    lines = []
    for pair in pairs.values():
        lines.append(f"{pair['title']}:\n")
        lines += pair_checks(pair)
        lines.append("")
    if comp:
        lines.append("Single-network compression:\n")
        d = {x["setting"]: x for x in rows_of(comp, "delete (L1 of incoming weights)")}
        for m in methods_in(comp):
            if m.startswith(("dense", "delete (")):
                continue
            mg = {x["setting"]: x for x in rows_of(comp, m)}
            inner = [s for s in mg if s < 1 and s in d]
            if inner:
                wins = sum(np.mean(mg[s]["acc"]) > np.mean(d[s]["acc"]) for s in inner)
                lines.append(f"- {m} > delete at {wins} of {len(inner)} multipliers < 1 (means)")
    return "\n".join(lines)


def pair_figure(key: str) -> str:
    return "partial_fusion.png" if key == "specialist" else f"partial_fusion_{key}.png"


def write_report(out: str, res: dict[str, Any], reading: str) -> str:
    cfg = res["config"]
    t = res["timings"]
    pairs, comp = res["pairs"], res["compression"]
    for key, pair in pairs.items():
        plot_pair(pair, os.path.join(out, pair_figure(key)))
    if comp:
        plot_compression(comp, os.path.join(out, "partial_fusion_compression.png"))
    sections = [
        "# Partial fusion, barycenter fusion into any width, generalized pruning",
        "Morelli & Eckstein, *Partial Fusion of Neural Networks* (ICML 2026) reproduced with jfusion on "
        "Fashion-MNIST (the paper uses MNIST), MLP 784-100-100-100-10. No retraining after any fusion or "
        "pruning.",
        f"Command: `{res['command']}`  \n"
        f"Measured runtime: {fmt_seconds(t['total_s'])} in all (training {fmt_seconds(t['train_s'])}, "
        f"experiment 1 {fmt_seconds(t.get('pair_s', 0.0))}, experiment 2 {fmt_seconds(t.get('compression_s', 0.0))}) "
        f"on {t.get('machine', '?')}. Most of the fusion time is XLA compilation (one program per distinct width); "
        f"a warm `partial_fuse` call takes {1000 * t.get('partial_fuse_warm_median_s', float('nan')):.0f} ms "
        "(median).",
        "## Settings\n\n" + settings_block(cfg, res["sizes"]),
        "## Reading\n\n" + reading.strip(),
        "## 1. Partial fusion: accuracy vs parameters",
        "Test accuracy %, mean ± std over seeds. Parameter counts: total = every entry of the dense arrays; "
        "non-zero = what a sparse implementation would store (partial fusion leaves zero blocks between the "
        "two models' isolated neurons; deleting neurons from the block-diagonal ensemble network keeps its "
        "zero blocks; merging neurons of different models fills them). The pruning rows are the ensemble "
        "network (width 200) pruned to the widths of partial fusion at the same alpha. In each figure, left: "
        "accuracy against non-zero parameters (the numbers at the partial-fusion (weights) points are alpha); "
        "middle: against total parameters; right: accuracy on the pair's special class. Error bars: std over "
        "seeds.",
    ]
    for key, pair in pairs.items():
        sections += [
            f"### {pair['title']}",
            pair["description"],
            f"![{pair['title']}]({pair_figure(key)})",
            pair_tables(pair),
        ]
    if comp:
        sections += [
            "## 2. Single-network compression",
            "![single-network compression](partial_fusion_compression.png)\n\n"
            "One MLP (C, trained on all the training data) compressed to width multiplier m (every hidden layer "
            "to round(100 m) neurons), without retraining. Barycenter fusion uses a second full-data model D.",
            compression_table(comp),
            "Barycenter iterations and solver convergence:\n\n" + barycenter_notes(comp),
        ]
    sections += [
        "## Computed checks\n\n" + summary_checks(pairs, comp),
        "## jfusion limitations met\n\n" + LIMITATIONS.strip(),
    ]
    path = os.path.join(out, "partial_fusion.md")
    with open(path, "w") as f:
        f.write("\n\n".join(s.strip("\n") for s in sections) + "\n")
    return path


LIMITATIONS = """
- **Activation alignment of models of different widths in one `fuse` call** (found by this
  experiment, fixed since): with `fuse([pruned, dense], spec, target=0, alignment=...)`
  every model's activations were computed with one module, so the pruned model failed with
  flax's `ScopeParamShapeError`. `Activations.from_module(small, modules=(small, big))` now
  runs each model through a module of its own widths. The numbers below were produced
  before that, so "delete + fuse dense" ran with weight alignment only; this script's
  `mlp_activations_any_width` (an MLP rebuilt from the parameter shapes) served activation
  alignment elsewhere.
- **Exact OT needs one width to divide the other** (documented: `FusionInputError` "use
  jfusion.Sinkhorn() for other width ratios"). For fusing into widths 90, 80, 70, ... only
  Sinkhorn works, so the Exact curves have 4 points (multipliers 1, 0.5, 0.2, 0.1). Where
  both run, Sinkhorn was better in 5 of 6 cases here (see the table), so this did not hurt
  these results. A transport LP for arbitrary uniform marginals (e.g. network simplex, as `ot.emd` in OTFusion's code) would remove this.
- **`prune(method="delete")` ignores outgoing connectivity.** Neurons are ranked group by
  group in topological order on their incoming weights only, so on the block-diagonal
  ensemble network it keeps first-layer neurons of model A whose every reader in the next
  layer is later deleted (in the Coat pair at width 100, 29 of the 100 kept `h0` neurons are
  A's, while all kept `h1`/`h2` neurons are B's): almost a third of the first layer is dead. This is
  the documented criterion (Li et al. 2017), not a bug, but a backward pass or an
  outgoing-weight term would avoid it. `prune` also returns neither the kept indices nor the
  clusters; this script recovers them by matching weights (`origin_share`).
- **`prune(method="delete")` with activation supports** ranks neurons by the L1 norm of their
  activations (the docstring said incoming weights; it now says supports); this script only
  uses delete with weight supports.
"""


# --- main ---------------------------------------------------------------------------------


def run(cfg: Config, argv: Sequence[str]) -> dict[str, Any]:
    start = time.perf_counter()
    data = load_data(cfg.train_subsample, cfg.test_subsample)
    models = train_all(cfg, data)
    train_s = time.perf_counter() - start
    n_models = sum(len(v) for k, v in models.items() if k != "sizes")
    print(f"trained {n_models} models in {train_s:.0f} s", flush=True)
    timings: dict[str, Any] = {"train_s": train_s}
    sizes = models["sizes"]
    t = time.perf_counter()
    pairs = {
        "specialist": {
            "title": f"Specialist pair, special class {SPECIAL} ({CLASS_NAMES[SPECIAL]})",
            "description": (
                f"The brief's setting. A = all of class {SPECIAL} ({CLASS_NAMES[SPECIAL]}) + 10% of every other "
                f"class ({sizes[0]} images); B = the other 90% without class {SPECIAL} ({sizes[1]} images). "
                "A is aligned onto B."
            ),
            "special": SPECIAL,
            "names": ("model A (specialist)", "model B (generalist)"),
        },
    }
    pairs["specialist"]["rows"] = exp_pair(cfg, data, (models["A"], models["B"]), SPECIAL,
                                           pairs["specialist"]["names"], timings, "specialist")
    if cfg.extra_pairs:
        pairs["generalists"] = {
            "title": "Two full-data models (C, D)",
            "description": (
                f"Added beside the brief's pair: C and D are trained on all {sizes[2]} training images from "
                "different initialisations and batch orders (they are also experiment 2's models); C is aligned "
                "onto D. Here the prediction ensemble does beat both parents, so this pair shows whether partial "
                f"fusion trades parameters for accuracy when there is accuracy to gain. Special-class column: "
                f"class {SPECIAL} for reference."
            ),
            "special": SPECIAL,
            "names": ("model C (full data)", "model D (full data)"),
        }
        pairs["generalists"]["rows"] = exp_pair(cfg, data, (models["C"], models["D"]), SPECIAL,
                                                pairs["generalists"]["names"], timings, "generalists")
        c2 = cfg.second_special
        pairs[f"specialist_class{c2}"] = {
            "title": f"Specialist pair, special class {c2} ({CLASS_NAMES[c2]}) (sensitivity check)",
            "description": (
                f"The first pair's setting with special class {c2} ({CLASS_NAMES[c2]}); the same inits and batch "
                f"orders. Added *after* seeing the class-{SPECIAL} results (no combined model there gets any "
                f"{CLASS_NAMES[SPECIAL]} right), to see whether that is specific to a class that is easily "
                f"confused with others ({CLASS_NAMES[SPECIAL]} vs Pullover and Shirt). Class {c2} was picked as "
                "Fashion-MNIST's visually most distinct class, not by scanning test results over classes."
            ),
            "special": c2,
            "names": (f"model A' (specialist, class {c2})", f"model B' (no class {c2})"),
        }
        pairs[f"specialist_class{c2}"]["rows"] = exp_pair(
            cfg, data, (models["A2"], models["B2"]), c2, pairs[f"specialist_class{c2}"]["names"], timings,
            f"specialist class {c2}")
    timings["pair_s"] = time.perf_counter() - t
    warm = timings.pop("partial_fuse_warm_s", [])
    timings["partial_fuse_warm_median_s"] = float(np.median(warm)) if warm else float("nan")
    t = time.perf_counter()
    comp = exp_compression(cfg, data, models, timings)
    timings["compression_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start
    timings["machine"] = f"{os.cpu_count()} CPU cores (shared with other jobs), JAX backend {jax.default_backend()}"
    return {
        "command": command_line("partial_fusion.py", argv),
        "config": {**dataclasses.asdict(cfg), "n_test": int(len(data.yte))},
        "sizes": list(sizes),
        "timings": timings,
        "pairs": pairs,
        "compression": comp,
    }


def reading_text(cfg: dict[str, Any]) -> str:
    if cfg["quick"]:
        return "(quick smoke-test run: tiny budget, 1 epoch, the numbers are not meaningful)"
    return READING


READING = """
All numbers are test accuracy, mean over 3 seeds, no retraining after fusion or pruning.

**Sanity.** `partial_fuse` at alpha = 1 reproduces the logit-averaging ensemble exactly
(78.87 = 78.87, 86.55 = 86.55, 79.54 = 79.54), alpha = 0 is OT fusion (`fuse`), the hidden
widths are 100 (1 + alpha), and its `num_nonzero` agrees with a recount in every run.

**Does partial fusion trace a useful trade-off?** It traces a *monotone* one: with
activation alignment accuracy rises steadily from OT fusion to the ensemble in all three
pairs (specialist: 72.8 → 74.5 → 76.8 → 77.5 → 78.0 → 78.7 → 78.9; full-data pair: 81.4 →
84.3 → 84.9 → 85.6 → 85.9 → 86.4 → 86.6), and most of the gap is closed by alpha ≈ 0.4–0.5,
i.e. at about 75% of the ensemble's non-zero parameters. Weight alignment is far worse at
small alpha (OT fusion 47.4 ± 8.6 and 68.0 ± 11.2) and noisier, and is not even monotone
in the Trouser pair; activation alignment is better at 17 of the 18 alpha < 1 cells.
But the trade-off is only as useful as the ensemble's gain, and here that gain is small or
negative: in the brief's Coat pair the ensemble (78.87) is *below* the generalist B (80.32),
and in the full-data pair it is +0.5 points over one parent (86.55 vs 86.06). So at every
alpha < 0.8, in every pair, one plain parent (99.7k parameters) beats the partial fusion
that costs more. The skill-transfer premise fails for Coat: no combined model, the ensemble included,
classifies a single coat correctly (B, which never saw the class, pushes its logit down
hard and the logit average follows B; Coat is also easily confused with Pullover and
Shirt). In the Trouser sensitivity check (chosen after seeing this) the ensemble recovers
40% of the special class and beats the better parent by 0.8 points, and partial fusion recovers
the special class only at alpha ≥ 0.6–0.8 (activations: 0, 0, 0, 1.5, 10, 38, 40% as alpha
goes 0 → 1): the specialist's skill survives in its isolated neurons, not in fused ones.

**Pruning the ensemble network instead.** At the same widths, generalized pruning by
merging with activation supports is at least as accurate as partial fusion (activations)
at every interior alpha in all three pairs, *and* it has fewer non-zero parameters
(clusters of one model's neurons keep the zero blocks), so on the main plot (accuracy vs
non-zero parameters) merge (activations) lies on or above partial fusion everywhere, e.g.
full-data pair at width 100: 82.9 with 94.9k non-zero vs OT fusion 81.4 with 99.7k; at
width 150: 85.9 with 147k vs 85.6 with 155k. Merging can also combine redundant neurons of
the *same* model, which a partial OT matching between the models cannot. Structured pruning
(delete) looks best in the Coat pair, but only because it essentially returns B: B's neurons have
the larger incoming weights (B trained 4.3× more steps), so deletion keeps 71% / 100% / 100%
of B's neurons at width 100 (79.1, vs B's 80.3), and A's 29 kept first-layer neurons are dead weight
(nothing downstream reads them). Where the parents are comparable (full-data pair), deleting
down to width 100 mixes the two networks and costs more than merging on activations (79.5
vs 82.9; merging on weights is worse still, 74.8); from alpha ≥ 0.5 all five curves except
weight-aligned partial fusion are within a point of each other.

**Merge vs delete on one network.** Removing 10–20% of the neurons costs every method at
most 2.3 points (delete is even slightly ahead of merge by weights at 0.9–0.7). Beyond that
merging wins clearly, and merging on activations most: multiplier 0.5: merge (activations)
78.2, merge (weights) 72.0, delete 70.3; 0.3: 65.4 / 53.3 / 37.1. Fusing the dense model
into the deleted one (OTFusion §5.2) repairs much of the deletion damage (0.5: 77.7 with
Sinkhorn; better than delete at 8 of 9 multipliers) and stays within 1.6 points of merging on
activations down to 0.5. Barycenter fusion of two full-data models into the small widths
is poor everywhere except at multiplier 0.1 (35.2 ± 10.8 with Sinkhorn, the best there,
where every method is nearly useless): without retraining, averaging two independently
trained networks already costs 10–18 points at full width (76.3 with Sinkhorn, 68.0 ± 11.2
with Exact, vs 86.0 for each parent). Where both solvers run, Sinkhorn is better in 5 of
6 cases (e.g. fuse-into-pruned at 0.5: 77.7 vs 70.4): its soft plans average several
neurons per slot.

**Against the paper.** Only the abstract is available here, so only its qualitative claims
can be checked. Reproduced: partial fusion interpolates between weight aggregation and the
ensemble, giving a monotone accuracy/compute curve (with activation alignment), and
generalized pruning (merging) of a single network beats deletion at strong compression.
Not reproduced: the premise that the ensemble clearly beats its members (small or
negative gains here), and in this setting partial fusion via partial OT is not the best
way to spend a parameter budget: merging the ensemble network by k-means on activations
dominates it, and in the specialist pair deleting down to the stronger parent dominates
both. Likely reasons: Fashion-MNIST instead of MNIST (and Coat, a confusable class), short
SGD training (parents at 86% rather than well converged), no retraining after fusion, and
models trained for unequal numbers of steps in the specialist split.
"""


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke test (< 1 min)")
    parser.add_argument("--out", default=None, help="output directory (default examples/results; a temp dir with --quick)")
    parser.add_argument("--report-only", action="store_true", help=f"rebuild report and figures from {RESULTS_JSON}")
    args = parser.parse_args(argv)
    default_out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    out = args.out or (tempfile.mkdtemp(prefix="partial_fusion_") if args.quick else default_out)
    os.makedirs(out, exist_ok=True)
    if args.report_only:
        with open(os.path.join(out, RESULTS_JSON)) as f:
            res = json.load(f)
    else:
        cfg = QUICK if args.quick else Config()
        res = run(cfg, argv)
        with open(os.path.join(out, RESULTS_JSON), "w") as f:
            json.dump(res, f, indent=1)
    path = write_report(out, res, reading_text(res["config"]))
    print(f"wrote {path} (+ figures, {RESULTS_JSON}); total {res['timings']['total_s']:.0f} s")


if __name__ == "__main__":
    main()
