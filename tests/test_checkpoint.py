"""Checkpoints: bit-exact arrays, the Spec (with views) and metadata; explicit overwrites;
digests that find damage; saves that a SIGKILL at any step leaves the old or the new checkpoint."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import jfusion
from jfusion import Spec
from jfusion.workflow.checkpoint import CheckpointError, _digest, load_checkpoint, save_checkpoint
from jfusion.workflow.cli import main
from jfusion.models import CNN, cnn_spec


def variables_with_every_kind_of_leaf():
    # The CNN's parameter shapes without compiling its init (which is slow on CPU).
    shapes = jax.eval_shape(CNN((4, 8), (16, 10)).init, jax.random.key(0), jnp.ones((1, 28, 28, 1)))
    rng = np.random.default_rng(2)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)
    return {
        **params,
        "batch_stats": {
            "BatchNorm_0": {
                "mean": jnp.asarray(np.random.default_rng(0).normal(size=4), jnp.bfloat16),
                "var": np.random.default_rng(1).random(4).astype(np.float64),
            }
        },
        "counters": {"steps": np.asarray(12345, np.int32), "tiny": np.float32(1e-40)},  # subnormal
    }


def assert_bit_exact(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def test_round_trip_is_bit_exact_with_spec_and_metadata(tmp_path):
    variables = variables_with_every_kind_of_leaf()
    spec = cnn_spec(2, 2, 49)  # Dense_0's kernel has a view (49, "c1"): a tuple in a tuple
    metadata = {"model": "CNN", "conv_features": [4, 8], "dense_features": [16, 10], "note": "é"}
    written = save_checkpoint(tmp_path / "ckpt", variables, spec, metadata=metadata)
    assert written == (tmp_path / "ckpt").resolve()
    loaded, loaded_spec, loaded_metadata = load_checkpoint(tmp_path / "ckpt")
    assert_bit_exact(loaded, variables)
    assert loaded_spec == spec
    assert loaded_spec["params/Dense_0/kernel"].axes == ((49, "c1"), "f0")
    assert loaded_metadata == metadata


def test_attention_specs_with_heads_and_concat_round_trip(tmp_path):
    spec = jfusion.Spec({
        **jfusion.layers.dense("embed", None, "r"),
        **jfusion.layers.attention("a0", "r", "b0"),  # Heads("b0") on their own axis
        **jfusion.layers.fused_attention("a1", "r", "b1", 2),  # Concat of views with Heads("b1", 2)
        **jfusion.layers.dense("head", "r", None),
    })
    save_checkpoint(tmp_path / "ckpt", {"params": {"w": np.zeros(3, np.float32)}}, spec)  # the sidecar is what is tested
    _, loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert loaded == spec and loaded.as_dict() == spec.as_dict() and loaded.heads == spec.heads


def test_relative_paths_and_stacked_models_round_trip(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stacked = {"params": {"w": jnp.arange(24, dtype=jnp.float32).reshape(2, 3, 4) / 7}}
    save_checkpoint("relative/ckpt", stacked)
    loaded, spec, metadata = load_checkpoint(tmp_path / "relative" / "ckpt")
    assert_bit_exact(loaded, stacked)
    assert spec is None and metadata is None


def test_overwriting_needs_overwrite_true(tmp_path):
    first = {"params": {"w": jnp.zeros((3,))}}
    second = {"params": {"w": jnp.ones((5,))}}
    save_checkpoint(tmp_path / "ckpt", first)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_checkpoint(tmp_path / "ckpt", second)
    assert_bit_exact(load_checkpoint(tmp_path / "ckpt")[0], first)  # untouched
    save_checkpoint(tmp_path / "ckpt", second, metadata={"round": 2}, overwrite=True)
    loaded, _, metadata = load_checkpoint(tmp_path / "ckpt")
    assert_bit_exact(loaded, second)
    assert metadata == {"round": 2}


def test_overwrite_never_deletes_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match="not a jfusion checkpoint"):
        save_checkpoint(tmp_path / "precious", {"w": jnp.zeros(2)}, overwrite=True)
    assert (tmp_path / "precious" / "thesis.tex").read_text() == "years of work"


def test_bad_metadata_and_missing_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(tmp_path / "ckpt", {"w": jnp.zeros(2)}, metadata={"array": np.zeros(2)})
    assert not (tmp_path / "ckpt").exists()  # nothing half-written
    with pytest.raises(FileNotFoundError, match="not a jfusion checkpoint"):
        load_checkpoint(tmp_path)


# --- damage is found and named -----------------------------------------------------------


def incompressible(size, seed=0):
    # Random bytes: zstd stores them as they are, so flipping a byte of the largest data file
    # changes one byte of the array and nothing else, which only the digest can notice.
    noise = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    return {"params": {"noise": noise}, "step": np.int32(seed)}


def flip_a_byte_of_the_largest_array_file(checkpoint):
    largest = max((f for f in (checkpoint / "variables").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0x01
    largest.write_bytes(bytes(data))


def test_the_sidecar_records_every_leaf_and_a_digest(tmp_path):
    variables = {"b": (np.zeros(3, np.float32),), "a": jnp.ones((2, 2), jnp.bfloat16)}
    path = save_checkpoint(tmp_path / "ckpt", variables)
    sidecar = json.loads((path / "jfusion.json").read_text())
    assert sidecar["version"] == 2 and sidecar["sha256"] == _digest(sidecar)
    assert [(r["path"], r["dtype"], r["shape"]) for r in sidecar["arrays"]] == [
        ("a", "bfloat16", [2, 2]),  # flattening order: sorted keys
        ("b/0", "float32", [3]),
    ]
    assert sorted(os.listdir(path)) == ["jfusion.json", "variables"]
    assert os.listdir(tmp_path) == ["ckpt"]  # no temporary sibling left behind


def test_a_flipped_byte_in_an_array_file_is_found_and_its_leaf_named(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt", incompressible(1 << 16))
    flip_a_byte_of_the_largest_array_file(path)
    digest = r"with sha256 [0-9a-f]{16}\.\.\."
    with pytest.raises(
        CheckpointError,
        match=rf"^{path}/variables: leaf params/noise is not what was saved: expected uint8\[65536\] {digest}, "
        rf"found uint8\[65536\] {digest}; the array files are damaged$",
    ):
        load_checkpoint(path)


def test_an_edited_sidecar_is_found(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt", {"w": np.zeros(2)}, metadata={"epochs": 10})
    sidecar = path / "jfusion.json"
    sidecar.write_text(sidecar.read_text().replace('"epochs": 10', '"epochs": 18'))
    with pytest.raises(CheckpointError, match=f"^{sidecar}: the sidecar is damaged: its contents do not match"):
        load_checkpoint(path)


def test_version_1_checkpoints_load_unverified(tmp_path):
    variables = {"params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "v": np.ones((3, 1), np.float32)}}
    small = Spec({"params/w": (None, "h"), "params/v": ("h", None)})
    path = save_checkpoint(tmp_path / "ckpt", variables, small, metadata={"m": 1})
    sidecar = json.loads((path / "jfusion.json").read_text())
    version_1 = {**{key: sidecar[key] for key in ("format", "spec", "metadata")}, "version": 1}
    (path / "jfusion.json").write_text(json.dumps(version_1))
    loaded, spec, metadata = load_checkpoint(path)
    assert_bit_exact(loaded, variables)
    assert spec == small and metadata == {"m": 1}


def resigned(document):
    """``document`` with its digest recomputed, as a tool that rewrote the sidecar would leave it."""
    return {**document, "sha256": _digest(document)}


def without(document, key):
    return {k: v for k, v in document.items() if k != key}


def with_record(document, **fields):
    return {**document, "arrays": [{**document["arrays"][0], **fields}]}


# variant: (what the sidecar becomes, given its fields; what the error says after the file name)
MALFORMED_SIDECARS = {
    "not JSON": (lambda d: '{"format": "jfusion-checkpoint", ', "malformed sidecar: not valid JSON"),
    "not UTF-8": (lambda d: b"\xff\xfe{}", "malformed sidecar: not UTF-8 text"),
    "not an object": (lambda d: "[1, 2]", "malformed sidecar: the document must be a JSON object, found [1, 2]"),
    "another format": (lambda d: {**d, "format": "npz"}, "format 'npz' version 2; this jfusion reads"),
    "a future version": (lambda d: {**d, "version": 3}, "format 'jfusion-checkpoint' version 3; this jfusion"),
    "no arrays": (lambda d: without(d, "arrays"), "malformed sidecar: no 'arrays' field"),
    "no metadata": (lambda d: without(d, "metadata"), "malformed sidecar: no 'metadata' field"),
    "no digest": (lambda d: without(d, "sha256"), "malformed sidecar: no 'sha256' field"),
    "metadata a list": (lambda d: {**d, "metadata": [1]}, "'metadata' must be an object or null, found [1]"),
    "spec a string": (lambda d: {**d, "spec": "mlp"}, "'spec' must be an object or null, found 'mlp'"),
    "arrays an object": (lambda d: {**d, "arrays": {}}, "'arrays' must be a list, found {}"),
    "a record without dtype": (
        lambda d: {**d, "arrays": [without(d["arrays"][0], "dtype")]}, "'arrays'[0] has no 'dtype'"
    ),
    "a shape of strings": (
        lambda d: with_record(d, shape=["2"]), "'arrays'[0]['shape'] must be a list of non-negative ints, found ['2']"
    ),
    "a digest not hex": (lambda d: {**d, "sha256": "xyz"}, "'sha256' must be 64 lowercase hex digits, found 'xyz'"),
    # Well-formed and digested, but wrong:
    "an invalid spec": (
        lambda d: resigned({**d, "spec": {"w": [[]]}}), "its spec is invalid: w: axis 0 has an empty view"
    ),
    "axes a string": (
        lambda d: resigned({**d, "spec": {"w": "h0"}}), "'spec'['w'] must be a list of axis entries, found 'h0'"
    ),
}


@pytest.mark.parametrize("variant", MALFORMED_SIDECARS)
def test_a_malformed_sidecar_is_an_error_naming_it(tmp_path, variant):
    path = save_checkpoint(tmp_path / "ckpt", {"w": np.zeros(2)})
    sidecar = path / "jfusion.json"
    change, message = MALFORMED_SIDECARS[variant]
    content = change(json.loads(sidecar.read_text()))
    if isinstance(content, bytes):
        sidecar.write_bytes(content)
    else:
        sidecar.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert str(error.value).startswith(f"{sidecar}: ") and message in str(error.value)


def test_a_sidecar_that_lists_other_leaves_is_an_error(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt", {"w": np.zeros(2)})
    document = json.loads((path / "jfusion.json").read_text())
    (path / "jfusion.json").write_text(json.dumps(resigned(with_record(document, path="v"))))
    expected = r"the arrays are not the leaves jfusion.json lists: missing \['v'\], unlisted \['w'\]$"
    with pytest.raises(CheckpointError, match=rf"^{path}/variables: {expected}"):
        load_checkpoint(path)


def remove(path):
    shutil.rmtree(path) if path.is_dir() else path.unlink()


# variant: (damage done to DIR/variables, what the error says after "DIR/variables: "; what
# orbax raised, the part in parentheses, depends on its version)
DAMAGED_ARRAYS = {
    "no variables/": (remove, "missing; the checkpoint has a jfusion.json but no arrays"),
    "no _METADATA": (lambda v: remove(v / "_METADATA"), "the array files are damaged ("),
    "garbage _METADATA": (lambda v: (v / "_METADATA").write_text("{"), "the array files are damaged ("),
    "zeroed manifest": (lambda v: (v / "manifest.ocdbt").write_bytes(b"\0" * 8), "the array files are damaged ("),
}


@pytest.mark.parametrize("variant", DAMAGED_ARRAYS)
def test_damaged_or_missing_array_files_are_an_error_naming_them(tmp_path, variant):
    path = save_checkpoint(tmp_path / "ckpt", incompressible(4096))
    damage, message = DAMAGED_ARRAYS[variant]
    damage(path / "variables")
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert str(error.value).startswith(f"{path}/variables: {message}")
    assert len(str(error.value)) < 500  # tensorstore's page-long spec of the store is left out


CORRUPTIONS = {
    "flipped byte": flip_a_byte_of_the_largest_array_file,
    "sidecar not JSON": lambda path: (path / "jfusion.json").write_text("{"),
    "no _METADATA": lambda path: remove(path / "variables" / "_METADATA"),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_the_cli_reports_a_corrupt_checkpoint_in_one_line_with_exit_code_2(tmp_path, capsys, corruption):
    path = save_checkpoint(tmp_path / "ckpt", incompressible(1 << 16))
    CORRUPTIONS[corruption](path)
    assert main(["fuse", str(path), str(path), "--out", str(tmp_path / "fused")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert errors == [err.splitlines()[-1]]
    assert errors[0].startswith(f"jfusion fuse: error: {path}")
    assert not (tmp_path / "fused").exists()


# --- overwriting deletes only what jfusion wrote -----------------------------------------


def test_overwrite_refuses_a_checkpoint_that_holds_user_files(tmp_path):
    variables = {"w": np.arange(3.0)}
    path = save_checkpoint(tmp_path / "ckpt", variables)
    (path / "notes.txt").write_text("which run was this?")
    (path / "plots").mkdir()
    with pytest.raises(FileExistsError, match="holds files a jfusion checkpoint does not: notes.txt, plots; refusing"):
        save_checkpoint(path, {"w": np.zeros(1)}, overwrite=True)
    assert (path / "notes.txt").read_text() == "which run was this?" and (path / "plots").is_dir()
    assert_bit_exact(load_checkpoint(path)[0], variables)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def finished_process_id():
    process = subprocess.Popen(["true"])
    process.wait()  # reaped, so no longer running
    return process.pid


def test_abandoned_temporary_siblings_neither_block_a_save_nor_survive_it(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt", {"w": np.zeros(2)})
    dead, alive = finished_process_id(), os.getpid()
    # A save killed inside orbax, one killed while deleting the old checkpoint, one into whose
    # temporary directory a user put a file, and one still running (this process).
    killed_in_orbax = tmp_path / f".ckpt.jfusion-tmp-{dead}-0000000a"
    (killed_in_orbax / "variables.orbax-checkpoint-tmp").mkdir(parents=True)
    (killed_in_orbax / "variables.orbax-checkpoint-tmp" / "_METADATA").write_text("{")
    killed_deleting = tmp_path / f".ckpt.jfusion-old-{dead}-0000000b"
    shutil.copytree(path, killed_deleting)
    with_user_file = tmp_path / f".ckpt.jfusion-tmp-{dead}-0000000c"
    shutil.copytree(path, with_user_file)
    (with_user_file / "mine.txt").write_text("mine")
    running = tmp_path / f".ckpt.jfusion-tmp-{alive}-0000000d"
    shutil.copytree(path, running)
    not_jfusions = tmp_path / ".ckpt.backup"
    shutil.copytree(path, not_jfusions)
    with pytest.warns(UserWarning, match=rf"kept {with_user_file}: it holds mine.txt, which jfusion did not write"):
        save_checkpoint(path, {"w": np.ones(2)}, overwrite=True)
    assert_bit_exact(load_checkpoint(path)[0], {"w": np.ones(2)})
    assert sorted(os.listdir(tmp_path)) == sorted(["ckpt", with_user_file.name, running.name, not_jfusions.name])
    assert os.listdir(with_user_file) == ["mine.txt"]
    assert sorted(os.listdir(running)) == sorted(os.listdir(not_jfusions)) == ["jfusion.json", "variables"]


def failing_once(function, when):
    """``function``, but raising OSError the first time its arguments match ``when``."""
    failed = []

    def wrapper(*args, **kwargs):
        if not failed and when(*args, **kwargs):
            failed.append(True)
            raise OSError("injected failure")
        return function(*args, **kwargs)

    return wrapper


# step: (what fails there -- an object and its attribute -- and on which arguments)
FAILURES = {
    "writing the arrays": (ocp.StandardCheckpointer, "save", lambda *args, **kwargs: True),
    "renaming the new one into place": (os, "rename", lambda src, dst: Path(dst).name == "ckpt"),
}


@pytest.mark.parametrize("step", FAILURES)
def test_a_save_that_fails_leaves_the_old_checkpoint_and_nothing_else(tmp_path, monkeypatch, step):
    path = save_checkpoint(tmp_path / "ckpt", {"w": np.zeros(2)})
    owner, name, when = FAILURES[step]
    monkeypatch.setattr(owner, name, failing_once(getattr(owner, name), when))
    with pytest.raises(OSError, match="injected failure"):
        save_checkpoint(path, {"w": np.ones(2)}, overwrite=True)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ckpt"]
    assert_bit_exact(load_checkpoint(path)[0], {"w": np.zeros(2)})


# --- a save killed at any step leaves the old or the new checkpoint -----------------------


def generation(k):
    """The checkpoint a test writes k-th: a few leaves of every kind, about 1 MB."""
    rng = np.random.default_rng(k)
    return {
        "params": {
            "kernel": rng.normal(size=(512, 512)).astype(np.float32),
            "bias": rng.normal(size=512).astype(np.float32),
            "scale": rng.normal(size=64).astype(jnp.bfloat16),
        },
        "step": np.int32(k),
    }


# A save over DIR is killed (SIGKILL) just before the first call of a function whose path
# argument matches a pattern, in a child forked by this script (argv: JSON [[DIR, FUNCTION,
# ARGUMENT INDEX or null for any call, PATTERN], ...], the checkpoint to save, jfusion's
# directory), once a line on stdin says go; it prints one line per child: "killed" or how it
# ended instead.
CRASH_DRIVER = r"""
import importlib, json, os, re, signal, sys, threading, types

