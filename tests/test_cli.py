"""The jfusion command line: ``train`` then ``fuse`` write exactly what the Python API computes,
the demo prints its table, and bad inputs end in one line on stderr with exit code 2."""

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import jfusion
from jfusion.workflow.checkpoint import load_checkpoint, save_checkpoint
from jfusion.workflow.cli import main, split_indices
from jfusion.workflow.data import batches, load_dataset
from jfusion.models import MLP, describe, from_metadata
from jfusion.workflow.results import has_matplotlib as jfusion_has_matplotlib
from jfusion.workflow.train import evaluate

pytestmark = pytest.mark.slow  # end to end: trains models

FEATURES = ["16", "16", "10"]


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    """Three MLPs trained on digits for one epoch by ``jfusion train``: (directories, stdout)."""
    out = tmp_path_factory.mktemp("runs")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(
            ["train", "--model", "mlp", "--features", *FEATURES, "--data", "digits", "--seeds", "0", "1", "2",
             "--epochs", "1", "--batch-size", "64", "--out", str(out)]
        )
    assert code == 0
    return [out / f"model_{k}" for k in range(3)], stdout.getvalue()


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def fuse_command(paths, out, *flags):
    return ["fuse", *map(str, paths), "--out", str(out), *flags]


def test_train_writes_one_checkpoint_per_seed_with_spec_and_metadata(parents):
    paths, stdout = parents
    data = load_dataset("digits")
    lines = stdout.splitlines()
    assert len(lines) == 3
    for k, (path, line) in enumerate(zip(paths, lines)):
        variables, spec, metadata = load_checkpoint(path)
        module = from_metadata(metadata)
        assert module == MLP((16, 16, 10))
        assert spec == module.spec()
        assert {key: metadata[key] for key in ("model", "kwargs")} == describe("mlp", features=[16, 16, 10])
        assert metadata["data"] == "digits" and metadata["training"]["seed"] == k
        accuracy = evaluate(module, variables, data.test_images, data.test_labels)
        assert metadata["training"]["test_accuracy"] == accuracy
        assert line.startswith(str(path)) and f"{100 * accuracy:.2f}%" in line
    kernels = [load_checkpoint(p)[0]["params"]["Dense_0"]["kernel"] for p in paths]
    assert not np.array_equal(kernels[0], kernels[1])  # different seeds, different models


@pytest.mark.parametrize(
    "flags, kwargs",
    [
        ([], {}),
        # One case for the rest: each new solver or target compiles another program.
        (
            ["--solver", "sinkhorn", "--epsilon", "0.05", "--tau-a", "0.9", "--importance", "l1",
             "--weights", "1", "2", "1", "--target", "1"],
            {"solver": jfusion.Sinkhorn(epsilon=0.05, tau_a=0.9), "importance": "l1",
             "model_weights": [1.0, 2.0, 1.0], "target": 1},
        ),
    ],
    ids=["exact", "sinkhorn-unbalanced-importance-weights-target"],
)
def test_fuse_writes_what_jfusion_fuse_computes(parents, tmp_path, flags, kwargs):
    paths, _ = parents
    assert main(fuse_command(paths, tmp_path / "fused", *flags)) == 0
    fused, spec, metadata = load_checkpoint(tmp_path / "fused")
    loaded = [load_checkpoint(p) for p in paths]
    expected = jfusion.fuse([variables for variables, _, _ in loaded], loaded[0][1], **kwargs).params
    assert_trees_equal(fused, expected)
    target = kwargs.get("target", 0)
    target_kernel = loaded[target][0]["params"]["Dense_1"]["kernel"]
    assert not np.array_equal(fused["params"]["Dense_1"]["kernel"], target_kernel)  # fusion did something
    assert spec == loaded[0][1]
    assert metadata["model"] == "mlp" and "training" not in metadata
    record = metadata["fusion"]
    assert record["parents"] == [str(p.resolve()) for p in paths]
    assert record["solver"] == ("sinkhorn" if "--solver" in flags else "exact")
    assert record["weights"] == kwargs.get("model_weights") and record["target"] == target
    assert record["importance"] == kwargs.get("importance", "uniform")
    assert record["tau_a"] == (0.9 if "--tau-a" in flags else None) and record["tau_b"] is None


