"""Fuse K = 8 models sharded on K over 8 devices; print what tests/test_sharding.py checks, as JSON.

Run as a script in a fresh process: it asks XLA for 8 host (CPU) devices before importing jax,
which the test process (1 device) cannot do for itself. XLA dumps the optimised HLO of every
fusion program it compiles, so the collectives checked are those of the programs that ran.

    python tests/sharded_fusion.py
"""

import os
import tempfile

if __name__ == "__main__":  # (tests/multihost_fusion.py imports the planted problem only)
    DUMP = tempfile.mkdtemp(prefix="jfusion-hlo-")
    os.environ["XLA_FLAGS"] = " ".join([
        os.environ.get("XLA_FLAGS", ""),
        "--xla_force_host_platform_device_count=8",
        f"--xla_dump_to={DUMP}",
        "--xla_dump_hlo_as_text",
        "--xla_dump_hlo_module_re=fusion_program|outer_jit",
    ])

import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

import jfusion  # noqa: E402
from jfusion.models import mlp_spec  # noqa: E402

K = 8
SPEC = mlp_spec(3)
SOLVERS = {"sinkhorn": jfusion.Sinkhorn(), "hungarian": jfusion.Exact("hungarian")}
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter", "collective-broadcast")


def planted():
    """One MLP 10-16-12-5, and K models: it, then 7 random permutations of its hidden neurons.

    In NumPy (new neuron q of a group is old neuron ``perm[q]``), so that building the
    problem compiles nothing; every model computes the same function.
    """
    rng = np.random.default_rng(0)
    shapes = [(10, 16), (16, 12), (12, 5)]
    base = {
        "params": {
            f"Dense_{i}": {"kernel": rng.normal(size=s).astype(np.float32) / np.sqrt(s[0]),
                           "bias": rng.normal(size=s[1]).astype(np.float32)}
            for i, s in enumerate(shapes)
        }
    }
    models, perms = [], []
    for k in range(K):
        p0, p1 = (np.arange(16), np.arange(12)) if k == 0 else (rng.permutation(16), rng.permutation(12))
        layers = base["params"]
        models.append({"params": {
            "Dense_0": {"kernel": layers["Dense_0"]["kernel"][:, p0], "bias": layers["Dense_0"]["bias"][p0]},
            "Dense_1": {"kernel": layers["Dense_1"]["kernel"][p0][:, p1], "bias": layers["Dense_1"]["bias"][p1]},
            "Dense_2": {"kernel": layers["Dense_2"]["kernel"][p1], "bias": layers["Dense_2"]["bias"]},
        }})
        perms.append({"h0": p0, "h1": p1})
    return base, jfusion.stack_models(models), perms


def collectives(hlo: str):
    """``(op, [array shapes])`` of every collective in a compiled HLO module's text."""
    found = []
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%\S+ = (.+?) (" + "|".join(COLLECTIVES) + r")(?:-start)?\(", line)
        if m:
            shapes = [tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\w+\[([\d,]*)\]", m.group(1))]
            found.append((m.group(2), shapes))
    return found


def compiled(fn):
    """``(fn(), the optimised HLO text of the one fusion program that fn compiled)``."""
    before = set(Path(DUMP).iterdir())
    out = jax.block_until_ready(fn())
    new = [p for p in set(Path(DUMP).iterdir()) - before if p.name.endswith("after_optimizations.txt")]
    assert len(new) == 1, f"expected one compiled fusion program, found {sorted(p.name for p in new)}"
    return out, new[0].read_text()


def sharded_on_k(x):
    """``[devices, shard shapes]`` of an array."""
    return [len({s.device for s in x.addressable_shards}), sorted({tuple(s.data.shape) for s in x.addressable_shards})]


def max_difference(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main():
    base, stacked, perms = planted()
    mesh = Mesh(np.array(jax.devices()), ("k",))
    sharding = NamedSharding(mesh, PartitionSpec("k"))
    sharded = jax.device_put(stacked, sharding)
    report = {
        "devices": jax.device_count(),
        "inputs": [sharded_on_k(x) for x in jax.tree.leaves(sharded)],
        "input_specs": sorted({str(x.sharding.spec) for x in jax.tree.leaves(sharded)}),
    }
    for name, solver in SOLVERS.items():
        one = jfusion.fuse(stacked, SPEC, solver=solver)  # on one device
        many, hlo = compiled(lambda: jfusion.fuse(sharded, SPEC, solver=solver))
        aligned = jfusion.align(sharded, SPEC, solver=solver)  # the same program, cached
        plans = {g: np.asarray(r.plan) for g, r in many.plans.items()}
        # Model k's neuron q is the base's neuron perm[q]: its plan sends row q to column perm[q].
        plans_match = all(np.array_equal(np.argmax(plans[g][k], axis=1), perms[k][g]) for k in range(K) for g in plans)
        report[name] = {
            "sharded_vs_one_device": max_difference(many.params, one.params),
            "sharded_vs_truth": max_difference(many.params, base),
            "one_device_vs_truth": max_difference(one.params, base),
            "one_device_devices": sorted({len(x.sharding.device_set) for x in jax.tree.leaves(one.params)}),
            "plans_are_the_planted_permutations": plans_match,
            "aligned": [sharded_on_k(x) for x in jax.tree.leaves(aligned.aligned)],
            "aligned_specs": sorted({str(x.sharding.spec) for x in jax.tree.leaves(aligned.aligned)}),
            "plans": [sharded_on_k(r.plan) for r in many.plans.values()],
            "collectives": collectives(hlo),
        }
    # Under an outer jit a traced value does not say it is sharded, so fuse takes the path for
    # models on one device (the reference sliced out of K, the others gathered and
    # restacked): what the check catches.
    def outer_jit(models):
        return jfusion.fuse(models, SPEC, solver=SOLVERS["sinkhorn"]).params

    fused, hlo = compiled(lambda: jax.jit(outer_jit)(sharded))
    report["outer_jit"] = {"vs_truth": max_difference(fused, base), "collectives": collectives(hlo)}
    print("REPORT " + json.dumps(report))


if __name__ == "__main__":
    try:
        main()
    finally:
        shutil.rmtree(DUMP, ignore_errors=True)
