#!/usr/bin/env python
"""OTFusion's MLP experiments (Singh & Jaggi, NeurIPS 2020) reproduced with jfusion.

Fashion-MNIST stands in for the paper's MNIST; the model is OTFusion's MLPNet,
``MLP((400, 200, 100, 10))``. Five experiments (``--exp``, all by default):

1. ``skill``     -- one-shot skill transfer (paper §5.1, Figure 2): specialist A (all of one
   class + 10% of the rest) fused with generalist B (the other 90%) in proportions
   ``w_B = 0, 0.1, ..., 1``; different and same initialisations; 5 seeds.
2. ``four``      -- four models on a 10/30/50/10 split, the first holding the special class
   (paper §5.1, "the case of multiple models").
3. ``widths``    -- B twice as wide as A (paper §5.2, Figure 4), fused into either architecture.
4. ``ensemble``  -- K = 2, 4, 6, 8 models from different seeds on the full data, fused, then
   fine-tuned (paper §5.3), with diagnostics of weight alignment.
5. ``skill_alt`` -- a post-hoc check of experiment 1 with special class 1 (Trouser), added
   after seeing experiment 1's results.

    python examples/otfusion_experiments.py                       # the recorded run, ~25 min on 2 CPU cores
    python examples/otfusion_experiments.py --quick --out /tmp/q  # smoke test, digits, seconds

Writes ``otfusion_experiments_numbers.{md,json}`` and one PNG per experiment to ``--out``;
the readings are the hand-written ``examples/results/otfusion_*.md``.

Training follows OTFusion's MNIST code (``sidak/otfusion``): SGD lr 0.01, momentum 0.5, batch
64, 10 epochs. Fusion follows its MNIST command: exact OT, Euclidean ground metric, activation
alignment on pre-activations of 200 training images, model A aligned onto model B
(``target=1``). Nothing is tuned on the test set; the "best w_B" columns (like the paper's
"up to 93.11%") are chosen on the test set and say so. Spreads: mean ± population std over seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import kit
import matplotlib.pyplot as plt
import numpy as np
import optax

import jfusion
from jfusion.models import MLP, mlp_spec
from jfusion.workflow.data import proportion_split, special_class_split
from jfusion.workflow.train import finetune, init_models

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
EXPERIMENTS = ("skill", "four", "widths", "ensemble", "skill_alt")
PAPER = {  # the paper's MNIST numbers (§5.1, §5.3)
    "skill": "A 89.78 / B 87.35 -> OT fusion (activations, different init) up to 93.11, no retraining",
    "four": "parents 87.7 / 86.5 / 87.0 / 83.5, ensemble 95.0, vanilla 80.6, OT 93.6 (same initialisation)",
    "ensemble": "CIFAR10 VGG11: parents 90.31 / 90.50, ensemble 91.34, vanilla 17.02, OT 85.98; "
    "after fine-tuning vanilla 90.39, OT 90.73",
}


@dataclasses.dataclass(frozen=True)
class Config:
    data: str = "fashion_mnist"
    features: tuple[int, ...] = (400, 200, 100, 10)  # OTFusion's MLPNet
    wide_features: tuple[int, ...] = (800, 400, 200, 10)  # every hidden width doubled (experiment 3)
    special: int = 4  # Fashion-MNIST's "Coat" (the paper's digit 4)
    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 0.01
    momentum: float = 0.5
    act_samples: int = 200
    skill_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    skill_alt_special: int = 1  # post-hoc check: Trouser, the most distinct class
    skill_alt_seeds: tuple[int, ...] = (0, 1, 2)
    four_seeds: tuple[int, ...] = (0, 1, 2)
    widths_seeds: tuple[int, ...] = (0, 1, 2)
    k_values: tuple[int, ...] = (2, 4, 6, 8)
    w_grid: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))
    finetune_epochs: int = 2
    finetune_lr: float = 0.005
    skill_conditions: tuple[str, ...] = ("different", "same")
    four_conditions: tuple[str, ...] = ("same", "different")
    four_all_targets: bool = True  # also fuse onto every other target and with data-proportional weights
    four_weights: bool = True  # also weight alignment in experiment 2
    widths_variants: tuple[tuple[int, str], ...] = ((0, "weights"), (0, "activations"), (1, "weights"), (1, "activations"))
    ensemble_outgoing: bool = True  # also ByWeights(outgoing=True, sweeps=2), not fine-tuned
    train_subsample: int | None = None
    test_subsample: int | None = None


def quick() -> Config:
    """Tiny models on digits, one seed, one condition: each fusion program once (compilation dominates)."""
    return Config(
        data=kit.quick_dataset(), features=(16, 10), wide_features=(32, 10), epochs=3, batch_size=32,
        learning_rate=0.05, momentum=0.9, act_samples=64, skill_seeds=(0,), skill_alt_seeds=(0,), four_seeds=(0,),
        widths_seeds=(0,), k_values=(2,), w_grid=(0.0, 0.5, 1.0), finetune_epochs=1, finetune_lr=0.02,
        skill_conditions=("different",), four_conditions=("same",), four_all_targets=False,
        four_weights=False, widths_variants=((1, "activations"),), ensemble_outgoing=False,
        train_subsample=3000, test_subsample=1000,
    )


@dataclasses.dataclass
class Part:
    """What an experiment contributes to the report."""

    tables: dict[str, kit.Table]
    data: Any
    figures: dict[str, Any]


# --- fusion programs, one jit each (the weights w are traced: one compilation per sweep) ------


@functools.cache
def sgd(lr: float, momentum: float) -> optax.GradientTransformation:
    """One optimizer object per setting: ``fit_models`` caches its epoch program per object."""
    return optax.sgd(lr, momentum=momentum)


def fuser(alignment: str, features: tuple[tuple[int, ...], ...], target: int) -> Callable:
    """jitted ``(models, inputs, model_weights) -> fused params``; ``features`` are each model's widths."""
    return _fusers(alignment, features, target)[0]


