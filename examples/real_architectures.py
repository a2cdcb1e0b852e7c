"""Fusion quality on real data: OTFusion's MLPNet and a ResNet20 on Fashion-MNIST.

Pairs of networks trained from different seeds (different initialisations and data
orders) are fused by vanilla averaging and by OT fusion (Singh & Jaggi 2020) with weight
and activation alignment, and compared with their parents and their prediction ensemble.
ResNet20 has BatchNorm: every fused or averaged ResNet is also evaluated after recomputing
its BatchNorm statistics on 512 training images (the same recalibration for vanilla
averaging, for fairness). A second table measures alignment quality directly: the mean
correlation, on held-out training images, between each target neuron's pre-activations
and those of the neuron(s) the plan matched to it.

    python examples/real_architectures.py --ablation           # the recorded run: 11-25 min on 2 shared CPU cores
    python examples/real_architectures.py --quick --out /tmp/q  # smoke test on digits (or a Fashion-MNIST subset)

Writes ``real_architectures_numbers.{md,json}`` to ``--out``; the reading is
``examples/results/real_architectures.md``, written by hand.

Nothing is tuned: no setting was chosen by test accuracy. Besides the training pool, only a
held-out slice of the training set is used (alignment diagnostic and ablation). The
diagnostic parts -- recalibrated parents, the MLP control and the ResNet ablation -- were
added after a first run, to explain its ResNet results.

ResNets are trained one model per ``train_set`` call: on XLA:CPU, ``vmap`` over models turns
convolutions into grouped convolutions, several times slower than running the models one
after the other (the MLPs are trained K at a time).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jfusion
import kit
from jfusion.core.tree import flatten, unflatten
from jfusion.models import MLP, ResNet, mlp_spec


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that defines a run (fixed in advance; nothing is tuned)."""

    data: str = "fashion_mnist"
    holdout: int = 5000  # last images of the training set: never trained on
    # MLPNet (OTFusion's 784-400-200-100-10).
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
    diag_resnet: bool = True  # the alignment diagnostic on the ResNet too (quick: on the MLP only)
    resnet_weights: bool = True  # weight alignment on the ResNet too (quick: activations only there)
    control: bool = True  # the MLPNet control on the ResNets' budget (quick: skipped, it reruns the MLP programs)
    weight_matching: bool = True  # jfusion.WeightMatching wherever weight alignment runs
    repair: bool = True  # + REPAIR after weight matching and after activation alignment

    @property
    def resnet_name(self) -> str:
        if tuple(self.resnet_stages) == (3, 3, 3):
            return f"ResNet20 (width {self.resnet_width})"
        return f"ResNet{2 + 2 * sum(self.resnet_stages)} (stages {self.resnet_stages}, widths {self.resnet_widths})"

    @property
    def resnet_widths(self) -> tuple[int, ...]:
        return tuple(c * self.resnet_width for c in (16, 32, 64)[: len(self.resnet_stages)])


def quick() -> Settings:
    return Settings(
        data=kit.quick_dataset(), holdout=300, mlp_features=(64, 32, 10), mlp_seeds=(0, 1), mlp_pairs=((0, 1),),
        mlp_train=3000, mlp_epochs=3, mlp_batch=32, mlp_test=1000, resnet_stages=(1, 1), resnet_seeds=(0, 1),
        resnet_pairs=((0, 1),), resnet_steps=20, resnet_batch=32, resnet_test=256, act_inputs=64, recal_batches=2,
        recal_batch=32, diag_inputs=64, ablation_inputs=256, warm_repeats=1, sinkhorn=False, sweeps2=False,
        diag_resnet=False, resnet_weights=False, control=False,
    )


SINKHORN = "OT fusion, weights (Sinkhorn eps=0.01·mean C)"


def train_resnets(model: Any, images: np.ndarray, labels: np.ndarray, cfg: Settings) -> Any:
    """Model k (initialised from ``seeds[k]``) sees its own random sample of ``steps * batch``
    training images once, one model per call (module docstring). Stacked along K."""
    trained = []
    for seed in cfg.resnet_seeds:
        sample = np.random.default_rng(seed).permutation(len(labels))[: cfg.resnet_steps * cfg.resnet_batch]
        variables = kit.train_set(model, (images[sample], labels[sample]), [seed], epochs=1, batch_size=cfg.resnet_batch)
        trained.append(kit.pick(variables, 0))
    return kit.stack(trained)


def partners(plan: np.ndarray) -> float:
    """Mean over target neurons (columns) of exp(entropy) of the column-normalised plan."""
    col = plan / np.maximum(plan.sum(0, keepdims=True), 1e-30)
    entropy = -np.sum(np.where(col > 0, col * np.log(np.maximum(col, 1e-30)), 0.0), axis=0)
    return float(np.mean(np.exp(entropy)))


