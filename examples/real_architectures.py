"""Fusion quality on real data: OTFusion's MLPNet and a ResNet20 on Fashion-MNIST.

Pairs of networks trained from different seeds (different initialisations and data
orders) are fused by vanilla averaging and by OT fusion (Singh & Jaggi 2020) with weight
and activation alignment, and compared with their parents and their prediction ensemble.
ResNet20 has BatchNorm: every fused or averaged ResNet is also evaluated after recomputing
its BatchNorm statistics on 512 training images (the same recalibration for vanilla
averaging, for fairness). A second table measures alignment quality directly: the mean
correlation, on held-out training images, between each target neuron's pre-activations
and those of the neuron(s) the plan matched to it.

    python examples/real_architectures.py --ablation  # the recorded run: 15-25 min on 2 shared CPU cores
    python examples/real_architectures.py --quick     # tiny smoke test, under a minute

The full run writes ``examples/results/real_architectures.md``; ``--quick`` writes
nothing unless ``--out`` is given.

Nothing is tuned: no setting was chosen by test accuracy. Besides the training pool, only a
held-out slice of the training set is used (alignment diagnostic and ablation). The
diagnostic parts -- recalibrated parents, the MLP control and the ResNet ablation -- were
added after a first run, to explain its ResNet results.

ResNets are trained one model per ``jfusion.train.train_models`` call: on XLA:CPU, ``vmap``
over models turns convolutions into grouped convolutions, several times slower than running
the models one after the other (the MLPs are trained K at a time).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import pickle
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jfusion
from jfusion.workflow.data import load_dataset
from jfusion.models import MLP, ResNet, mlp_spec
from jfusion.workflow.train import train_models
from jfusion.core.tree import flatten, unflatten

RESULTS = Path(__file__).resolve().parent / "results" / "real_architectures.md"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that defines a run (fixed in advance; nothing is tuned)."""

    holdout: int = 5000  # last images of the training set: never trained on
    # MLPNet (OTFusion's 784-400-200-100-10), trained with jfusion.train_models.
    mlp_features: tuple[int, ...] = (400, 200, 100, 10)
    mlp_seeds: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    mlp_pairs: tuple[tuple[int, int], ...] = ((0, 1), (2, 3), (4, 5))  # disjoint
    mlp_train: int | None = None  # None: the whole training pool
    mlp_epochs: int = 10
    mlp_batch: int = 128
    mlp_test: int = 10000
    # ResNet: ResNet20 is stage_sizes (3, 3, 3), widths (16, 32, 64) x width.
    resnet_stages: tuple[int, ...] = (3, 3, 3)
    resnet_width: int = 1
    resnet_seeds: tuple[int, ...] = (0, 1, 2)
    resnet_pairs: tuple[tuple[int, int], ...] = ((0, 1), (0, 2), (1, 2))  # every pair of 3
    resnet_steps: int = 250
    resnet_batch: int = 64
    resnet_test: int = 5000  # a fixed subset of the test set: forward passes cost ~2 s / 1000
    # Fusion inputs.
    act_inputs: int = 256  # training images for activation alignment
    recal_batches: int = 4  # BN recalibration: recal_batches x recal_batch training images
    recal_batch: int = 128
    diag_inputs: int = 500  # held-out images for the alignment-quality diagnostic (0: skip it)
    ablation_inputs: int = 2000  # held-out images scoring the ResNet weight-support ablation
    warm_repeats: int = 2
    sinkhorn: bool = True
    sweeps2: bool = True

    @property
    def resnet_name(self) -> str:
        if tuple(self.resnet_stages) == (3, 3, 3):
            return f"ResNet20 (width {self.resnet_width})"
        return f"ResNet{2 + 2 * sum(self.resnet_stages)} (stages {self.resnet_stages}, widths {self.resnet_widths})"

    @property
    def resnet_widths(self) -> tuple[int, ...]:
        return tuple(c * self.resnet_width for c in (16, 32, 64)[: len(self.resnet_stages)])


FULL = Settings()
QUICK = Settings(
    holdout=1000,
    mlp_seeds=(0, 1),
    mlp_pairs=((0, 1),),
    mlp_train=4000,
    mlp_epochs=1,
    mlp_test=1000,
    resnet_stages=(1, 1),
    resnet_seeds=(0, 1),
    resnet_pairs=((0, 1),),
    resnet_steps=6,
    resnet_batch=32,
    resnet_test=256,
    act_inputs=64,
    recal_batches=2,
    recal_batch=32,
    diag_inputs=0,  # no diagnostic (it compiles every alignment a second time)
    ablation_inputs=256,
    warm_repeats=1,
    sinkhorn=False,
    sweeps2=False,
)


# --- helpers --------------------------------------------------------------------------------


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def take(stacked: Any, index: Any) -> Any:
    return jax.tree.map(lambda a: a[jnp.asarray(index)], stacked)


def make_predict(model: Any, bn: bool, batch: int = 1000) -> Callable[[Any, np.ndarray], np.ndarray]:
    """Logits of one model (BatchNorm in inference mode), in batches run from Python."""
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False) if bn else model.apply(v, x))

    def predict(variables: Any, images: np.ndarray) -> np.ndarray:
        return np.concatenate(
            [np.asarray(apply(variables, images[i : i + batch])) for i in range(0, len(images), batch)]
        )

    return predict


def train_resnets(
    model: Any, images: np.ndarray, labels: np.ndarray, seeds: tuple[int, ...], steps: int, batch: int, log
) -> dict[str, Any]:
    """Model k (initialised from ``seeds[k]``) sees its own random sample of ``steps * batch``
    training images once: one epoch of ``train_models``, one model at a time (module
    docstring). Returns variables stacked along K."""
    trained = []
    for seed in seeds:
        sample = np.random.default_rng(seed).permutation(len(labels))[: steps * batch]
        start, losses = time.perf_counter(), []
        variables = train_models(
            model, (images[sample], labels[sample]), [seed], epochs=1, batch_size=batch,
            progress=lambda epoch, epochs, loss: losses.append(float(loss[0])),
        )
        jax.block_until_ready(variables)
        log(f"  resnet seed {seed}: {steps} steps in {time.perf_counter() - start:.0f} s, mean loss {losses[-1]:.3f}")
        trained.append(take(variables, 0))
    return jax.tree.map(lambda *a: jnp.stack(a), *trained)


