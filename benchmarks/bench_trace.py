"""What tracing a Spec costs: ``trace_spec`` on ResNet18 (width 1, 32x32 inputs).

``trace`` is ``trace_spec(..., check=False)``: ``jax.make_jaxpr`` of the model plus the
union-find over its equations (first call, then the best of three). ``check`` is the
verification ``trace_spec`` runs by default (:func:`jfusion.check_spec` with the model
jitted), on a first call, so it includes compiling the model and the permutation ops.

    python benchmarks/bench_trace.py
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

import jfusion
from jfusion.models import ResNet18, ResNet20


def seconds(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def same_groups(a: jfusion.Spec, b: jfusion.Spec) -> bool:
    def groups(spec):
        out = {}
        for leaf in spec.leaves:
            for dim, group in enumerate(leaf.dim_groups):
                if group is not None:
                    out.setdefault(group, set()).add((leaf.path, dim))
        return {frozenset(dims) for dims in out.values()}

    return groups(a) == groups(b)


def row(name: str, model, x: jax.Array) -> str:
    variables = jax.jit(model.init)(jax.random.key(0), x)
    first = seconds(jfusion.trace_spec, model.apply, variables, x, check=False)
    best = min(seconds(jfusion.trace_spec, model.apply, variables, x, check=False) for _ in range(3))
    spec = jfusion.trace_spec(model.apply, variables, x, check=False)
    check = seconds(jfusion.check_spec, jax.jit(model.apply), variables, spec, x)
    return (
        f"| {name} | {len(spec.leaves)} | {len(spec.groups)} | {first:.2f} | {best:.2f} | {check:.2f} | "
        f"{'yes' if same_groups(spec, model.spec()) else 'NO'} |"
    )


def main():
    x = jnp.ones((1, 32, 32, 3))
    print("| model | leaves | groups | trace, first (s) | trace, best of 3 (s) | check (s) | equals hand spec |")
    print("|---|---|---|---|---|---|---|")
    for name, model in {"resnet18": ResNet18(), "resnet20": ResNet20()}.items():
        print(row(name, model, x))


if __name__ == "__main__":
    main()
