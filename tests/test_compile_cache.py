"""The command line keeps JAX's compiled programs in the user's cache directory, unless told not to.

Each case runs ``jfusion fuse`` in a fresh process (the cache is process-wide JAX state, and the
test processes opt out of it in conftest.py) with ``XDG_CACHE_HOME`` in a temporary directory.
"""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jfusion.models import MLP, describe
from jfusion.workflow.checkpoint import save_checkpoint
from jfusion.workflow.compile_cache import OPT_OUT, cache_directory

pytestmark = pytest.mark.slow  # end to end: three processes compile a fusion each

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two random MLPs 64-16-16-10 as checkpoints ``jfusion fuse`` can read (no training)."""
    out = tmp_path_factory.mktemp("parents")
    module = MLP((16, 16, 10))
    shapes = jax.eval_shape(module.init, jax.random.key(0), np.ones((1, 64), np.float32))
    paths = []
    for k in range(2):
        rng = np.random.default_rng(k)
        variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
        paths.append(save_checkpoint(out / f"model_{k}", variables, module.spec(), metadata=describe("mlp", features=[16, 16, 10])))
    return paths


def run_fuse(checkpoints, tmp_path, *flags, env=None):
    """``jfusion fuse`` in a new process whose XDG_CACHE_HOME is ``tmp_path/xdg``; its cache directory."""
    xdg = tmp_path / "xdg"
    environment = {k: v for k, v in os.environ.items() if k not in (OPT_OUT, "JAX_COMPILATION_CACHE_DIR")}
    environment.update(
        XDG_CACHE_HOME=str(xdg), PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]), **(env or {})
    )
    command = [sys.executable, "-m", "jfusion.workflow.cli", "fuse", *map(str, checkpoints), "--out", str(tmp_path / "fused"), *flags]
    done = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return xdg / "jfusion" / "xla"


def entries(directory):
    return sorted(p.name for p in directory.glob("*-cache")) if directory.exists() else []


def test_the_cache_directory_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_directory() == tmp_path / "jfusion" / "xla"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # not absolute: ignored, as the XDG spec says
    assert cache_directory() == Path.home() / ".cache" / "jfusion" / "xla"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_directory() == Path.home() / ".cache" / "jfusion" / "xla"


def test_fuse_writes_compiled_programs_into_the_cache_and_leaves_other_files_alone(checkpoints, tmp_path):
    directory = tmp_path / "xdg" / "jfusion" / "xla"
    directory.mkdir(parents=True)
    (directory / "not-jfusions.txt").write_text("kept")
    # Sinkhorn: on the CPU Exact() is scipy through a host callback, and JAX writes no program
    # with host callbacks to the cache (the exact fusion's own program is compiled every time).
    assert run_fuse(checkpoints, tmp_path, "--solver", "sinkhorn") == directory
    written = entries(directory)
    assert any("fusion_program" in name for name in written), written
    assert (directory / "not-jfusions.txt").read_text() == "kept"


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_opting_out_writes_nothing(checkpoints, tmp_path, how):
    # Sinkhorn, as above: the program that would otherwise be written.
    if how == "flag":
        directory = run_fuse(checkpoints, tmp_path, "--solver", "sinkhorn", "--no-compile-cache")
    else:
        directory = run_fuse(checkpoints, tmp_path, "--solver", "sinkhorn", env={OPT_OUT: "1"})
    assert not directory.exists() or not any(directory.iterdir())