def matched_correlation(acts_a: dict, acts_b: dict) -> dict[str, float]:
    """Per group: mean over target neurons of corr(target neuron, aligned model's neuron)
    across samples (and positions); neurons constant on the batch are skipped."""
    out = {}
    for group, a in acts_a.items():
        a = np.asarray(a, np.float64).reshape(-1, a.shape[-1])
        b = np.asarray(acts_b[group], np.float64).reshape(-1, a.shape[-1])
        a, b = a - a.mean(0), b - b.mean(0)
        sa, sb = np.sqrt((a * a).mean(0)), np.sqrt((b * b).mean(0))
        ok = (sa > 1e-8) & (sb > 1e-8)
        out[group] = float(np.mean((a * b).mean(0)[ok] / (sa[ok] * sb[ok]))) if ok.any() else float("nan")
    return out


def partners(plan: np.ndarray) -> float:
    """Mean over target neurons (columns) of exp(entropy) of the column-normalised plan."""
    col = plan / np.maximum(plan.sum(0, keepdims=True), 1e-30)
    entropy = -np.sum(np.where(col > 0, col * np.log(np.maximum(col, 1e-30)), 0.0), axis=0)
    return float(np.mean(np.exp(entropy)))


def mean_std(values: list[float]) -> str:
    pct = [100 * v for v in values]
    if len(pct) == 1:
        return f"{pct[0]:.2f}"
    return f"{statistics.mean(pct):.2f} ± {statistics.stdev(pct):.2f}"


@dataclasses.dataclass
class Row:
    name: str
    accs: list[float]
    first_s: float | None = None
    warm_s: float | None = None
    note: str = ""


@dataclasses.dataclass
class ArchResult:
    title: str
    rows: list[Row]
    diag: dict[str, dict[str, float]]  # method -> group -> correlation (pair 0)
    train_s: float
    notes: list[str]
    blur: dict[str, float] = dataclasses.field(default_factory=dict)  # Sinkhorn: partners per group


# --- one architecture -----------------------------------------------------------------------


def run_architecture(
    title: str,
    model: Any,
    spec: jfusion.Spec,
    bn: bool,
    variables: Any,
    seeds: tuple[int, ...],
    pairs: tuple[tuple[int, int], ...],
    test: tuple[np.ndarray, np.ndarray],
    pool: np.ndarray,
    holdout: np.ndarray,
    cfg: Settings,
    train_s: float,
    log,
) -> ArchResult:
    test_x, test_y = test
    predict = make_predict(model, bn)
    rng = np.random.default_rng(1234)
    act_x = jnp.asarray(pool[rng.choice(len(pool), cfg.act_inputs, replace=False)])
    recal_x = jnp.asarray(
        pool[rng.choice(len(pool), cfg.recal_batches * cfg.recal_batch, replace=False)].reshape(
            cfg.recal_batches, cfg.recal_batch, *pool.shape[1:]
        )
    )
    diag_x = jnp.asarray(holdout[: cfg.diag_inputs])
    acts_kwargs = {"train": False} if bn else {}
    activations = jfusion.Activations.from_module(model, **acts_kwargs)
    train_apply = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])

    # Parents and ensembles (logit averaging, as jfusion.ensemble_apply(average="logits")).
    logits = [predict(take(variables, k), test_x) for k in range(len(seeds))]
    acc = lambda lg: float(np.mean(np.argmax(lg, -1) == test_y))
    rows = [Row(f"parent seed {s}", [acc(lg)]) for s, lg in zip(seeds, logits)]
    recal_first = None
    if bn:  # the parents' own running statistics, recomputed exactly as the fused models' are
        for k, s in enumerate(seeds):
            recal, t = timed(jfusion.recalibrate_batch_stats, train_apply, take(variables, k), recal_x)
            recal_first = t if recal_first is None else recal_first
            rows.append(Row(f"parent seed {s} + BN recal", [acc(predict(recal, test_x))]))
    rows.append(Row("ensemble (logit average)", [acc((logits[i] + logits[j]) / 2) for i, j in pairs]))
    # The cached-logit ensemble is ensemble_apply's: check it once, on a small slice.
    i, j = pairs[0]
    direct = jax.jit(lambda m, x: jfusion.ensemble_apply(
        (lambda v, x: model.apply(v, x, train=False)) if bn else model.apply, m, x))(
        take(variables, [i, j]), test_x[:200])
    np.testing.assert_allclose(np.asarray(direct), (logits[i][:200] + logits[j][:200]) / 2, rtol=1e-4, atol=1e-4)

    methods: list[tuple[str, Callable, Any]] = [
        ("vanilla average", lambda m, x: jfusion.vanilla_average(m), None),
        ("OT fusion, weights (exact)", lambda m, x: jfusion.fuse(m, spec), jfusion.Weights()),
    ]
    if bn and cfg.sweeps2:
        methods.append((
            "OT fusion, weights sweeps=2 (exact)",
            lambda m, x: jfusion.fuse(m, spec, alignment=jfusion.Weights(sweeps=2)),
            jfusion.Weights(sweeps=2),
        ))
    methods.append((
        f"OT fusion, activations (exact, {cfg.act_inputs} images)",
        lambda m, x: jfusion.fuse(m, spec, alignment=activations, inputs=x),
        activations,
    ))
    if cfg.sinkhorn:
        methods.append((
            "OT fusion, weights (Sinkhorn eps=0.01·mean C)",
            lambda m, x: jfusion.fuse(m, spec, solver=jfusion.Sinkhorn()),
            ("sinkhorn", jfusion.Weights()),
        ))

    recal_warm_all = []
    for name, method, _ in methods:
        fn = jax.jit(method)
        accs, recal_accs, warm, recal_warm = [], [], [], []
        first = None
        for p, (i, j) in enumerate(pairs):
            pair = take(variables, [i, j])
            fused, t = timed(fn, pair, act_x)
            if p == 0:
                first = t
            for _ in range(cfg.warm_repeats):
                fused, t = timed(fn, pair, act_x)
                warm.append(t)
            accs.append(acc(predict(fused, test_x)))
            if bn:
                recal, t = timed(jfusion.recalibrate_batch_stats, train_apply, fused, recal_x)
                recal_warm.append(t)
                recal_accs.append(acc(predict(recal, test_x)))
        rows.append(Row(name, accs, first, statistics.median(warm)))
        log(f"  {name}: {mean_std(accs)}" + (f"; + BN recal: {mean_std(recal_accs)}" if bn else ""))
        if bn:
            recal_warm_all += recal_warm
            rows.append(Row(f"{name} + BN recal", recal_accs, None, statistics.median(recal_warm), note="recal"))

    # Alignment quality (pair 0, held-out images): matched-neuron activation correlation.
    notes = []
    if bn:
        notes.append(
            f"BN recalibration (jfusion.recalibrate_batch_stats, {cfg.recal_batches} x {cfg.recal_batch} "
            f"training images): first call {recal_first:.2f} s (compiled once, on the first parent; the same program "
            f"then serves every model), warm {statistics.median(recal_warm_all):.2f} s (median), on top of the fusion."
        )
    if cfg.diag_inputs == 0:
        return ArchResult(title, rows, {}, train_s, notes)
    i, j = pairs[0]
    pair = take(variables, [i, j])
    acts_fn = activations.fn
    target_acts = acts_fn(take(variables, i), diag_x)
    diag = {"unaligned": matched_correlation(target_acts, acts_fn(take(variables, j), diag_x))}
    sinkhorn_blur = {}
    for name, _, how in methods[1:]:
        solver = jfusion.Exact()
        if isinstance(how, tuple):
            solver, how = jfusion.Sinkhorn(), how[1]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            aligned = jfusion.align(pair, spec, alignment=how, solver=solver, inputs=act_x)
        for w in caught:
            if issubclass(w.category, jfusion.ConvergenceWarning):
                notes.append(f"{name}: {w.message}")
        if isinstance(solver, jfusion.Sinkhorn):
            iters = {g: int(np.max(np.asarray(r.iterations))) for g, r in aligned.plans.items()}
            blur = {g: round(partners(np.asarray(r.plan[1])), 1) for g, r in aligned.plans.items()}
            sinkhorn_blur = blur
            notes.append(
                f"{name} (pair {seeds[i]},{seeds[j]}): Sinkhorn iterations per group {iters}; effective number "
                f"of source neurons per target neuron (exp of the entropy of the plan's column; 1 for a "
                f"permutation, the width for a uniform plan) {blur}"
            )
        diag[name] = matched_correlation(target_acts, acts_fn(take(aligned.aligned, 1), diag_x))
    return ArchResult(title, rows, diag, train_s, notes, sinkhorn_blur)