@functools.cache
def _fusers(alignment: str, features: tuple[tuple[int, ...], ...], target: int) -> tuple[Callable, Callable]:
    """The jitted fusion returning the params, and the one returning (params, model 1's plans onto the target)."""
    spec = mlp_spec(len(features[0]))
    options: dict[str, Any] = {}
    if alignment == "activations":
        modules = [MLP(f) for f in features]
        options["alignment"] = jfusion.ByActivations.from_module(modules[0], modules=modules if len(set(features)) > 1 else None)
    elif alignment == "weights, outgoing, 2 sweeps":
        options["alignment"] = jfusion.ByWeights(outgoing=True, sweeps=2)

    def fused(models, inputs, w):
        extra = {"inputs": inputs} if alignment == "activations" else {}
        result = jfusion.fuse(models, spec, model_weights=w, target=target, **options, **extra)
        return result.params, {g: r.plan[1] for g, r in result.plans.items()}

    return jax.jit(lambda models, inputs, w: fused(models, inputs, w)[0]), jax.jit(fused)


_VANILLA = jax.jit(lambda models, w: jfusion.vanilla_average(models, model_weights=w).params)


@functools.cache
def mlp(features: tuple[int, ...]) -> MLP:
    """One module object per widths: ``jfusion.workflow.train`` caches its programs per module object."""
    return MLP(features)


@functools.cache
def _apply(features: tuple[int, ...]) -> Callable:
    return jax.jit(mlp(features).apply)


def models_of(stacked: Any) -> list[Any]:
    """A stacked pytree as K numpy pytrees (host slicing: no compilation per shape)."""
    host = jax.device_get(stacked)
    return [jax.tree.map(lambda a, k=k: a[k], host) for k in range(jax.tree.leaves(host)[0].shape[0])]


