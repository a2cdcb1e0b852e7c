"""Every example script's ``--quick`` mode, in-process: it runs on the current API and its numbers are sane."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

pytest.importorskip("sklearn", reason="quick modes use the digits dataset, which ships with scikit-learn")
pytest.importorskip("matplotlib", reason="the scripts write PNGs with matplotlib")

pytestmark = pytest.mark.slow


def numbers(out: Path, name: str) -> dict:
    """The JSON a script wrote, after checking its markdown twin exists."""
    assert (out / f"{name}_numbers.md").is_file()
    return json.loads((out / f"{name}_numbers.json").read_text())


def test_recurrent_fusion_quick(tmp_path):
    import recurrent_fusion

    recurrent_fusion.main(["--quick", "--out", str(tmp_path)])
    blob = numbers(tmp_path, "recurrent_fusion")
    assert (tmp_path / "recurrent_fusion.png").is_file()
    assert blob["settings"]["data"] in ("digits", "fashion_mnist") and blob["versions"]["jax"]
    for cell, result in blob["data"].items():
        by_name = {r["name"]: r["accuracy"] for r in result["rows"]}
        assert {"vanilla average", "ensemble (logit average)", "OT, weights, 2 sweeps (+ hidden-to-hidden)",
                "OT, activations (100 images)", "GWB, alpha=0.5 (fused Gromov-Wasserstein barycenter)"} <= set(by_name), cell
        assert all(0.0 <= a <= 1.0 for accs in by_name.values() for a in accs)
        parents = [accs[0] for name, accs in by_name.items() if name.startswith("parent")]
        assert len(parents) == 2 and min(parents) > 0.2, parents  # chance is 0.1
        assert (tmp_path / f"recurrent_fusion_barrier_{cell}.png").is_file()
        curves = {name: runs[0] for name, runs in result["barriers"].items()}
        naive = curves.pop("naive (model 2 as it is)")
        assert len(naive["lambdas"]) == 25
        for name, curve in curves.items():
            # Every segment starts at model 1; every method here aligns by a permutation (exact
            # plans, GWB rounded to one), so its far end is model 2 permuted: model 2's function.
            for metric in ("loss", "accuracy"):
                np.testing.assert_allclose(curve["values"][metric][0], naive["values"][metric][0], rtol=1e-5, err_msg=name)
                np.testing.assert_allclose(curve["values"][metric][-1], naive["values"][metric][-1], rtol=1e-4, atol=1e-5, err_msg=name)


def test_real_architectures_quick(tmp_path):
    import real_architectures

    real_architectures.main(["--quick", "--out", str(tmp_path)])  # the ablation is too slow for a smoke test
    blob = numbers(tmp_path, "real_architectures")
    assert set(blob["data"]) == {"MLPNet", blob["settings"]["resnet_name"]}  # the control is skipped in quick mode
    for title, result in blob["data"].items():
        by_name = {r["name"]: r["accuracy"] for r in result["rows"]}
        activations = "OT fusion, activations (exact, 64 images)"
        expected = {"ensemble (logit average)", "vanilla average", activations, activations + " + REPAIR"}
        if title == "MLPNet":  # quick mode aligns the ResNet by activations only
            expected |= {"OT fusion, weights (exact)", "weight matching (Git Re-Basin)", "weight matching (Git Re-Basin) + REPAIR"}
        assert expected <= set(by_name), title
        assert all(0.0 <= a <= 1.0 for accs in by_name.values() for a in accs)
        if title == "MLPNet":
            assert min(accs[0] for name, accs in by_name.items() if name.startswith("parent")) > 0.3
            aligned = {name for name in expected - {"ensemble (logit average)", "vanilla average"} if not name.endswith("REPAIR")}
            assert set(result["diag"]) == {"unaligned"} | aligned
    resnet = {r["name"] for r in blob["data"][blob["settings"]["resnet_name"]]["rows"]}
    assert "OT fusion, activations (exact, 64 images) + BN recal" in resnet


def test_otfusion_experiments_quick(tmp_path):
    import otfusion_experiments

    otfusion_experiments.main(["--quick", "--out", str(tmp_path)])
    blob = numbers(tmp_path, "otfusion_experiments")
    for png in ("skill_transfer", "skill_transfer_class1", "four_models", "widths", "ensembling"):
        assert (tmp_path / f"otfusion_{png}.png").is_file(), png
    data = blob["data"]
    assert set(data) == {"skill", "skill_alt", "four", "widths", "ensemble"}

    def accuracies(tree):
        if isinstance(tree, dict):
            return [a for v in tree.values() for a in accuracies(v)]
        return [a for v in tree for a in accuracies(v)] if isinstance(tree, list) else [tree]

    for name in ("skill", "skill_alt"):
        r = data[name]["different"]
        assert {"A", "B", "OT (activations)", "OT (weights)", "vanilla average", "prediction ensemble"} <= set(r)
        assert all(0.0 <= a <= 1.0 for a in accuracies(r))
        assert min(r["A"][0], r["B"][0]) > 0.15  # chance is 0.1; each parent misses classes by design
    four = data["four"]["same"]
    assert {"model A", "prediction ensemble", "vanilla average", "OT acts, target C"} <= set(four)
    assert max(four["model C"]) > 0.3 and all(0.0 <= a <= 1.0 for a in accuracies(four))
    assert any(k.startswith("OT activations into") for k in data["widths"])
    k2 = data["ensemble"]["rows"]["2"]
    assert {"ensemble", "vanilla", "OT acts", "OT wts", "OT acts + FT", "OT wts + FT"} <= set(k2)
    assert min(k2["parents"]) > 0.3 and all(0.0 <= a <= 1.0 for a in accuracies(k2))


def test_partial_fusion_quick(tmp_path):
    import partial_fusion

    partial_fusion.main(["--quick", "--out", str(tmp_path)])
    blob = numbers(tmp_path, "partial_fusion")
    assert (tmp_path / "partial_fusion.png").is_file() and (tmp_path / "partial_fusion_compression.png").is_file()
    rows = blob["data"]["pairs"]["specialist"]["rows"]
    methods = {r["method"] for r in rows}
    assert {"model A (specialist)", "model B (generalist)", "prediction ensemble", "vanilla averaging",
            "partial fusion (weights)"} <= methods
    comp = blob["data"]["compression"]
    assert {"dense model C", "delete (L1 of incoming weights)", "merge (weights)",
            "delete + fuse dense into it (Exact)", "barycenter of C, D (Exact)"} <= {r["method"] for r in comp}
    assert all(0.0 <= a <= 1.0 for r in rows + comp for a in r["acc"] + r["special"])
    parents = [r["acc"][0] for r in rows + comp if r["method"].startswith(("model", "dense"))]
    assert len(parents) == 4 and min(parents) > 0.15, parents  # chance is 0.1; A and B miss classes by design
    partial = next(r for r in rows if r["method"] == "partial fusion (weights)")
    assert partial["nonzero"][0] <= partial["total"][0]
    # Reading the JSON back gives the same tables.
    again = tmp_path / "again"
    again.mkdir()
    (again / "partial_fusion_numbers.json").write_text((tmp_path / "partial_fusion_numbers.json").read_text())
    partial_fusion.main(["--report-only", "--out", str(again)])
    assert numbers(again, "partial_fusion")["tables"] == blob["tables"]


def test_federated_quick(tmp_path):
    import federated

    federated.main(["--quick", "--out", str(tmp_path)])
    blob = numbers(tmp_path, "federated")
    assert (tmp_path / "federated.png").is_file()
    rounds = blob["settings"]["rounds"]
    for title, result in blob["data"].items():
        assert set(result["curves"]) == {"FedAvg", "OT fusion (exact)"}, title
        assert all(len(curve) == rounds and all(0.0 <= a <= 1.0 for a in curve) for curve in result["curves"].values())
        assert all(row["all_converged"] for row in result["table"])
        fedavg, ot, partial = result["one_shot"]
        assert fedavg["widths"] == ot["widths"] and partial["params"] > fedavg["params"]
        assert max(result["curves"]["FedAvg"]) > 0.2, title  # chance is 0.1


def test_vit_fusion_quick(tmp_path):
    import vit_fusion

    vit_fusion.main(["--quick", "--out", str(tmp_path)])
    blob = numbers(tmp_path, "vit_fusion")
    assert (tmp_path / "vit_fusion.png").is_file() and (tmp_path / "vit_fusion_barrier.png").is_file()
    data = blob["data"]
    by_name = {r["name"]: r["accuracy"] for r in data["rows"]}
    methods = {"vanilla average", "OT, activations, heads matched"}
    assert methods | {"ensemble (logit average)", "parent 1 of the pair (control)"} <= set(by_name)
    assert set(data["finetuned"]) == methods | {"parent 1 of the pair (control)"}
    assert all(0.0 <= a <= 1.0 for accs in [*by_name.values(), *data["finetuned"].values()] for a in accs)
    assert min(data["parents"]) > 0.2, data["parents"]  # chance is 0.1
    # A permuted copy (every head order moved) is undone by solved head orders, not by averaging.
    assert data["planted"]["OT, activations, heads matched"] < 1e-4 and data["planted"]["vanilla average"] > 1e-2
    diagnosed = {(row[0], row[1]) for row in data["diagnostics"]["rows"]}
    assert diagnosed == {("OT, activations, heads matched", g) for g in ("r", "b0.qk", "b0.vo", "b0.mlp")}
    curves = {name: runs[0] for name, runs in data["barriers"].items()}
    naive = curves.pop("naive (model 2 as it is)")
    assert len(naive["lambdas"]) == 25 and set(curves) == methods - {"vanilla average"}
    for name, curve in curves.items():  # permutation plans: the far end is model 2's function
        for metric in ("loss", "accuracy"):
            np.testing.assert_allclose(curve["values"][metric][0], naive["values"][metric][0], rtol=1e-5, err_msg=name)
            np.testing.assert_allclose(curve["values"][metric][-1], naive["values"][metric][-1], rtol=1e-4, atol=1e-5, err_msg=name)


def test_width_ablation_quick(tmp_path):
    import width_ablation

    width_ablation.main(["--quick", "--out", str(tmp_path)])
    blob = numbers(tmp_path, "width_ablation")
    assert (tmp_path / "width_ablation_barrier_quick_vgg.png").is_file()
    (result,) = blob["data"].values()
    by_name = {r["name"]: r["accuracy"][0] for r in result["rows"]}
    assert all(0.0 <= a <= 1.0 for a in by_name.values())
    assert min(by_name["parent seed 0"], by_name["parent seed 1"]) > 0.2, by_name  # chance is 0.1
    # Planted truth: a randomly permuted copy of parent A is matched back onto A exactly, so
    # their fusion is A itself.
    assert result["selfcheck"]["max_abs_diff"] < 1e-6
    assert result["selfcheck"]["accuracy"] == by_name["parent seed 0"]
    naive = result["barriers"]["naive (vanilla average)"]
    assert len(naive["lambdas"]) == 25
    for name in ("weight matching", "OT fusion, activations"):
        # Exact plans are permutations: each segment runs from A to B's function, as the naive one.
        curve = result["barriers"][name]
        for metric in ("loss", "accuracy"):
            np.testing.assert_allclose(curve["values"][metric][0], naive["values"][metric][0], rtol=1e-5, err_msg=name)
            np.testing.assert_allclose(curve["values"][metric][-1], naive["values"][metric][-1], rtol=1e-4, atol=1e-5, err_msg=name)
        assert result["diagnostics"][name]["sharpness"] == 1.0