@dataclasses.dataclass
class Architecture:
    """One architecture's models and how to run them."""

    title: str
    model: Any
    spec: jfusion.Spec
    bn: bool
    variables: Any  # stacked along K
    seeds: tuple[int, ...]
    pairs: tuple[tuple[int, int], ...]
    train_s: float

    def apply(self, variables: Any, x: Any) -> Any:
        return self.model.apply(variables, x, train=False) if self.bn else self.model.apply(variables, x)

    def train_apply(self, variables: Any, x: Any) -> Any:
        return self.model.apply(variables, x, train=True, mutable=["batch_stats"])

    def activations(self) -> jfusion.ByActivations:
        return jfusion.ByActivations.from_module(self.model, **({"train": False} if self.bn else {}))


def fusion_methods(arch: Architecture, cfg: Settings) -> dict[str, tuple[kit.Method, dict[str, Any]]]:
    """name -> (``method(pair, inputs)``, the ``align`` options it fuses with).

    Weight matching and activation alignment are also followed by REPAIR (``jfusion.repair``,
    on the same inputs as activation alignment): every fused channel gets its aligned parents'
    mean statistics, folded into the writers or, with BatchNorm, into the norms' affine
    parameters."""
    spec, acts = arch.spec, arch.activations()
    weights = not arch.bn or cfg.resnet_weights
    options: dict[str, dict[str, Any]] = {"OT fusion, weights (exact)": {}} if weights else {}
    if arch.bn and cfg.sweeps2:
        options["OT fusion, weights sweeps=2 (exact)"] = {"alignment": jfusion.ByWeights(sweeps=2)}
    if weights and cfg.weight_matching:
        options["weight matching (Git Re-Basin)"] = {"alignment": jfusion.WeightMatching()}
    options[f"OT fusion, activations (exact, {cfg.act_inputs} images)"] = {"alignment": acts}
    if cfg.sinkhorn:
        options[SINKHORN] = {"solver": "sinkhorn"}
    out: dict[str, tuple[kit.Method, dict[str, Any]]] = {
        "vanilla average": (lambda m, x: jfusion.vanilla_average(m).params, {})
    }
    apply_kwargs = {"train": False} if arch.bn else None
    for name, kw in options.items():
        needs_inputs = "alignment" in kw and isinstance(kw["alignment"], jfusion.ByActivations)
        out[name] = (lambda m, x, kw=kw, n=needs_inputs: jfusion.fuse(m, spec, inputs=x if n else None, **kw).params, kw)
        if cfg.repair and isinstance(kw.get("alignment"), (jfusion.ByActivations, jfusion.WeightMatching)):

            def repaired(m, x, kw=kw, n=needs_inputs):
                alignment = jfusion.align(m, spec, inputs=x if n else None, **kw)
                fused = jax.tree.map(lambda a: jnp.mean(a, axis=0), alignment.aligned)  # uniform weights: fuse's average
                return jfusion.repair(fused, alignment, spec, x, model=arch.model, apply_kwargs=apply_kwargs).params

            out[name + " + REPAIR"] = (repaired, kw)
    return out


def run_architecture(arch: Architecture, test: tuple[np.ndarray, np.ndarray], pool: np.ndarray, holdout: np.ndarray,
                     cfg: Settings) -> dict[str, Any]:
    """Parents, ensembles and every fusion (with and without BN recalibration) over the pairs,
    then the alignment diagnostic on the first pair."""
    test_x, test_y = test
    rng = np.random.default_rng(1234)
    act_x = jnp.asarray(pool[rng.choice(len(pool), cfg.act_inputs, replace=False)])
    recal_x = kit.recalibration_batches(pool, cfg.recal_batches, cfg.recal_batch, rng)
    score = lambda v: kit.accuracy(kit.predictions(arch.apply, v, test_x), test_y)
    scores = {"": score}
    if arch.bn:
        scores[" + BN recal"] = lambda v: score(jfusion.recalibrate_batch_stats(arch.train_apply, v, recal_x))
    rows = []
    for suffix, fn in scores.items():
        rows += [kit.Row(f"parent seed {s}{suffix}", [fn(kit.pick(arch.variables, k))]) for k, s in enumerate(arch.seeds)]
    cases = [kit.Case([kit.pick(arch.variables, i), kit.pick(arch.variables, j)], act_x) for i, j in arch.pairs]
    rows.append(kit.Row("ensemble (logit average)", [kit.ensemble_accuracy(arch.apply, c.models, test_x, test_y) for c in cases]))
    methods = fusion_methods(arch, cfg)
    rows += kit.evaluate_methods({n: m for n, (m, _) in methods.items()}, cases, scores, repeats=cfg.warm_repeats)
    print(f"[{arch.title}] " + "; ".join(f"{r.name}: {kit.mean_std(r.accuracy)}" for r in rows), flush=True)
    result: dict[str, Any] = {"rows": rows, "diag": {}, "notes": []}
    if cfg.diag_inputs and (cfg.diag_resnet or not arch.bn):
        diagnose(arch, cases[0], {n: kw for n, (_, kw) in methods.items() if n != "vanilla average" and not n.endswith(" + REPAIR")},
                 jnp.asarray(holdout[: cfg.diag_inputs]), result)
    return result


