"""The digits demo: trains, fuses with every method, and prints one table."""

import json

import jax
import pytest

from jfusion.workflow.demo import FUSION_METHODS, DemoRow, format_table, run_demo
from jfusion.workflow.results import has_matplotlib

pytestmark = pytest.mark.slow  # end to end: trains models


def test_demo_runs_end_to_end_and_tabulates_every_method():
    printed = []
    # The parent's own weights as a "fusion": the table must accept methods from a list.
    first_parent = ("model 0 as a method", lambda module, models, spec, inputs: jax.tree.map(lambda a: a[0], models))
    rows = run_demo(num_models=3, epochs=8, methods=FUSION_METHODS + (first_parent,), print_fn=printed.append)
    by_name = {row.name: row for row in rows}
    names = [name for name, _ in FUSION_METHODS]
    assert list(by_name) == [f"model {k} (seed {k})" for k in range(3)] + ["ensemble (logits)", *names, first_parent[0]]
    table = "\n".join(printed)
    for row in rows:
        assert row.name in table
    assert all(row.first_call_s is not None and row.warm_s >= 0 for row in rows[4:])
    assert by_name["model 0 as a method"].accuracy == by_name["model 0 (seed 0)"].accuracy
    parents = [by_name[f"model {k} (seed {k})"].accuracy for k in range(3)]
    assert min(parents) > 0.85
    for name in ["OT fusion (exact)", "OT fusion (Sinkhorn)", "OT fusion (activations)", "barycenter fusion"]:
        assert by_name[name].accuracy > 0.5, name
        assert by_name[name].parameters == by_name["model 0 (seed 0)"].parameters
    # Partial fusion keeps isolated neurons: larger than one parent, smaller than the ensemble.
    partial = by_name["partial fusion a=0.5"]
    assert by_name["model 0 (seed 0)"].parameters < partial.parameters < by_name["ensemble (logits)"].parameters
    # ... and its isolated neurons of different models never connect: zero blocks.
    assert partial.nonzero_parameters < partial.parameters
    assert by_name["vanilla average"].nonzero_parameters == by_name["vanilla average"].parameters
    # Unaligned averaging of independently initialised networks is what OT fusion fixes.
    assert by_name["OT fusion (exact)"].accuracy > by_name["vanilla average"].accuracy


def test_table_columns_line_up():
    table = format_table(
        [DemoRow("a", 0.5, 10), DemoRow("a much longer name", 0.98765, 12345, 1.5, 0.0021, nonzero_parameters=12000)]
    )
    lines = table.splitlines()
    assert len({len(line) for line in lines}) == 1  # every line the same width
    assert "98.77%" in lines[-1] and "12345" in lines[-1] and "1500.0" in lines[-1] and "2.1" in lines[-1] and "12000" in lines[-1]
    assert lines[2].rstrip().endswith("-")


def test_demo_prints_each_row_when_it_is_done_and_saves_the_results(tmp_path):
    printed = []

    def recording(name):
        # A method that records how much of the table was printed when it ran.
        def method(module, models, spec, inputs):
            seen[name] = len(printed)
            return jax.tree.map(lambda a: a[0], models)

        return name, method

    seen = {}
    methods = (recording("first"), recording("second"))
    rows = run_demo(num_models=2, epochs=1, methods=methods, print_fn=printed.append, out=tmp_path)
    # intro, header, 2 parents, ensemble: printed before any fusion; each row before the next method.
    assert seen["first"] == 5 and seen["second"] == 6
    assert printed[5].startswith("first") and printed[6].startswith("second")
    written = json.loads((tmp_path / "demo.json").read_text())
    assert [row["name"] for row in written["rows"]] == [row.name for row in rows]
    assert [row["accuracy"] for row in written["rows"]] == [row.accuracy for row in rows]
    assert written["settings"]["epochs"] == 1 and written["settings"]["methods"] == ["first", "second"]
    assert {"python", "jax", "flax", "ott-jax", "jfusion"} <= set(written["versions"])
    assert (tmp_path / "demo.png").exists() == has_matplotlib()
    with pytest.raises(FileExistsError, match="already exists"):  # refused before training
        run_demo(num_models=2, epochs=1, methods=methods, print_fn=None, out=tmp_path)
