"""An exact linear-assignment solver built for XLA: a forward auction with epsilon-scaling.

Problem: given a square cost ``C (n, n)``, find the permutation ``s`` minimising
``sum_i C[i, s(i)]``. Its LP dual is ``max sum_i u_i - sum_j p_j`` subject to
``u_i - p_j <= C[i, j]``; ``p`` are the column *prices*.

**Auction** (Bertsekas 1988, "The auction algorithm: a distributed relaxation method for
the assignment problem", Annals of Operations Research 14). An unassigned row ``i`` looks
at its net costs ``C[i, j] + p_j``, takes its best column ``j_i`` and its second best net
cost ``b2_i``, and bids the price ``b2_i - C[i, j_i] + eps`` for ``j_i``: the highest at
which ``j_i`` stays within ``eps`` of its best alternative. Each column takes its highest
bid, raises its price to it, and its previous owner becomes unassigned. Every assigned
row then satisfies *eps-complementary slackness* (eps-CS):
``C[i, s(i)] + p_s(i) <= min_j (C[i, j] + p_j) + eps``; once all rows are assigned the
assignment costs at most ``n * eps`` more than the dual bound. Here the unassigned rows
bid at once (the Jacobi variant), each round a few array passes, and the whole solve is
one ``lax.scan`` of ``lax.while_loop``s, which ``vmap`` batches.

**Integers** (:func:`quantise`). The cost, mapped affinely onto ``[0, 1]``, is rounded to
``q in {0..Q}`` and multiplied by ``n + 1``. Every assignment's cost is then a multiple of
``n + 1``, so ``eps = 1`` (a duality gap ``<= n < n + 1``) proves the assignment optimal for
``q``: no tolerance to choose, no float drift (:func:`certify`).

**Epsilon scaling** (Bertsekas & Castañon 1989, "The auction algorithm for the
transportation problem", Annals of Operations Research 20). A large ``eps`` settles the
prices' rough shape in few rounds; it is divided by ``SCALING`` phase after phase down to
1, each phase starting from the previous prices. Rows whose column still satisfies the new
eps-CS keep it (prices only rise, which keeps it true); the others bid again.

**Range.** Each phase starts with the prices shifted to min 0 (no comparison changes). A
complete eps-CS assignment has a price spread ``<= R + eps`` with ``R = (n + 1) Q``, and a
phase raises no price more than ``2 R + 2 eps`` above its start, so prices stay below
``4 R <= 2^30``: with ``R <= 2^28`` all arithmetic is exact in int32.

**Gap to the float problem** (:func:`quantisation_gap`). Rounding moves each scaled entry
by ``<= 1 / (2Q)``, and the float32 affine map onto ``[0, 1]`` by ``<~ 2^-23``; comparing
the quantised and the float optimum through both permutations, the assignment's float
cost exceeds the float optimum by at most ``n * (1/Q + 2^-21)`` in scaled units, i.e.
``n * (max C - min C) * (1/Q + 2^-21)`` in the cost's units, and ``1/n`` of that for OT
between uniform marginals (plan ``P / n``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

SCALING = 8  # eps divisor between phases (Bertsekas suggests 4..10)
BLOCK = 128  # most rows bidding in one round (see `auction`)
_RANGE = 2**28  # (n + 1) * Q <= _RANGE keeps every price < 2^30 (module docstring)
_PRICE_LIMIT = 2**30
_BIG = jnp.iinfo(jnp.int32).max


class Auction(NamedTuple):
    """An assignment and its certificate.

    Attributes:
      assignment: ``(n,)`` int32, the column of each row (-1: unassigned, after a cap hit).
      prices: ``(n,)`` int32 column prices, in the units of the integer cost.
      converged: the certificate (:func:`certify`) holds. False after an iteration cap hit,
        or whenever the assignment is not proven optimal.
      iterations: bidding rounds run, over all phases.
    """

    assignment: jax.Array
    prices: jax.Array
    converged: jax.Array
    iterations: jax.Array


def levels(n: int) -> int:
    """``Q``, the quantisation levels for size ``n``: ``(n + 1) Q <= 2^28``, and no finer
    than float32 resolves on ``[0, 1]``."""
    if n + 1 > _RANGE:
        raise ValueError(f"the auction solves assignments of size n < {_RANGE - 1}, got n={n}")
    return min(2**24, _RANGE // (n + 1))


def quantise(scaled: jax.Array) -> jax.Array:
    """The integer cost ``(n + 1) * round(Q * scaled)`` of a square cost ``scaled`` in [0, 1]."""
    n = scaled.shape[0]
    return jnp.round(jnp.clip(scaled, 0.0, 1.0) * levels(n)).astype(jnp.int32) * (n + 1)


def quantisation_gap(n: int) -> float:
    """Bound on the float cost of the quantised optimum minus the float optimum, for a cost
    scaled onto [0, 1] (module docstring); multiply by ``max C - min C`` for the cost's units."""
    return n * (1.0 / levels(n) + 2.0**-21)


