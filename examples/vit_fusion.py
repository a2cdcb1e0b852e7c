"""Fusing Vision Transformers: Fashion-MNIST ViTs from different seeds, one-shot and fine-tuned.

Transformer fusion's setting (Imfeld et al., ICLR 2024) on a small scale: ViTs
(``jfusion.models.ViT``: patch embedding, learned positions, pre-LN blocks with stock Flax
attention, a mean-token classifier) trained from different seeds, fused in disjoint pairs.
Each attention layer is a structured group (``jfusion.Heads``) and the residual stream one
group ``r`` (``vit_spec``). The rows compare the parents, their logit ensemble, vanilla
averaging and OT fusion by weights and by activations (``ByActivations.from_module(model, points=spec)`` on
``activation_images`` training images), each with the head order solved (``heads="matched"``,
jfusion's default) and with head ``h`` matched to head ``h`` (``heads="in_order"``, what
Transformer fusion does), plus two options: one plan over all of a layer's ``H * hd`` dims
(``heads="flat"``, a heuristic that may split heads) and the residual stream left unaligned
(``identity_groups=("r",)``). Every fused model is scored one-shot and after the same short
fine-tuning (``finetune_steps`` Adam steps on the same batches, vanilla averaging and a parent
too, as controls).

The loss barrier (``jfusion.loss_barrier``: 25 lambdas, the maximum minus the endpoints'
mean) runs along the segment from model 1 to model 2 aligned onto it by each method -- the
method's fusion with model weights (0, 1); for vanilla averaging that is model 2 itself, the
naive barrier -- on ``barrier_images`` test images. A planted check fuses model 1 with a
randomly permuted copy of itself (heads, dims inside heads, stream, MLP units): an alignment
that recovers the permutation gives model 1 back.

    python examples/vit_fusion.py                        # the recorded run (~15 min on 2 CPU cores)
    python examples/vit_fusion.py --quick --out /tmp/q   # smoke test, tiny ViTs, seconds

Writes ``vit_fusion_numbers.{md,json}``, ``vit_fusion.png`` and ``vit_fusion_barrier.png`` to
``--out``; the reading is ``examples/results/vit_fusion.md``, written by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import jfusion
import kit
from jfusion.models import ViT


@dataclasses.dataclass(frozen=True)
class Config:
    data: str = "fashion_mnist"
    patch: int = 7
    dim: int = 64
    heads: int = 4
    blocks: int = 2
    mlp: int = 128
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4, 5)  # disjoint pairs (0, 1), (2, 3), (4, 5)
    epochs: int = 3
    batch_size: int = 128
    learning_rate: float = 1e-3
    train_subsample: int | None = None
    test_subsample: int | None = None
    activation_images: int = 200
    finetune_steps: int = 200
    finetune_lr: float = 5e-4
    barrier_images: int = 1000
    methods: tuple[str, ...] | None = None  # a subset of the rows of methods(); None: all


def quick() -> Config:
    """Tiny ViTs, one pair, a few steps, two methods (each fusion program costs seconds of compilation)."""
    return Config(
        data=kit.quick_dataset(), dim=16, heads=2, blocks=1, mlp=32, seeds=(0, 1), epochs=2, batch_size=64,
        train_subsample=2000, test_subsample=500, activation_images=64, finetune_steps=4, finetune_lr=1e-3, barrier_images=200,
        methods=("vanilla average", "OT, activations, heads matched"),
    )


Fusion = Any  # (pair, inputs, model_weights or None) -> variables

FINETUNED = ("vanilla average", "OT, weights, heads matched", "OT, weights, heads in order",
             "OT, activations, heads matched", "OT, activations, heads in order", "OT, activations, stream kept (r identity)")
BARRIERS = FINETUNED[:-1] + ("OT, activations, heads flat",)


def alignments(model: ViT) -> dict[str, dict[str, Any]]:
    """name -> the keyword arguments of ``jfusion.fuse`` / ``jfusion.align`` for each OT row."""
    activations = jfusion.ByActivations.from_module(model, points=model.spec())
    return {
        "OT, weights, heads matched": dict(),
        "OT, weights, heads in order": dict(heads="in_order"),
        "OT, weights, heads flat": dict(heads="flat"),
        "OT, weights, stream kept (r identity)": dict(identity_groups=("r",)),
        "OT, activations, heads matched": dict(alignment=activations),
        "OT, activations, heads in order": dict(alignment=activations, heads="in_order"),
        "OT, activations, heads flat": dict(alignment=activations, heads="flat"),
        "OT, activations, stream kept (r identity)": dict(alignment=activations, identity_groups=("r",)),
    }


def methods(cfg: Config, model: ViT) -> dict[str, Fusion]:
    """name -> ``fusion(pair, inputs, model_weights) -> variables`` (None: uniform weights)."""
    spec = model.spec()
    out: dict[str, Fusion] = {"vanilla average": lambda pair, inputs, w: jfusion.vanilla_average(pair, model_weights=w).params}
    for name, kwargs in alignments(model).items():
        out[name] = lambda pair, inputs, w, kw=kwargs: jfusion.fuse(pair, spec, inputs=inputs, model_weights=w, **kw).params
    return out if cfg.methods is None else {name: out[name] for name in cfg.methods}


def planted(model: ViT, fusions: dict[str, Fusion], case: kit.Case, apply: Any) -> dict[str, float]:
    """Per method, the largest logit change when model 1 is fused (uniform weights) with a permuted copy of itself."""
    parent, spec, key = case.models[0], model.spec(), 0
    shuffled, perms = jfusion.permute(parent, spec, jax.random.key(key))
    while any((np.asarray(perms[name]) == np.arange(model.heads)).all() for name, _ in spec.heads):  # every head order moved
        key += 1
        shuffled, perms = jfusion.permute(parent, spec, jax.random.key(key))
    pair, x, uniform = [parent, shuffled], case.inputs, jnp.full((2,), 0.5)
    return {name: float(jnp.max(jnp.abs(apply(f(pair, x, uniform), x) - apply(parent, x)))) for name, f in fusions.items()}


def diagnostics(cfg: Config, model: ViT, case: kit.Case, images: jax.Array) -> kit.Table:
    """Per OT row with solved heads and group: how sharp model 2's plan is, how far from the identity, and the
    plan-weighted correlation of matched neurons against the identity's (``jfusion.plan_diagnostics``)."""
    spec, body = model.spec(), []
    activations = jfusion.ByActivations.from_module(model, points=spec)
    for name, kwargs in alignments(model).items():
        if (cfg.methods is not None and name not in cfg.methods) or "heads matched" not in name:
            continue
        aligned = jfusion.align(case.models, spec, inputs=case.inputs, **kwargs)
        heads = {name for name, _ in spec.heads}  # a head plan pairs heads, not neurons: its members are scored
        plans = {g: result for g, result in aligned.plans.items() if g not in heads}
        report = jfusion.plan_diagnostics(plans, case.models, activations=activations, inputs=images)
        for group, d in report.items():
            body.append([name, group, f"{float(d.sharpness[1]):.3f}", f"{float(d.off_identity[1]):.3f}",
                         f"{float(d.matched_correlation[1]):.3f}", f"{float(d.identity_correlation[1]):.3f}"])
    return kit.Table(["plans", "group", "sharpness", "mass off identity", "matched corr.", "identity corr."], body)


