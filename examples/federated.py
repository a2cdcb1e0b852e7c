"""Federated learning with jfusion as the server's aggregation: FedAvg against OT fusion.

K clients hold a Dirichlet(``dirichlet``) non-iid split of Fashion-MNIST (for every class,
its training images are divided among the clients in Dirichlet proportions; Hsu et al. 2019).
A round: every client starts from the server's model, takes ``local_steps`` SGD steps on
minibatches of its own data (``vmap`` over the K clients), and the server aggregates the K
client models into the next server model, weighting client k by its number of examples:

* FedAvg: the weighted average of the client models (McMahan et al. 2017);
* OT fusion, exact or Sinkhorn: the clients aligned onto the server's previous model by
  weights, then averaged (``jfusion.fuse(clients, spec, target=server)``; Singh & Jaggi
  2020 fuse this way in their federated experiment);
* OT fusion by activations (on ``server_images`` training images the server holds), without
  and with an identity prior (``GroundMetric(identity_prior=lam)``): a price of ``lam``
  times the mean cost on moving a neuron away from its own index, since clients that started
  from the server model keep its neurons in place.

The R rounds of a method run inside one ``lax.scan``: one jitted program per method holds the
clients' local training, the aggregation and the server's test accuracy of every round. Two
starts: *shared* (round 1's clients all start from one server model, as FedAvg assumes) and
*different* (in round 1 each client starts from its own random initialisation, as when
clients bring their own models; the first aggregation must then align, and round 1's
alignment reference is client 0).

Partial fusion (Morelli & Eckstein 2026) widens the model with every aggregation, so it cannot
be a round of a fixed-width loop; it is reported as a one-shot final aggregation of the last
round's clients, beside FedAvg and OT fusion of the same clients.

    python examples/federated.py                 # K = 64 and 256, 20 rounds, Fashion-MNIST
    python examples/federated.py --quick --out /tmp/q   # smoke test: K = 8, 3 rounds, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import jfusion
import kit
from jfusion.models import MLP


@dataclasses.dataclass(frozen=True)
class Config:
    data: str = "fashion_mnist"
    clients: tuple[int, ...] = (64, 256)
    dirichlet: float = 0.5  # concentration: small is more non-iid
    hidden: tuple[int, ...] = (64, 64)
    rounds: int = 20
    local_steps: int = 20
    batch_size: int = 32
    learning_rate: float = 0.05
    starts: tuple[str, ...] = ("shared", "different")
    sinkhorn: bool = True
    activations: bool = True  # OT fusion by activations, without and with the identity prior
    server_images: int = 200  # the activation alignment's inputs
    identity_prior: float = 1.0  # lam of the identity-prior row
    partial_isolated: int = 1  # neurons of every client kept isolated by the final partial fusion
    seed: int = 0
    train_subsample: int | None = None
    test_subsample: int | None = None


def quick() -> Config:
    """K = 8 clients, 3 rounds, one start, weights only: the loop and each kind of aggregation once."""
    return Config(
        data=kit.quick_dataset(), clients=(8,), hidden=(32,), rounds=3, local_steps=5, starts=("different",),
        sinkhorn=False, activations=False, train_subsample=3000, test_subsample=1000,
    )


def dirichlet_split(labels: np.ndarray, clients: int, concentration: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Each class's indices divided among the clients in Dirichlet(concentration) proportions.

    A client left with no example takes one random example, so every client can train."""
    parts: list[list[int]] = [[] for _ in range(clients)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cuts = (np.cumsum(rng.dirichlet(np.full(clients, concentration))) * len(idx)).astype(int)[:-1]
        for k, chunk in enumerate(np.split(idx, cuts)):
            parts[k].extend(chunk.tolist())
    return [np.sort(p) if p else rng.integers(0, len(labels), 1) for p in parts]


def padded(parts: Sequence[np.ndarray]) -> tuple[jax.Array, jax.Array]:
    """The clients' index lists as one ``(K, max n_k)`` array (rows padded by repetition) and their sizes."""
    sizes = np.array([len(p) for p in parts])
    rows = np.stack([np.resize(p, sizes.max()) for p in parts])
    return jnp.asarray(rows, jnp.int32), jnp.asarray(sizes, jnp.int32)


Aggregate = Callable[[Any, Any, jax.Array], tuple[Any, jax.Array]]  # (clients, reference, weights) -> (server, converged)


def aggregations(cfg: Config, model: MLP, server_images: jax.Array) -> dict[str, Aggregate]:
    """name -> ``aggregate(clients, reference, weights) -> (server, all plans converged)``."""
    spec = model.spec()

    def fedavg(clients, reference, weights):
        return jfusion.vanilla_average(clients, model_weights=weights).params, jnp.array(True)

    def ot(solver, metric=jfusion.GroundMetric(), alignment=jfusion.ByWeights()):
        inputs = server_images if isinstance(alignment, jfusion.ByActivations) else None

        def aggregate(clients, reference, weights):
            fused = jfusion.fuse(
                clients, spec, solver=solver, metric=metric, alignment=alignment, model_weights=weights,
                target=reference, inputs=inputs,
            )
            return fused.params, jnp.all(jnp.stack([jnp.all(p.converged) for p in fused.plans.values()]))

        return aggregate

    out = {"FedAvg": fedavg, "OT fusion (exact)": ot(jfusion.Exact())}
    if cfg.sinkhorn:
        out["OT fusion (Sinkhorn)"] = ot(jfusion.Sinkhorn())
    if cfg.activations:
        by_activations = jfusion.ByActivations.from_module(model)
        out["OT fusion (exact, activations)"] = ot(jfusion.Exact(), alignment=by_activations)
        prior = jfusion.GroundMetric(identity_prior=cfg.identity_prior)
        out[f"OT fusion (exact, activations, identity prior {cfg.identity_prior})"] = ot(jfusion.Exact(), prior, by_activations)
    return out


def simulation(cfg: Config, model: MLP, images: jax.Array, labels: jax.Array, test: tuple[jax.Array, jax.Array]):
    """``simulate(starts, aggregate, rows, sizes, key) -> (server, clients, accuracy per round, converged per round)``."""
    optimizer = optax.sgd(cfg.learning_rate)

    def loss(params, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(params, x), y).mean()

    def local_training(params, rows, size, key):
        state = optimizer.init(params)

        def step(carry, key):
            params, state = carry
            idx = rows[jax.random.randint(key, (cfg.batch_size,), 0, size)]
            grads = jax.grad(loss)(params, images[idx], labels[idx])
            updates, state = optimizer.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, _), _ = jax.lax.scan(step, (params, state), jax.random.split(key, cfg.local_steps))
        return params

    def test_accuracy(params):
        return jnp.mean(jnp.argmax(model.apply(params, test[0]), -1) == test[1])

    def simulate(starts, aggregate: Aggregate, rows, sizes, key):
        weights = sizes / jnp.sum(sizes)
        num = rows.shape[0]

        def one_round(carry, inputs):
            starts, server, _ = carry
            first, key = inputs
            clients = jax.vmap(local_training)(starts, rows, sizes, jax.random.split(key, num))
            # Round 1 of different starts has no server model of the clients' basis: align onto client 0.
            reference = jax.tree.map(lambda c, s: jnp.where(first, c[0], s), clients, server)
            server, converged = aggregate(clients, reference, weights)
            broadcast = jax.tree.map(lambda s: jnp.broadcast_to(s, (num, *s.shape)), server)
            return (broadcast, server, clients), (test_accuracy(server), converged)

        server0 = jax.tree.map(lambda s: s[0], starts)
        firsts = jnp.arange(cfg.rounds) == 0
        # The carry keeps only the last round's clients (K models per round would not fit for K = 256).
        (_, server, clients), (accuracy, converged) = jax.lax.scan(
            one_round, (starts, server0, starts), (firsts, jax.random.split(key, cfg.rounds))
        )
        return server, clients, accuracy, converged

    return jax.jit(simulate, static_argnums=1)


