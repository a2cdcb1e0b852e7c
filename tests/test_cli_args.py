"""The command line without training: your own models by package.module:Factory, arguments
checked before any data or checkpoint loads, saved results that never replace a file jfusion
did not write, and progress on stderr. Fast: nothing here trains or fuses."""

import io
import json
import sys

import numpy as np
import pytest

import jfusion
from jfusion.models import build_model, describe, model_arguments, resolve_model
from jfusion.models.registry import ModelConfigError
from jfusion.workflow import cli, demo, progress, results
from jfusion.workflow.demo import DemoRow, format_row, format_table, table_header
from jfusion.workflow.handle import ModelHandle

import user_models


@pytest.fixture
def no_loading(monkeypatch):
    """Make loading data or a checkpoint fail the test: arguments must be refused first."""

    def refuse(*args, **kwargs):
        raise AssertionError("loaded data or a checkpoint before checking the arguments")

    monkeypatch.setattr(cli, "load_dataset", refuse)
    monkeypatch.setattr(demo, "load_dataset", refuse)
    monkeypatch.setattr(cli, "_load", refuse)


def one_error_line(capsys, command):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0] == err.splitlines()[-1], err
    assert errors[0].startswith(f"jfusion {command}: error: ")
    return errors[0]


# --- package.module:Factory ---------------------------------------------------------------


def test_a_reference_resolves_builds_and_describes_your_model():
    assert resolve_model("user_models:tiny") is user_models.tiny
    assert resolve_model("user_models:Tiny") is user_models.Tiny
    assert model_arguments("user_models:tiny") == {"hidden": 16, "num_classes": 10}
    assert build_model("user_models:tiny", hidden=4) == user_models.Tiny(hidden=4)
    assert describe("user_models:tiny", hidden=4) == {"model": "user_models:tiny", "kwargs": {"hidden": 4}}
    # An nnx class: its __init__'s arguments (not the metaclass's *args), rngs excluded.
    assert model_arguments("user_models:TinyNnx") == {"hidden": 12, "num_classes": 10}
    handle = ModelHandle({"model": "user_models:TinyNnx", "kwargs": {"hidden": 5}})
    assert handle.is_nnx and not handle.has_spec()
    assert handle.num_outputs(np.zeros((1, 8, 8, 1), np.float32)) == 10


# reference: what the one error line says.
BAD_REFERENCES = {
    "no_such_module_jf:Net": "cannot import 'no_such_module_jf' (ModuleNotFoundError: No module named 'no_such_module_jf')",
    "user_models:Missing": "'user_models' has no attribute 'Missing'",
    "user_models:NOT_CALLABLE": "NOT_CALLABLE is not callable (type int)",
    "user_models:returns_a_number": "returned an object of type int, not a flax.linen.Module or nnx.Module instance",
    "user_models:raises": "raised RuntimeError: this factory is broken",
    "user_models:WithDropout": "keeps random streams in its state (drop/rngs",
    "user_models:needs_depth": "needs depth, which no flag of jfusion train sets",
    "user_models:": "expected package.module:Factory",
    "resnet99": "unknown model 'resnet99'; known models: mlpnet, mlp",
}


@pytest.mark.parametrize("reference", BAD_REFERENCES)
def test_a_bad_model_is_one_line_and_exit_code_2_before_the_data_loads(reference, tmp_path, capsys, no_loading):
    argv = ["train", "--model", reference, "--data", "digits", "--seeds", "0", "1", "--epochs", "1", "--out", str(tmp_path)]
    assert cli.main(argv) == 2
    assert BAD_REFERENCES[reference] in one_error_line(capsys, "train")
    assert list(tmp_path.iterdir()) == []


def test_fuse_resolves_model_before_loading_checkpoints(tmp_path, capsys, no_loading):
    argv = ["fuse", "a", "b", "--out", str(tmp_path / "fused"), "--model", "no_such_module_jf:Net", "--evaluate"]
    assert cli.main(argv) == 2
    assert "cannot import 'no_such_module_jf'" in one_error_line(capsys, "fuse")


def test_registry_errors_are_model_config_errors():
    with pytest.raises(ModelConfigError, match="takes no argument 'depth'; it takes hidden, num_classes"):
        describe("user_models:tiny", depth=3)
    with pytest.raises(ModelConfigError, match="must be JSON"):
        describe("user_models:tiny", hidden=object())
    assert issubclass(ModelConfigError, jfusion.JFusionError)


# --- arguments before data ----------------------------------------------------------------

TRAIN = ["train", "--data", "digits", "--epochs", "1"]

