"""Weight matching (Git Re-Basin) against OTFusion's forward pass on every model of the zoo.

For each model of ``jfusion.models.registry.MODELS``: a random network ``A`` and
``B = permute(A + noise)`` -- a permuted copy whose weights (the ``params`` collection) got
Gaussian noise of ``noise`` times each leaf's standard deviation -- or ``B`` an independent
initialisation (``noise`` "indep."), aligned onto ``A`` by

* ``forward``: ``jfusion.ByWeights()``, OTFusion's forward pass (incoming weights, one sweep);
* ``fwd+out x2``: ``jfusion.ByWeights(outgoing=True, sweeps=2)``;
* ``matching``: ``jfusion.WeightMatching()``, coordinate descent over all groups;

and, for scale, ``identity`` (vanilla averaging) and ``planted`` (the true permutation). Columns:
``objective`` is weight matching's, ``sum_L <W_L^A, W_L^B aligned>`` over the grouped leaves,
as a cosine: divided by ``||W^A|| ||W^B||`` over the same leaves; ``recovered`` the share of
neurons matched as planted; ``fused error`` the relative error ``||f(F) - f(A)|| / ||f(A)||``
of the logits of ``F = (A + B aligned) / 2`` (what ``jfusion.fuse`` returns) on 256 random
inputs, and ``agree`` the share of those inputs where ``F`` and ``A`` predict the same class
(neither for independent networks, which have no function in common); compile and warm
(median of 3) times of the jitted alignment; ``iterations`` the sweeps, or weight matching's
passes over the groups.

    python benchmarks/bench_weight_matching.py --quick   # narrow models, small inputs (~minutes on 2 cores)
    python benchmarks/bench_weight_matching.py           # the registry's default widths
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jfusion
from jfusion.core.tree import flatten, unflatten
from jfusion.models import ResNet, build_model

METHODS = {
    "forward": jfusion.ByWeights(),
    "fwd+out x2": jfusion.ByWeights(outgoing=True, sweeps=2),
    "matching": jfusion.WeightMatching(),
}


def zoo(quick: bool):
    """``{name: (module, input shape, apply kwargs)}`` for every registry model."""
    bn = {"train": False}
    if quick:
        return {
            "mlpnet": (build_model("mlpnet"), (784,), {}),
            "mlp": (build_model("mlp", features=(32, 32, 10)), (64,), {}),
            "cnn": (build_model("cnn", conv_features=(8, 16), dense_features=(32, 10), image_size=16), (16, 16, 1), {}),
            "vgg11": (build_model("vgg11", width=0.125), (16, 16, 3), bn),
            "vgg11_bn": (build_model("vgg11_bn", width=0.125), (16, 16, 3), bn),
            # ResNet18's topology at 1/8 of its widths (the registry's width is an integer multiplier).
            "resnet18/8": (ResNet((2, 2, 2, 2), (8, 16, 32, 64)), (16, 16, 3), bn),
            "resnet20": (build_model("resnet20"), (16, 16, 3), bn),
            "rnn": (build_model("rnn", hidden=(32,), cell="lstm"), (8, 8), {}),
        }
    return {
        "mlpnet": (build_model("mlpnet"), (784,), {}),
        "mlp": (build_model("mlp"), (64,), {}),
        "cnn": (build_model("cnn", image_size=28), (28, 28, 1), {}),
        "vgg11": (build_model("vgg11"), (32, 32, 3), bn),
        "vgg11_bn": (build_model("vgg11_bn"), (32, 32, 3), bn),
        "resnet18": (build_model("resnet18"), (32, 32, 3), bn),
        "resnet20": (build_model("resnet20"), (32, 32, 3), bn),
        "rnn": (build_model("rnn"), (28, 28), {}),
    }


def noisy_copy(variables, spec, noise: float, key):
    """``(A + noise, permute(A + noise), perms)``: noise on the ``params`` collection only."""
    leaves, treedef = flatten(variables)
    keys = dict(zip(leaves, jax.random.split(key, len(leaves))))
    noisy = {
        p: x + noise * jnp.std(x) * jax.random.normal(keys[p], x.shape) if p.startswith("params/") and x.size > 1 else x
        for p, x in leaves.items()
    }
    truth = unflatten(treedef, noisy)
    permuted, perms = jfusion.permute(truth, spec, jax.random.fold_in(key, 1))
    return truth, permuted, perms


def objective(reference, aligned, spec) -> float:
    """``sum_L <A_L, B_L> / (||A|| ||B||)`` over the grouped leaves."""
    ref, other = flatten(reference)[0], flatten(aligned)[0]
    paths = [leaf.path for leaf in spec.leaves if leaf.groups]
    inner = sum(float(jnp.vdot(ref[p], other[p])) for p in paths)
    norms = [np.sqrt(sum(float(jnp.vdot(t[p], t[p])) for p in paths)) for t in (ref, other)]
    return inner / (norms[0] * norms[1])


def readings(module, kwargs, reference, aligned, spec, x):
    if x is None:
        return {"objective": objective(reference, aligned, spec)}
    fused = jax.tree.map(lambda a, b: (a + b) / 2, reference, aligned)
    want, got = module.apply(reference, x, **kwargs), module.apply(fused, x, **kwargs)
    return {
        "objective": objective(reference, aligned, spec),
        "fused error": float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)),
        "agree": float(jnp.mean(jnp.argmax(got, -1) == jnp.argmax(want, -1))),
    }


def bench_model(module, shape, kwargs, noise, repeats, programs):
    """The rows of one model at one noise level (None: an independent network); ``programs``
    caches the compiled alignments."""
    spec = module.spec()
    variables = module.init(jax.random.key(0), jnp.ones((1, *shape)), **kwargs)
    if noise is None:
        other, perms, x = module.init(jax.random.key(3), jnp.ones((1, *shape)), **kwargs), None, None
        rows = [{"method": "identity", **readings(module, kwargs, variables, other, spec, x)}]
    else:
        truth, other, perms = noisy_copy(variables, spec, noise, jax.random.key(1))
        x = jax.random.normal(jax.random.key(2), (256, *shape))
        unmoved = np.concatenate([np.asarray(p) == np.arange(len(p)) for p in perms.values()])
        rows = [
            {"method": "planted", **readings(module, kwargs, variables, truth, spec, x), "recovered": 1.0},
            {"method": "identity", **readings(module, kwargs, variables, other, spec, x), "recovered": float(np.mean(unmoved))},
        ]
    stacked = jfusion.stack_models([variables, other])
    for method, alignment in METHODS.items():
        if method not in programs:
            align = jax.jit(lambda models, alignment=alignment: jfusion.align(models, spec, alignment=alignment))
            start = time.perf_counter()
            programs[method] = (align.lower(stacked).compile(), time.perf_counter() - start)
        compiled, compile_s = programs[method]
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            result = jax.block_until_ready(compiled(stacked))
            times.append(time.perf_counter() - start)
        aligned = jfusion.take_model(result.aligned, 1)
        iterations = int(result.plans[spec.groups[0]].iterations[1]) if method == "matching" else alignment.sweeps
        row = {
            "method": method, **readings(module, kwargs, variables, aligned, spec, x),
            "compile (s)": compile_s, "warm (s)": statistics.median(times), "iterations": iterations,
        }
        if perms is not None:
            matched = [np.argmax(np.asarray(result.plans[g].plan[1]), axis=1) == np.asarray(p) for g, p in perms.items()]
            row["recovered"] = float(np.mean(np.concatenate(matched)))
        rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="narrow models and small inputs")
    parser.add_argument("--noise", type=float, nargs="+", default=[1.0, 4.0], help="noise / leaf std")
    parser.add_argument("--models", nargs="+", default=None, help="a subset of the zoo")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    models = zoo(args.quick)
    print(f"jax {jax.__version__} on {jax.default_backend()}, {len(jax.devices())} device(s); K = 2")
    columns = ["objective", "recovered", "fused error", "agree", "iterations", "compile (s)", "warm (s)"]
    print("\n| model | groups | noise | method | " + " | ".join(columns) + " |")
    print("|---|---:|---:|---|" + "---:|" * len(columns))
    for name in args.models or models:
        module, shape, kwargs = models[name]
        programs = {}
        for noise in [*args.noise, None]:
            for row in bench_model(module, shape, kwargs, noise, args.repeats, programs):
                cells = [
                    "" if c not in row else f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns
                ]
                print(f"| {name} | {len(module.spec().groups)} | {noise or 'indep.'} | {row['method']} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