# --- ResNet weight-alignment ablation (held-out data only) ----------------------------------

# Conv -> the BatchNorm that follows it, in jfusion.models.ResNet.
_CONV_BN = {"stem_conv": "stem_bn", "conv1": "bn1", "conv2": "bn2", "proj_conv": "proj_bn"}


def bn_folded(variables: Any, epsilon: float = 1e-5) -> Any:
    """The same network (in inference mode) with every BatchNorm folded into its conv:
    kernel * gamma / sqrt(var + eps), BN bias - mean * gamma / sqrt(var + eps), and the BN left
    as (almost) the identity -- scale 1, mean 0, var 1 - eps. Used only to build weight supports."""
    leaves, treedef = flatten(variables)
    out = dict(leaves)
    for path in leaves:
        parts = path.split("/")
        if parts[0] != "params" or parts[-1] != "kernel" or parts[-2] not in _CONV_BN:
            continue
        bn = "/".join(parts[1:-2] + [_CONV_BN[parts[-2]]])
        gain = leaves[f"params/{bn}/scale"] / jnp.sqrt(leaves[f"batch_stats/{bn}/var"] + epsilon)
        out[path] = leaves[path] * gain
        out[f"params/{bn}/bias"] = leaves[f"params/{bn}/bias"] - leaves[f"batch_stats/{bn}/mean"] * gain
        out[f"params/{bn}/scale"] = jnp.ones_like(gain)
        out[f"batch_stats/{bn}/mean"] = jnp.zeros_like(gain)
        out[f"batch_stats/{bn}/var"] = jnp.full_like(gain, 1.0 - epsilon)
    return unflatten(treedef, out)


def transport_with(plans: dict, model_b: Any, spec: jfusion.Spec) -> Any:
    """Model B moved onto the target's neurons by the given plans (one per group).

    WORKAROUND (jfusion has no public "fuse with these plans" entry point): uses the internal
    jfusion.transport.transport_model, the function fuse() itself applies."""
    from jfusion.core.transport import group_map, transport_model

    leaves, treedef = flatten(model_b)
    widths = spec.validate({p: np.shape(x) for p, x in leaves.items()})
    moved = transport_model(leaves, spec.leaves, {g: group_map(plan) for g, plan in plans.items()}, widths)
    return unflatten(treedef, {p: moved[p] for p in leaves})


