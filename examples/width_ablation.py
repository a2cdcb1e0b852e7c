"""Does fusion improve with width? ResNet20 at widths 1, 2, 4 and a VGG without BatchNorm on Fashion-MNIST.

Permutation alignment is known to work better on wider networks (Ainsworth et al. 2023, Git
Re-Basin: near-zero barriers for ResNets only from width ~4-8; Jordan et al. 2023, REPAIR:
ResNet20x4 midpoint 11.7% -> 90.3% on CIFAR-10 after REPAIR, VGG11 without BN 67.3% -> 84.9%).
Here two networks per width are trained from different seeds (initialisation and data order) with
the literature's recipe -- SGD, momentum 0.9, weight decay 5e-4, linear warm-up and cosine decay
of the learning rate -- and fused, for every width:

- parents (train and test accuracy), their prediction ensemble, and how far the trained weights
  moved: the cosine between a model's parameters and its initialisation;
- naive averaging, OT fusion by weights, weight matching (``jfusion.WeightMatching``) and OT fusion
  by activations (``jfusion.ByActivations``), each as it is, after BatchNorm recalibration
  (``jfusion.recalibrate_batch_stats``, BN nets only) and after REPAIR (``jfusion.repair``);
- the loss barrier (``jfusion.loss_barrier``: 25 lambdas, max loss minus the endpoints' mean, on
  test images) from parent A to parent B aligned onto it, for naive / weight matching /
  activations. For BN nets every point of the segment has its BatchNorm statistics recomputed
  (as Git Re-Basin and REPAIR do; otherwise every midpoint is at chance). REPAIR is applied at the
  midpoint only (``repaired_mid``: the repaired midpoint's loss minus the endpoints' mean);
- ``jfusion.plan_diagnostics`` of every plan on held-out training images (never the test set);
- a self-check: parent A against a randomly permuted copy of itself must be matched back exactly.

``--digits`` runs the same protocol on small residual CNNs with BatchNorm (``jfusion.models.ResNet``,
two stages of one block, 32/64 and 64/128 channels) on scikit-learn's 8x8 digits.

Fashion-MNIST images are average-pooled 2x2 to 14x14: on 2 shared CPU cores a ResNet20x4 step
on 28x28 images takes ~8x longer than the schedule below allows. Nothing is tuned on the test
set: the schedules were fixed from the measured step times, before any fusion was run.

    python examples/width_ablation.py --arch resnet --widths 1 2 --cache /tmp/wa   # ~15 min on 2 shared CPU cores
    python examples/width_ablation.py --arch resnet --widths 4 --cache /tmp/wa     # ~19 min
    python examples/width_ablation.py --arch vgg --digits --cache /tmp/wa          # ~10 min
    python examples/width_ablation.py --arch resnet vgg --widths 1 2 4 --digits --cache /tmp/wa  # report from the cache
    python examples/width_ablation.py --quick --out /tmp/q                         # smoke test, seconds

Each network's parents and results are kept in ``--cache`` (keyed by its settings), so a run
computes only what is missing and reports every network it is asked for. Writes
``width_ablation_numbers.{md,json}`` and the PNGs to ``--out``; the reading is
``examples/results/width_ablation.md``, written by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import jfusion
import kit
from jfusion.core.tree import flatten
from jfusion.models import VGG, ResNet
from jfusion.workflow.train import fit_models, init_models

NAIVE = "naive (vanilla average)"
WEIGHTS = "OT fusion, weights"
MATCHING = "weight matching"
ACTIVATIONS = "OT fusion, activations"
BARRIER_METHODS = (NAIVE, MATCHING, ACTIVATIONS)


@dataclasses.dataclass(frozen=True)
class Net:
    """One network of the ablation and its training schedule (fixed from step times, not tuned)."""

    label: str
    arch: str  # "resnet" or "vgg"
    widths: tuple[Any, ...]  # ResNet: stage widths; VGG: its features (conv widths and "M" pools)
    data: str  # "fashion_mnist" or "digits"
    epochs: int
    batch: int
    peak_lr: float
    stages: tuple[int, ...] = (3, 3, 3)

    @property
    def bn(self) -> bool:
        return self.arch == "resnet"

    def module(self) -> Any:
        if self.arch == "resnet":
            return ResNet(self.stages, self.widths)
        return VGG(self.widths, batch_norm=False)


def resnet20(width: int, epochs: int, batch: int = 64) -> Net:
    return Net(f"ResNet20x{width}", "resnet", tuple(c * width for c in (16, 32, 64)), "fashion_mnist", epochs, batch, 0.1)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a run shares (fixed in advance; nothing is tuned)."""

    seeds: tuple[int, int] = (0, 1)
    train_size: int | None = 6400  # class-balanced Fashion-MNIST training images (None: all)
    holdout: int = 500  # further training images, never trained on: plan diagnostics
    downsample: int = 2  # average-pool Fashion-MNIST 28x28 -> 14x14
    test: int = 2000  # test images for accuracies (a fixed class-balanced subset)
    train_eval: int = 2000  # training images for the parents' training accuracy
    barrier_test: int = 500  # test images along each interpolation path
    num_points: int = 25
    act_inputs: int = 256  # training images: activation alignment and REPAIR's statistics
    recal_batches: int = 2  # BN recalibration: recal_batches x recal_batch training images
    recal_batch: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup: float = 0.2  # fraction of the steps with a linear warm-up, then cosine decay to 0