# case: (extra arguments, what the error line says)
BAD_TRAIN = {
    "resnet-width": (["--model", "resnet20", "--width", "0.5", "--seeds", "0", "1"], "a ResNet's width is a positive integer multiplier, not 0.5"),
    "negative-width": (["--model", "vgg11", "--width", "-1", "--seeds", "0", "1"], "--width must be a positive multiplier, not -1"),
    "epochs": (["--model", "mlp", "--seeds", "0", "1", "--epochs", "-1"], "--epochs must be at least 0, not -1"),
    "batch-size": (["--model", "mlp", "--seeds", "0", "1", "--batch-size", "0"], "--batch-size must be at least 1, not 0"),
    "features": (["--model", "mlp", "--features", "16", "0", "10", "--seeds", "0", "1"], "--features must be at least 1, not 0"),
    "num-classes": (["--model", "mlpnet", "--num-classes", "0", "--seeds", "0", "1"], "--num-classes must be at least 1, not 0"),
    "repeated-seed": (["--model", "mlp", "--seeds", "0", "0"], "repeats a seed"),
    "special-split": (["--model", "mlp", "--seeds", "0", "1", "2", "--split", "special:2:0.5"], "give exactly two --seeds, not 3"),
    "unknown-flag-for-model": (["--model", "mlp", "--hidden", "8", "--seeds", "0", "1"], "model 'mlp' takes no argument 'hidden'"),
}


@pytest.mark.parametrize("case", BAD_TRAIN)
def test_train_checks_every_number_before_the_data_loads(case, tmp_path, capsys, no_loading):
    extra, message = BAD_TRAIN[case]
    assert cli.main([*TRAIN, *extra, "--out", str(tmp_path)]) == 2
    assert message in one_error_line(capsys, "train")


def test_malformed_splits_are_refused_by_the_parser(tmp_path, capsys, no_loading):
    for split in ("dirichlet:0", "special:2:1.5", "special:-1:0.5", "dirichlet:nan"):
        assert cli.main([*TRAIN, "--model", "mlp", "--seeds", "0", "1", "--split", split, "--out", str(tmp_path)]) == 2
        assert "expected full, iid" in capsys.readouterr().err


BAD_FUSE = {
    "weights-count": (["--weights", "1", "2", "3"], "--weights gives 3 weights for 2 checkpoints"),
    "weights-negative": (["--weights", "-1", "2"], "--weights must be finite, non-negative and not all zero"),
    "weights-zero": (["--weights", "0", "0"], "--weights must be finite, non-negative and not all zero"),
    "recalibrate": (["--recalibrate", "0"], "--recalibrate must be at least 1, not 0"),
    "batch-size": (["--recalibrate", "2", "--batch-size", "0"], "--batch-size must be at least 1, not 0"),
    "target": (["--target", "2"], "--target 2 is not a checkpoint index for 2 checkpoints"),
    "trace-and-spec": (["--trace-spec", "--spec", "mlp"], "--trace-spec reads the spec off the model"),
    "unknown-spec": (["--spec", "resnet99"], "unknown model 'resnet99'"),
    "epsilon": (["--solver", "sinkhorn", "--epsilon", "0"], "Sinkhorn.epsilon must be a finite number > 0"),
    "tau-zero": (["--solver", "sinkhorn", "--tau-a", "0"], "Sinkhorn.tau_a must be a number in (0, 1]"),
    "tau-above-one": (["--solver", "sinkhorn", "--tau-b", "1.5"], "Sinkhorn.tau_b must be a number in (0, 1]"),
    "tau-exact": (["--tau-a", "0.5"], "--tau-a is unbalanced Sinkhorn's marginal penalty; it needs --solver sinkhorn"),
    "importance-exact": (["--importance", "l1"], "--importance l1 gives non-uniform marginals"),
    "importance-unknown": (["--importance", "l3"], "argument --importance: invalid choice: 'l3'"),
}


@pytest.mark.parametrize("case", BAD_FUSE)
def test_fuse_checks_every_argument_before_loading_anything(case, tmp_path, capsys, no_loading):
    extra, message = BAD_FUSE[case]
    assert cli.main(["fuse", "a", "b", "--out", str(tmp_path / "fused"), *extra]) == 2
    assert message in one_error_line(capsys, "fuse")


@pytest.mark.parametrize("extra, message", [(["--models", "0"], "--models must be at least 1, not 0"),
                                            (["--epochs", "-2"], "--epochs must be at least 0, not -2")])
def test_demo_checks_its_numbers_before_the_data_loads(extra, message, capsys, no_loading):
    assert cli.main(["demo", *extra]) == 2
    assert message in one_error_line(capsys, "demo")