def test_train_then_fuse_by_activations_and_evaluate(parents, tmp_path, capsys):
    paths, _ = parents
    out = tmp_path / "fused"
    assert main(fuse_command(paths, out, "--alignment", "activations", "--samples", "100", "--evaluate")) == 0
    table = capsys.readouterr().out.splitlines()
    fused, spec, metadata = load_checkpoint(out)
    module = from_metadata(metadata)
    data = load_dataset("digits")
    inputs = next(batches(data.train_images, data.train_labels, 100, seed=0))[0]
    alignment = jfusion.ByActivations.from_module(module)
    expected = jfusion.fuse([load_checkpoint(p)[0] for p in paths], spec, alignment=alignment, inputs=inputs).params
    assert_trees_equal(fused, expected)
    accuracy = evaluate(module, fused, data.test_images, data.test_labels)
    assert metadata["fusion"]["test_accuracy"] == accuracy
    assert metadata["fusion"]["alignment"] == "activations" and metadata["fusion"]["samples"] == 100
    assert len(table) == 7  # header, three parents, the ensemble, vanilla averaging, the fused model
    for path, line in zip(paths, table[1:4]):
        parent = load_checkpoint(path)[2]["training"]["test_accuracy"]
        assert line.startswith(str(path)) and f"{100 * parent:.2f}%" in line
    variables = [load_checkpoint(p)[0] for p in paths]
    ensemble = jfusion.ensemble_apply(module.apply, variables, data.test_images)
    ensemble_accuracy = float(np.mean(np.argmax(np.asarray(ensemble), -1) == data.test_labels))
    vanilla = evaluate(module, jfusion.vanilla_average(variables).params, data.test_images, data.test_labels)
    assert table[4].startswith("ensemble (logits)") and f"{100 * ensemble_accuracy:.2f}%" in table[4]
    assert table[5].startswith("vanilla average") and f"{100 * vanilla:.2f}%" in table[5]
    assert table[6].startswith(str(out)) and f"{100 * accuracy:.2f}%" in table[6]
    assert metadata["fusion"]["baselines_test_accuracy"] == {"ensemble (logits)": ensemble_accuracy, "vanilla average": vanilla}
    # Every number printed is in the results beside the checkpoint, with the settings and versions.
    written = json.loads((tmp_path / "fused.results.json").read_text())
    assert [row["test_accuracy"] for row in written["rows"]] == [
        *metadata["fusion"]["parents_test_accuracy"], ensemble_accuracy, vanilla, accuracy
    ]
    assert written["settings"]["alignment"] == "activations" and written["settings"]["samples"] == 100
    assert {"python", "jax", "flax", "ott-jax", "jfusion"} <= set(written["versions"])
    if jfusion_has_matplotlib():
        assert (tmp_path / "fused.results.png").read_bytes().startswith(b"\x89PNG")
    # A second run refuses to replace them, and replaces them (only them) with --overwrite.
    argv = fuse_command(paths, out, "--alignment", "activations", "--samples", "100", "--evaluate")
    assert main(argv) == 2
    assert main([*argv, "--overwrite"]) == 0


def test_train_and_fuse_recurrent_models_with_two_sweeps(tmp_path):
    runs = tmp_path / "runs"
    train = ["train", "--model", "rnn", "--hidden", "12", "--cell", "gru", "--data", "digits", "--seeds", "0", "1",
             "--epochs", "1", "--out", str(runs)]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(train) == 0
    paths = [runs / "model_0", runs / "model_1"]
    variables, spec, metadata = load_checkpoint(paths[0])
    assert metadata["kwargs"] == {"hidden": [12], "num_classes": 10, "cell": "gru"}
    assert variables["params"]["Recurrent_0"]["hr"]["kernel"].shape == (12, 12)  # digits: 8 rows of 8 pixels
    assert main(fuse_command(paths, tmp_path / "fused", "--sweeps", "2")) == 0
    fused, _, metadata = load_checkpoint(tmp_path / "fused")
    expected = jfusion.fuse([load_checkpoint(p)[0] for p in paths], spec, alignment=jfusion.ByWeights(sweeps=2)).params
    assert_trees_equal(fused, expected)
    assert metadata["fusion"]["sweeps"] == 2