# One schedule for every width (3 passes over 6400 images, 300 steps of 64), fixed from the measured
# step times (~0.26 / 0.5 / 1.1 s per step of 64 at widths 1 / 2 / 4 on 14x14 images, 2 busy cores; 0.2 / 0.3 / 1.25 s
# in the recorded run).
RESNETS = {w: resnet20(w, 3) for w in (1, 2, 4)}
# Four convs: without BatchNorm, under flax's default (LeCun normal) init, an 8-conv VGG11 did not leave
# chance in a first epoch (training loss 2.295 at peak lr 0.02); this one reached 71% training accuracy.
VGG_NET = Net("VGG-4 (no BN)", "vgg", (64, "M", 128, "M", 256, 256, "M"), "fashion_mnist", 4, 64, 0.05)
DIGITS_NETS = [Net(f"digits ResNet (2 stages, {a}/{b})", "resnet", (a, b), "digits", 30, 32, 0.05, stages=(1, 1))
               for a, b in ((32, 64), (64, 128))]


def quick() -> tuple[Settings, list[Net]]:
    cfg = Settings(train_size=None, holdout=64, test=256, train_eval=256, barrier_test=64, act_inputs=64,
                   recal_batches=1, recal_batch=64)
    return cfg, [Net("quick VGG", "vgg", (8, "M", 16, "M"), "digits", 2, 32, 0.05)]


# --- data and training -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Split:
    train: tuple[np.ndarray, np.ndarray]
    holdout: np.ndarray
    test: tuple[np.ndarray, np.ndarray]


def split(name: str, cfg: Settings) -> Split:
    """Training subset, held-out training images, test subset (images pooled for Fashion-MNIST)."""
    data = kit.load_data(name)
    xtr, xte = data.xtr, data.xte
    if name == "fashion_mnist" and cfg.downsample > 1:
        xtr, xte = pool(xtr, cfg.downsample), pool(xte, cfg.downsample)
    order = np.random.default_rng(0).permutation(len(data.ytr))
    n = len(order) - cfg.holdout if cfg.train_size is None else cfg.train_size
    train, held = np.sort(order[:n]), order[n : n + cfg.holdout]
    test = np.sort(np.random.default_rng(1).permutation(len(data.yte))[: cfg.test])
    return Split((xtr[train], data.ytr[train]), xtr[held], (xte[test], data.yte[test]))