def run(cfg: Config, num_clients: int, start: str, data: kit.Data) -> dict[str, Any]:
    rng = np.random.default_rng(cfg.seed)
    model = MLP((*cfg.hidden, 10))
    spec = model.spec()
    images = jnp.asarray(data.xtr.reshape(len(data.xtr), -1))
    labels = jnp.asarray(data.ytr)
    test = (jnp.asarray(data.xte.reshape(len(data.xte), -1)), jnp.asarray(data.yte))
    rows, sizes = padded(dirichlet_split(data.ytr, num_clients, cfg.dirichlet, rng))
    keys = jax.random.split(jax.random.key(cfg.seed), num_clients)
    if start == "shared":
        keys = jnp.broadcast_to(keys[:1], keys.shape)
    starts = jax.vmap(lambda k: model.init(k, images[:1]))(keys)
    simulate = simulation(cfg, model, images, labels, test)
    curves, table, finals = {}, [], {}
    server_images = images[rng.choice(len(images), cfg.server_images, replace=False)]
    for name, aggregate in aggregations(cfg, model, server_images).items():
        began = time.perf_counter()
        jax.block_until_ready(simulate(starts, aggregate, rows, sizes, jax.random.key(1)))
        first_s = time.perf_counter() - began
        began = time.perf_counter()
        server, clients, accuracy, converged = jax.block_until_ready(simulate(starts, aggregate, rows, sizes, jax.random.key(1)))
        round_s = (time.perf_counter() - began) / cfg.rounds
        curves[name] = [float(a) for a in accuracy]
        finals[name] = clients
        table.append({
            "name": name, "final_accuracy": curves[name][-1], "best_accuracy": max(curves[name]),
            "all_converged": bool(np.all(converged)), "first_call_s": first_s, "round_s": round_s,
        })
        print(f"[K={num_clients}, {start}] {name}: {100 * curves[name][-1]:.2f}% after {cfg.rounds} rounds, "
              f"{1000 * round_s:.1f} ms/round", flush=True)
    return {"curves": curves, "table": table, "one_shot": one_shot(cfg, model, spec, finals["FedAvg"], sizes, test)}


