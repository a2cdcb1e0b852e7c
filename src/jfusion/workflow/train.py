"""Train K models at once: one XLA program per optimizer step advances all K models.

The K models' variables (and optimizer states) are stacked along a leading K axis and each
step is ``vmap``ped over them, their seeds and their data subsets: one XLA program per step
for all K models. The loss is the mean cross-entropy
``-1/B sum_i log softmax(f(x_i))[y_i]`` of each model's own minibatch.

Subsets of unequal sizes (a special-class split gives a specialist a few hundred examples
and its partner thousands) are concatenated into one array on the device; model k reads
only its own range of it. An epoch is ``max_k n_k // batch_size`` steps (every model takes
the same number of steps, so they vmap); each model walks through its own examples in a
fresh random order each pass -- back-to-back permutations of ``range(n_k)``, drawn on the
host from the model's seed -- so a smaller subset is seen more than once per epoch, and
every example is seen equally often up to one pass.

Models with BatchNorm follow the reference convention: ``__call__`` takes a keyword
``train``; with a ``"batch_stats"`` collection, training applies
``train=True, mutable=["batch_stats"]`` and evaluation ``train=False``. Models without
``train`` are applied as ``model.apply(variables, x)``.

flax.nnx models take the same path: an nnx model is ``nnx.split`` into its static GraphDef
and an ``nnx.State``, the K models' states are stacked, and every step merges a fresh
module per model from (graphdef, state) -- ``Module.train()`` or ``eval()`` set on it --
and returns the state it leaves behind (updated BatchNorm statistics, advanced rng
streams), so a step stays a pure function of the stacked states. Initialising K nnx models
from seeds needs their constructor, ``make(rngs) -> Module``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jfusion.core.nnx import fresh, graphdef_of, is_nnx

Variables = Mapping[str, Any]
Subset = tuple[Any, Any]
Progress = Callable[[int, int, np.ndarray], None]

# One shared instance, so repeated calls with the default reuse the compiled programs
# (optax builds new closures, hence a new jit cache key, on every ``optax.adam(...)``).
DEFAULT_OPTIMIZER = optax.adam(1e-3)

# Collections that hold the values of one forward pass, not state to train or save.
_SOWN = ("activations", "intermediates")


class _ByIdentity:
    """A module that cannot be hashed (a list attribute, say) as a jit static argument."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __hash__(self) -> int:
        return id(self.module)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ByIdentity) and other.module is self.module


def takes_train(model: nn.Module, variables: Variables) -> bool:
    """Whether ``model`` is applied with a ``train=`` flag (it has BatchNorm or asks for one)."""
    if "batch_stats" in variables:
        return True
    try:
        return "train" in inspect.signature(model.__call__).parameters
    except (TypeError, ValueError):
        return False


# A model is seen through an adapter: variables split into the trained parameters and the
# rest (batch statistics, rng counters), and ``apply(params, rest, x) -> (logits, rest)``, a
# pure function; the steps below are written once against it for linen and nnx.


@dataclasses.dataclass(frozen=True)
class _Linen:
    """A linen module; variables ``{"params": ..., "batch_stats": ..., ...}``."""

    static: nn.Module | _ByIdentity

    @property
    def module(self) -> nn.Module:
        return self.static.module if isinstance(self.static, _ByIdentity) else self.static

    def init(self, key: jax.Array, x: jax.Array) -> Variables:
        variables = self.module.init(key, x, train=False) if takes_train(self.module, {}) else self.module.init(key, x)
        return {c: v for c, v in variables.items() if c not in _SOWN}

    def split(self, variables: Variables) -> tuple[Any, dict[str, Any]]:
        return variables["params"], {c: v for c, v in variables.items() if c != "params"}

    def join(self, params: Any, rest: Mapping[str, Any], like: Variables) -> dict[str, Any]:
        return {c: params if c == "params" else rest[c] for c in like}

    def apply(self, params: Any, rest: Mapping[str, Any], x: jax.Array, *, train: bool, rng: jax.Array | None = None):
        model, variables = self.module, {"params": params, **rest}
        if not takes_train(model, variables):
            return model.apply(variables, x), rest
        rngs = {"dropout": rng} if rng is not None else None
        if train and "batch_stats" in variables:
            logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"], rngs=rngs)
            return logits, {**rest, **updates}
        return model.apply(variables, x, train=train, rngs=rngs), rest