def certify(cost: jax.Array, assignment: jax.Array, prices: jax.Array, eps: int = 1) -> jax.Array:
    """Whether ``assignment`` is optimal for the integer ``cost`` of :func:`quantise`, in O(n^2).

    With ``u_i = min_j (cost[i, j] + p_j)``, the reduced costs ``cost[i, j] + p_j - u_i`` are
    ``>= 0`` (dual feasibility, by construction); checked here: the assignment is a
    permutation and its reduced costs are ``<= eps`` (eps-CS). The duality gap is then
    ``<= n * eps``, below ``n + 1`` for ``eps = 1``, and every assignment's cost is a multiple
    of ``n + 1``: none is cheaper. Prices in ``[0, 2^30]`` keep ``cost + p`` exact in int32.
    """
    n = cost.shape[0]
    column = jnp.clip(assignment, 0, n - 1)
    permutation = jnp.all(assignment == column) & jnp.all(jnp.zeros(n, jnp.int32).at[column].add(1) == 1)
    exact = jnp.all((prices >= 0) & (prices <= _PRICE_LIMIT))
    net = cost + prices[None, :]
    reduced = jnp.take_along_axis(net, column[:, None], axis=1)[:, 0] - jnp.min(net, axis=1)
    return permutation & exact & jnp.all(reduced <= eps)