def test_demo_prints_its_table(capsys):
    assert main(["demo", "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    rows = ["model 0 (seed 0)", "model 2 (seed 2)", "ensemble (logits)", "vanilla average", "OT fusion (exact)"]
    assert all(row in out for row in rows)
    assert "2 epochs" in out


def mismatched_checkpoint(directory):
    """An MLP of the same spec whose inputs are 100 wide (the parents read 64 pixels)."""
    module = MLP((16, 16, 10))
    shapes = jax.eval_shape(module.init, jax.random.key(0), np.ones((1, 100), np.float32))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
    metadata = describe("mlp", features=[16, 16, 10])
    return save_checkpoint(directory, variables, module.spec(), metadata=metadata)


# case: what the error line must say.
BAD_INPUTS = {
    "missing": "does not exist",
    "unknown-spec": "unknown model 'resnet99'; known models: mlpnet, mlp",
    "mismatched": "model 1: params/Dense_0/kernel axis 0 has size 100",
    "exists": "already exists; pass --overwrite",
    "epsilon-exact": "--epsilon is Sinkhorn's regularisation",
    "zero-sweeps": "--sweeps must be at least 1, not 0",
    "sweeps-activations": "--sweeps is for weight alignment",
    "zero-samples": "--samples must be at least 1",
    "negative-epsilon": "Sinkhorn.epsilon must be a finite number > 0",
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_are_one_line_and_exit_code_2(parents, tmp_path, capsys, case):
    paths, _ = parents
    out = tmp_path / "fused"
    commands = {
        "missing": lambda: fuse_command([paths[0], tmp_path / "missing"], out),
        "unknown-spec": lambda: fuse_command(paths[:2], out, "--spec", "resnet99"),
        "mismatched": lambda: fuse_command([paths[0], mismatched_checkpoint(tmp_path / "wide")], out),
        "exists": lambda: fuse_command(paths[:2], paths[2]),
        "epsilon-exact": lambda: fuse_command(paths[:2], out, "--epsilon", "0.1"),
        "zero-sweeps": lambda: fuse_command(paths[:2], out, "--sweeps", "0"),
        "sweeps-activations": lambda: fuse_command(paths[:2], out, "--alignment", "activations", "--sweeps", "2"),
        "zero-samples": lambda: fuse_command(paths[:2], out, "--alignment", "activations", "--samples", "0"),
        "negative-epsilon": lambda: fuse_command(paths[:2], out, "--solver", "sinkhorn", "--epsilon", "-1"),
    }
    argv = commands[case]()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0] == err.splitlines()[-1]
    assert errors[0].startswith("jfusion fuse: error: ") and BAD_INPUTS[case] in errors[0]
    assert not out.exists()


def test_splits():
    labels = np.repeat(np.arange(4), 25)
    shares = split_indices("iid", labels, 3)
    assert sorted(np.concatenate(shares).tolist()) == list(range(100))
    assert all(np.bincount(labels[s], minlength=4).min() >= 8 for s in shares)  # every class in every share
    specialist, generalist = split_indices("special:2:0.2", labels, 2)
    assert (labels[specialist] == 2).sum() == 25 and (labels[generalist] == 2).sum() == 0
    assert split_indices("full", labels, 3) is None
    with pytest.raises(jfusion.JFusionError, match="exactly two --seeds"):
        split_indices("special:2:0.2", labels, 3)


def test_help_lists_the_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(command in out for command in ("demo", "train", "fuse"))


def test_console_script_exits_with_code_2_on_bad_input(tmp_path):
    script = Path(sys.executable).with_name("jfusion")  # installed by pip from pyproject's [project.scripts]
    assert script.exists()
    done = subprocess.run(
        [str(script), "fuse", str(tmp_path / "nothing"), "--out", str(tmp_path / "fused")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    missing = tmp_path / "nothing"
    assert done.stderr.splitlines()[-1] == f"jfusion fuse: error: checkpoint directory {missing} does not exist"


def test_fuse_with_a_traced_spec_writes_the_registry_specs_fusion(parents, tmp_path):
    paths, _ = parents
    assert main(fuse_command(paths, tmp_path / "hand")) == 0
    assert main(fuse_command(paths, tmp_path / "traced", "--trace-spec")) == 0
    hand, hand_spec, _ = load_checkpoint(tmp_path / "hand")
    traced, traced_spec, _ = load_checkpoint(tmp_path / "traced")
    assert traced_spec.groups == ("Dense_0", "Dense_1") and hand_spec.groups == ("h0", "h1")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6), hand, traced)
    assert main(fuse_command(paths, tmp_path / "both", "--trace-spec", "--spec", "mlp")) == 2


USER_PACKAGE = """
import flax.linen as nn


class SmallCNN(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3), name="conv")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="norm")(x))
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes, name="readout")(nn.relu(nn.Dense(16, name="hidden")(x)))


def make_cnn(num_classes: int = 10) -> SmallCNN:
    return SmallCNN(num_classes=num_classes)
"""


def test_your_own_linen_model_from_a_package_of_yours_trains_fuses_recalibrates_and_evaluates(tmp_path):
    # The jfusion console script, run where a user's own package lives (written here): a linen
    # CNN with BatchNorm, no spec() and no sown activations. The spec is traced when training,
    # activation alignment reads its writer modules' outputs, and --recalibrate recomputes BN.
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "models.py").write_text(USER_PACKAGE)
    command = Path(sys.executable).with_name("jfusion")

    def jfusion_command(*args):
        done = subprocess.run([str(command), *map(str, args)], capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    jfusion_command("train", "--model", "mypkg.models:make_cnn", "--data", "digits", "--seeds", "0", "1",
                    "--epochs", "2", "--batch-size", "32", "--out", "runs")
    paths = [tmp_path / "runs" / "model_0", tmp_path / "runs" / "model_1"]
    parents = [load_checkpoint(path) for path in paths]
    variables, spec, metadata = parents[0]
    assert metadata["model"] == "mypkg.models:make_cnn" and metadata["kwargs"] == {"num_classes": 10}
    assert spec.groups == ("conv", "hidden")  # traced: the groups are named after their modules
    table = jfusion_command("fuse", *paths, "--out", "fused", "--evaluate", "--alignment", "activations",
                            "--samples", "100", "--recalibrate", "4")
    fused, fused_spec, fused_metadata = load_checkpoint(tmp_path / "fused")
    assert fused_metadata["model"] == "mypkg.models:make_cnn" and fused_spec == spec
    assert fused_metadata["fusion"]["recalibrate_batches"] == 4

    sys.path.insert(0, str(tmp_path))
    try:
        from mypkg.models import make_cnn
    finally:
        sys.path.remove(str(tmp_path))
    module = make_cnn()
    data = load_dataset("digits")
    inputs = next(batches(data.train_images, data.train_labels, 100, seed=0))[0]
    alignment = jfusion.ByActivations.from_module(module, points=spec)
    expected = jfusion.fuse([p[0] for p in parents], spec, alignment=alignment, inputs=inputs).params
    assert_trees_equal(fused["params"], expected["params"])  # the weights: exactly the API's fusion
    assert not np.allclose(fused["batch_stats"]["norm"]["mean"], expected["batch_stats"]["norm"]["mean"])
    accuracy = evaluate(module, fused, data.test_images, data.test_labels)
    assert table[-1].startswith("fused") and f"{100 * accuracy:.2f}%" in table[-1]
    assert [line.split()[0] for line in table[3:5]] == ["ensemble", "vanilla"]


def test_your_own_nnx_model_trains_fuses_and_recalibrates(tmp_path):
    # An nnx factory taking rngs, with BatchNorm: the checkpoint holds the State's pure dict.
    runs = tmp_path / "runs"
    train = ["train", "--model", "user_models:TinyNnx", "--data", "digits", "--seeds", "0", "1", "--epochs", "1",
             "--batch-size", "64", "--out", str(runs)]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(train) == 0
    paths = [runs / "model_0", runs / "model_1"]
    variables, spec, metadata = load_checkpoint(paths[0])
    assert set(variables) == {"hidden", "norm", "readout"} and "mean" in variables["norm"]
    out = tmp_path / "fused"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(fuse_command(paths, out, "--alignment", "activations", "--recalibrate", "2", "--evaluate")) == 0
    fused, _, fused_metadata = load_checkpoint(out)
    parent_mean = variables["norm"]["mean"]
    assert fused["norm"]["mean"].shape == parent_mean.shape
    assert not np.allclose(fused["norm"]["mean"], parent_mean)  # recomputed on the data
    assert fused_metadata["fusion"]["recalibrate_batches"] == 2
    assert 0 <= fused_metadata["fusion"]["test_accuracy"] <= 1