def one_shot(cfg: Config, model: MLP, spec: jfusion.Spec, clients: Any, sizes: jax.Array, test) -> list[dict[str, Any]]:
    """FedAvg, OT fusion and partial fusion of FedAvg's last-round clients, once."""
    weights = sizes / jnp.sum(sizes)
    width = min(cfg.hidden)
    partial = jfusion.partial_fuse(clients, spec, cfg.partial_isolated / width, model_weights=weights)
    fused = {
        "FedAvg": jfusion.vanilla_average(clients, model_weights=weights).params,
        "OT fusion (exact)": jfusion.fuse(clients, spec, model_weights=weights).params,
        f"partial fusion ({cfg.partial_isolated} isolated neuron(s) per client and layer)": partial.params,
    }
    out = []
    for name, params in fused.items():
        module = jfusion.module_for(model, params, spec)
        logits = module.apply(params, test[0])
        out.append({"name": name, "accuracy": float(jnp.mean(jnp.argmax(logits, -1) == test[1])),
                    "params": kit.count_params(params)[0], "widths": dict(jfusion.widths_of(params, spec))})
    return out


def plot(cfg: Config, results: dict[str, Any]) -> Any:
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, (title, res) in zip(axes[0], results.items()):
        for name, curve in res["curves"].items():
            ax.plot(range(1, cfg.rounds + 1), [100 * a for a in curve], marker="o", markersize=3, label=name)
        ax.set_xlabel("round")
        ax.set_ylabel("server test accuracy %")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main(argv: Sequence[str] | None = None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test: K = 8 clients, 3 rounds")
    parser.add_argument("--out", default=None, help="output directory (default examples/results; a temp dir with --quick)")
    args = parser.parse_args(argv)
    cfg = quick() if args.quick else Config()
    began = time.perf_counter()
    data = kit.load_data(cfg.data, cfg.train_subsample, cfg.test_subsample)
    results = {f"K={k}, {start} start": run(cfg, k, start, data) for k in cfg.clients for start in cfg.starts}
    tables = {}
    for title, res in results.items():
        tables[f"{title}: {cfg.rounds} rounds"] = kit.Table(
            ["aggregation", "final acc. %", "best acc. %", "plans converged", "first call s", "ms / round"],
            [[r["name"], f"{100 * r['final_accuracy']:.2f}", f"{100 * r['best_accuracy']:.2f}", r["all_converged"],
              f"{r['first_call_s']:.1f}", f"{1000 * r['round_s']:.1f}"] for r in res["table"]],
        )
        tables[f"{title}: one-shot aggregation of FedAvg's last-round clients"] = kit.Table(
            ["aggregation", "test acc. %", "params", "hidden widths"],
            [[r["name"], f"{100 * r['accuracy']:.2f}", f"{r['params']:,}", r["widths"]] for r in res["one_shot"]],
        )
    return kit.write_report(
        kit.output_dir(args.out, args.quick, "federated"), "federated", title="Federated rounds: FedAvg against OT fusion",
        settings=dataclasses.asdict(cfg), tables=tables, data=results, figures={"federated.png": plot(cfg, results)},
        script="federated.py", argv=argv, runtime_s=time.perf_counter() - began,
    )


if __name__ == "__main__":
    main()