def pool(images: np.ndarray, f: int) -> np.ndarray:
    n, h, w, c = images.shape
    return images.reshape(n, h // f, f, w // f, f, c).mean((2, 4))


def optimizer(net: Net, cfg: Settings, steps: int) -> optax.GradientTransformation:
    """SGD with momentum and (coupled, PyTorch-style) weight decay; warm-up then cosine decay."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, net.peak_lr, max(1, int(cfg.warmup * steps)), steps, 0.0)
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay), optax.sgd(schedule, momentum=cfg.momentum))


def train_parents(net: Net, cfg: Settings, data: Split) -> dict[str, Any]:
    """Each seed's model trained on its own call (vmapped convolutions are slow on XLA:CPU)."""
    model, (x, y) = net.module(), data.train
    steps = net.epochs * max(1, len(y) // net.batch)
    sgd = optimizer(net, cfg, steps)  # one object for both seeds: one compiled training step
    inits, trained, seconds = [], [], []
    for seed in cfg.seeds:
        start = time.perf_counter()
        init = init_models(model, [seed], x[:1])
        out = fit_models(model, init, (x, y), [seed], epochs=net.epochs, batch_size=net.batch,
                         optimizer=sgd)
        trained.append(kit.pick(jax.block_until_ready(out), 0))
        inits.append(kit.pick(init, 0))
        seconds.append(time.perf_counter() - start)
        print(f"[{net.label}] seed {seed} trained in {seconds[-1]:.0f} s ({steps} steps)", flush=True)
    return {"init": inits, "trained": trained, "seconds": seconds, "steps": steps}


def cosine_to_init(trained: Any, init: Any) -> dict[str, float]:
    """Cosine between the trained and initial parameters: all of them, and the range over kernels."""
    a, b = flatten(trained["params"])[0], flatten(init["params"])[0]
    cos = lambda u, v: float(jnp.vdot(u, v) / (jnp.linalg.norm(u) * jnp.linalg.norm(v)))
    kernels = [cos(a[p], b[p]) for p in a if p.endswith("kernel")]
    everything = cos(jnp.concatenate([a[p].ravel() for p in a]), jnp.concatenate([b[p].ravel() for p in a]))
    return {"all": everything, "kernel_min": min(kernels), "kernel_max": max(kernels)}


# --- one network's experiment --------------------------------------------------------------------


def run_net(net: Net, cfg: Settings, data: Split, parents: dict[str, Any]) -> dict[str, Any]:
    model, spec = net.module(), net.module().spec()
    kw = {"train": False} if net.bn else {}
    apply = jax.jit(lambda v, x: model.apply(v, x, **kw))
    rng = np.random.default_rng(1234)
    xtr, ytr = data.train
    act_x = jnp.asarray(xtr[rng.choice(len(ytr), min(cfg.act_inputs, len(ytr)), replace=False)])
    recal_x = kit.recalibration_batches(xtr, cfg.recal_batches, cfg.recal_batch, rng)
    train_apply = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])
    recal = jax.jit(lambda v: jfusion.recalibrate_batch_stats(train_apply, v, recal_x))
    acts = jfusion.ByActivations.from_module(model, **kw)
    test_x, test_y = data.test
    score = lambda v: kit.accuracy(kit.predictions(apply, v, test_x), test_y)
    a, b = parents["trained"]
    pair = kit.stack([a, b])

    rows = [kit.Row(f"parent seed {s}", [score(p)]) for s, p in zip(cfg.seeds, (a, b))]
    train_acc = [kit.accuracy(kit.predictions(apply, p, xtr[: cfg.train_eval]), ytr[: cfg.train_eval]) for p in (a, b)]
    if net.bn:
        rows += [kit.Row(f"parent seed {s} + BN recal", [score(recal(p))]) for s, p in zip(cfg.seeds, (a, b))]
    rows.append(kit.Row("ensemble (logit average)", [kit.ensemble_accuracy(apply, [a, b], test_x, test_y)]))

    aligners: dict[str, Callable[[Any], Any]] = {
        NAIVE: lambda m: jfusion.Alignment(m, {}),
        WEIGHTS: lambda m: jfusion.align(m, spec),
        MATCHING: lambda m: jfusion.align(m, spec, alignment=jfusion.WeightMatching()),
        ACTIVATIONS: lambda m: jfusion.align(m, spec, alignment=acts, inputs=act_x),
    }
    repair = jax.jit(lambda fused, aligned: jfusion.repair(fused, aligned, spec, act_x, model=model, apply_kwargs=kw).params)
    metrics = kit.classification_metrics(lambda v, x: model.apply(v, x, **kw), test_x[: cfg.barrier_test], test_y[: cfg.barrier_test])

    path_metrics = (lambda v: metrics(jfusion.recalibrate_batch_stats(train_apply, v, recal_x))) if net.bn else metrics
    curve = jax.jit(lambda u, v: jfusion.loss_barrier(path_metrics, u, v, num_points=cfg.num_points))
    at = jax.jit(metrics)
    diagnose = jax.jit(lambda alignment, models, x: jfusion.plan_diagnostics(alignment, models, activations=acts, inputs=x))
    barriers, diagnostics, times = {}, {}, {}
    for name, aligner in aligners.items():
        start = time.perf_counter()
        alignment = jax.block_until_ready(jax.jit(aligner)(pair))
        times[name] = time.perf_counter() - start  # compile + run
        fused = jax.tree.map(lambda x: jnp.mean(x, 0), alignment.aligned)
        repaired = repair(fused, alignment.aligned)
        rows.append(kit.Row(name, [score(fused)], first_s=times[name]))
        if net.bn:
            rows.append(kit.Row(name + " + BN recal", [score(recal(fused))]))
        rows.append(kit.Row(name + " + REPAIR", [score(repaired)]))
        if alignment.plans:
            diagnostics[name] = summarise(diagnose(alignment, pair, jnp.asarray(data.holdout)))
        if name in BARRIER_METHODS:
            result = jax.device_get(curve(a, kit.pick(alignment.aligned, 1)))
            ends = {m: (v[0] + v[-1]) / 2 for m, v in result.values.items()}
            mid = jax.device_get(at(repaired))
            barriers[name] = {"curve": result, "repaired_mid": {"loss": float(mid["loss"] - ends["loss"]),
                                                                 "accuracy": float(ends["accuracy"] - mid["accuracy"])}}
        print(f"[{net.label}] {name}: " + ", ".join(f"{r.name} {100 * r.accuracy[0]:.2f}" for r in rows if r.name.startswith(name))
              + (f"; barrier {float(barriers[name]['curve'].barrier):.3f}" if name in barriers else ""), flush=True)

    permuted, _ = jfusion.permute(a, spec, jax.random.key(7))
    selfcheck = jax.jit(aligners[MATCHING])(kit.stack([a, permuted]))
    back = kit.pick(selfcheck.aligned, 1)
    check = {"max_abs_diff": max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(back), jax.tree.leaves(a))),
             "accuracy": score(jax.tree.map(lambda x: jnp.mean(x, 0), selfcheck.aligned))}
    return {"rows": rows, "train_accuracy": train_acc, "barriers": barriers, "diagnostics": diagnostics,
            "cosine_to_init": [cosine_to_init(t, i) for t, i in zip(parents["trained"], parents["init"])],
            "train_s": parents["seconds"], "steps": parents["steps"], "selfcheck": check}