def diagnose(arch: Architecture, case: kit.Case, options: dict[str, dict[str, Any]], diag_x: jax.Array,
             result: dict[str, Any]) -> None:
    """Plan-weighted correlation of matched neurons' activations per group for every alignment
    (``jfusion.plan_diagnostics`` of ``jfusion.align``'s plans; "unaligned" is the identity's);
    Sinkhorn's iterations and blur (effective partners per target neuron) as notes."""
    activations = arch.activations()
    for name, kw in options.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            aligned = jfusion.align(case.models, arch.spec, inputs=case.inputs, **kw)
        result["notes"] += [f"{name}: {w.message}" for w in caught if issubclass(w.category, jfusion.ConvergenceWarning)]
        if name == SINKHORN:
            iters = {g: int(np.max(np.asarray(r.iterations))) for g, r in aligned.plans.items()}
            blur = {g: round(partners(np.asarray(r.plan[1])), 1) for g, r in aligned.plans.items()}
            result["notes"].append(f"{name}: Sinkhorn iterations per group {iters}; effective source neurons per target neuron {blur}")
        report = jfusion.plan_diagnostics(aligned, case.models, activations=activations, inputs=diag_x)
        result["diag"].setdefault("unaligned", {g: float(d.identity_correlation[1]) for g, d in report.items()})
        result["diag"][name] = {g: float(d.matched_correlation[1]) for g, d in report.items()}


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
    jfusion.core.transport.transport_model, the function fuse() itself applies."""
    from jfusion.core.transport import group_map, transport_model

    leaves, treedef = flatten(model_b)
    widths = spec.validate({p: np.shape(x) for p, x in leaves.items()})
    moved = transport_model(leaves, spec.leaves, {g: group_map(plan) for g, plan in plans.items()}, widths)
    return unflatten(treedef, {p: moved[p] for p in leaves})


def resnet_ablation(arch: Architecture, pool: np.ndarray, holdout: tuple[np.ndarray, np.ndarray], cfg: Settings) -> kit.Table:
    """Why does weight alignment fail on the ResNet? Plans from several weight supports,
    applied to the real models of the first pair; scored on held-out training images only:
    matched-neuron correlation and accuracy after averaging and BN recalibration."""
    hold_x, hold_y = holdout
    spec = arch.spec
    diag_x = jnp.asarray(hold_x[: cfg.diag_inputs or 64])
    rng = np.random.default_rng(1234)
    act_x = jnp.asarray(pool[rng.choice(len(pool), cfg.act_inputs, replace=False)])
    recal_x = kit.recalibration_batches(pool, cfg.recal_batches, cfg.recal_batch, rng)
    activations = arch.activations()
    a, b = (kit.pick(arch.variables, k) for k in arch.pairs[0])
    stacked = kit.stack([a, b])
    n = cfg.ablation_inputs
    recal_accuracy = lambda v: kit.accuracy(
        kit.predictions(arch.apply, jfusion.recalibrate_batch_stats(arch.train_apply, v, recal_x), hold_x[:n]), hold_y[:n])
    widths = spec.validate({p: np.shape(x) for p, x in flatten(a)[0].items()})

    def correlation(plans: dict[str, jax.Array], model: Any) -> float:
        """Mean over groups of the plan-weighted correlation of B's neurons with A's matched ones."""
        both = {g: jnp.stack([jnp.eye(widths[g]) / widths[g], plan]) for g, plan in plans.items()}
        report = jfusion.plan_diagnostics(both, [a, model], activations=activations, inputs=diag_x)
        return float(np.nanmean([d.matched_correlation[1] for d in report.values()]))

    folded = kit.stack([bn_folded(a), bn_folded(b)])
    constant_stats = {**stacked, "batch_stats": jax.tree.map(jnp.ones_like, stacked["batch_stats"])}
    variants = [
        ("weights: default support (kernel rows + BN scale and bias; running statistics left out)", stacked, {}),
        ("weights: supports normalised to unit norm", stacked, {"metric": jfusion.GroundMetric(normalize_supports=True)}),
        ("weights: BN running mean/var made constant in the support", constant_stats, {}),
        ("weights: BN folded into the conv kernels and biases", folded, {}),
        ("weights: outgoing weights too, 3 sweeps (weight matching)", stacked, {"alignment": jfusion.ByWeights(outgoing=True, sweeps=3)}),
        ("activations (reference)", stacked, {"alignment": activations, "inputs": act_x}),
    ]
    rows = [[f"parent {who} alone, + BN recal (no fusion)", "-", recal_accuracy(v)] for who, v in (("A", a), ("B", b))]
    # Self-check: a randomly permuted copy of A must be aligned back exactly.
    permuted, _ = jfusion.permute(a, spec, jax.random.key(7))
    plans = {g: r.plan[1] for g, r in jfusion.align(kit.stack([a, permuted]), spec).plans.items()}
    moved = transport_with(plans, permuted, spec)
    rows.append(["weights, self-check: A against a randomly permuted copy of A", correlation(plans, permuted),
                 recal_accuracy(jax.tree.map(lambda x, y: (x + y) / 2, a, moved))])
    perm = np.random.default_rng(0)
    fixed = [  # plans given, nothing solved
        ("identity plans (= vanilla averaging)", {g: jnp.eye(w) / w for g, w in widths.items()}),
        ("random permutations", {g: jnp.eye(w)[perm.permutation(w)] / w for g, w in widths.items()}),
        ("uniform plans: each A neuron averaged with B's mean neuron", {g: jnp.full((w, w), 1.0 / w**2) for g, w in widths.items()}),
    ]
    solved = [
        (name, {g: r.plan[1] for g, r in jfusion.align(models, spec, **kwargs).plans.items()})
        for name, models, kwargs in variants
    ]
    for name, plans in fixed + solved:
        moved = transport_with(plans, b, spec)
        rows.append([name, correlation(plans, b), recal_accuracy(jax.tree.map(lambda x, y: (x + y) / 2, a, moved))])
    return kit.Table(
        ["plans used to average parent B into parent A", "matched correlation", "held-out acc. % after BN recal"],
        [[name, c if isinstance(c, str) else f"{c:.3f}", f"{100 * acc:.2f}"] for name, c, acc in rows],
    )


# --- numbers out ------------------------------------------------------------------------------


def diag_table(diag: dict[str, dict[str, float]]) -> kit.Table:
    """Matched-neuron correlation per group (rows) and alignment (columns), with the mean."""
    methods = list(diag)
    groups = list(diag[methods[0]])
    rows = [[g] + [f"{diag[m][g]:.3f}" for m in methods] for g in groups]
    rows.append(["**mean**"] + [f"**{np.nanmean(list(diag[m].values())):.3f}**" for m in methods])
    return kit.Table(["group", *methods], rows)


def glance(cfg: Settings, results: dict[str, dict[str, Any]]) -> kit.Table:
    """The README's table: mean parent, ensemble and each method, MLPNet / ResNet / ResNet + recal."""
    mlp, res = results["MLPNet"]["rows"], results[cfg.resnet_name]["rows"]

    def cell(rows: list[kit.Row], name: str) -> str:
        found = [r for r in rows if r.name == name]
        return kit.mean_std(found[0].accuracy) if found else "-"

    def parents(rows: list[kit.Row], recal: bool) -> str:
        accs = [r.accuracy[0] for r in rows if r.name.startswith("parent") and r.name.endswith("recal") == recal]
        return f"{100 * np.mean(accs):.2f}"

    body = [["mean parent", parents(mlp, False), parents(res, False), parents(res, True)]]
    names = [r.name for r in res if not r.name.startswith("parent") and not r.name.endswith("recal")]
    body += [[n, cell(mlp, n), cell(res, n), cell(res, n + " + BN recal")] for n in names]
    return kit.Table(["", "MLPNet", cfg.resnet_name, cfg.resnet_name + " + BN recal"], body)


