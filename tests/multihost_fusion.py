"""One of two processes fusing K = 8 models sharded over both processes' devices (4 each).

What a multi-host run does, on one machine: ``jax.distributed.initialize`` joins the
processes, the mesh spans every process's devices, and each process gives only its own four
models (``jax.make_array_from_process_local_data``); every process then runs the same
``jfusion.fuse``. Prints what tests/test_sharding.py checks, as JSON.

    python tests/multihost_fusion.py PROCESS_ID PORT
"""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import json  # noqa: E402
import warnings  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

import jfusion  # noqa: E402
from sharded_fusion import K, SPEC, max_difference, planted  # noqa: E402

PROCESSES = 2


def main(process_id: int, port: int) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # collectives across processes on CPU
    jax.distributed.initialize(f"localhost:{port}", num_processes=PROCESSES, process_id=process_id)
    base, stacked, _ = planted()
    mesh = Mesh(np.array(jax.devices()), ("k",))
    sharding = NamedSharding(mesh, PartitionSpec("k"))
    mine = slice(process_id * K // PROCESSES, (process_id + 1) * K // PROCESSES)  # this process's models
    local = jax.tree.map(lambda x: np.asarray(x)[mine], stacked)

    def global_models(leaves):
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), leaves)

    models = global_models(local)
    report = {"devices": [jax.device_count(), jax.local_device_count()]}
    for name, solver in {"sinkhorn": jfusion.Sinkhorn(), "hungarian": jfusion.Exact("hungarian")}.items():
        fused = jfusion.fuse(models, SPEC, solver=solver).params
        report[name] = {
            "replicated": all(x.is_fully_replicated for x in jax.tree.leaves(fused)),
            "vs_truth": max_difference(fused, base),  # replicated: every process reads it whole
        }
    # Unconverged plans: the warning reads the K flags, sharded over both processes.
    rng = np.random.default_rng(process_id)
    noisy = global_models(jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(np.float32), local))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jfusion.fuse(noisy, SPEC, solver=jfusion.Sinkhorn(epsilon=1e-3, max_iterations=2))
    report["warnings"] = [str(w.message) for w in caught if issubclass(w.category, jfusion.ConvergenceWarning)]
    print("REPORT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