def summarise(report: dict[str, jfusion.PlanDiagnostics]) -> dict[str, float]:
    """Model B's plans, averaged over groups."""
    field = lambda f: [float(np.asarray(getattr(d, f))[1]) for d in report.values()]
    return {"sharpness": float(np.mean(field("sharpness"))), "off_identity": float(np.mean(field("off_identity"))),
            "matched_correlation": float(np.mean(field("matched_correlation"))),
            "identity_correlation": float(np.mean(field("identity_correlation"))),
            "groups_no_better_than_identity": int(sum(field("no_better_than_identity"))), "groups": len(report)}


def cached(directory: Path | None, tag: str, key: Any, compute: Callable[[], Any]) -> Any:
    """``compute()``, or its result saved in ``directory`` by an earlier run with this key."""
    name = f"width_ablation_{tag}_{hashlib.sha1(repr(key).encode()).hexdigest()[:12]}.pkl"
    return kit.cached(None if directory is None else directory / name, compute)


# --- numbers out ---------------------------------------------------------------------------------


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def accuracy_table(results: dict[str, dict[str, Any]]) -> kit.Table:
    """Test accuracy % of every row (rows) per network (columns)."""
    by_rows = sorted(results.values(), key=lambda res: -len(res["rows"]))  # a BN net's rows first: they include "+ BN recal"
    names = list(dict.fromkeys(r.name for res in by_rows for r in res["rows"]))
    body = []
    for name in names:
        cells = [next((pct(r.accuracy[0]) for r in res["rows"] if r.name == name), "–") for res in results.values()]
        body.append([name, *cells])
    body.append(["parents' training accuracy", *(" / ".join(pct(a) for a in res["train_accuracy"]) for res in results.values())])
    body.append(["cosine(trained, init), all params", *(" / ".join(f"{c['all']:.3f}" for c in res["cosine_to_init"]) for res in results.values())])
    body.append(["cosine(trained, init), kernels min-max",
                 *(" / ".join(f"{c['kernel_min']:.2f}-{c['kernel_max']:.2f}" for c in res["cosine_to_init"]) for res in results.values())])
    return kit.Table(["model / method (test acc. %)", *results], body)