def _lexmin(a: jax.Array, b: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """The lexicographic minimum of the pairs ``(a, b)`` along ``axis``: one XLA reduction."""

    def smaller(x, y):
        take = (y[0] < x[0]) | ((y[0] == x[0]) & (y[1] < x[1]))
        return jnp.where(take, y[0], x[0]), jnp.where(take, y[1], x[1])

    init = (jnp.array(_BIG, a.dtype), jnp.array(_BIG, b.dtype))
    return lax.reduce((a, b), init, smaller, (axis,))


def _best_two(net: jax.Array, offset: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per row: the least net cost, the least ``offset`` attaining it, and the second least
    net cost (over the other columns), in one XLA reduction."""

    def merge(x, y):
        x_first = (x[0] < y[0]) | ((x[0] == y[0]) & (x[1] < y[1]))
        return (
            jnp.where(x_first, x[0], y[0]),
            jnp.where(x_first, x[1], y[1]),
            jnp.where(x_first, jnp.minimum(x[2], y[0]), jnp.minimum(y[2], x[0])),
        )

    big = jnp.array(_BIG, net.dtype)
    return lax.reduce((net, offset, jnp.full_like(net, _BIG)), (big, big, big), merge, (1,))


def _bids(cost: jax.Array, prices: jax.Array, rows: jax.Array, bidder: jax.Array, eps: jax.Array):
    """The bids of ``rows`` (their ``cost`` rows) as a matrix: ``-1``, except at each
    bidder's best column ``j``, where it offers ``b2 - cost[i, j] + eps``.

    That offer leaves ``j`` within ``eps`` of the row's second best net cost ``b2`` (for a
    single column, ``b2 = b1``: it is bid up by eps). Ties go to the first tied column at or
    after the row's own index (cyclically), so rows with equal costs (dead neurons, constant
    rows) bid for different columns at once instead of all chasing column 0, one round
    each. Only reductions and elementwise ops: no gather or scatter, which XLA compiles
    slower and batches worse under vmap.
    """
    n = cost.shape[1]
    offset = jnp.arange(n)[None, :] - rows[:, None]
    offset = jnp.where(offset < 0, offset + n, offset)  # (j - i) mod n, without a remainder
    b1, first, b2 = _best_two(cost + prices[None, :], offset)
    b2 = b1 if n == 1 else b2
    return jnp.where((offset == first[:, None]) & bidder[:, None], b2[:, None] + eps - cost, -1)


def _schedule(n: int) -> list[int]:
    """Each phase's eps: ``R / SCALING``, then divided by ``SCALING`` down to 1."""
    eps = [max(1, (n + 1) * levels(n) // SCALING)]
    while eps[-1] > 1:
        eps.append(max(1, eps[-1] // SCALING))
    return eps


def default_max_iterations(n: int) -> int:
    """The bidding-round cap: far above the rounds seen on random, neuron-like and tied
    costs (module tests), and finite."""
    return 1000 + 100 * n


def auction(cost: jax.Array, max_iterations: int | None = None, block: int = BLOCK) -> Auction:
    """Solve ``min_s sum_i cost[i, s(i)]`` over permutations for an integer cost of :func:`quantise`.

    Args:
      cost: ``(n, n)`` int32, ``(n + 1)`` times integers in ``0..levels(n)``.
      max_iterations: cap on bidding rounds over all phases (default
        :func:`default_max_iterations`); a solve that hits it has ``converged=False``.
      block: at most this many unassigned rows (the first ones) bid in one round, which
        then costs ``O(block * n)``: late in a phase few rows are unassigned, and a full
        ``O(n^2)`` round would mostly recompute rows that do not bid.
    """
    n = cost.shape[0]
    if cost.shape != (n, n):
        raise ValueError(f"the auction solves square assignments, got a cost of shape {cost.shape}")
    cap = default_max_iterations(n) if max_iterations is None else int(max_iterations)
    everyone = jnp.arange(n, dtype=jnp.int32)

    # The assignment is kept as `holder`, the row of each column (-1: none), so that a
    # round's outcome is elementwise: a column that took a bid gets the bidder as holder
    # and the bid as price, and its previous holder is simply left without a column.
    def bidding_round(state):
        prices, holder, eps, it = state
        if block >= n:  # every row's bid is computed, the assigned rows' masked
            rows, costs = everyone, cost
            bidder = ~jnp.any(holder[None, :] == everyone[:, None], axis=1)
        else:  # the first `block` unassigned rows; index n pads the block when fewer are left
            unassigned = jnp.ones(n, bool).at[jnp.where(holder < 0, n, holder)].set(False, mode="drop")
            rows = jnp.nonzero(unassigned, size=block, fill_value=n)[0].astype(jnp.int32)
            bidder, costs = rows < n, cost[jnp.minimum(rows, n - 1)]
        bids = _bids(costs, prices, rows, bidder, eps)  # real bids are >= eps >= 1
        # Each column takes its highest bid, from the lowest row among equal ones.
        top, winner = _lexmin(-bids, jnp.broadcast_to(rows[:, None], bids.shape), axis=0)
        top, took = -top, top < 0
        return jnp.where(took, top, prices), jnp.where(took, winner, holder), eps, it + 1

    def phase(carry, eps):
        prices, holder, it = carry
        prices = prices - jnp.min(prices)  # keeps prices in range (module docstring)
        # Holders still within the new eps of their best column keep it; the others bid again.
        row = jnp.maximum(holder, 0)
        slack = cost[row, everyone] + prices - jnp.min(cost + prices[None, :], axis=1)[row]
        holder = jnp.where((holder >= 0) & (slack <= eps), holder, -1)
        prices, holder, _, it = lax.while_loop(
            lambda s: jnp.any(s[1] < 0) & (s[3] < cap), bidding_round, (prices, holder, eps, it)
        )
        return (prices, holder, it), None

    init = (jnp.zeros(n, jnp.int32), jnp.full(n, -1, jnp.int32), jnp.int32(0))
    (prices, holder, iterations), _ = lax.scan(phase, init, jnp.asarray(_schedule(n), jnp.int32))
    # Rows -> columns; a row left without a column (cap hit) keeps -1 and fails `certify`.
    owner = jnp.full(n, -1, jnp.int32).at[jnp.where(holder < 0, n, holder)].set(everyone, mode="drop")
    return Auction(owner, prices, certify(cost, owner, prices), iterations)