def cached(directory: Path | None, name: str, cfg: Settings, train: Callable[[], Any]) -> tuple[Any, float]:
    """``train()`` (timed), or its result saved in ``directory`` by an earlier run of these settings."""
    key = hashlib.sha1(repr(cfg).encode()).hexdigest()[:12]

    def timed():
        start = time.perf_counter()
        variables = jax.block_until_ready(train())
        return variables, time.perf_counter() - start

    variables, seconds = kit.cached(None if directory is None else directory / f"real_architectures_{name}_{key}.pkl", timed)
    return jax.tree.map(jnp.asarray, variables), seconds


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 pair, tiny MLP, a 2-stage ResNet, few steps")
    parser.add_argument("--ablation", action="store_true", help="also run the ResNet weight-support ablation (~2 min)")
    parser.add_argument(
        "--cache", type=Path, default=None,
        help="directory to save the trained parents in and reuse them from (keyed by the settings); "
        "training times are then those of the run that trained them",
    )
    parser.add_argument("--out", default=None, help="output directory (default examples/results; a temp dir with --quick)")
    args = parser.parse_args(argv)
    cfg = quick() if args.quick else Settings()
    start = time.perf_counter()
    data = kit.load_data(cfg.data)
    n_pool = len(data.ytr) - cfg.holdout
    pool_x, pool_y = data.xtr[:n_pool], data.ytr[:n_pool]
    holdout = (data.xtr[n_pool:], data.ytr[n_pool:])
    mlp_test = (data.xte[: cfg.mlp_test], data.yte[: cfg.mlp_test])

    mlp = MLP(cfg.mlp_features)
    n = n_pool if cfg.mlp_train is None else cfg.mlp_train
    mlp_vars, mlp_s = cached(args.cache, "mlp", cfg, lambda: kit.train_set(
        mlp, (pool_x[:n], pool_y[:n]), cfg.mlp_seeds, epochs=cfg.mlp_epochs, batch_size=cfg.mlp_batch))
    resnet = ResNet(tuple(cfg.resnet_stages), cfg.resnet_widths)
    res_vars, res_s = cached(args.cache, "resnet", cfg, lambda: train_resnets(resnet, pool_x, pool_y, cfg))
    archs = [
        (Architecture("MLPNet", mlp, mlp_spec(len(cfg.mlp_features)), False, mlp_vars, cfg.mlp_seeds, cfg.mlp_pairs, mlp_s), mlp_test, cfg),
        (Architecture(cfg.resnet_name, resnet, resnet.spec(), True, res_vars, cfg.resnet_seeds, cfg.resnet_pairs, res_s),
         (data.xte[: cfg.resnet_test], data.yte[: cfg.resnet_test]), cfg),
    ]
    if cfg.control:  # MLPNets on the ResNets' budget (the same per-seed samples, one pass)
        seeds = cfg.resnet_seeds[:2]
        samples = [np.random.default_rng(s).permutation(n_pool)[: cfg.resnet_steps * cfg.resnet_batch] for s in seeds]
        ctl_vars, ctl_s = cached(args.cache, "control", cfg, lambda: kit.train_set(
            mlp, [(pool_x[i], pool_y[i]) for i in samples], seeds, epochs=1, batch_size=cfg.resnet_batch))
        archs.append((Architecture("MLPNet, ResNet budget", mlp, mlp_spec(len(cfg.mlp_features)), False, ctl_vars, seeds,
                                   ((0, 1),), ctl_s), mlp_test, dataclasses.replace(cfg, sinkhorn=False, warm_repeats=1)))
    results = {arch.title: run_architecture(arch, test, pool_x, holdout[0], c) for arch, test, c in archs}
    tables = {"At a glance (test accuracy %, mean ± std over pairs)": glance(cfg, results)}
    for arch, _, _ in archs:
        res = results[arch.title]
        tables[f"{arch.title} (trained in {arch.train_s:.0f} s)"] = kit.rows_table(res["rows"], cases="pair")
        if res["diag"]:
            tables[f"{arch.title}: alignment quality (matched-neuron correlation, first pair, held-out images)"] = diag_table(res["diag"])
    if args.ablation:
        tables[f"Ablation: weight supports on {cfg.resnet_name}, pair {cfg.resnet_pairs[0]}"] = resnet_ablation(
            archs[1][0], pool_x, holdout, cfg)
    settings = {**dataclasses.asdict(cfg), "resnet_name": cfg.resnet_name, "resnet_widths": cfg.resnet_widths,
                "pool": n_pool, "ablation": args.ablation}
    return kit.write_report(
        kit.output_dir(args.out, args.quick, "real_architectures"), "real_architectures", title=f"Fusion quality on real data: MLPNet and {cfg.resnet_name}",
        settings=settings, tables=tables,
        data={t: {"rows": [dataclasses.asdict(r) for r in res["rows"]], "diag": res["diag"], "notes": res["notes"]}
              for t, res in results.items()},
        script="real_architectures.py", argv=argv, runtime_s=time.perf_counter() - start,
    )


if __name__ == "__main__":
    main()