def barrier_table(results: dict[str, dict[str, Any]]) -> kit.Table:
    body = []
    for label, res in results.items():
        for name in BARRIER_METHODS:
            b, c = res["barriers"][name], res["barriers"][name]["curve"]
            loss, acc = np.asarray(c.values["loss"]), np.asarray(c.values["accuracy"])
            mid = int(np.argmin(np.abs(np.asarray(c.lambdas) - 0.5)))
            worst = float(c.lambdas[int(np.argmax(loss))])
            body.append([label, name, f"{float(c.barriers['loss']):.3f} (lambda {worst:.2f})", f"{100 * float(c.barriers['accuracy']):.2f}",
                         f"{loss[mid] - (loss[0] + loss[-1]) / 2:.3f}", f"{100 * ((acc[0] + acc[-1]) / 2 - acc[mid]):.2f}",
                         f"{b['repaired_mid']['loss']:.3f}", f"{100 * b['repaired_mid']['accuracy']:.2f}"])
    return kit.Table(["network", "B aligned onto A by", "loss barrier (where)", "accuracy barrier, points",
                      "midpoint: loss - ends' mean", "midpoint: ends' mean - acc., points",
                      "REPAIRed midpoint: loss - ends' mean", "REPAIRed midpoint: ends' mean - acc., points"], body)


def diagnostics_table(results: dict[str, dict[str, Any]]) -> kit.Table:
    body = []
    for label, res in results.items():
        for name in (WEIGHTS, MATCHING, ACTIVATIONS):  # cached results come back with their keys sorted
            d = res["diagnostics"][name]
            body.append([label, name, f"{d['sharpness']:.3f}", f"{d['off_identity']:.3f}", f"{d['matched_correlation']:.3f}",
                         f"{d['identity_correlation']:.3f}", f"{d['groups_no_better_than_identity']} / {d['groups']}"])
    return kit.Table(["network", "plans", "sharpness", "mass off identity", "matched corr.", "identity corr.",
                      "groups no better than identity"], body)


def run_table(nets: dict[str, Net], results: dict[str, dict[str, Any]]) -> kit.Table:
    body = [[label, f"{net.epochs} x {res['steps'] // net.epochs} steps of {net.batch}", f"{net.peak_lr}",
             " / ".join(f"{s:.0f}" for s in res["train_s"]), f"{res['selfcheck']['max_abs_diff']:.1e}",
             pct(res["selfcheck"]["accuracy"])] for label, net in nets.items() for res in [results[label]]]
    return kit.Table(["network", "schedule (epochs x steps of batch)", "peak lr", "training s per parent",
                      "self-check: permuted copy matched back, max |diff|", "self-check: fused acc. %"], body)


