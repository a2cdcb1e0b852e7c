"""loss_barrier with git-re-basin's protocol (several metrics, the mean of the endpoints), and its plot."""

import jax.numpy as jnp
import numpy as np
import pytest

import jfusion


def _metrics(p):
    # Along w = 2 - 4t (t: lambda): loss rises by a bump on top of a slope, accuracy dips.
    w = p["w"]
    return {"loss": w + jnp.exp(-(w**2)), "accuracy": 1.0 - 0.5 * jnp.exp(-(w**2)), "train_acc": jnp.ones(())}


def test_barriers_are_measured_from_the_mean_of_the_endpoints():
    a, b = {"w": jnp.array(2.0)}, {"w": jnp.array(-2.0)}
    result = jfusion.loss_barrier(_metrics, a, b)
    assert result.lambdas.shape == (25,) and set(result.values) == {"loss", "accuracy", "train_acc"}
    w = 2.0 - 4.0 * np.linspace(0, 1, 25)
    loss = w + np.exp(-(w**2))
    # The endpoints' mean, not the line between them (which would give ~ exp(0) = 1 at w = 0).
    assert float(result.barrier) == pytest.approx(np.max(loss) - (loss[0] + loss[-1]) / 2, rel=1e-5)
    assert float(result.barrier) > 1.5
    accuracy = 1.0 - 0.5 * np.exp(-(w**2))
    assert float(result.barriers["accuracy"]) == pytest.approx((accuracy[0] + accuracy[-1]) / 2 - accuracy.min(), rel=1e-5)
    assert float(result.barriers["train_acc"]) == pytest.approx(0.0, abs=1e-7)
    flipped = jfusion.loss_barrier(_metrics, a, b, num_points=3, higher_is_better=())
    assert float(flipped.barriers["accuracy"]) == pytest.approx(0.0, abs=1e-6)  # read as a loss
    with pytest.raises(ValueError, match="num_points must be an int >= 2"):
        jfusion.loss_barrier(_metrics, a, b, num_points=1)


def test_plot_interpolation_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    a, b = {"w": jnp.array(2.0)}, {"w": jnp.array(-2.0)}
    curves = {"naive": jfusion.loss_barrier(_metrics, a, b, num_points=5), "aligned": jfusion.loss_barrier(_metrics, a, a, num_points=5)}
    path = jfusion.plot_interpolation(curves, tmp_path / "curves.png", title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert jfusion.plot_interpolation(curves, path, overwrite=True) == path  # jfusion's own PNG may be replaced
