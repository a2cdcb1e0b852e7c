"""Models sharded on K over 8 devices fuse without being gathered, to the one-device result.

The test process has one device, so ``tests/sharded_fusion.py`` runs in a subprocess that asks
XLA for 8 host devices before importing jax; it fuses K = 8 models -- one MLP and 7 random
permutations of its neurons, stacked and put on a 1-D mesh with ``PartitionSpec('k')`` -- with
Sinkhorn and the Hungarian, and reports what is checked here as one JSON line. A slow test runs
``tests/multihost_fusion.py`` as two processes joined by ``jax.distributed.initialize``, the
models sharded over both processes' devices.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
K = 8
LARGEST_LEAF = 16 * 12  # elements of one model's largest leaf (Dense_1's kernel)


def subprocess_environment(*paths: Path) -> dict[str, str]:
    """This process's environment with jfusion (and ``paths``) importable, compiling at the
    suite's LLVM -O0 (tests/conftest.py) but without its other XLA flags."""
    python_path = os.pathsep.join([str(ROOT / "src"), *map(str, paths), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": python_path, "XLA_FLAGS": "--xla_backend_optimization_level=0"}


def prod(shape):
    n = 1
    for d in shape:
        n *= d
    return n


@pytest.fixture(scope="module")
def report():
    env = subprocess_environment()
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "sharded_fusion.py")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("REPORT "))
    return json.loads(line.removeprefix("REPORT "))


def test_the_inputs_are_sharded_one_model_per_device(report):
    assert report["devices"] == K
    assert report["input_specs"] == ["P('k',)"]
    for devices, shard_shapes in report["inputs"]:
        assert devices == K and all(shape[0] == 1 for shape in shard_shapes)


@pytest.mark.parametrize("solver", ["sinkhorn", "hungarian"])
def test_sharded_fusion_is_the_one_device_fusion_and_the_planted_truth(report, solver):
    result = report[solver]
    assert result["sharded_vs_one_device"] <= 1e-6  # the combine's sum is split over devices
    assert result["sharded_vs_truth"] <= 1e-6
    assert result["one_device_vs_truth"] <= 1e-6
    assert result["one_device_devices"] == [1]
    assert result["plans_are_the_planted_permutations"]


@pytest.mark.parametrize("solver", ["sinkhorn", "hungarian"])
def test_aligned_models_and_plans_stay_sharded_on_k(report, solver):
    result = report[solver]
    assert result["aligned_specs"] == ["P('k',)"]
    for devices, shard_shapes in result["aligned"] + result["plans"]:
        assert devices == K and all(shape[0] == 1 for shape in shard_shapes)


@pytest.mark.parametrize("solver", ["sinkhorn", "hungarian"])
def test_the_compiled_program_moves_no_more_than_one_models_leaf(report, solver):
    """The optimised HLO of the program ``fuse`` ran on the sharded models.

    Every collective in it is an all-reduce (no all-gather, all-to-all, collective-permute or
    reduce-scatter), and none carries an array larger than one model's largest leaf: what
    crosses devices is the reference model (sent to every device as a masked sum), the
    combine's partial sums, and the solvers' loop flags -- never the K axis, whole or K - 1 of it.
    """
    collectives = report[solver]["collectives"]
    assert {op for op, _ in collectives} == {"all-reduce"}
    assert max(prod(shape) for _, shapes in collectives for shape in shapes) <= LARGEST_LEAF


def test_the_check_catches_gathering_under_an_outer_jit(report):
    """A traced value under ``jax.jit`` does not say it is sharded, so ``fuse`` takes the
    one-device path: the same check finds the others gathered (right, but not shard-friendly)."""
    outer = report["outer_jit"]
    assert outer["vs_truth"] <= 1e-6
    ops = {op for op, _ in outer["collectives"]}
    assert ops - {"all-reduce"}, ops
    assert max(prod(shape) for _, shapes in outer["collectives"] for shape in shapes) > LARGEST_LEAF


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two processes, each compiling three fusions
def test_two_processes_fuse_models_sharded_over_both():
    """``tests/multihost_fusion.py`` twice, joined by ``jax.distributed.initialize``: 4 devices each."""
    env = subprocess_environment(ROOT / "tests")
    port = free_port()
    script = str(ROOT / "tests" / "multihost_fusion.py")
    processes = [
        subprocess.Popen([sys.executable, script, str(i), str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=900) for p in processes]
    for p, (_, stderr) in zip(processes, outputs):
        assert p.returncode == 0, stderr[-3000:]
    for stdout, _ in outputs:
        report = json.loads(next(line for line in stdout.splitlines() if line.startswith("REPORT ")).removeprefix("REPORT "))
        assert report["devices"] == [K, K // 2]
        for solver in ("sinkhorn", "hungarian"):
            assert report[solver]["replicated"] and report[solver]["vs_truth"] <= 1e-6
        assert [w.split()[1] for w in report["warnings"]] == ["'h0':", "'h1':"]
        assert all("models [1, 2, 3, 4, 5, 6, 7]" in w for w in report["warnings"])