def width_plots(nets: dict[str, Net], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Barrier vs width and accuracy vs width for the Fashion-MNIST ResNets."""
    labels = [label for label, n in nets.items() if n.arch == "resnet" and n.data == "fashion_mnist"]
    if not labels:
        return {}
    widths = [nets[label].widths[0] // 16 for label in labels]
    fig, (ax_b, ax_a) = plt.subplots(1, 2, figsize=(11, 4.2))
    color = {name: f"C{i}" for i, name in enumerate((NAIVE, WEIGHTS, MATCHING, ACTIVATIONS))}
    for name in BARRIER_METHODS:
        ax_b.plot(widths, [float(results[lb]["barriers"][name]["curve"].barrier) for lb in labels], marker="o", color=color[name],
                  label=name + " (BN recal at every lambda)")
        ax_b.plot(widths, [results[lb]["barriers"][name]["repaired_mid"]["loss"] for lb in labels], marker="x", ls="--",
                  color=color[name], label=name + " (+ REPAIR, midpoint)")
    ax_b.set(xlabel="ResNet20 width multiplier", ylabel="test loss barrier", xscale="log", xticks=widths, xticklabels=widths)
    ax_b.minorticks_off()
    ax_b.legend(fontsize=7)
    acc = lambda lb, row: next(100 * r.accuracy[0] for r in results[lb]["rows"] if r.name == row)
    ax_a.plot(widths, [np.mean([acc(lb, f"parent seed {s} + BN recal") for s in (0, 1)]) for lb in labels], "k-o", label="mean parent (+ BN recal)")
    ax_a.plot(widths, [acc(lb, "ensemble (logit average)") for lb in labels], "k:o", label="ensemble")
    for name in (NAIVE, WEIGHTS, MATCHING, ACTIVATIONS):
        for suffix, style in ((" + BN recal", "-"), (" + REPAIR", "--")):
            ax_a.plot(widths, [acc(lb, name + suffix) for lb in labels], ls=style, marker=".", color=color[name], label=name + suffix)
    ax_a.set(xlabel="ResNet20 width multiplier", ylabel="test accuracy %", xscale="log", xticks=widths, xticklabels=widths)
    ax_a.minorticks_off()
    ax_a.legend(fontsize=6)
    fig.tight_layout()
    return {"width_ablation.png": fig}


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="*", default=[], choices=["resnet", "vgg"], help="Fashion-MNIST networks to run")
    parser.add_argument("--widths", nargs="*", type=int, default=[1, 2, 4], choices=sorted(RESNETS), help="ResNet20 widths")
    parser.add_argument("--digits", action="store_true", help="the small residual CNNs (two widths) on 8x8 digits")
    parser.add_argument("--quick", action="store_true", help="smoke test: one tiny VGG on digits")
    parser.add_argument("--cache", type=Path, default=None, help="directory keeping trained parents and results")
    parser.add_argument("--out", default=None, help="output directory (default examples/results; a temp dir with --quick)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.quick:
        cfg, chosen = quick()
    else:
        cfg = Settings()
        chosen = [RESNETS[w] for w in args.widths] if "resnet" in args.arch else []
        chosen += [VGG_NET] if "vgg" in args.arch else []
        chosen += DIGITS_NETS if args.digits else []
    if not chosen:
        parser.error("nothing to run: give --arch, --digits or --quick")
    nets, results, splits = {}, {}, {}
    for net in chosen:
        digits = net.data == "digits"
        net_cfg = dataclasses.replace(cfg, train_size=None, holdout=200, test=10**6, train_eval=10**6) if digits and not args.quick else cfg
        if net.data not in splits:
            splits[net.data] = split(net.data, net_cfg)
        data = splits[net.data]
        parents = cached(args.cache, f"parents_{net.label}", (net, net_cfg), lambda: train_parents(net, net_cfg, data))
        results[net.label] = cached(args.cache, f"results_{net.label}", (net, net_cfg, "results"),
                                    lambda: run_net(net, net_cfg, data, parents))
        nets[net.label] = net
    out = kit.output_dir(args.out, args.quick, "width_ablation")
    out.mkdir(parents=True, exist_ok=True)
    for label, res in results.items():
        slug = "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_")
        jfusion.plot_interpolation({name: res["barriers"][name]["curve"] for name in BARRIER_METHODS}, out / f"width_ablation_barrier_{slug}.png",
                                   title=f"{label}: parent A to parent B aligned onto it (test)", overwrite=True)
    tables = {
        "Runs": run_table(nets, results),
        "Test accuracy %": accuracy_table(results),
        "Loss barriers (test)": barrier_table(results),
        "Plan diagnostics (model B's plans, mean over groups, held-out training images)": diagnostics_table(results),
    }
    data_out = {label: {**{k: v for k, v in res.items() if k != "rows"}, "rows": [dataclasses.asdict(r) for r in res["rows"]],
                        "barriers": {n: {"lambdas": b["curve"].lambdas, "values": b["curve"].values, "barriers": b["curve"].barriers,
                                         "repaired_mid": b["repaired_mid"]} for n, b in res["barriers"].items()}}
                for label, res in results.items()}
    settings = {**dataclasses.asdict(cfg), "nets": {label: dataclasses.asdict(n) for label, n in nets.items()}}
    return kit.write_report(
        out, "width_ablation", title="Fusion across widths: ResNet20 x1/x2/x4 and VGG without BN on Fashion-MNIST",
        settings=settings, tables=tables, data=data_out, figures=width_plots(nets, results),
        script="width_ablation.py", argv=argv, runtime_s=time.perf_counter() - start,
    )


if __name__ == "__main__":
    main()
