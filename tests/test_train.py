"""Training K models at once: accuracy, seeds, unequal subsets, BatchNorm, finetuning."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jfusion
from jfusion.workflow.data import load_dataset, proportion_split
from jfusion.models import MLP
from jfusion.workflow.train import evaluate, evaluate_models, finetune, init_models, train_models

pytestmark = pytest.mark.slow  # end to end: trains models

# The demo's model, batch size and K: tests and demo share compiled programs in one run.
MODEL = MLP((64, 64, 10))
BATCH = 32


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def trained(digits):
    """Three models on unequal subsets: 40% and 60% of the data, and only classes 0-4."""
    x, y = digits.train_images, digits.train_labels
    part_a, part_b = proportion_split(y, (0.4, 0.6), seed=0)
    low = np.flatnonzero(y < 5)
    subsets = [(x[part_a], y[part_a]), (x[part_b], y[part_b]), (x[low], y[low])]
    calls = []
    variables = train_models(
        MODEL, subsets, seeds=[0, 1, 2], epochs=12, batch_size=BATCH,
        progress=lambda epoch, total, losses: calls.append((epoch, total, losses)),
    )
    return variables, subsets, calls


def model_k(variables, k):
    return jax.tree.map(lambda a: a[k], variables)


def test_models_trained_together_beat_80_percent(trained, digits):
    variables, subsets, _ = trained
    assert jax.tree.leaves(variables)[0].shape[0] == 3
    accuracy = evaluate_models(MODEL, variables, digits.test_images, digits.test_labels)
    assert accuracy.shape == (3,)
    assert accuracy[0] > 0.8 and accuracy[1] > 0.8, accuracy
    single = evaluate(MODEL, model_k(variables, 1), digits.test_images, digits.test_labels, batch_size=64)
    assert single == pytest.approx(accuracy[1])  # batching and padding do not change the count


def test_each_model_learns_only_from_its_own_subset(trained, digits):
    variables, subsets, _ = trained
    assert len({len(s[1]) for s in subsets}) == 3  # three different sizes
    logits = MODEL.apply(model_k(variables, 2), digits.test_images)
    predicted = np.asarray(jnp.argmax(logits, -1))
    # Model 2 saw classes 0-4 only: it never predicts 5-9, and knows 0-4 well.
    assert (predicted < 5).mean() > 0.97
    low = digits.test_labels < 5
    assert (predicted[low] == digits.test_labels[low]).mean() > 0.9


def test_progress_reports_every_epoch_with_falling_losses(trained):
    _, _, calls = trained
    assert [c[:2] for c in calls] == [(e, 12) for e in range(1, 13)]
    first, last = calls[0][2], calls[-1][2]
    assert first.shape == (3,) and (last < 0.5 * first).all(), (first, last)


def test_seeds_set_initialisation_and_batch_order(digits):
    params = init_models(MODEL, [0, 1, 0], digits.train_images[:4])["params"]
    kernels = params["Dense_0"]["kernel"]
    assert not np.array_equal(kernels[0], kernels[1])
    np.testing.assert_array_equal(kernels[0], kernels[2])
    same = init_models(MODEL, [5, 6, 7], digits.train_images[:4], same_init=True)["params"]["Dense_0"]["kernel"]
    np.testing.assert_array_equal(same[0], same[1])
    # Same initialisation, same data: only the seed's batch order tells models 0 and 1 apart.
    trained = train_models(
        MODEL, (digits.train_images, digits.train_labels), [0, 1, 0], epochs=1, batch_size=BATCH, same_init=True
    )["params"]["Dense_1"]["kernel"]
    assert not np.allclose(trained[0], trained[1])
    np.testing.assert_array_equal(trained[0], trained[2])


def test_finetuning_repairs_a_vanilla_average(trained, digits):
    variables, subsets, _ = trained
    averaged = jfusion.vanilla_average([model_k(variables, 0), model_k(variables, 1)]).params
    before = evaluate(MODEL, averaged, digits.test_images, digits.test_labels)
    tuned = finetune(MODEL, averaged, digits.train_images, digits.train_labels, epochs=3, seed=0, batch_size=BATCH)
    after = evaluate(MODEL, tuned, digits.test_images, digits.test_labels)
    assert jax.tree.structure(tuned) == jax.tree.structure(averaged)
    assert after > 0.85 and after > before, (before, after)


def test_subset_count_must_match_seeds(digits):
    pair = (digits.train_images[:10], digits.train_labels[:10])
    with pytest.raises(ValueError, match="2 subsets for 3 seeds"):
        train_models(MODEL, [pair, pair], [0, 1, 2], epochs=1)


class TinyBN(nn.Module):
    @nn.compact
    def __call__(self, x, *, train: bool):
        x = nn.Dense(16)(x.reshape((x.shape[0], -1)))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(10)(nn.relu(x))


def test_batchnorm_models_train_and_update_running_statistics(digits):
    model = TinyBN()
    initial = init_models(model, [0, 1], digits.train_images[:1])
    assert set(initial) == {"params", "batch_stats"}
    trained = train_models(
        model, (digits.train_images, digits.train_labels), [0, 1], epochs=6, batch_size=32,
        optimizer=optax.adam(3e-3),
    )
    mean = np.asarray(trained["batch_stats"]["BatchNorm_0"]["mean"])
    var = np.asarray(trained["batch_stats"]["BatchNorm_0"]["var"])
    assert mean.shape == (2, 16)
    assert not np.allclose(mean, 0) and not np.allclose(var, 1)  # moved off the init values
    assert not np.allclose(mean[0], mean[1])
    # Inference uses the running statistics: they must match the data's pre-BN statistics.
    first = model_k(trained, 0)
    h = np.asarray(digits.train_images.reshape(len(digits.train_images), -1) @ first["params"]["Dense_0"]["kernel"]
                   + first["params"]["Dense_0"]["bias"])
    np.testing.assert_allclose(mean[0], h.mean(0), atol=0.1 * np.abs(h).mean() + 0.05)
    accuracy = evaluate_models(model, trained, digits.test_images, digits.test_labels)
    assert (accuracy > 0.85).all(), accuracy