# checkpoint.py needs only jax, orbax and jfusion.core: skipping the package's __init__ (ott,
# flax, every method) saves most of this test's time.
package = types.ModuleType("jfusion")
package.__path__ = [sys.argv[3]]
sys.modules["jfusion"] = package
from jfusion.workflow.checkpoint import load_checkpoint, save_checkpoint

def kill_before(function, argument, pattern):
    module, name = function.rsplit(".", 1)
    module = importlib.import_module(module)
    original = getattr(module, name)
    def wrapper(*args, **kwargs):
        if argument is None or re.search(pattern, os.fspath(args[argument])):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    setattr(module, name, wrapper)

# Forking is safe only without threads: jax and orbax start theirs when first used (in the
# children), the BLAS pools are pinned to one thread by the environment.
assert threading.active_count() == 1
assert not os.path.isdir("/proc/self/task") or len(os.listdir("/proc/self/task")) == 1
sys.stdin.readline()  # the old checkpoints are written
children = []
for directory, *call in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        try:
            variables, _, _ = load_checkpoint(sys.argv[2])
            kill_before(*call)
            save_checkpoint(directory, variables, overwrite=True)
        finally:
            os._exit(3)  # only a child whose crash point never came gets here
    children.append(pid)
for pid in children:
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    print("killed" if killed else f"not killed (status {status})", flush=True)
"""

OLD = r"/\.ckpt\.jfusion-old-[^/]+"

# point: (the call that kills the save; what the checkpoint's parent then holds -- DIR is
#         "ckpt", its siblings "tmp" and "old"; which generation loads afterwards, None: none)
CRASH_POINTS = {
    "orbax finalizing the arrays": (["os.rename", 1, r"/variables$"], ["ckpt", "tmp"], 0),
    "arrays written, no sidecar": (["os.fsync", None, ""], ["ckpt", "tmp"], 0),
    "sidecar not yet renamed": (["os.replace", 1, r"/jfusion\.json$"], ["ckpt", "tmp"], 0),
    "new complete, old in place": (["os.rename", 1, OLD + "$"], ["ckpt", "tmp"], 0),
    "old moved aside, DIR missing": (["os.rename", 1, r"/ckpt$"], ["old", "tmp"], 1),
    "new in place, old kept": (["os.unlink", 0, OLD + r"/jfusion\.json$"], ["ckpt", "old"], 1),
    "old half-deleted": (["shutil.rmtree", 0, OLD + r"/variables$"], ["ckpt", "old"], 1),
    "old emptied": (["os.rmdir", 0, OLD + "$"], ["ckpt", "old"], 1),
    "first save, before its rename": (["os.rename", 1, r"/ckpt$"], ["tmp"], None),
}


def kinds(directory):
    """What ``directory`` holds: "ckpt", and "tmp" or "old" for each of its siblings."""
    names = {".ckpt.jfusion-tmp": "tmp", ".ckpt.jfusion-old": "old"}
    return sorted(names.get(name[:17], name) for name in os.listdir(directory))


def test_a_save_killed_at_any_step_leaves_the_old_or_the_new_checkpoint(tmp_path):
    new = save_checkpoint(tmp_path / "generation-1", generation(1))
    roots = [tmp_path / str(index) for index in range(len(CRASH_POINTS))]
    calls = [[str(root / "ckpt"), *call] for root, (call, _, _) in zip(roots, CRASH_POINTS.values())]
    single_threaded = {name: "1" for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    # Started first, so that its imports overlap with writing the old checkpoints.
    driver = subprocess.Popen(
        [sys.executable, "-c", CRASH_DRIVER, json.dumps(calls), str(new), jfusion.__path__[0]],
        env={**os.environ, **single_threaded}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    for root, (_, _, loads) in zip(roots, CRASH_POINTS.values()):
        root.mkdir()
        if loads is not None:  # the last point is a first save: nothing to replace
            save_checkpoint(root / "ckpt", generation(0))
    stdout, stderr = driver.communicate("go\n", timeout=300)
    assert driver.returncode == 0, stderr
    assert dict(zip(CRASH_POINTS, stdout.splitlines())) == {point: "killed" for point in CRASH_POINTS}, stderr
    for root, (point, (_, beside, loads)) in zip(roots, CRASH_POINTS.items()):
        assert kinds(root) == beside, point  # killed where named
        if loads is None:
            with pytest.raises(FileNotFoundError, match="does not exist"):
                load_checkpoint(root / "ckpt")
        else:
            loaded, _, _ = load_checkpoint(root / "ckpt")  # digests verified
            assert_bit_exact(loaded, generation(loads))
        # Nothing left blocks the next save, which also clears away what the killed one left.
        save_checkpoint(root / "ckpt", generation(2), overwrite=loads is not None)
        assert os.listdir(root) == ["ckpt"], point
