"""Speed and memory of ``jax.jit(jfusion.fuse)`` against a NumPy + POT layer loop, same run.

Random-weight MLPNets (784-400-200-100-10) and VGG11-width CNNs (conv widths 64, 128, 256,
256, 512, 512, 512, 512 on 32x32x3 inputs, one dense layer), K = 2, 4, 8 models, exact OT and
Sinkhorn. For each: compile time and warm time (median of repeats) of the jitted fusion,
XLA's temporary buffer size, the time of the reference (``benchmarks/numpy_reference.py``),
and the largest difference between the two fused weights.

    python benchmarks/bench_fuse.py                 # everything, prints a markdown table
    python benchmarks/bench_fuse.py --models mlp --ks 2 4 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jfusion  # noqa: E402
from jfusion.models import MLP, VGG, VGG11, mlp_spec, vgg_spec  # noqa: E402
from numpy_reference import fuse_layers  # noqa: E402


def mlpnet():
    model = MLP((400, 200, 100, 10))
    return model, mlp_spec(4), (784,), [f"Dense_{i}" for i in range(4)]


def vgg11():
    model = VGG(features=VGG11, batch_norm=False, num_classes=10)
    num_convs = sum(layer != "M" for layer in VGG11)
    names = [f"Conv_{i}" for i in range(num_convs)] + ["Dense_0"]
    return model, vgg_spec(VGG11, batch_norm=False), (32, 32, 3), names


ARCHITECTURES = {"mlp": mlpnet, "vgg11": vgg11}


def random_models(model, input_shape, num_models, seed=0):
    keys = jax.random.split(jax.random.key(seed), num_models)
    return jax.vmap(lambda k: model.init(k, jnp.ones((1, *input_shape))))(keys)


def as_layers(stacked, names, k):
    params = stacked["params"]
    return [(np.asarray(params[n]["kernel"][k]), np.asarray(params[n]["bias"][k])) for n in names]


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def bench_one(arch, num_models, solver_name, repeats, threshold):
    model, spec, input_shape, names = ARCHITECTURES[arch]()
    stacked = random_models(model, input_shape, num_models)
    solver = jfusion.Exact() if solver_name == "exact" else jfusion.Sinkhorn(threshold=threshold)
    fuse = jax.jit(lambda models: jfusion.fuse(models, spec, solver=solver).params)
    start = time.perf_counter()
    compiled = fuse.lower(stacked).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    temp_mb = memory.temp_size_in_bytes / 2**20 if memory is not None else float("nan")
    fused, warm_s = timed(lambda: compiled(stacked), repeats)

    layers = [as_layers(stacked, names, k) for k in range(num_models)]
    reference, reference_s = timed(lambda: fuse_layers(layers, solver_name, threshold=threshold), max(1, repeats // 3))
    diff = max(
        float(np.max(np.abs(np.asarray(fused["params"][n][part]) - ref[i])))
        for n, ref in zip(names, reference)
        for i, part in enumerate(("kernel", "bias"))
    )
    scale = max(float(np.max(np.abs(ref[0]))) for ref in reference)
    return {
        "model": arch,
        "K": num_models,
        "solver": solver_name,
        "compile_s": compile_s,
        "warm_s": warm_s,
        "temp_mb": temp_mb,
        "reference_s": reference_s,
        "speedup": reference_s / warm_s,
        "max_diff": diff / scale,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--ks", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--solvers", nargs="+", default=["exact", "sinkhorn"], choices=["exact", "sinkhorn"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threshold", type=float, default=1e-4, help="Sinkhorn's marginal-error tolerance, for both implementations"
    )
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    print(f"jax {jax.__version__} on {device.platform} ({device.device_kind}), {jax.device_count()} device(s)\n")
    header = (
        "| model | K | solver | jit compile (s) | jit warm (s) | XLA temp (MiB) | NumPy+POT (s) "
        "| speed-up | max rel. diff |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for arch in args.models:
        for solver in args.solvers:
            for num in args.ks:
                r = bench_one(arch, num, solver, args.repeats, args.threshold)
                print(
                    f"| {r['model']} | {r['K']} | {r['solver']} | {r['compile_s']:.2f} | "
                    f"{r['warm_s']:.3f} | {r['temp_mb']:.1f} | {r['reference_s']:.3f} | "
                    f"{r['speedup']:.1f}x | {r['max_diff']:.1e} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