@dataclasses.dataclass
class Scorer:
    """Test accuracies in [0, 1], on all test images ("") and on the special class (" special"),
    from one forward pass per model."""

    x: jax.Array
    y: np.ndarray
    mask: np.ndarray

    @classmethod
    def of(cls, data: kit.Data, special: int) -> Scorer:
        return cls(jnp.asarray(data.xte), data.yte, data.yte == special)

    def logits(self, features: tuple[int, ...], models: Sequence[Any]) -> np.ndarray:
        return np.stack([np.asarray(_apply(features)(m, self.x)) for m in models])  # (K, N, classes)

    def split(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        right = logits.argmax(-1) == self.y
        return {"": right.mean(-1), " special": right[..., self.mask].mean(-1)}

    def __call__(self, features: tuple[int, ...], models: Sequence[Any]) -> dict[str, np.ndarray]:
        """(K,) accuracies of each model."""
        return self.split(self.logits(features, models))

    def ensemble(self, features: tuple[int, ...], models: Sequence[Any], weights: Any = None) -> dict[str, float]:
        """The prediction ensemble: the weighted logit average (what ``jfusion.ensemble_apply`` computes)."""
        w = np.full(len(models), 1.0) if weights is None else np.asarray(weights, np.float64)
        return {k: float(v) for k, v in self.split(np.tensordot(w / w.sum(), self.logits(features, models), 1)).items()}


def train(cfg: Config, features, subsets, seeds, init_seeds) -> Any:
    """SGD as in OTFusion; every model of one call has a subset of the same size, so that each
    makes exactly ``cfg.epochs`` passes over its own data."""
    return kit.train_set(mlp(features), subsets, seeds, init_seeds=init_seeds, epochs=cfg.epochs,
                         batch_size=cfg.batch_size, optimizer=sgd(cfg.learning_rate, cfg.momentum))


def ms(values: Any) -> str:
    return kit.mean_std(np.ravel(values), ddof=0)


def class_name(cfg: Config, c: int) -> str:
    return CLASS_NAMES[c] if cfg.data == "fashion_mnist" else f"digit {c}"


# --- experiments 1 and 5: one-shot skill transfer ---------------------------------------------

SKILL_METHODS = ("OT (activations)", "OT (weights)", "vanilla average", "prediction ensemble")


def exp_skill(cfg: Config, data: kit.Data) -> Part:
    return run_skill(cfg, data, cfg.special, cfg.skill_seeds, cfg.skill_conditions, "otfusion_skill_transfer")


def exp_skill_alt(cfg: Config, data: kit.Data) -> Part:
    """POST-HOC robustness check, added after seeing experiment 1's results; different init only."""
    return run_skill(cfg, data, cfg.skill_alt_special, cfg.skill_alt_seeds, ("different",),
                     f"otfusion_skill_transfer_class{cfg.skill_alt_special}")


def run_skill(cfg: Config, data: kit.Data, special: int, seeds: Sequence[int], conditions: Sequence[str], name: str) -> Part:
    f = cfg.features
    seeds = list(seeds)
    splits = [special_class_split(data.ytr, special, 0.1, seed=s) for s in seeds]
    # A: init 1000+s, batch order s; B: init 2000+s (different) or A's init (same), batch order 100+s.
    parents_a = train(cfg, f, [(data.xtr[a], data.ytr[a]) for a, _ in splits], seeds, [1000 + s for s in seeds])
    trained_b = {
        cond: train(cfg, f, [(data.xtr[b], data.ytr[b]) for _, b in splits], [100 + s for s in seeds],
                    [2000 + s if cond == "different" else 1000 + s for s in seeds])
        for cond in conditions
    }
    score = Scorer.of(data, special)
    parents_a = models_of(parents_a)
    acts, wts = fuser("activations", (f, f), 1), fuser("weights", (f, f), 1)  # A aligned onto B, as OTFusion's code
    res: dict[str, Any] = {}
    for cond in conditions:
        parents_b = models_of(trained_b[cond])
        r = {who + sfx: a for who, p in (("A", parents_a), ("B", parents_b)) for sfx, a in score(f, p).items()}
        for m in SKILL_METHODS:
            for sfx in ("", " special"):
                r[m + sfx] = np.zeros((len(seeds), len(cfg.w_grid)))
        for i, s in enumerate(seeds):
            pair = [parents_a[i], parents_b[i]]
            inputs = kit.activation_batch(data, cfg.act_samples, s)
            fused: dict[str, list] = {m: [] for m in SKILL_METHODS[:3]}
            for j, w in enumerate(cfg.w_grid):
                weights = jnp.asarray([1.0 - w, w], jnp.float32)
                fused["OT (activations)"].append(acts(pair, inputs, weights))
                fused["OT (weights)"].append(wts(pair, inputs, weights))
                fused["vanilla average"].append(_VANILLA(pair, weights))
                for sfx, a in score.ensemble(f, pair, weights).items():
                    r["prediction ensemble" + sfx][i, j] = a
            for m, trees in fused.items():
                for sfx, a in score(f, trees).items():
                    r[m + sfx][i] = a
        res[cond] = r
    return Part(skill_tables(cfg, res, special, name), res, {f"{name}.png": plot_skill(cfg, res, special, len(seeds))})


def skill_tables(cfg: Config, res: dict[str, Any], special: int, name: str) -> dict[str, kit.Table]:
    w = list(cfg.w_grid)
    half = w.index(0.5) if 0.5 in w else len(w) // 2
    inner = [j for j, v in enumerate(w) if 0 < v < 1]
    summary = []
    tables = {}
    for cond, r in res.items():
        ot = r["OT (activations)"]
        best = int(np.argmax(ot.mean(0)))
        beats = np.mean(ot[:, half] > np.maximum(r["A"], r["B"]))
        above = np.mean(ot[:, inner].mean(0) > r["vanilla average"][:, inner].mean(0)) if inner else float("nan")
        summary.append([
            cond, ms(r["A"]), ms(r["A special"]), ms(r["B"]), ms(r["B special"]),
            *(ms(r[m][:, half]) for m in SKILL_METHODS), f"{ms(ot[:, best])} at w_B={w[best]:.1f}",
            f"{100 * beats:.0f}%", f"{100 * above:.0f}%",
        ])
        tables[f"{name}: sweep, {cond} initialisation (test accuracy %)"] = kit.Table(
            ["w_B", *(f"{m}: all" for m in SKILL_METHODS), *(f"{m}: class {special}" for m in SKILL_METHODS)],
            [[f"{v:.1f}", *(ms(r[m][:, j]) for m in SKILL_METHODS), *(ms(r[m + " special"][:, j]) for m in SKILL_METHODS)]
             for j, v in enumerate(w)],
        )
    header = ["init", "A", f"A class {special}", "B", f"B class {special}", *(f"{m} (w_B={w[half]})" for m in SKILL_METHODS),
              "OT acts, best w_B (chosen on test)", "seeds where OT acts (w_B=.5) > both parents",
              "interior w_B where OT acts > vanilla"]
    return {f"{name}: summary, special class {special} (test accuracy %)": kit.Table(header, summary), **tables}


def plot_skill(cfg: Config, res: dict[str, Any], special: int, num_seeds: int) -> Any:
    w = np.asarray(cfg.w_grid)
    fig, axes = plt.subplots(2, len(res), figsize=(max(8, 6 * len(res)), 9), sharex=True, squeeze=False)
    colors = {"OT (activations)": "m", "OT (weights)": "tab:purple", "vanilla average": "tab:green", "prediction ensemble": "tab:gray"}
    for col, (cond, r) in enumerate(res.items()):
        for row, sfx in enumerate(("", " special")):
            ax = axes[row, col]
            for m in SKILL_METHODS:
                v = 100 * r[m + sfx]
                ax.errorbar(w, v.mean(0), yerr=v.std(0), label=m, color=colors[m], marker="o", ms=3, capsize=3,
                            ls="--" if m == "prediction ensemble" else "-")
            for who, color in (("A", "tab:blue"), ("B", "tab:orange")):
                v = 100 * r[who + sfx]
                ax.axhline(v.mean(), color=color, ls=":", label=f"model {who}")
                ax.axhspan(v.mean() - v.std(), v.mean() + v.std(), color=color, alpha=0.1)
            ax.set_title(f"{cond} initialisation: " + ("all test images" if not sfx else f"class {special} ({class_name(cfg, special)})"))
            ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3)
            if row == 1:
                ax.set_xlabel("w_B (weight of the generalist B)")
    axes[0, 0].legend(fontsize=8, loc="lower center")
    fig.suptitle(f"One-shot skill transfer (special class {special}), MLP {cfg.features}; mean ± std over {num_seeds} seeds", fontsize=11)
    fig.tight_layout()
    return fig