# --- saved results ------------------------------------------------------------------------


def test_results_are_written_atomically_and_only_over_files_jfusion_wrote(tmp_path):
    path = tmp_path / "out" / "r.json"
    document = results.results_document("test", {"a": 1}, [{"name": "x", "test_accuracy": 0.5}])
    results.write_json(path, document)
    written = json.loads(path.read_text())
    assert written["format"] == "jfusion-results" and written["rows"][0]["test_accuracy"] == 0.5
    assert {"python", "jax", "flax", "ott-jax", "jfusion"} <= set(written["versions"])
    assert written["versions"]["jfusion"] == jfusion_version()
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.json"]  # no temporary file left
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        results.write_json(path, document)
    results.write_json(path, {**document, "rows": []}, overwrite=True)  # jfusion's own: replaced
    assert json.loads(path.read_text())["rows"] == []
    foreign = tmp_path / "out" / "notes.json"
    foreign.write_text('{"mine": true}')
    with pytest.raises(FileExistsError, match="not a results file jfusion wrote; refusing"):
        results.write_json(foreign, document, overwrite=True)
    assert foreign.read_text() == '{"mine": true}'


def jfusion_version():
    import importlib.metadata

    return importlib.metadata.version("jfusion")


def test_the_chart_is_a_png_jfusion_recognises(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "chart.png"
    bars = [("model 0", 0.9, "parent"), ("vanilla average", 0.5, "baseline"), ("fused", 0.85, "fused")]
    assert results.write_chart(path, bars, title="t") == path.resolve()
    assert path.read_bytes().startswith(results.PNG_SIGNATURE) and results.written_by_jfusion(path)
    results.write_chart(path, bars, title="again", overwrite=True)
    other = tmp_path / "photo.png"
    other.write_bytes(results.PNG_SIGNATURE + b"not ours")
    with pytest.raises(FileExistsError, match="refusing to replace it even with --overwrite"):
        results.write_chart(other, bars, title="t", overwrite=True)


def test_without_matplotlib_only_the_json_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # import fails
    assert results.write_chart(tmp_path / "chart.png", [("a", 0.5, "fused")], title="t") is None
    assert not (tmp_path / "chart.png").exists()


def test_demo_and_fuse_refuse_a_foreign_results_file_before_any_work(tmp_path, capsys, no_loading):
    (tmp_path / "demo.png").write_bytes(b"someone's picture")
    assert cli.main(["demo", "--out", str(tmp_path), "--overwrite"]) == 2
    assert "demo.png exists and is not a results file jfusion wrote" in one_error_line(capsys, "demo")
    (tmp_path / "fused.results.json").write_text("{}")
    assert cli.main(["fuse", "a", "b", "--out", str(tmp_path / "fused"), "--evaluate"]) == 2
    assert "fused.results.json already exists" in one_error_line(capsys, "fuse")
    assert (tmp_path / "demo.png").read_bytes() == b"someone's picture"


# --- progress -----------------------------------------------------------------------------


def test_progress_is_lines_on_a_pipe_and_a_bar_on_a_terminal(monkeypatch):
    stream = io.StringIO()  # not a terminal: one line per step, no bar
    with progress.Progress(2, "epoch", stream=stream) as bar:
        bar.status("compiling")
        bar.step("loss 1.0")
        bar.step("loss 0.5")
    assert stream.getvalue().splitlines() == ["epoch 1/2: compiling", "epoch 1/2: loss 1.0", "epoch 2/2: loss 0.5"]
    for tqdm in (progress._tqdm, None):  # tqdm's bar, and the built-in one without tqdm
        monkeypatch.setattr(progress, "_tqdm", tqdm)
        stream = io.StringIO()
        with progress.Progress(2, "fusing", bar=True, stream=stream) as bar:
            bar.step("a")
            bar.step("b")
        assert "\r" in stream.getvalue() and "2/2" in stream.getvalue()


def test_results_go_to_stdout_under_the_bar(capsys):
    with progress.Progress(1, "x", bar=True) as bar:
        bar.result("a row")
        bar.step()
    captured = capsys.readouterr()
    assert captured.out == "a row\n" and "a row" not in captured.err


# --- the demo's table ---------------------------------------------------------------------


def test_rows_printed_one_by_one_make_the_table():
    rows = [DemoRow("model 0 (seed 0)", 0.9, 10, kind="parent"), DemoRow("fused", 0.8, 10, 1.0, 0.01)]
    width = max(len("method"), *(len(r.name) for r in rows))
    assert "\n".join([table_header(width), *(format_row(r, width) for r in rows)]) == format_table(rows)