@dataclasses.dataclass(frozen=True)
class _Nnx:
    """An nnx model; variables an ``nnx.State``, its ``nnx.Param`` leaves trained.

    ``make(rngs) -> Module`` builds a model (needed to initialise K of them from seeds).
    Training mode is the module's (``Module.train()``: BatchNorm normalises by the batch
    and updates its statistics, Dropout draws from the module's own rng streams, which
    advance in the state).
    """

    graphdef: nnx.GraphDef
    make: Callable[[nnx.Rngs], nnx.Module] | None = None

    def init(self, key: jax.Array, x: jax.Array) -> nnx.State:
        if self.make is None:
            raise ValueError(
                "initialising nnx models from seeds needs a constructor: pass make(rngs) -> Module "
                "(e.g. lambda rngs: Net(rngs=rngs)) instead of a module or graphdef"
            )
        return nnx.state(self.make(nnx.Rngs(key)))

    def split(self, state: nnx.State) -> tuple[nnx.State, nnx.State]:
        return nnx.split_state(state, nnx.Param, ...)

    def join(self, params: nnx.State, rest: nnx.State, like: nnx.State) -> nnx.State:
        return nnx.merge_state(params, rest)

    def apply(self, params: nnx.State, rest: nnx.State, x: jax.Array, *, train: bool, rng: jax.Array | None = None):
        module = fresh(self.graphdef, params, rest, train=train)
        logits = module(x)
        return logits, nnx.state(module, nnx.Not(nnx.Param))


Model = nn.Module | nnx.Module | nnx.GraphDef | Callable[[nnx.Rngs], nnx.Module]


def _adapter(model: Model) -> _Linen | _Nnx:
    if isinstance(model, nn.Module):
        try:  # equal hashable modules share compiled programs; others are cached per object
            hash(model)
            return _Linen(model)
        except TypeError:
            return _Linen(_ByIdentity(model))
    if is_nnx(model):
        return _Nnx(graphdef_of(model))
    if callable(model):
        return _Nnx(nnx.graphdef(nnx.eval_shape(lambda: model(nnx.Rngs(0)))), model)
    raise TypeError(
        f"model must be a flax.linen module, an nnx Module or GraphDef, or make(rngs) -> nnx Module; "
        f"got {type(model).__name__}"
    )


# --- initialisation -----------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _init_stacked(adapter: _Linen | _Nnx, keys: jax.Array, x: jax.Array) -> Any:
    # lax.map, not vmap: the same stacked result, and XLA compiles a batched threefry
    # several times more slowly (seconds on CPU) than one run in a loop.
    return jax.lax.map(lambda key: adapter.init(key, x), keys)


def init_models(model: Model, seeds: Sequence[int], sample_input: Any, *, same_init: bool = False) -> Any:
    """Initial variables of ``len(seeds)`` models, stacked along a leading K axis.

    Args:
      model: a flax.linen module, or ``make(rngs) -> nnx.Module`` (the result is then a
        stacked ``nnx.State``).
      seeds: one per model; model k is initialised from ``jax.random.key(seeds[k])``.
      sample_input: a batch of inputs (only its first example's shape is used).
      same_init: give every model the initialisation of ``seeds[0]`` (OTFusion's
        same-initialisation experiments); the seeds then only change batch orders.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("init_models needs at least one seed")
    x = jnp.asarray(sample_input[:1])
    # Same init: K copies of seeds[0]'s key, so the program is the one of distinct seeds.
    init_seeds = [seeds[0]] * len(seeds) if same_init else seeds
    return _init_stacked(_adapter(model), jax.vmap(jax.random.key)(jnp.asarray(init_seeds)), x)


# --- training -----------------------------------------------------------------------------


def _is_pair(subsets: Any) -> bool:
    return (
        isinstance(subsets, (tuple, list))
        and len(subsets) == 2
        and not isinstance(subsets[0], (tuple, list))
        and np.ndim(subsets[1]) == 1
    )


def _pack(subsets: Subset | Sequence[Subset], num_models: int) -> tuple[jax.Array, jax.Array, list[int], list[int]]:
    """One device array of every distinct subset, and each model's offset and size in it."""
    if _is_pair(subsets):
        subsets = [subsets] * num_models
    subsets = list(subsets)
    if len(subsets) != num_models:
        raise ValueError(f"got {len(subsets)} subsets for {num_models} seeds; give one per model or one shared")
    # Subsets given as the same arrays are stored once (e.g. one dataset for all K).
    placed: dict[tuple[int, int], int] = {}
    images, labels, offsets, sizes, total = [], [], [], [], 0
    for k, (x, y) in enumerate(subsets):
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"subset {k} has {len(x)} images and {len(y)} labels; need equal, non-zero counts")
        key = (id(x), id(y))
        if key not in placed:
            placed[key] = total
            images.append(np.asarray(x, np.float32))
            labels.append(np.asarray(y, np.int32))
            total += len(x)
        offsets.append(placed[key])
        sizes.append(len(x))
    shapes = {a.shape[1:] for a in images}
    if len(shapes) > 1:
        raise ValueError(f"subsets have different example shapes {sorted(shapes)}")
    return jnp.asarray(np.concatenate(images)), jnp.asarray(np.concatenate(labels)), offsets, sizes


