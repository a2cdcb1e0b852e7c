"""Recurrent sequence classifiers (Elman RNN, LSTM, GRU) and their Specs.

A recurrent layer's hidden units are one neuron group: the input-to-hidden kernels and the
biases write into it, and the hidden-to-hidden kernels carry it on *both* axes, so a
permutation of the hidden units permutes that square matrix's rows and columns alike (and
an LSTM's cell state with them). Akash et al. (2022) align these units with the
hidden-to-hidden weights in the cost; with :class:`jfusion.ByWeights` the first sweep matches
on the input-to-hidden weights (the recurrent kernel reads the group being solved) and
``ByWeights(sweeps=2)`` adds the recurrent kernels, transported by the first sweep's plan.
"""

from __future__ import annotations

from typing import Literal, Mapping, Sequence

import flax.linen as nn
import jax

from jfusion.core.spec import Spec, bias, dense
from jfusion.models.mlp import _prefixed
from jfusion.models.sow import record_activations
from jfusion.models.widths import check_groups

CellKind = Literal["simple", "lstm", "gru"]
CELL_KINDS: tuple[str, ...] = ("simple", "lstm", "gru")

# Per cell, flax.linen's submodule names: (input-to-hidden with bias, input-to-hidden without,
# hidden-to-hidden with bias, hidden-to-hidden without). Every one's outputs are the hidden units.
_CELL_LEAVES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "simple": (("i",), (), (), ("h",)),
    "lstm": ((), ("ii", "if", "ig", "io"), ("hi", "hf", "hg", "ho"), ()),
    "gru": (("ir", "iz", "in"), (), ("hn",), ("hr", "hz")),
}

_CELLS = {"simple": nn.SimpleCell, "lstm": nn.LSTMCell, "gru": nn.GRUCell}


class RecurrentClassifier(nn.Module):
    """Stacked recurrent layers ``Recurrent_0 ...`` and a ``Dense_0`` readout of the last step.

    Inputs are ``(B, T, F)`` sequences; images ``(B, H, W[, C])`` are read row by row
    (``T = H``, ``F = W * C``), as in the row-by-row MNIST experiments of Akash et al. Each
    layer's hidden states (all steps) are sown into ``"activations"`` as ``r0, r1, ...``.

    Attributes:
      hidden: the recurrent layers' widths.
      num_classes: the readout's outputs.
      cell: ``"simple"`` (Elman, tanh), ``"lstm"`` or ``"gru"`` (flax.linen's cells).
    """

    hidden: Sequence[int] = (64,)
    num_classes: int = 10
    cell: CellKind = "lstm"

    def spec(self) -> Spec:
        """This model's Spec (see :func:`rnn_spec`)."""
        return rnn_spec(self.cell, len(self.hidden))

    def with_widths(self, widths: Mapping[str, int]) -> "RecurrentClassifier":
        """This classifier with recurrent layer i ``widths[f"r{i}"]`` wide (groups not
        named keep their width)."""
        groups = {f"r{i}": w for i, w in enumerate(self.hidden)}
        check_groups(widths, groups, "this RecurrentClassifier")
        return self.clone(hidden=tuple(int(widths.get(g, w)) for g, w in groups.items()))

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.cell not in CELL_KINDS:
            raise ValueError(f"cell must be one of {CELL_KINDS}, not {self.cell!r}")
        x = x.reshape((x.shape[0], x.shape[1], -1))
        for i, width in enumerate(self.hidden):
            x = nn.RNN(_CELLS[self.cell](width, name=f"Recurrent_{i}"))(x)
            record_activations(self, f"r{i}", x)
        return nn.Dense(self.num_classes, name="Dense_0")(x[:, -1])


def rnn_spec(
    cell: CellKind,
    num_layers: int,
    *,
    prefix: str = "params",
    layer_names: Sequence[str] | None = None,
    readout: str | None = "Dense_0",
    group_prefix: str = "r",
) -> Spec:
    """Spec of stacked flax.linen recurrent cells: layer i's hidden units are group ``r{i}``.

    Input-to-hidden kernels are ``(r{i-1} or None, r{i})``, hidden-to-hidden kernels
    ``(r{i}, r{i})``, biases ``(r{i},)``; the readout Dense reads the last layer.

    Args:
      cell: ``"simple"``, ``"lstm"`` or ``"gru"``: which gates the cell has.
      num_layers: stacked recurrent layers.
      prefix: ``"params"`` for a linen variable dict.
      layer_names: the cells' module names (``Recurrent_0, ...`` by default).
      readout: the Dense layer after the last recurrent layer, or None if there is none.
      group_prefix: prefix of the group names.
    """
    if cell not in CELL_KINDS:
        raise ValueError(f"cell must be one of {CELL_KINDS}, not {cell!r}")
    names = list(layer_names) if layer_names is not None else [f"Recurrent_{i}" for i in range(num_layers)]
    if len(names) != num_layers:
        raise ValueError(f"{num_layers} layers but {len(names)} layer_names")
    input_biased, input_plain, hidden_biased, hidden_plain = _CELL_LEAVES[cell]
    layer, nnx = _prefixed(prefix)
    axes: dict[str, tuple] = {}
    for i, name in enumerate(names):
        group, previous = f"{group_prefix}{i}", (f"{group_prefix}{i - 1}" if i else None)
        # Kernels first, then the biases, as the gates are listed.
        for gate in input_biased + input_plain:
            axes.update(dense(layer(f"{name}/{gate}"), previous, group, bias=False, nnx=nnx))
        for gate in hidden_biased + hidden_plain:
            axes.update(dense(layer(f"{name}/{gate}"), group, group, bias=False, nnx=nnx))
        for gate in input_biased + hidden_biased:
            axes.update(bias(layer(f"{name}/{gate}"), group, nnx=nnx))
    if readout is not None:
        axes.update(dense(layer(readout), f"{group_prefix}{num_layers - 1}", None, nnx=nnx))
    return Spec(axes)
