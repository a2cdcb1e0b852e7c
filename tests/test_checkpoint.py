"""Checkpoints: bit-exact arrays, the Spec (with views) and metadata; explicit overwrites."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfusion.workflow.checkpoint import load_checkpoint, save_checkpoint
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