def plot(cfg: Config, rows: dict[str, list[float]], finetuned: dict[str, list[float]], curves: dict[str, list]) -> Any:
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5))
    for name, results in curves.items():
        values = np.stack([np.asarray(r.values["loss"]) for r in results])
        lambdas = np.asarray(results[0].lambdas)
        left.plot(lambdas, values.mean(0), marker=".", label=name)
    left.set_xlabel("lambda (0: model 1, 1: model 2 aligned onto it)")
    left.set_ylabel(f"test loss ({cfg.barrier_images} images, mean over pairs)")
    left.set_title("Interpolation from model 1 to model 2 aligned onto it")
    left.legend(fontsize=7)
    names = list(rows)
    y = np.arange(len(names))
    one = [100 * np.mean(rows[n]) for n in names]
    right.barh(y - 0.2, one, height=0.4, label="one-shot")
    tuned = [100 * np.mean(finetuned[n]) if n in finetuned else np.nan for n in names]
    right.barh(y + 0.2, tuned, height=0.4, label=f"+ {cfg.finetune_steps} fine-tuning steps")
    right.set_yticks(y, names, fontsize=8)
    right.invert_yaxis()
    right.set_xlabel("test accuracy % (mean over pairs)")
    right.set_title(f"ViT d={cfg.dim}, {cfg.heads} heads, {cfg.blocks} blocks, {len(cfg.seeds) // 2} pairs")
    right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    fig.tight_layout()
    return fig