def resnet_ablation(model, spec, variables, pair, pool, holdout, cfg: Settings, log) -> list[tuple[str, float, float]]:
    """Why does weight alignment fail on the ResNet? Plans from several weight supports,
    applied to the real models of ``pair``; scored on held-out training images only:
    matched-neuron correlation and accuracy after averaging and BN recalibration."""
    hold_x, hold_y = holdout
    n = cfg.ablation_inputs
    diag_x = jnp.asarray(hold_x[: cfg.diag_inputs or 64])
    rng = np.random.default_rng(1234)
    act_x = jnp.asarray(pool[rng.choice(len(pool), cfg.act_inputs, replace=False)])
    recal_x = jnp.asarray(
        pool[rng.choice(len(pool), cfg.recal_batches * cfg.recal_batch, replace=False)].reshape(
            cfg.recal_batches, cfg.recal_batch, *pool.shape[1:]
        )
    )
    predict = make_predict(model, True)
    train_apply = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])
    activations = jfusion.Activations.from_module(model, train=False)
    a, b = take(variables, pair[0]), take(variables, pair[1])
    stacked = take(variables, list(pair))
    target_acts = activations.fn(a, diag_x)
    accuracy = lambda v: float(np.mean(np.argmax(predict(v, hold_x[:n]), -1) == hold_y[:n]))
    folded = jax.tree.map(lambda x, y: jnp.stack([x, y]), bn_folded(a), bn_folded(b))
    constant_stats = {**stacked, "batch_stats": jax.tree.map(jnp.ones_like, stacked["batch_stats"])}
    variants = [
        ("weights: default support (kernel rows + BN scale, bias, running mean, var)", stacked, {}),
        ("weights: supports normalised to unit norm", stacked, {"metric": jfusion.GroundMetric(normalize_supports=True)}),
        ("weights: BN running mean/var made constant in the support", constant_stats, {}),
        ("weights: BN folded into the conv kernels and biases", folded, {}),
        ("weights: outgoing weights too, 3 sweeps (weight matching)", stacked, {"alignment": jfusion.Weights(outgoing=True, sweeps=3)}),
        ("activations (reference)", stacked, {"alignment": activations, "inputs": act_x}),
    ]
    rows = [
        (f"parent {who} alone, + BN recal (no fusion)", float("nan"), accuracy(jfusion.recalibrate_batch_stats(train_apply, v, recal_x)))
        for who, v in (("A", a), ("B", b))
    ]
    # Self-check: a randomly permuted copy of A must be aligned back exactly.
    permuted, _ = jfusion.permute(a, spec, jax.random.key(7))
    plans = {g: r.plan[1] for g, r in jfusion.align(jax.tree.map(lambda x, y: jnp.stack([x, y]), a, permuted), spec).plans.items()}
    moved = transport_with(plans, permuted, spec)
    corr = float(np.nanmean(list(matched_correlation(target_acts, activations.fn(moved, diag_x)).values())))
    fused = jax.tree.map(lambda x, y: (x + y) / 2, a, moved)
    rows.append((
        "weights, self-check: A against a randomly permuted copy of A", corr,
        accuracy(jfusion.recalibrate_batch_stats(train_apply, fused, recal_x)),
    ))
    widths = spec.validate({p: np.shape(x) for p, x in flatten(a)[0].items()})
    perm = np.random.default_rng(0)
    fixed = [  # (name, plans, {}): plans given, nothing solved
        ("identity plans (= vanilla averaging)", {g: jnp.eye(n) / n for g, n in widths.items()}),
        ("random permutations", {g: jnp.eye(n)[perm.permutation(n)] / n for g, n in widths.items()}),
        ("uniform plans: each A neuron averaged with B's mean neuron", {g: jnp.full((n, n), 1.0 / n**2) for g, n in widths.items()}),
    ]

    solved = [
        (name, {g: r.plan[1] for g, r in jfusion.align(models, spec, **kwargs).plans.items()})
        for name, models, kwargs in variants
    ]
    for name, plans in fixed + solved:
        moved = transport_with(plans, b, spec)
        corr = float(np.nanmean(list(matched_correlation(target_acts, activations.fn(moved, diag_x)).values())))
        fused = jax.tree.map(lambda x, y: (x + y) / 2, a, moved)
        recal = jfusion.recalibrate_batch_stats(train_apply, fused, recal_x)
        rows.append((name, corr, accuracy(recal)))
        log(f"  ablation: {name}: corr {corr:.3f}, held-out acc after recal {100 * rows[-1][2]:.2f}")
    return rows


# --- report ---------------------------------------------------------------------------------


def table(result: ArchResult, pairs: tuple[tuple[int, int], ...], seeds: tuple[int, ...]) -> str:
    pair_names = ", ".join(f"({seeds[i]},{seeds[j]})" for i, j in pairs)
    lines = [
        f"| model / method | test acc. % (mean ± std over pairs) | per pair {pair_names} | fuse: first call s | fuse: warm s |",
        "|---|---|---|---|---|",
    ]
    for r in result.rows:
        per = " / ".join(f"{100 * a:.2f}" for a in r.accs) if len(r.accs) > 1 else ""
        first = "-" if r.first_s is None else f"{r.first_s:.2f}"
        warm = "-" if r.warm_s is None else (f"{r.warm_s:.4f}" if r.warm_s < 0.1 else f"{r.warm_s:.2f}")
        if r.note == "recal":  # the recalibration's own time, on top of the fusion above
            first = "(compiled)" if r.first_s is None else f"+{r.first_s:.2f}"
            warm = f"+{r.warm_s:.2f}"
        lines.append(f"| {r.name} | {mean_std(r.accs)} | {per} | {first} | {warm} |")
    return "\n".join(lines)


