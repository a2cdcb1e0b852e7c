"""What a Spec costs: building it once, then reading its group order and index.

``Spec`` computes its index, parsed views, writers/readers and topological group order when
it is made; reading ``spec.groups`` is then an attribute access. The reference in the same
run is the ordering computed on every access (what ``spec.groups`` did before it was stored),
on ResNet18's spec (102 leaves, 9 groups with residual streams) and VGG11's.

    python benchmarks/bench_spec.py
"""

from __future__ import annotations

import timeit

import jfusion
from jfusion.core.spec import _order
from jfusion.models import VGG11, ResNet18, vgg_spec


def per_call_ms(fn, number):
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e3


def main():
    specs = {"resnet18": ResNet18().spec(), "vgg11": vgg_spec(VGG11, batch_norm=True)}
    print("| spec | leaves | groups | build (ms) | spec.groups (ms) | order recomputed (ms) | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for name, spec in specs.items():
        mapping = spec.as_dict()
        build = per_call_ms(lambda: jfusion.Spec(mapping), 20)
        access = per_call_ms(lambda: spec.groups, 100_000)
        writers = {g: spec.writers(g) for g in spec.groups}
        recompute = per_call_ms(lambda: _order(spec.leaves, writers), 50)
        print(
            f"| {name} | {len(spec.leaves)} | {len(spec.groups)} | {build:.3f} | {access:.6f} | "
            f"{recompute:.3f} | {recompute / access:,.0f}x |"
        )


if __name__ == "__main__":
    main()