def barrier_table(curves: dict[str, list]) -> kit.Table:
    body = []
    for name, results in curves.items():
        loss = [float(r.barriers["loss"]) for r in results]
        accuracy = [float(r.barriers["accuracy"]) for r in results]
        end = [float(r.values["loss"][-1]) for r in results]
        body.append([name, kit.mean_std(loss, scale=1.0, digits=3), kit.mean_std(accuracy), kit.mean_std(end, scale=1.0, digits=3)])
    return kit.Table(["model 2 aligned onto model 1 by", "loss barrier (mean ± std over pairs)", "accuracy barrier, points",
                      "loss at lambda = 1 (model 2 aligned)"], body)


def accuracy_table(rows: list[kit.Row], finetuned: dict[str, list[float]], pairs: int) -> kit.Table:
    body = []
    for r in rows:
        tuned = finetuned.get(r.name)
        body.append([r.name, kit.mean_std(r.accuracy), " / ".join(f"{100 * a:.2f}" for a in r.accuracy),
                     "–" if tuned is None else kit.mean_std(tuned), "–" if tuned is None else " / ".join(f"{100 * a:.2f}" for a in tuned),
                     "–" if r.first_s is None else f"{r.first_s:.2f}"])
    header = ["model / method", f"one-shot test acc. % (mean ± std over {pairs} pairs)", "per pair",
              "after fine-tuning", "per pair", "fuse: first call s"]
    return kit.Table(header, body)