def diag_table(result: ArchResult) -> str:
    if not result.diag:
        return "(alignment diagnostic skipped)"
    groups = list(next(iter(result.diag.values())))
    methods = list(result.diag)
    lines = ["| group | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for g in groups:
        lines.append(f"| {g} | " + " | ".join(f"{result.diag[m][g]:.3f}" for m in methods) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{np.nanmean(list(result.diag[m].values())):.3f}**" for m in methods) + " |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    return (
        f"jax {jax.__version__}, backend `{jax.default_backend()}` ({jax.devices()[0].device_kind}), "
        f"{cpu}, {os.cpu_count()} cores visible, shared with other jobs "
        f"(load average at the end of the run: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f})"
    )


def find(result: ArchResult, name: str) -> Row:
    return next(r for r in result.rows if r.name == name)


def pct(row: Row) -> float:
    return 100 * statistics.mean(row.accs)


def mean_of(rows: list[Row]) -> float:
    return float(np.mean([pct(r) for r in rows]))


def corr(result: ArchResult, method: str) -> float:
    return float(np.nanmean(list(result.diag[method].values())))


def method_names(cfg: Settings) -> dict[str, str]:
    return {
        "w": "OT fusion, weights (exact)",
        "w2": "OT fusion, weights sweeps=2 (exact)",
        "a": f"OT fusion, activations (exact, {cfg.act_inputs} images)",
        "s": "OT fusion, weights (Sinkhorn eps=0.01·mean C)",
    }


def discussion(mlp: ArchResult, res: ArchResult, control: ArchResult, ablation: list, cfg: Settings) -> str:
    """The discussion, with every number taken from this run."""
    if not (mlp.diag and res.diag and control.diag) or not cfg.sinkhorn or not cfg.sweeps2:
        return "(the discussion needs the full run: alignment diagnostic, Sinkhorn and sweeps=2 rows)"
    n = method_names(cfg)
    f = lambda x: f"{x:.1f}%"
    mp = mean_of([r for r in mlp.rows if r.name.startswith("parent") and "recal" not in r.name])
    mv, mw, ma, ms = (pct(find(mlp, k)) for k in ("vanilla average", n["w"], n["a"], n["s"]))
    me = pct(find(mlp, "ensemble (logit average)"))
    rp = mean_of([r for r in res.rows if r.name.startswith("parent") and "recal" not in r.name])
    rpr = mean_of([r for r in res.rows if r.name.startswith("parent") and "recal" in r.name])
    re_ = pct(find(res, "ensemble (logit average)"))
    rv, rw, ra = (pct(find(res, k)) for k in ("vanilla average", n["w"], n["a"]))
    rvr, rwr, r2r, rar, rsr = (pct(find(res, k + " + BN recal")) for k in ("vanilla average", n["w"], n["w2"], n["a"], n["s"]))
    cp = mean_of([r for r in control.rows if r.name.startswith("parent")])
    cv, cw, ca = (pct(find(control, k)) for k in ("vanilla average", n["w"], n["a"]))
    abl = {name: (c, 100 * a) for name, c, a in ablation}
    weight_rows = [v for k, v in abl.items() if k.startswith("weights:") and "permuted copy" not in k]
    self_check = next((v for k, v in abl.items() if "permuted copy" in k), None)
    uniform = next(v for k, v in abl.items() if k.startswith("uniform plans"))
    acts_abl = abl["activations (reference)"]
    parent_a = next(v for k, v in abl.items() if k.startswith("parent A"))
    blur = float(np.mean(list(res.blur.values()))) if res.blur else float("nan")
    paired = [100 * (x - y) for x, y in zip(find(res, n["w"] + " + BN recal").accs, find(res, "vanilla average + BN recal").accs)]
    paired_wins = sum(d > 0 for d in paired)
    vanilla_abl = next(v for k, v in abl.items() if k.startswith("identity plans"))
    random_abl = next(v for k, v in abl.items() if k.startswith("random permutations"))
    std = lambda row: 100 * statistics.stdev(row.accs) if len(row.accs) > 1 else 0.0
    return f"""\
1. **MLPNet: OT fusion beats vanilla averaging by a wide margin.** Vanilla averaging of two
   independently trained MLPNets falls to {f(mv)} (mean parent {f(mp)}); OT fusion keeps {f(mw)}
   (weights), {f(ma)} (activations) and {f(ms)} (Sinkhorn): {mw - mv:+.1f} points over vanilla and
   {mw - mp:+.1f} from the mean parent, in one shot, with one model's parameters -- the behaviour
   OTFusion reports for its MNIST MLPNet. The prediction ensemble ({f(me)}) remains better, at twice
   the parameters and compute. The alignment is real: matched neurons correlate
   {corr(mlp, 'unaligned'):.2f} unaligned, {corr(mlp, n['w']):.2f} after weight alignment and
   {corr(mlp, n['a']):.2f} after activation alignment.
2. **{cfg.resnet_name} without BN recalibration: every fused model is at chance, OT included**
   (vanilla {f(rv)}, OT weights {f(rw)}, OT activations {f(ra)}). Fusion transports and averages
   the parents' running statistics, which are not the statistics of the fused channels: the
   average of two partly correlated channels has a smaller variance (REPAIR's "variance
   collapse"; matched channels correlate only {corr(res, n['a']):.2f} here even with activation
   plans), and the error compounds through 19 BatchNorms. Here OT does *not* beat vanilla; for
   BN networks recalibration is required, not optional.
3. **With recalibration, activation-based OT beats vanilla by a wide margin but stays far below its
   parents:** {f(rar)} ± {std(find(res, n['a'] + ' + BN recal')):.1f} against {f(rvr)} ± {std(find(res, 'vanilla average + BN recal')):.1f} for
   vanilla + recalibration ({rar - rvr:+.1f} points), yet {rpr - rar:.1f} points below the
   recalibrated parents ({f(rpr)}) and {re_ - rar:.1f} below the ensemble ({f(re_)}).
   (Recalibration helps the parents themselves, {f(rp)} -> {f(rpr)}: after {cfg.resnet_steps} steps
   their momentum-0.9 running averages are stale, which is why the recalibrated parents are the
   fair reference.) OTFusion itself reports the same kind of gap before finetuning (ResNet18 on
   CIFAR-10: 77.0% one-shot against 93.1/93.2% parents).
4. **Weight-based OT fails on this ResNet:** {f(rwr)} with recalibration (two sweeps: {f(r2r)})
   against {f(rvr)} for vanilla + recalibration. It is ahead in {paired_wins} of {len(paired)} pairs (by
   {min(paired):+.1f} to {max(paired):+.1f} points), but both are near chance: not the wide margin OT
   should give. Its plans are close to random: matched-neuron correlation {corr(res, n['w']):.3f}
   (two sweeps {corr(res, n['w2']):.3f}) against {corr(res, 'unaligned'):.3f} for the identity pairing
   and {corr(res, n['a']):.3f} for activation plans.
5. **It is neither a wiring bug nor the BN statistics in the support** (ablation below, held-out
   images).{f" A randomly permuted copy of a parent is recovered exactly (matched correlation {self_check[0]:.3f})." if self_check else ""}
   No weight support does better: default, unit-normalised, BN running statistics made constant,
   BN folded into the kernels, outgoing weights over 3 sweeps all give matched correlations
   {min(c for c, _ in weight_rows):.3f}-{max(c for c, _ in weight_rows):.3f} and held-out accuracies after
   recalibration of {min(a for _, a in weight_rows):.1f}-{max(a for _, a in weight_rows):.1f}%, close to identity plans
   (vanilla, {vanilla_abl[1]:.1f}%) and random permutations ({random_abl[1]:.1f}%).
6. **Short training explains only part of it** (control below): MLPNets given the ResNets' budget
   ({cfg.resnet_steps} steps of {cfg.resnet_batch}) fuse to {f(cw)} by weights (matched correlation
   {corr(control, n['w']):.2f}) and {f(ca)} by activations ({corr(control, n['a']):.2f}); parents {f(cp)},
   vanilla {f(cv)}. Briefly trained weights stay close to their seed-specific random initialisation,
   which weakens weight matching more than activation matching -- but weight-based OT still beats
   vanilla by {cw - cv:.0f} points on the MLP, so the ResNet's failure needs more: its layers are
   narrow (16-64 channels, few near-duplicate features to pair), BatchNorm makes a kernel's scale
   meaningless, and in the first sweep a residual stream is aligned only by the stem (9 kernel
   weights per channel) or a 1x1 projection.
7. **On this ResNet, a trivial baseline beats every fusion -- so its fusion accuracies mostly measure
   how little of the second model they keep.** Sinkhorn plans are blurred (on average {blur:.1f}
   source neurons per target neuron, against 1 for exact plans), and with recalibration
   Sinkhorn reaches {f(rsr)} (activation OT: {f(rar)}; exact weight OT: {f(rwr)}) with a matched
   correlation of only {corr(res, n['s']):.2f}. The ablation shows why: with *uniform* plans (B collapsed to its mean
   neuron, so the result is A with its kernels halved plus a channel-constant term, which BN
   recalibration largely undoes) the "fusion" reaches {uniform[1]:.1f}% on held-out images,
   above activation OT ({acts_abl[1]:.1f}%) and {parent_a[1] - uniform[1]:.1f} points below parent A alone after
   recalibration ({parent_a[1]:.1f}%). One-shot OT fusion of two width-1 ResNet20s trained this briefly is worse than
   keeping one recalibrated parent.

What would probably change the ResNet result, untested here for lack of compute (2 shared CPU
cores): wider ResNets (the literature on permutation alignment -- Ainsworth et al. 2023, Jordan
et al. 2023 -- finds merging improves sharply with width), fully trained parents, REPAIR-style
per-channel statistics correction instead of a plain BN reset, and finetuning after fusion.
"""


LIMITATIONS = """\
## jfusion limitations met while running this (and workarounds)

1. **`train_models` was very slow for conv nets on CPU** (found by this experiment, fixed
   since): it ran an epoch as one `lax.scan` over steps, and on XLA:CPU a convolution's gradient
   inside a loop body runs an order of magnitude slower than the same jitted step called from
   Python (jax-ml/jax#12868; 8.9 s against 0.53 s per ResNet20 step of 64 images here).
   `train_models` now dispatches one jitted step per iteration. `vmap` over models still turns
   convolutions into grouped ones (~3x slower on CPU), so the ResNets are trained one per call.
2. **Activation alignment `vmap`s the K models' forward passes**, which on CPU become grouped
   convolutions: for two ResNet20s on 256 images, 3.2 s vmapped against 0.7 s for the same two
   passes unrolled (measured separately). This is most of the activation fusion's warm time in
   the table. Not worked around.
3. **No public way to fuse with given plans, or to pick which leaves make up a group's weight
   support.** BatchNorm running mean/var are part of the default weight support (running
   statistics are not weights; harmless here per the ablation, but a questionable default). The
   ablation uses the internal `jfusion.transport.transport_model` (marked in `transport_with`).
4. **Under `jax.jit`, `fuse` dropped the solver diagnostics** (found by this experiment, fixed
   since: `fuse(..., return_plans=True)` returns the plans with their convergence flags; a
   warning cannot see traced values): here Sinkhorn convergence was checked with an eager `jfusion.align`
   (iteration counts in the notes above).
"""


def write_report(path, cfg, command, runtime, mlp, res, control, ablation) -> None:
    n_pool = "all" if cfg.mlp_train is None else str(cfg.mlp_train)
    nm = method_names(cfg)
    ablation_md = "(not run: pass --ablation)"
    if ablation:
        ablation_md = "| plans used to average parent B into parent A | matched correlation | held-out acc. % after BN recal |\n|---|---|---|\n"
        ablation_md += "\n".join(
            f"| {name} | {'-' if np.isnan(c) else f'{c:.3f}'} | {100 * a:.2f} |" for name, c, a in ablation
        )
    glance = ["| | MLPNet | " + cfg.resnet_name + " | " + cfg.resnet_name + " + BN recal |", "|---|---|---|---|"]

    def cell(result, name, recal=False):
        try:
            row = find(result, name + (" + BN recal" if recal else ""))
        except StopIteration:
            return "-"
        return mean_std(row.accs)

    parents = lambda r, recal: f"{mean_of([x for x in r.rows if x.name.startswith('parent') and (('recal' in x.name) == recal)]):.2f}"
    glance.append(f"| mean parent | {parents(mlp, False)} | {parents(res, False)} | {parents(res, True)} |")
    for label, name in (("ensemble", "ensemble (logit average)"), ("vanilla average", "vanilla average"),
                        ("OT, weights (exact)", nm["w"]), ("OT, weights, 2 sweeps (exact)", nm["w2"]),
                        ("OT, activations (exact)", nm["a"]), ("OT, weights (Sinkhorn)", nm["s"])):
        recal_cell = "-" if name.startswith("ensemble") else cell(res, name, True)
        glance.append(f"| {label} | {cell(mlp, name)} | {cell(res, name)} | {recal_cell} |")
    text = f"""# Fusion quality on real data: MLPNet and {cfg.resnet_name} on Fashion-MNIST

Produced by `{command}` in {runtime / 60:.1f} min (wall clock, everything included).

**Machine.** {machine()}. Times are wall-clock with `jax.block_until_ready` on a machine other
jobs were using at the same time: indicative only (±30% or more).

**Data.** Fashion-MNIST from Debian's IDX files (`jfusion.data.load_dataset("fashion_mnist")`),
28x28x1 in [0, 1]. The last {cfg.holdout} training images are held out (never trained on; used only
for the alignment diagnostic and the ablation); the other {60000 - cfg.holdout} are the training pool.
Nothing was tuned: no setting was chosen by test accuracy. The diagnostic parts (recalibrated
parents, the MLP control, the ablation) were added after a first run, to explain its ResNet results.

**MLPNet** `MLP({cfg.mlp_features})` (784-400-200-100-10, biases, ReLU): {len(cfg.mlp_seeds)} models,
seeds {cfg.mlp_seeds}, trained together by `jfusion.train.train_models` ({cfg.mlp_epochs} epochs over
{n_pool} pool images, batch {cfg.mlp_batch}, Adam 1e-3; {mlp.train_s:.0f} s), fused in the disjoint pairs
{cfg.mlp_pairs}; test accuracy on the {cfg.mlp_test}-image test set.

**{cfg.resnet_name}** (`jfusion.models.ResNet`: 3x3 stem, stages {cfg.resnet_stages} of widths
{cfg.resnet_widths}, option-B projection shortcuts, BatchNorm, global average pool): {len(cfg.resnet_seeds)}
models, seeds {cfg.resnet_seeds}, each trained for {cfg.resnet_steps} Adam (1e-3) steps of {cfg.resnet_batch}
images -- a seed-dependent random sample of {cfg.resnet_steps * cfg.resnet_batch} pool images, each seen
once ({res.train_s:.0f} s for all). Width 1 and this short schedule are what 2 shared CPU cores allow
(a step costs ~0.5 s, a forward pass ~2 s per 1000 images), so the parents are under-trained.
Fused in the pairs {cfg.resnet_pairs} (every pair of the three models, so the pairs are not
independent); test accuracy on the first {cfg.resnet_test} test images (binomial standard error
≈ 0.6 points at 80%). BN recalibration: `jfusion.recalibrate_batch_stats` (what
`fuse(..., recalibrate=(train_apply, batches))` runs) on {cfg.recal_batches} x {cfg.recal_batch} pool images,
applied identically to the parents, to vanilla averaging and to every OT fusion.

**Fusion.** `jfusion.fuse(pair, spec, ...)`, target = the pair's first model, uniform model
weights; `Exact()` (Hungarian) unless stated; `Sinkhorn()` with jfusion's defaults (epsilon 0.01
relative to the mean cost, threshold 1e-4). Activation alignment: `Activations.from_module(model)`
(`train=False` for the ResNet) on {cfg.act_inputs} pool images -- pre-activations; a residual stream
stacks all its writers' pre-ReLU sums. Timing: the method wrapped in `jax.jit`; *first call* =
trace + compile + run on the first pair, *warm* = median of {cfg.warm_repeats} further calls on each
pair. Ensemble = average of the two parents' logits (`ensemble_apply(average="logits")`).
Means ± sample standard deviations over pairs.

## At a glance (test accuracy %, mean ± std over pairs)

{chr(10).join(glance)}

## MLPNet (784-400-200-100-10)

{table(mlp, cfg.mlp_pairs, cfg.mlp_seeds)}

{chr(10).join("* " + x for x in mlp.notes)}

## {cfg.resnet_name}

{table(res, cfg.resnet_pairs, cfg.resnet_seeds)}

"+ BN recal" rows: the model of the line above after BatchNorm recalibration; their time
columns give the recalibration's own extra time.
{chr(10).join("* " + x for x in res.notes)}

## Alignment quality

Mean Pearson correlation, over the target's neurons, between a target neuron's pre-activations
and those of the neuron(s) the plan sends to it from the other model (`jfusion.align`), on
{cfg.diag_inputs} held-out images, first pair of each architecture. 1 = the matched neurons compute
the same feature; "unaligned" pairs neuron i with neuron i.

**MLPNet**

{diag_table(mlp)}

**{cfg.resnet_name}** (`s*`: residual streams, `s*.b*`: the blocks' inner channels)

{diag_table(res)}

## Control: MLPNet with the ResNets' training budget

Two MLPNets (seeds {cfg.resnet_seeds[:2]}), each trained by `train_models` for one pass of
{cfg.resnet_steps} steps of {cfg.resnet_batch} over exactly the sample the ResNet of its seed saw;
full test set.

{table(control, ((0, 1),), cfg.resnet_seeds[:2])}

{diag_table(control)}

## Why weight alignment fails on {cfg.resnet_name}: ablation on held-out images

Pair {cfg.resnet_pairs[0]}; plans from several sources are applied to parent B (with the transport
`fuse` uses), B is averaged with A, BatchNorm is recalibrated, and the result is scored on the
first {cfg.ablation_inputs} held-out training images (not the test set).

{ablation_md}

## Discussion

{discussion(mlp, res, control, ablation, cfg)}

{LIMITATIONS}"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def cached(directory: Path | None, name: str, cfg: Settings, train: Callable[[], Any]) -> tuple[Any, float]:
    """``train()`` (timed), or its result saved in ``directory`` by an earlier run of these settings."""
    key = hashlib.sha1(repr(cfg).encode()).hexdigest()[:12]
    path = None if directory is None else directory / f"real_architectures_{name}_{key}.pkl"
    if path is not None and path.exists():
        with path.open("rb") as f:
            variables, seconds = pickle.load(f)
        return jax.tree.map(jnp.asarray, variables), seconds
    start = time.perf_counter()
    variables = jax.block_until_ready(train())
    seconds = time.perf_counter() - start
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            pickle.dump((jax.device_get(variables), seconds), f)
    return variables, seconds


# --- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke test (~1 min): 1 pair, a 2-stage ResNet, few steps")
    parser.add_argument("--ablation", action="store_true", help="also run the ResNet weight-support ablation (~2 min)")
    parser.add_argument(
        "--cache", type=Path, default=None,
        help="directory to save the trained parents in and reuse them from (keyed by the settings); "
        "training times are then those of the run that trained them",
    )
    parser.add_argument("--out", type=Path, default=None, help=f"markdown output (default: {RESULTS} for full runs, none for --quick)")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    out = args.out if args.out is not None else (None if args.quick else RESULTS)
    command = "python examples/real_architectures.py" + (" --quick" if args.quick else "") + (" --ablation" if args.ablation else "")
    start = time.perf_counter()
    log = lambda s: print(f"[{time.perf_counter() - start:6.1f}s] {s}", flush=True)

    data = load_dataset("fashion_mnist")
    n_pool = len(data.train_labels) - cfg.holdout
    pool_x, pool_y = data.train_images[:n_pool], data.train_labels[:n_pool]
    holdout = (data.train_images[n_pool:], data.train_labels[n_pool:])
    mlp_test = (data.test_images[: cfg.mlp_test], data.test_labels[: cfg.mlp_test])

    # MLPNet ---------------------------------------------------------------------------------
    mlp = MLP(cfg.mlp_features)
    mlp_spec_ = mlp_spec(len(cfg.mlp_features))
    n = n_pool if cfg.mlp_train is None else cfg.mlp_train
    log(f"training {len(cfg.mlp_seeds)} MLPNets ({cfg.mlp_epochs} epochs on {n} images)")
    mlp_vars, mlp_train_s = cached(args.cache, "mlp", cfg, lambda: train_models(
        mlp, (pool_x[:n], pool_y[:n]), list(cfg.mlp_seeds), epochs=cfg.mlp_epochs, batch_size=cfg.mlp_batch
    ))
    mlp_result = run_architecture(
        "MLPNet", mlp, mlp_spec_, False, mlp_vars, cfg.mlp_seeds, cfg.mlp_pairs,
        mlp_test, pool_x, holdout[0], cfg, mlp_train_s, log,
    )

    # ResNet ---------------------------------------------------------------------------------
    resnet = ResNet(tuple(cfg.resnet_stages), cfg.resnet_widths)
    log(f"training {len(cfg.resnet_seeds)} {cfg.resnet_name} ({cfg.resnet_steps} steps of {cfg.resnet_batch})")
    res_vars, res_train_s = cached(args.cache, "resnet", cfg, lambda: train_resnets(
        resnet, pool_x, pool_y, cfg.resnet_seeds, cfg.resnet_steps, cfg.resnet_batch, log
    ))
    res_result = run_architecture(
        cfg.resnet_name, resnet, resnet.spec(), True, res_vars, cfg.resnet_seeds, cfg.resnet_pairs,
        (data.test_images[: cfg.resnet_test], data.test_labels[: cfg.resnet_test]), pool_x, holdout[0], cfg,
        res_train_s, log,
    )

    # Control: MLPNets on the ResNets' budget (the same per-seed samples, one pass) ------------
    seeds = cfg.resnet_seeds[:2]
    log(f"control: 2 MLPNets on the ResNets' budget ({cfg.resnet_steps} steps of {cfg.resnet_batch})")
    samples = [np.random.default_rng(s).permutation(n_pool)[: cfg.resnet_steps * cfg.resnet_batch] for s in seeds]
    ctl_vars, ctl_train_s = cached(args.cache, "control", cfg, lambda: train_models(
        mlp, [(pool_x[i], pool_y[i]) for i in samples], list(seeds), epochs=1, batch_size=cfg.resnet_batch
    ))
    control = run_architecture(
        "MLPNet, ResNet budget", mlp, mlp_spec_, False, ctl_vars, seeds, ((0, 1),), mlp_test, pool_x, holdout[0],
        dataclasses.replace(cfg, sinkhorn=False, warm_repeats=1), ctl_train_s, log,
    )

    ablation = []
    if args.ablation:
        log("ablation: ResNet weight supports (held-out images)")
        ablation = resnet_ablation(resnet, resnet.spec(), res_vars, cfg.resnet_pairs[0], pool_x, holdout, cfg, log)

    runtime = time.perf_counter() - start
    for r, pairs, s in ((mlp_result, cfg.mlp_pairs, cfg.mlp_seeds), (res_result, cfg.resnet_pairs, cfg.resnet_seeds),
                        (control, ((0, 1),), seeds)):
        print(f"\n{r.title}\n{table(r, pairs, s)}\n{diag_table(r)}")
        for note in r.notes:
            print("*", note)
    for name, c, a in ablation:
        print(f"ablation | {name} | {c:.3f} | {100 * a:.2f}")
    print("\n" + discussion(mlp_result, res_result, control, ablation, cfg) if ablation else "")
    print(f"\ntotal runtime {runtime:.1f} s")
    if out is not None:
        write_report(out, cfg, command, runtime, mlp_result, res_result, control, ablation)
        print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