# --- experiment 2: four models ------------------------------------------------------------------


def exp_four(cfg: Config, data: kit.Data) -> Part:
    f = cfg.features
    seeds = list(cfg.four_seeds)
    splits = [proportion_split(data.ytr, (0.1, 0.3, 0.5, 0.1), special=cfg.special, seed=s) for s in seeds]
    sizes = [len(p) for p in splits[0]]
    largest = int(np.argmax(sizes))  # the target, fixed in advance: the model with the most data
    names = "ABCD"
    score = Scorer.of(data, cfg.special)
    uniform = jnp.full(4, 0.25, jnp.float32)
    data_w = jnp.asarray(np.asarray(sizes, np.float64) / sum(sizes), jnp.float32)
    res: dict[str, Any] = {}
    for cond in cfg.four_conditions:
        parents = [  # per part, stacked over seeds; same init: 3000+s for all four, different: 3000+100·part+s
            train(cfg, f, [(data.xtr[sp[part]], data.ytr[sp[part]]) for sp in splits], [10 * part + s for s in seeds],
                  [3000 + s if cond == "same" else 3000 + 100 * part + s for s in seeds])
            for part in range(4)
        ]
        parents = [models_of(p) for p in parents]
        r: dict[str, list] = {}
        for i, s in enumerate(seeds):
            models = [parents[p][i] for p in range(4)]
            inputs = kit.activation_batch(data, cfg.act_samples, s)
            for p, a in enumerate(score(f, models)[""]):
                r.setdefault(f"model {names[p]}", []).append(a)
            r.setdefault("prediction ensemble", []).append(score.ensemble(f, models)[""])
            candidates = {"vanilla average": _VANILLA(models, uniform)}
            for t in range(4) if cfg.four_all_targets else (largest,):
                candidates[f"OT acts, target {names[t]}"] = fuser("activations", (f,) * 4, t)(models, inputs, uniform)
                if cfg.four_weights:
                    candidates[f"OT wts, target {names[t]}"] = fuser("weights", (f,) * 4, t)(models, inputs, uniform)
            if cfg.four_all_targets:
                candidates[f"OT acts, target {names[largest]}, weights ∝ data"] = fuser("activations", (f,) * 4, largest)(models, inputs, data_w)
                candidates["vanilla, weights ∝ data"] = _VANILLA(models, data_w)
            for k, a in zip(candidates, score(f, list(candidates.values()))[""]):
                r.setdefault(k, []).append(a)
        res[cond] = {k: np.asarray(v) for k, v in r.items()}

    main_keys = [f"model {n}" for n in names] + ["prediction ensemble", "vanilla average",
                                                 f"OT acts, target {names[largest]}", f"OT wts, target {names[largest]}"]
    main_keys = [k for k in main_keys if k in res[cfg.four_conditions[0]]]
    conds = list(res)
    best_parent = {c: np.max(np.stack([res[c][f"model {n}"] for n in names]), axis=0) for c in conds}
    ot = f"OT acts, target {names[largest]}"
    checks = [
        [c, ms(res[c][ot] - res[c]["vanilla average"]), ms(res[c][ot] - best_parent[c]), ms(res[c]["prediction ensemble"] - res[c][ot])]
        for c in conds
    ]
    others = [k for k in res[conds[0]] if k not in main_keys]
    tables = {
        f"otfusion_four_models: split sizes {sizes}, target {names[largest]} (test accuracy %)": kit.Table(
            ["model / method", *(f"{c} init" for c in conds)], [[k, *(ms(res[c][k]) for c in conds)] for k in main_keys]),
        "otfusion_four_models: differences (points)": kit.Table(
            ["init", "OT acts − vanilla", "OT acts − best parent", "ensemble − OT acts"], checks),
    }
    if others:
        tables["otfusion_four_models: other targets and weights (test accuracy %)"] = kit.Table(
            ["method", *(f"{c} init" for c in conds)], [[k, *(ms(res[c][k]) for c in conds)] for k in others])
    return Part(tables, {"sizes": sizes, **res}, {"otfusion_four_models.png": plot_four(cfg, res, main_keys)})