def main(argv: Sequence[str] | None = None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny ViTs, a few steps")
    parser.add_argument("--out", default=None, help="output directory (default examples/results; a temp dir with --quick)")
    args = parser.parse_args(argv)
    cfg = quick() if args.quick else Config()
    start = time.perf_counter()
    data = kit.load_data(cfg.data, cfg.train_subsample, cfg.test_subsample)
    side = data.xtr.shape[1]
    model = ViT(patch=cfg.patch if side % cfg.patch == 0 else side // 2, dim=cfg.dim, heads=cfg.heads, blocks=cfg.blocks, mlp=cfg.mlp)
    stacked = kit.train_set(model, (data.xtr, data.ytr), cfg.seeds, epochs=cfg.epochs, batch_size=cfg.batch_size,
                            optimizer=optax.adam(cfg.learning_rate))
    train_s = time.perf_counter() - start
    print(f"trained {len(cfg.seeds)} ViTs in {train_s:.0f} s", flush=True)
    apply = jax.jit(model.apply)
    score = lambda variables: kit.accuracy(kit.predictions(apply, variables, data.xte), data.yte)
    pairs = len(cfg.seeds) // 2
    cases = [kit.Case([kit.pick(stacked, 2 * p), kit.pick(stacked, 2 * p + 1)], kit.activation_batch(data, cfg.activation_images, p))
             for p in range(pairs)]
    parents = [score(kit.pick(stacked, k)) for k in range(len(cfg.seeds))]
    rows = [kit.Row("parents (mean of the pair's two)", [float(np.mean(parents[2 * p: 2 * p + 2])) for p in range(pairs)])]
    rows.append(kit.Row("ensemble (logit average)", [kit.ensemble_accuracy(model.apply, c.models, data.xte, data.yte) for c in cases]))
    rows.append(kit.Row("parent 1 of the pair (control)", [parents[2 * p] for p in range(pairs)]))
    # One program per method, for the rows (uniform weights), the barriers (0, 1) and the planted check.
    fusions = {name: jax.jit(f) for name, f in methods(cfg, model).items()}
    uniform = jnp.full((2,), 0.5)
    fused: dict[str, list] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jfusion.ResidualStreamWarning)  # weight alignment of the stream r: measured, not advised
        for name, fusion in fusions.items():
            tic = time.perf_counter()
            outs = [jax.block_until_ready(fusion(c.models, c.inputs, uniform)) for c in cases[:1]]
            first_s = time.perf_counter() - tic
            outs += [fusion(c.models, c.inputs, uniform) for c in cases[1:]]
            rows.append(kit.Row(name, [score(v) for v in outs], first_s=first_s))
            if name in FINETUNED:
                fused[name] = outs
        print(f"one-shot rows done at {time.perf_counter() - start:.0f} s", flush=True)
        curves = kit.barrier_curves(model.apply, {n: f for n, f in fusions.items() if n in BARRIERS}, cases,
                                    data.xte[: cfg.barrier_images], data.yte[: cfg.barrier_images])
        print(f"barriers done at {time.perf_counter() - start:.0f} s", flush=True)
        copy = planted(model, fusions, cases[0], apply)
        held_out = kit.activation_batch(data, cfg.activation_images, seed=len(cases))  # not any pair's alignment batch
        diagnosis = diagnostics(cfg, model, cases[0], held_out)

    # Fine-tuning: every fused model and the first parent of each pair, one budget, one vmapped run.
    tuned_inputs = [("parent 1 of the pair (control)", c.models[0]) for c in cases]
    tuned_inputs += [(name, v) for name, vs in fused.items() for v in vs]
    tuned = kit.finetune_set(model, [v for _, v in tuned_inputs], (data.xtr, data.ytr), steps=cfg.finetune_steps,
                             batch_size=cfg.batch_size, optimizer=optax.adam(cfg.finetune_lr))
    finetuned: dict[str, list[float]] = {}
    for (name, _), variables in zip(tuned_inputs, tuned):
        finetuned.setdefault(name, []).append(score(variables))
    print(f"fine-tuning done at {time.perf_counter() - start:.0f} s", flush=True)

    out = kit.output_dir(args.out, args.quick, "vit_fusion")
    out.mkdir(parents=True, exist_ok=True)
    jfusion.plot_interpolation({name: results[0] for name, results in curves.items()}, out / "vit_fusion_barrier.png",
                               title="ViT: model 1 to model 2 aligned onto it (first pair)", overwrite=True)
    tables = {
        f"ViT (patch {model.patch}, d={cfg.dim}, {cfg.heads} heads, {cfg.blocks} blocks, MLP {cfg.mlp}; {len(cfg.seeds)} models trained in {train_s:.0f} s), "
        f"test accuracy % on {len(data.yte)} images; fine-tuning: {cfg.finetune_steps} Adam steps, lr {cfg.finetune_lr}": accuracy_table(rows, finetuned, pairs),
        f"Loss barrier on {cfg.barrier_images} test images, 25 lambdas": barrier_table(curves),
        f"Plan diagnostics, first pair, model 2's plans, {cfg.activation_images} other training images": diagnosis,
        "Planted check: model 1 fused with a permuted copy of itself (every head order moved)": kit.Table(
            ["method", "largest change of model 1's logits on the activation batch"], [[name, f"{v:.2e}"] for name, v in copy.items()]),
    }
    data_out = {
        "parents": parents,
        "rows": [dataclasses.asdict(r) for r in rows],
        "finetuned": finetuned,
        "planted": copy,
        "diagnostics": dict(zip(("header", "rows"), (diagnosis.header, diagnosis.rows))),
        "barriers": {name: [{"lambdas": np.asarray(r.lambdas).tolist(), "values": {m: np.asarray(v).tolist() for m, v in r.values.items()},
                             "barriers": {m: float(v) for m, v in r.barriers.items()}} for r in results]
                     for name, results in curves.items()},
        "train_s": train_s,
    }
    one_shot = {r.name: r.accuracy for r in rows}
    return kit.write_report(
        out, "vit_fusion", title="Fusing Vision Transformers on Fashion-MNIST",
        settings=dataclasses.asdict(cfg), tables=tables, data=data_out,
        figures={"vit_fusion.png": plot(cfg, one_shot, finetuned, curves)}, script="vit_fusion.py", argv=argv,
        runtime_s=time.perf_counter() - start,
    )


if __name__ == "__main__":
    main()