def _epoch_indices(rng: np.random.Generator, size: int, count: int) -> np.ndarray:
    # Back-to-back permutations: without replacement within each pass over the subset.
    passes = -(-count // size)
    return np.concatenate([rng.permutation(size) for _ in range(passes)])[:count]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _train_step(adapter, optimizer, params, rest, opt_state, images, labels, idx, keys):
    """One optimizer step of every model: ``vmap`` over models of a single step.

    Epochs loop over this in Python rather than in a ``lax.scan``: XLA:CPU runs convolution
    gradients inside a loop body many times slower than as a program of their own
    (jax-ml/jax#12868), and a step's dispatch costs little next to its work.
    """

    def one_model(params, rest, opt_state, batch, key):
        x, y = images[batch], labels[batch]

        def loss_fn(p):
            logits, new_rest = adapter.apply(p, rest, x, train=True, rng=key)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_rest

        (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        changes, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, changes), new_rest, opt_state, loss

    return jax.vmap(one_model)(params, rest, opt_state, idx, keys)


def fit_models(
    model: Model,
    variables: Any,
    subsets: Subset | Sequence[Subset],
    seeds: Sequence[int],
    *,
    epochs: int,
    batch_size: int = 128,
    optimizer: optax.GradientTransformation | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Continue training K models whose variables are stacked along a leading K axis.

    Args:
      model: the flax.linen module all K models instantiate, or the nnx model (a Module,
        its GraphDef or ``make(rngs) -> Module``).
      variables: stacked linen variables (``{"params": ..., "batch_stats": ...}``), or a
        stacked ``nnx.State`` (its ``nnx.Param`` leaves are trained).
      subsets: K ``(images, labels)`` pairs, of any sizes, or one pair shared by all K.
      seeds: one per model: its batch order (and dropout keys).
      epochs: passes of ``max_k n_k // batch_size`` steps each.
      batch_size: examples per step and model.
      optimizer: an optax transformation (``optax.adam(1e-3)`` when None), one state per model.
      progress: called after every epoch as ``progress(epoch, epochs, losses)`` with ``losses``
        the K models' mean training loss over that epoch (a numpy array).

    Returns:
      The trained variables, stacked, with the collections of ``variables``.
    """
    seeds = [int(s) for s in seeds]
    num_models = len(seeds)
    sizes_k = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in jax.tree.leaves(variables)}
    if sizes_k != {num_models}:
        raise ValueError(
            f"variables must be stacked along a leading axis of {num_models} models (one per "
            f"seed); their leading sizes are {sorted(map(str, sizes_k))}"
        )
    if batch_size < 1 or epochs < 0:
        raise ValueError(f"need batch_size >= 1 and epochs >= 0, got {batch_size}, {epochs}")
    optimizer = DEFAULT_OPTIMIZER if optimizer is None else optimizer
    images, labels, offsets, sizes = _pack(subsets, num_models)
    adapter = _adapter(model)
    params, rest = adapter.split(variables)
    opt_state = jax.jit(jax.vmap(optimizer.init))(params)
    steps = max(1, max(sizes) // batch_size)
    orders = [np.random.default_rng(seed) for seed in seeds]
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
    for epoch in range(epochs):
        idx = np.stack(
            [off + _epoch_indices(rng, n, steps * batch_size) for rng, off, n in zip(orders, offsets, sizes)]
        ).reshape(num_models, steps, batch_size)
        idx = jnp.asarray(idx.transpose(1, 0, 2), jnp.int32)  # (steps, K, batch)
        epoch_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, epoch)
        total = jnp.zeros((num_models,), jnp.float32)
        for step in range(steps):
            step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(epoch_keys, step)
            params, rest, opt_state, losses = _train_step(
                adapter, optimizer, params, rest, opt_state, images, labels, idx[step], step_keys
            )
            total = total + losses
        if progress is not None:
            progress(epoch + 1, epochs, np.asarray(total / steps))
    return adapter.join(params, rest, variables)


def train_models(
    model: Model,
    subsets: Subset | Sequence[Subset],
    seeds: Sequence[int],
    *,
    epochs: int,
    batch_size: int = 128,
    optimizer: optax.GradientTransformation | None = None,
    progress: Progress | None = None,
    same_init: bool = False,
) -> Any:
    """Initialise and train ``len(seeds)`` models at once; variables stacked along a leading K axis.

    Seed k sets model k's initialisation (``jax.random.key(seeds[k])``) and its batch order.
    ``model`` is a linen module or ``make(rngs) -> nnx.Module`` (see :func:`init_models`).
    See :func:`fit_models` for the other arguments and :func:`init_models` for ``same_init``.
    The stacked result is what :func:`jfusion.fuse` and :func:`jfusion.vanilla_average` take.
    """
    first = subsets if _is_pair(subsets) else list(subsets)[0]
    variables = init_models(model, seeds, np.asarray(first[0][:1], np.float32), same_init=same_init)
    return fit_models(
        model, variables, subsets, seeds,
        epochs=epochs, batch_size=batch_size, optimizer=optimizer, progress=progress,
    )


def finetune(
    model: Model,
    variables: Any,
    images: Any,
    labels: Any,
    *,
    epochs: int,
    seed: int = 0,
    batch_size: int = 128,
    optimizer: optax.GradientTransformation | None = None,
    progress: Progress | None = None,
) -> Any:
    """Continue training one model (e.g. a fused one) with a fresh optimizer state.

    ``variables`` are one model's (not stacked); so is the result.
    """
    stacked = jax.tree.map(lambda a: jnp.asarray(a)[None], variables)
    trained = fit_models(
        model, stacked, (images, labels), [seed],
        epochs=epochs, batch_size=batch_size, optimizer=optimizer, progress=progress,
    )
    return jax.tree.map(lambda a: a[0], trained)


# --- evaluation ---------------------------------------------------------------------------


def _count_correct(adapter, variables, images, labels, mask) -> jax.Array:
    params, rest = adapter.split(variables)

    def body(total, batch):
        x, y, m = batch
        logits, _ = adapter.apply(params, rest, x, train=False)
        return total + jnp.sum((jnp.argmax(logits, axis=-1) == y) & m), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.int32), (images, labels, mask))
    return total


@functools.partial(jax.jit, static_argnums=0)
def _logits(adapter, variables, images):
    params, rest = adapter.split(variables)
    return jax.lax.map(lambda x: adapter.apply(params, rest, x, train=False)[0], images)


@functools.partial(jax.jit, static_argnums=0)
def _correct_one(adapter, variables, images, labels, mask):
    return _count_correct(adapter, variables, images, labels, mask)


@functools.partial(jax.jit, static_argnums=0)
def _correct_stacked(adapter, variables, images, labels, mask):
    count = functools.partial(_count_correct, adapter)
    return jax.vmap(count, in_axes=(0, None, None, None))(variables, images, labels, mask)


def _batched(images: Any, labels: Any, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Padded to whole batches (masked out of the count), so every batch has one shape and
    # only one batch of activations is live at a time.
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int32)
    n = len(labels)
    if n == 0 or len(images) != n:
        raise ValueError(f"need equal, non-zero numbers of images and labels, got {len(images)} and {n}")
    size = min(batch_size, n)
    pad = -n % size
    mask = np.arange(n + pad) < n
    images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), np.float32)])
    labels = np.concatenate([labels, np.zeros((pad,), np.int32)])
    batches = (n + pad) // size
    return (
        images.reshape(batches, size, *images.shape[1:]),
        labels.reshape(batches, size),
        mask.reshape(batches, size),
    )


def evaluate(model: Model, variables: Any, images: Any, labels: Any, *, batch_size: int = 1000) -> float:
    """Top-1 accuracy of one model (BatchNorm in inference mode), in batches of ``batch_size``.

    ``model`` is a linen module with its variables, or an nnx model (Module, GraphDef or
    ``make(rngs)``) with an ``nnx.State``.
    """
    x, y, mask = _batched(images, labels, batch_size)
    return float(_correct_one(_adapter(model), variables, x, y, mask)) / float(mask.sum())


def predict(model: Model, variables: Any, images: Any, *, batch_size: int = 1000) -> np.ndarray:
    """One model's outputs (logits) on ``images`` (BatchNorm in inference mode), in batches.

    ``model`` and ``variables`` as for :func:`evaluate`; returns a numpy array, one row per image.
    """
    x, _, mask = _batched(images, np.zeros(len(images), np.int32), batch_size)
    logits = np.asarray(_logits(_adapter(model), variables, x))
    return logits.reshape(-1, *logits.shape[2:])[: int(mask.sum())]


def evaluate_models(
    model: Model, variables: Any, images: Any, labels: Any, *, batch_size: int = 1000
) -> np.ndarray:
    """Top-1 accuracy of each of K models stacked along a leading axis: a ``(K,)`` array."""
    x, y, mask = _batched(images, labels, batch_size)
    return np.asarray(_correct_stacked(_adapter(model), variables, x, y, mask)) / float(mask.sum())