def plot_four(cfg: Config, res: dict[str, Any], keys: list[str]) -> Any:
    fig, ax = plt.subplots(figsize=(11, 4.5))
    x = np.arange(len(keys))
    for j, (c, color) in enumerate(zip(res, ("tab:blue", "tab:orange"))):
        ax.bar(x + (j - 0.5) * 0.38, [100 * res[c][k].mean() for k in keys], 0.38,
               yerr=[100 * res[c][k].std() for k in keys], capsize=3, label=f"{c} init", color=color)
    ax.set_xticks(x, [k.replace(", ", "\n") for k in keys], fontsize=8)
    ax.set_ylim(max(0, min(100 * res[c][k].mean() for c in res for k in keys) - 10), 100)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Four models (10/30/50/10 split, A holds class {cfg.special}), MLP {cfg.features}")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


# --- experiment 3: different widths -------------------------------------------------------------


def exp_widths(cfg: Config, data: kit.Data) -> Part:
    fa, fb = cfg.features, cfg.wide_features
    seeds = list(cfg.widths_seeds)
    splits = [special_class_split(data.ytr, cfg.special, 0.1, seed=s) for s in seeds]
    parents_a = train(cfg, fa, [(data.xtr[a], data.ytr[a]) for a, _ in splits], seeds, [1000 + s for s in seeds])
    parents_b = train(cfg, fb, [(data.xtr[b], data.ytr[b]) for _, b in splits], [100 + s for s in seeds], [2000 + s for s in seeds])
    score = Scorer.of(data, cfg.special)
    parents_a, parents_b = models_of(parents_a), models_of(parents_b)
    res: dict[str, Any] = {who + sfx: a for who, feat, p in (("A", fa, parents_a), ("B", fb, parents_b)) for sfx, a in score(feat, p).items()}
    arch = {0: f"A's architecture {fa[:-1]}", 1: f"B's architecture {fb[:-1]}"}
    for i, s in enumerate(seeds):
        pair = [parents_a[i], parents_b[i]]
        inputs = kit.activation_batch(data, cfg.act_samples, s)
        for t, alignment in cfg.widths_variants:
            # Activation alignment runs each parent through a module of its own widths.
            fn = fuser(alignment, (fa, fb), t)
            fused = [fn(pair, inputs, jnp.asarray([1.0 - w, w], jnp.float32)) for w in cfg.w_grid]
            for sfx, a in score((fa, fb)[t], fused).items():
                res.setdefault(f"OT {alignment} into {arch[t]}{sfx}", np.zeros((len(seeds), len(cfg.w_grid))))[i] = a
    w = list(cfg.w_grid)
    half = w.index(0.5) if 0.5 in w else len(w) // 2
    variants = [f"OT {a} into {arch[t]}" for t, a in cfg.widths_variants]
    summary = [[f"parent {who}", ms(res[who]), ms(res[who + " special"])] for who in "AB"]
    for v in variants:
        best = int(np.argmax(res[v].mean(0)))
        summary.append([f"{v}, w_B={w[half]}", ms(res[v][:, half]), ms(res[v + " special"][:, half])])
        summary.append([f"{v}, best w_B={w[best]:.1f} (chosen on test)", ms(res[v][:, best]), ms(res[v + " special"][:, best])])
    tables = {
        f"otfusion_widths: A {fa} + B {fb} (test accuracy %)": kit.Table(["model / fusion", "all", f"class {cfg.special}"], summary),
        "otfusion_widths: sweep over w_B (all test images, %)": kit.Table(
            ["w_B", *variants], [[f"{v:.1f}", *(ms(res[name][:, j]) for name in variants)] for j, v in enumerate(w)]),
    }
    return Part(tables, res, {"otfusion_widths.png": plot_widths(cfg, res, variants)})


