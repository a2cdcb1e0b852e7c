"""Exact OT solvers side by side on the same costs: jfusion.Exact's algorithms -- scipy's assignment
called from the program (``"scipy"``, the CPU default), optax's Hungarian and jfusion's auction --
jitted and vmapped over K problems as jfusion.Exact runs them; scipy's linear_sum_assignment and
POT's ot.emd called directly on the host (a loop over K); and jfusion.Sinkhorn (jitted, vmapped).

Costs: ``random`` (uniform on [0, 1]) and ``neuron`` (a random weight matrix's rows against a
noisy permutation of themselves: pairwise squared distances, what fusion aligns). For each: the
first call's time (compile included, for JAX), the warm time (median of repeats) and the gap of
the solution's cost to scipy's optimum, relative to it (``0`` = the optimum; Sinkhorn's plan is
entropic, so its gap is its blur).

    python benchmarks/bench_solvers.py            # n = 64, 256, 1024; K = 1, 8 (~6 min on 2 cores)
    python benchmarks/bench_solvers.py --quick    # n = 16, 64; K = 1, 4
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
import ot
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import jfusion
from jfusion.core.solvers import _assign, _conditioned


def costs(kind: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.random((k, n, n)).astype(np.float32)
    w = rng.normal(size=(k, n, 64))
    noisy = np.stack([x[rng.permutation(n)] for x in w]) + 0.3 * rng.normal(size=w.shape)
    return ((w[:, :, None] - noisy[:, None]) ** 2).sum(-1).astype(np.float32)


def exact_jax(algorithm):
    def solve(cost):
        return _assign(_conditioned(cost)[0], algorithm, None)[0]

    return jax.jit(jax.vmap(solve))


def sinkhorn_jax(n):
    uniform = jnp.full((n,), 1.0 / n)
    return jax.jit(jax.vmap(lambda c: jfusion.Sinkhorn()(c, uniform, uniform).plan))


def host(fn):
    return lambda cs: [fn(c) for c in cs]


def scipy_cols(c):
    return linear_sum_assignment(c.astype(np.float64))[1]


def pot_plan(c):
    n = c.shape[0]
    return ot.emd(np.full(n, 1 / n), np.full(n, 1 / n), c.astype(np.float64))


def cost_of(c: np.ndarray, out) -> float:
    """``sum_i C[i, s(i)]`` of an assignment, or ``n <C, plan>`` of a plan."""
    out = np.asarray(out, np.float64)
    if out.ndim == 1:
        return float(c[np.arange(len(out)), out.astype(int)].sum())
    return float(len(c) * (c * out).sum())


def timed(fn, x, repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(x))
    first = time.perf_counter() - start
    warm = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(x))
        warm.append(time.perf_counter() - start)
    return out, first, statistics.median(warm) if warm else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="n = 16, 64; K = 1, 4")
    parser.add_argument("--ns", type=int, nargs="+")
    parser.add_argument("--ks", type=int, nargs="+")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    ns = args.ns or ([16, 64] if args.quick else [64, 256, 1024])
    ks = args.ks or ([1, 4] if args.quick else [1, 8])
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; times in ms, first call includes compile")
    print("| costs | n | K | solver | first call | warm | gap to optimum |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: |")
    for kind in ("random", "neuron"):
        for n in ns:
            for k in ks:
                cs = costs(kind, n, k)
                optimum = [cost_of(c, scipy_cols(c)) for c in cs.astype(np.float64)]
                solvers = {
                    "Exact('scipy') (jitted host call)": (exact_jax("scipy"), jnp.asarray(cs)),
                    "hungarian (optax)": (exact_jax("hungarian"), jnp.asarray(cs)),
                    "auction (jfusion)": (exact_jax("auction"), jnp.asarray(cs)),
                    "scipy lsa (host loop)": (host(scipy_cols), cs),
                    "POT emd (host loop)": (host(pot_plan), cs),
                    "sinkhorn (jfusion)": (sinkhorn_jax(n), jnp.asarray(cs)),
                }
                for name, (fn, x) in solvers.items():
                    jax.clear_caches()
                    out, first, warm = timed(fn, x, args.repeats if n < 1024 else 1)
                    gaps = [
                        (cost_of(c, o) - opt) / max(abs(opt), 1e-30)
                        for c, o, opt in zip(cs.astype(np.float64), out, optimum, strict=True)
                    ]
                    gap = max(gaps)
                    shown = "0" if abs(gap) < 1e-12 else f"{gap:.1e}"
                    print(f"| {kind} | {n} | {k} | {name} | {1e3 * first:.1f} | {1e3 * warm:.1f} | {shown} |", flush=True)


if __name__ == "__main__":
    main()
