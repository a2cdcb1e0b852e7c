#!/usr/bin/env python
"""Partial fusion, barycenter fusion into any width and generalized pruning, with jfusion.

Morelli & Eckstein, "Partial Fusion of Neural Networks: Efficient Tradeoffs Between
Ensembles and Weight Aggregation" (ICML 2026), on Fashion-MNIST (installed offline here;
the paper uses MNIST) with the paper's MLP 784-100-100-100-10, ``MLP((100, 100, 100, 10))``.
Two experiments:

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

    python examples/partial_fusion.py                        # the recorded run, ~13-25 min on 2 CPU cores
    python examples/partial_fusion.py --quick --out /tmp/q   # smoke test, digits, seconds
    python examples/partial_fusion.py --report-only          # tables and figures again from the JSON

Writes ``partial_fusion_numbers.{md,json}`` (the JSON holds every per-seed number) and the
figures to ``--out``; the reading is ``examples/results/partial_fusion.md``, written by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import kit
import matplotlib.pyplot as plt
import numpy as np
import optax

import jfusion
from jfusion.core.support import ModuleActivations
from jfusion.models import MLP, mlp_spec
from jfusion.workflow.data import special_class_split

FEATURES = (100, 100, 100, 10)  # the paper's MNIST MLP, 784-100-100-100-10
SPEC = mlp_spec(len(FEATURES))
HIDDEN = tuple(f"h{i}" for i in range(len(FEATURES) - 1))
SPECIAL = 4  # Fashion-MNIST "Coat"; the paper's special digit is 4 too
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
ALPHAS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0)
MULTIPLIERS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)


# --- configuration ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    quick: bool = False
    data: str = "fashion_mnist"
    features: tuple[int, ...] = FEATURES  # quick: narrower, same depth (so SPEC serves both)
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
    prune_ensemble: bool = True  # experiment 1 also prunes the ensemble network (quick: pruning runs in experiment 2 only)
    extra_pairs: bool = True  # experiment 1 also on the generalist pair (C, D) and a second special class
    second_special: int = 1  # Trouser: the sensitivity check's special class
    train_subsample: int | None = None  # quick mode: a stratified subset of the training set
    test_subsample: int | None = None


def quick() -> Config:
    """Tiny MLPs on digits, one seed: each fusion program (one per distinct width) once."""
    return Config(
        quick=True, data=kit.quick_dataset(), features=(16, 16, 16, 10), epochs=10, batch_size=32, learning_rate=0.05,
        momentum=0.9, seeds=(0,), act_samples=64, alphas=(0.5,), multipliers=(0.5,), alignments=("weights",),
        extra_pairs=False, prune_ensemble=False, train_subsample=3000, test_subsample=1000,
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


def accuracies(pred: Any, data: kit.Data, special: int = SPECIAL) -> tuple[float, float]:
    """(overall, special-class) test accuracy in [0, 1]."""
    pred = np.asarray(pred)
    mask = data.yte == special
    return float(np.mean(pred == data.yte)), float(np.mean(pred[mask] == data.yte[mask]))


def mlp_activations_any_width(variables: Any, inputs: jax.Array) -> dict[str, jax.Array]:
    """Pre-activations of an MLP of any widths (rebuilt from the kernel shapes, static under jit).

    Used for the ensemble network (width 200) and every pruned width, so one function serves
    all of them. (Needed as a WORKAROUND only where models of *different* widths are aligned
    in one call -- see the report's "jfusion limitations"; this script avoids that case.)
    """
    return ModuleActivations(MLP(features_of(variables)))(variables, inputs)


ACTIVATIONS = jfusion.ByActivations(mlp_activations_any_width)


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


def train_all(cfg: Config, data: kit.Data) -> dict[str, Any]:
    """Specialist A, generalist B and two full-data models C, D per seed (stacked over seeds).

    Models sharing one ``fit_models`` call have subsets of equal size, so every model runs
    exactly ``cfg.epochs`` passes over its own data (``fit_models`` gives every model of one
    call ``max_k n_k // batch`` steps per epoch).
    """
    model = MLP(cfg.features)
    seeds = list(cfg.seeds)
    optimizer = optax.sgd(cfg.learning_rate, momentum=cfg.momentum)
    kw = {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "optimizer": optimizer}

    def specialist_pair(special: int) -> tuple[Any, Any, list]:
        splits = [special_class_split(data.ytr, special, 0.1, seed=s) for s in seeds]
        a = kit.train_set(model, [(data.xtr[i], data.ytr[i]) for i, _ in splits], seeds, init_seeds=[1000 + s for s in seeds], **kw)
        b = kit.train_set(model, [(data.xtr[j], data.ytr[j]) for _, j in splits], [100 + s for s in seeds],
                          init_seeds=[2000 + s for s in seeds], **kw)
        return a, b, splits

    a, b, splits = specialist_pair(SPECIAL)
    cd = kit.train_set(model, (data.xtr, data.ytr), [200 + s for s in seeds] + [300 + s for s in seeds],
                       init_seeds=[3000 + s for s in seeds] + [4000 + s for s in seeds], **kw)
    k = len(seeds)
    models = {
        "A": [kit.pick(a, i) for i in range(k)],
        "B": [kit.pick(b, i) for i in range(k)],
        "C": [kit.pick(cd, i) for i in range(k)],
        "D": [kit.pick(cd, k + i) for i in range(k)],
        "sizes": (len(splits[0][0]), len(splits[0][1]), len(data.ytr)),
    }
    if cfg.extra_pairs:
        # The sensitivity check: the same inits and batch orders, another special class.
        a2, b2, _ = specialist_pair(cfg.second_special)
        models["A2"] = [kit.pick(a2, i) for i in range(k)]
        models["B2"] = [kit.pick(b2, i) for i in range(k)]
    return models


def widths_for(features: Sequence[int], alpha: float) -> dict[str, int]:
    """The hidden widths of partial fusion at ``alpha`` for two models of width n: n + round(alpha n)."""
    return {g: features[i] + int(round(alpha * features[i])) for i, g in enumerate(HIDDEN)}


# --- experiment 1: the specialist pair ----------------------------------------------------


def origin_share(ensemble_net: Any, pruned: Any, features: Sequence[int]) -> list[float]:
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
        shares.append(float(np.mean(kept_inputs >= features[i])))
    return shares


def exp_pair(cfg: Config, data: kit.Data, pair: Sequence[list[Any]], special: int, names: tuple[str, str],
             timings: dict[str, float], tag: str) -> list[dict[str, Any]]:
    """Partial fusion of ``pair = (As, Bs)`` (one model per seed each) and its baselines."""
    rec = Recorder()
    xte = jnp.asarray(data.xte)
    acc = functools.partial(accuracies, data=data, special=special)
    partial_s: list[float] = []
    for i, s in enumerate(cfg.seeds):
        A, B = pair[0][i], pair[1][i]
        inputs = kit.activation_batch(data, cfg.act_samples, s)
        rec.add(names[0], 0.0, A, acc(_predict(cfg.features, A, xte)))
        rec.add(names[1], 0.0, B, acc(_predict(cfg.features, B, xte)))
        pair_stacked = jax.tree.map(lambda *xs: jnp.stack(xs), A, B)
        rec.add("prediction ensemble", 1.0, A, acc(_predict_ensemble(cfg.features, pair_stacked, xte)),
                total=count_total(A) + count_total(B), nonzero=count_nonzero(A) + count_nonzero(B))
        avg = jfusion.vanilla_average([A, B]).params
        rec.add("vanilla averaging", 0.0, avg, acc(_predict(cfg.features, avg, xte)))
        for alignment in cfg.alignments:
            for alpha in cfg.alphas:
                t = time.perf_counter()
                # The first model aligned onto the second (target=-1, the paper's B); exact partial OT.
                pf = jfusion.partial_fuse([A, B], SPEC, alpha, target=-1, **alignment_kwargs(alignment, inputs))
                jax.block_until_ready(pf.params)
                if i > 0:
                    partial_s.append(time.perf_counter() - t)
                f = features_of(pf.params)
                assert count_nonzero(pf.params) == int(pf.num_nonzero), "num_nonzero disagrees with a recount"
                assert count_total(pf.params) == int(pf.num_parameters)
                rec.add(f"partial fusion ({alignment})", alpha, pf.params, acc(_predict(f, pf.params, xte)))
        if not cfg.prune_ensemble:
            print(f"[{tag}] seed {s} done", flush=True)
            continue
        # The block-diagonal ensemble network (alpha = 1: nothing matched, so alignment is moot).
        ensemble_net = jfusion.partial_fuse([A, B], SPEC, 1.0, target=-1).params
        prune_cells = [("structured pruning (delete)", "delete", "weights")]
        prune_cells += [(f"generalized pruning (merge, {a})", "merge", a) for a in cfg.alignments]
        for alpha in cfg.alphas:
            widths = widths_for(cfg.features, alpha)
            for name, method, alignment in prune_cells:
                pruned = jfusion.prune(ensemble_net, SPEC, widths, method=method, **alignment_kwargs(alignment, inputs)).params
                f = features_of(pruned)
                info = {"share_B": origin_share(ensemble_net, pruned, cfg.features)} if method == "delete" else {}
                rec.add(name, alpha, pruned, acc(_predict(f, pruned, xte)), **info)
        print(f"[{tag}] seed {s} done", flush=True)
    timings.setdefault("partial_fuse_warm_s", []).extend(partial_s)
    return rec.as_list()


# --- experiment 2: single-network compression ---------------------------------------------


def exact_ok(features: Sequence[int], mult: float) -> bool:
    """Exact OT between uniform measures needs one width to divide the other."""
    widths = [max(1, int(round(mult * n))) for n in features[:-1]]
    return all(n % w == 0 for n, w in zip(features[:-1], widths))


def exp_compression(cfg: Config, data: kit.Data, models: dict[str, Any], timings: dict[str, float]) -> list[dict[str, Any]]:
    rec = Recorder()
    xte = jnp.asarray(data.xte)
    solvers = {"Sinkhorn": jfusion.Sinkhorn(), "Exact": jfusion.Exact()}
    bary_s: list[float] = []
    for i, s in enumerate(cfg.seeds):
        C, D = models["C"][i], models["D"][i]
        inputs = kit.activation_batch(data, cfg.act_samples, s)
        rec.add("dense model C", 1.0, C, accuracies(_predict(cfg.features, C, xte), data))
        rec.add("dense model D", 1.0, D, accuracies(_predict(cfg.features, D, xte), data))
        for mult in cfg.multipliers:
            deleted = jfusion.prune(C, SPEC, mult, method="delete").params
            f = features_of(deleted)
            rec.add("delete (L1 of incoming weights)", mult, deleted, accuracies(_predict(f, deleted, xte), data))
            for alignment in cfg.alignments:
                merged = jfusion.prune(C, SPEC, mult, method="merge", **alignment_kwargs(alignment, inputs)).params
                rec.add(f"merge ({alignment})", mult, merged, accuracies(_predict(f, merged, xte), data))
            if not cfg.extras:
                continue
            for sname, solver in solvers.items():
                if sname == "Exact" and not exact_ok(cfg.features, mult):
                    continue
                if cfg.quick and sname == "Sinkhorn":
                    continue
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", jfusion.ConvergenceWarning)
                    # OTFusion §5.2: the dense model fused into the pruned one's architecture.
                    fused = jfusion.fuse([deleted, C], SPEC, target=0, solver=solver).params
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


def pair_tables(pair: dict[str, Any]) -> dict[str, kit.Table]:
    rows, names, special = pair["rows"], pair["names"], pair["special"]
    header = ["method", "alpha", "widths", "total params", "non-zero params", "test acc %", f"class {special} acc %"]
    base = []
    for m in (*names, "vanilla averaging", "prediction ensemble"):
        for r in rows_of(rows, m):
            alpha = "(≡ 1)" if "ensemble" in m else "–"
            base.append([m, alpha, widths_str(r) if "ensemble" not in m else "2 × " + widths_str(r),
                         fmt_count(r["total"]), fmt_count(r["nonzero"]), kit.mean_std(r["acc"]), kit.mean_std(r["special"])])
    out = {f"{pair['title']}: parents and baselines": kit.Table(header, base)}
    for m in methods_in(rows):
        if m.startswith(("partial", "structured", "generalized")):
            delete = m.startswith("structured")
            body = []
            for r in rows_of(rows, m):
                label = f"{r['setting']:g}" + (" (OT fusion)" if m.startswith("partial") and r["setting"] == 0 else "")
                label += " (ensemble)" if m.startswith("partial") and r["setting"] == 1 else ""
                line = [m, label, widths_str(r), fmt_count(r["total"]), fmt_count(r["nonzero"]),
                        kit.mean_std(r["acc"]), kit.mean_std(r["special"])]
                if delete:
                    shares = np.mean([x["share_B"] for x in r["info"]], axis=0)
                    line.append(" / ".join(f"{100 * v:.0f}%" for v in shares))
                body.append(line)
            extra = [f"kept from {names[1].split(' (')[0]} (h0 / h1 / h2)"] if delete else []
            out[f"{pair['title']}: {m}"] = kit.Table(header + extra, body)
    return out


def compression_table(rows: list[dict[str, Any]]) -> tuple[str, kit.Table]:
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
            line.append(kit.mean_std(r["acc"]) if r else "–")
        body.append(line)
    d = dense[0]
    title = (f"Single-network compression (test accuracy %; all dense): dense model C ({fmt_count(d['total'])} params) "
             f"{kit.mean_std(d['acc'])}, dense model D {kit.mean_std(rows_of(rows, 'dense model D')[0]['acc'])}")
    return title, kit.Table(header, body)


def barycenter_notes(rows: list[dict[str, Any]]) -> kit.Table:
    """Barycenter iterations and convergence per multiplier, and the solvers' ConvergenceWarnings."""
    body = []
    for m in methods_in(rows):
        for r in rows_of(rows, m) if m.startswith("barycenter") else []:
            its = [x["iterations"] for x in r["info"]]
            body.append([m, f"{r['setting']:g}", f"{min(its)}–{max(its)}", f"{sum(x['converged'] for x in r['info'])}/{len(its)}", "–"])
    for m in methods_in(rows):
        if m.startswith(("delete + fuse", "barycenter")):
            bad = sum(x.get("unconverged", 0) for r in rows_of(rows, m) for x in r["info"])
            body.append([m, "all", "–", "–", str(bad)])
    return kit.Table(["method", "multiplier", "iterations", "converged", "ConvergenceWarnings"], body)


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
    y = np.array([100 * np.mean(r[key_y]) for r in rows])
    e = np.array([100 * np.std(r[key_y], ddof=1) if len(r[key_y]) > 1 else 0.0 for r in rows])
    ax.errorbar(x, y, yerr=e, label=label, color=color, marker=marker, ls=ls, ms=4, capsize=3, lw=1.3)
    if annotate:
        for r, xi, yi in zip(rows, x, y):
            ax.annotate(f"{r['setting']:g}", (xi, yi), textcoords="offset points", xytext=(3, -10), fontsize=7, color=color)


def plot_pair(pair: dict[str, Any], features: Sequence[int]) -> Any:
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
            top = 100 * max(np.mean(r["acc"]) for r in rows)
            ax.set_ylim(top - 12.0, top + 1.5)
            title += " (labels: alpha of partial fusion (activations))"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("non-zero parameters" if kx == "nonzero" else "total parameters")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("accuracy % (mean ± std over seeds)")
    axes[1, 0].set_ylabel("accuracy % (mean ± std over seeds)")
    axes[0, 0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{pair['title']}, MLP {'-'.join(map(str, features))}, no retraining:\npartial fusion "
                 "(labels: alpha) vs pruning the ensemble network to the same widths", fontsize=11)
    fig.tight_layout()
    return fig


def plot_compression(rows: list[dict[str, Any]]) -> Any:
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
                ax.axhline(100 * np.mean(r[0]["acc"]), color="k", ls=ls, lw=0.8, label="dense model C (uncompressed)")
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
    return fig


def pair_checks(pair: dict[str, Any]) -> list[str]:
    """Computed statements about one pair that the reading relies on."""
    rows, names = pair["rows"], pair["names"]
    lines = []
    ens = 100 * np.mean(rows_of(rows, "prediction ensemble")[0]["acc"])
    best = 100 * max(np.mean(rows_of(rows, n)[0]["acc"]) for n in names)
    lines.append(f"- prediction ensemble {ens:.2f} vs the better parent {best:.2f} (mean)")
    for m in methods_in(rows):
        if not m.startswith("partial"):
            continue
        r = rows_of(rows, m)
        acc = [100 * np.mean(x["acc"]) for x in r]
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


def summary_checks(pairs: dict[str, Any], comp: list[dict[str, Any]]) -> kit.Table:
    """Computed statements the reading relies on (so a rerun with other numbers shows it)."""
    lines = []
    for pair in pairs.values():
        lines += [f"{pair['title']}: {line[2:]}" for line in pair_checks(pair)]
    if comp:
        d = {x["setting"]: x for x in rows_of(comp, "delete (L1 of incoming weights)")}
        for m in methods_in(comp):
            if m.startswith(("dense", "delete (")):
                continue
            mg = {x["setting"]: x for x in rows_of(comp, m)}
            inner = [s for s in mg if s < 1 and s in d]
            if inner:
                wins = sum(np.mean(mg[s]["acc"]) > np.mean(d[s]["acc"]) for s in inner)
                lines.append(f"- single-network compression: {m} > delete at {wins} of {len(inner)} multipliers < 1 (means)")
    return kit.Table(["computed check"], [[line.removeprefix("- ")] for line in lines])


def pair_figure(key: str) -> str:
    return "partial_fusion.png" if key == "specialist" else f"partial_fusion_{key}.png"


# --- main ---------------------------------------------------------------------------------


def run(cfg: Config) -> dict[str, Any]:
    start = time.perf_counter()
    data = kit.load_data(cfg.data, cfg.train_subsample, cfg.test_subsample)
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
    return {
        "config": {**dataclasses.asdict(cfg), "n_test": len(data.yte)},
        "sizes": list(sizes),
        "timings": timings,
        "pairs": pairs,
        "compression": comp,
    }


def report(res: dict[str, Any]) -> tuple[dict[str, kit.Table], dict[str, Any]]:
    """Tables and figures of a run's results (fresh, or read back by ``--report-only``)."""
    features = res["config"]["features"]
    tables: dict[str, kit.Table] = {}
    figures = {}
    for key, pair in res["pairs"].items():
        tables.update(pair_tables(pair))
        figures[pair_figure(key)] = plot_pair(pair, features)
    if res["compression"]:
        title, table = compression_table(res["compression"])
        tables[title] = table
        tables["Barycenter iterations and solver convergence"] = barycenter_notes(res["compression"])
        figures["partial_fusion_compression.png"] = plot_compression(res["compression"])
    tables["Computed checks"] = summary_checks(res["pairs"], res["compression"])
    t = res["timings"]
    tables["Timings"] = kit.Table(["part", "seconds"], [[k, f"{v:.3f}"] for k, v in t.items() if isinstance(v, float)])
    return tables, figures


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny MLPs on digits, one seed")
    parser.add_argument("--out", default=None, help="output directory (default examples/results; a temp dir with --quick)")
    parser.add_argument("--report-only", action="store_true", help="rebuild tables and figures from --out's partial_fusion_numbers.json")
    args = parser.parse_args(argv)
    out = kit.output_dir(args.out, args.quick, "partial_fusion")
    if args.report_only:
        res = json.loads((out / "partial_fusion_numbers.json").read_text())["data"]
    else:
        res = run(quick() if args.quick else Config())
    tables, figures = report(res)
    return kit.write_report(
        out, "partial_fusion", title="Partial fusion, barycenter fusion into any width, generalized pruning",
        settings=res["config"], tables=tables, data=res, figures=figures, script="partial_fusion.py", argv=argv,
        runtime_s=res["timings"]["total_s"],
    )


if __name__ == "__main__":
    main()