def plot_widths(cfg: Config, res: dict[str, Any], variants: list[str]) -> Any:
    w = np.asarray(cfg.w_grid)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, sfx in zip(axes, ("", " special")):
        for v, (color, ls) in zip(variants, [("tab:blue", "-"), ("tab:blue", "--"), ("tab:red", "-"), ("tab:red", "--")]):
            vals = 100 * res[v + sfx]
            ax.errorbar(w, vals.mean(0), yerr=vals.std(0), color=color, ls=ls, marker="o", ms=3, capsize=3, label=v)
        for who, color in (("A", "tab:cyan"), ("B", "tab:orange")):
            ax.axhline(100 * res[who + sfx].mean(), color=color, ls=":", label=f"parent {who}")
        ax.set_xlabel("w_B (weight of the wide generalist B)")
        ax.set_title("all test images" if not sfx else f"class {cfg.special} ({class_name(cfg, cfg.special)})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Different widths: A = {cfg.features[:-1]}, B = {cfg.wide_features[:-1]}, fused into either architecture")
    fig.tight_layout()
    return fig


# --- experiment 4: fusion as an ensemble proxy --------------------------------------------------


def exp_ensemble(cfg: Config, data: kit.Data) -> Part:
    f = cfg.features
    model = mlp(f)
    k_max = max(cfg.k_values)
    seeds = list(range(k_max))
    parents = train(cfg, f, (data.xtr, data.ytr), seeds, seeds)
    init = init_models(model, seeds, np.asarray(data.xtr[:1]))  # the parents' initialisations
    score = Scorer.of(data, cfg.special)
    parents = models_of(parents)
    parent_acc = score(f, parents)[""]
    inputs = kit.activation_batch(data, cfg.act_samples, 0)

    def ft(variables):  # the same budget and batch order for every fused model, fresh optimizer state
        return finetune(model, variables, data.xtr, data.ytr, epochs=cfg.finetune_epochs, seed=12345,
                        batch_size=cfg.batch_size, optimizer=sgd(cfg.finetune_lr, cfg.momentum))

    parent0_ft = float(score(f, [ft(parents[0])])[""][0])
    rows, plans = {}, {}
    for k in cfg.k_values:
        sub = parents[:k]
        uniform = jnp.full(k, 1.0 / k, jnp.float32)
        fused = {"vanilla": _VANILLA(sub, uniform)}
        for name, alignment in (("OT acts", "activations"), ("OT wts", "weights")):
            if k == cfg.k_values[0]:  # also model 1's plans onto model 0, for the diagnostics
                fused[name], plans[name] = _fusers(alignment, (f,) * k, 0)[1](sub, inputs, uniform)
            else:
                fused[name] = fuser(alignment, (f,) * k, 0)(sub, inputs, uniform)
        tuned = list(fused)
        if cfg.ensemble_outgoing:  # Git Re-Basin-style weight matching, added post hoc, not fine-tuned
            fused["OT wts (out, 2 sweeps)"] = fuser("weights, outgoing, 2 sweeps", (f,) * k, 0)(sub, inputs, uniform)
        before = score(f, list(fused.values()))[""]
        after = score(f, [ft(fused[n]) for n in tuned])[""]
        rows[k] = {"parents": parent_acc[:k], "ensemble": score.ensemble(f, sub)[""],
                   **dict(zip(fused, before)), **{n + " + FT": a for n, a in zip(tuned, after)}}
    names = [n for n in rows[cfg.k_values[0]] if n != "parents"]
    tables = {
        "otfusion_ensembling: K models, fused and fine-tuned (test accuracy %)": kit.Table(
            ["K", "parents", "best parent", *names],
            [[k, ms(r["parents"]), f"{100 * np.max(r['parents']):.2f}", *(f"{100 * r[n]:.2f}" for n in names)] for k, r in rows.items()]),
        f"otfusion_ensembling: control, parent 0 fine-tuned with the same budget: {100 * parent0_ft:.2f} "
        f"(was {100 * parent_acc[0]:.2f}); weight diagnostics": weight_diagnostics(cfg, init, parents, plans),
    }
    data_out = {"parent0_ft": parent0_ft, "rows": {str(k): r for k, r in rows.items()}}
    return Part(tables, data_out, {"otfusion_ensembling.png": plot_ensemble(rows, parent0_ft)})


def weight_diagnostics(cfg: Config, init: Any, parents: list[Any], plans: dict[str, Any]) -> kit.Table:
    """How far training moved each layer from its init, and how often weight and activation
    alignment send a neuron of model 1 to the same neuron of model 0 (``plans``: model 1's
    plans onto model 0 of the first K's fusions by each alignment)."""
    init = jax.device_get(init)
    k = len(parents)
    rows = []
    for i in range(len(cfg.features)):
        w0 = init["params"][f"Dense_{i}"]["kernel"].reshape(k, -1)
        w1 = np.stack([p["params"][f"Dense_{i}"]["kernel"] for p in parents]).reshape(k, -1)
        rows.append([f"Dense_{i}", ms(np.linalg.norm(w1 - w0, axis=1) / np.linalg.norm(w0, axis=1)), "–"])
    for g in mlp_spec(len(cfg.features)).groups:
        same = np.asarray(plans["OT wts"][g]).argmax(axis=1) == np.asarray(plans["OT acts"][g]).argmax(axis=1)
        rows.append([g, "–", f"{100 * np.mean(same):.0f}"])
    return kit.Table(["layer / group", f"‖W − W_init‖ / ‖W_init‖ % (over {k} parents)", "same match by weights and activations %"], rows)


def plot_ensemble(rows: dict[int, dict[str, Any]], parent0_ft: float) -> Any:
    ks = list(rows)
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.errorbar(ks, [100 * rows[k]["parents"].mean() for k in ks], yerr=[100 * rows[k]["parents"].std() for k in ks],
                color="k", marker="o", capsize=3, label="parents (mean ± std)")
    styles = {"ensemble": ("tab:gray", "--"), "vanilla": ("tab:green", "-"), "OT acts": ("m", "-"), "OT wts": ("tab:purple", "-"),
              "OT wts (out, 2 sweeps)": ("tab:blue", "-"), "vanilla + FT": ("tab:green", ":"), "OT acts + FT": ("m", ":"),
              "OT wts + FT": ("tab:purple", ":")}
    for name, (color, ls) in styles.items():
        if name in rows[ks[0]]:
            ax.plot(ks, [100 * rows[k][name] for k in ks], color=color, ls=ls, marker="s", ms=4, label=name)
    ax.axhline(100 * parent0_ft, color="k", ls="-.", lw=0.8, label="parent 0 + same FT")
    ax.set_xlabel("number of models K")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xticks(ks)
    ax.set_title("Fusion as an ensemble proxy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# --- main ---------------------------------------------------------------------------------------

RUNNERS: dict[str, Callable[[Config, kit.Data], Part]] = {
    "skill": exp_skill, "skill_alt": exp_skill_alt, "four": exp_four, "widths": exp_widths, "ensemble": exp_ensemble,
}


def main(argv: Sequence[str] | None = None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", nargs="+", choices=EXPERIMENTS, default=list(EXPERIMENTS), help="experiments to run")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny MLPs on digits, one seed")
    parser.add_argument("--out", default=None, help="output directory (default examples/results; a temp dir with --quick)")
    args = parser.parse_args(argv)
    cfg = quick() if args.quick else Config()
    start = time.perf_counter()
    data = kit.load_data(cfg.data, cfg.train_subsample, cfg.test_subsample)
    parts, times = {}, {}
    for name in args.exp:
        t = time.perf_counter()
        parts[name] = RUNNERS[name](cfg, data)
        times[name] = round(time.perf_counter() - t, 1)
        print(f"[{name}] {times[name]:.0f} s", flush=True)
    return kit.write_report(
        kit.output_dir(args.out, args.quick, "otfusion_experiments"), "otfusion_experiments",
        title="OTFusion's MLP experiments", settings={**dataclasses.asdict(cfg), "experiments": args.exp, "seconds": times,
                                                     "paper": PAPER},
        tables={h: t for p in parts.values() for h, t in p.tables.items()},
        data={name: p.data for name, p in parts.items()},
        figures={fn: fig for p in parts.values() for fn, fig in p.figures.items()},
        script="otfusion_experiments.py", argv=argv, runtime_s=time.perf_counter() - start,
    )


if __name__ == "__main__":
    main()
