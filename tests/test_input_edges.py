"""Bad input at the edges (links that loop, in-memory stores, weights paths that are no file, stores that do
not answer, plugin annotations pydantic cannot read): one line and exit 2, at once, nothing left behind, no
password shown."""

from __future__ import annotations

import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import torch  # a module global: the block's annotations below are evaluated in this module
import yaml

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "experiments" / "digits.yaml"
TINY_RUN = ("--n-trials", "1", "--set", "train.epochs=1", "--set", "data.image_size=8")
RUN_ID = "0123456789abcdef0123456789abcdef"
PASSWORD = "s3cret"


def one_line(result: subprocess.CompletedProcess, code: int = 2) -> str:
    assert result.returncode == code, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines[:3]
    return lines[0]


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def loop(tmp_path) -> Path:
    """``a`` in tmp_path: a symbolic link to ``b``, which links back to ``a``."""
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    return tmp_path / "a"


def spec_with_init(folder: Path, init: dict) -> Path:
    raw = yaml.safe_load(DIGITS.read_text())
    raw["model"]["init"] = init
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# -- Optuna storages ----------------------------------------------------------------------------------------
def test_a_journal_storage_that_is_a_symlink_loop_is_one_line_and_leaves_no_lock_or_store(tmp_path, loop, cli_here):
    line = one_line(cli_here("run", DIGITS, "--storage", "journal:a", *TINY_RUN, cwd=tmp_path,
                             env={"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"}))
    assert "a: its symbolic links form a loop" in line and "--storage" in line
    assert names(tmp_path) == ["a", "b"]  # no a.<n>.lock, no mlflow.db


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_an_in_memory_sqlite_storage_is_refused_and_leaves_no_lock(tmp_path, cli_here, url):
    line = one_line(cli_here("run", DIGITS, "--storage", url, *TINY_RUN, cwd=tmp_path,
                             env={"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"}))
    assert "an in-memory SQLite database cannot be shared by workers; name a file" in line
    assert names(tmp_path) == []  # no :memory:.<n>.lock, no mlflow.db


# -- MLflow stores ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("uri", ["sqlite:///:memory:", "sqlite://"])
def test_an_in_memory_mlflow_store_is_refused_before_anything_is_made(tmp_path, cli_here, uri):
    line = one_line(cli_here("run", DIGITS, "--storage", "journal:j.log", *TINY_RUN, cwd=tmp_path,
                             env={"MLFLOW_TRACKING_URI": uri}))
    assert line.startswith(f"error: MLflow store {uri}: an in-memory SQLite database") and "name a file" in line
    assert names(tmp_path) == []  # no j.log, no mlruns/


def test_an_mlflow_store_that_is_a_symlink_loop_is_one_line_at_once(tmp_path, loop, cli_here):
    started = time.monotonic()
    line = one_line(cli_here("run", DIGITS, "--storage", "journal:j.log", *TINY_RUN, cwd=tmp_path,
                             env={"MLFLOW_TRACKING_URI": f"sqlite:///{loop}"}))
    assert time.monotonic() - started < 30  # not MLflow's minutes of retries
    assert f"{loop}: its symbolic links form a loop" in line and "MLFLOW_TRACKING_URI" in line
    assert names(tmp_path) == ["a", "b"]


# -- checkpoints --------------------------------------------------------------------------------------------
def test_a_checkpoint_folder_that_is_a_symlink_loop_is_refused_before_the_mlflow_run(tmp_path, loop, cli_here,
                                                                                   sqlite_uri):
    from mlflow.tracking import MlflowClient

    line = one_line(cli_here("train", DIGITS, "--checkpoint-dir", "a", "--set", "train.epochs=1", "--set",
                             "data.image_size=8", "--set", "tracking.experiment=edges-looping-checkpoints",
                             cwd=tmp_path, env={"MLFLOW_TRACKING_URI": sqlite_uri}))
    assert "cannot write checkpoints in a: its symbolic links form a loop" in line and "--checkpoint-dir" in line
    assert names(tmp_path) == ["a", "b"]
    assert MlflowClient(sqlite_uri).get_experiment_by_name("edges-looping-checkpoints") is None  # no FAILED run


# -- data files ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_labels_that_do_not_fit_a_data_sets_files_stop_train_in_one_line_before_the_mlflow_run(tmp_path, cli_here,
                                                                                               sqlite_uri, dataset):
    # A label of 12 ended in the loss's IndexError (exit 1, a FAILED run left); CIFAR labels one short trained
    # on misaligned labels, or (decoded cache) broke in numpy's broadcast.
    import numpy as np
    import torchvision
    from mlflow.tracking import MlflowClient
    from test_data import _fake_cifar, _fake_mnist, _idx, _repickle

    if dataset == "mnist":
        _fake_mnist(tmp_path, "MNIST")
        bad = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte"
        _idx(bad, np.full(60, 12, dtype=np.uint8))
        said = f"error: mnist: {bad} holds 60 labels outside 0 to 9, the classes of mnist (the first: 12); "
    else:
        _fake_cifar(tmp_path, torchvision.datasets.CIFAR10)
        bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
        _repickle(bad, labels=list(range(9)))
        said = f"error: cifar10: {bad} holds 10 images but 9 labels; "
    experiment = f"edges-bad-labels-{dataset}"
    said_all = cli_here("train", DIGITS, "--set", f"data.dataset={dataset}", "--set", f"data.root={tmp_path}",
                        "--set", "data.on_device=no", "--set", "train.epochs=1", "--set", "data.image_size=8",
                        "--set", f"tracking.experiment={experiment}", "--checkpoint-dir", tmp_path / "runs",
                        cwd=tmp_path, env={"MLFLOW_TRACKING_URI": sqlite_uri, "VIT_SEARCH_CACHE": str(tmp_path / "cache")})
    if dataset == "cifar10":  # fake files: the one warning line that they are not the release's comes first
        warning, said_all.stderr = said_all.stderr.split("\n", 1)
        assert warning.startswith("vit-search: warning: ") and "md5 differs" in warning
    line = one_line(said_all)
    assert line.startswith(said) and line.endswith("delete it and download the set again (data.download: true), or "
                                                   "put the release's file there")
    assert MlflowClient(sqlite_uri).get_experiment_by_name(experiment) is None  # no FAILED run


# -- model.init: file ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("path, said", [("folder", "is a folder, not a weights file"),
                                        ("/dev/zero", "is not a regular file")])
def test_an_init_weights_path_that_is_no_regular_file_says_what_it_is(tmp_path, cli_here, path, said):
    (tmp_path / "folder").mkdir()
    spec = spec_with_init(tmp_path, {"from": "file", "path": path})
    line = one_line(cli_here("validate", spec, cwd=tmp_path))
    assert "model.init: " in line and said in line and "no such file" not in line


def test_an_init_weights_path_that_is_a_symlink_loop_is_one_weights_error(loop):
    # Read from here, not through a spec: spec loading resolves the path first (see spec._on_init_weights).
    from vit_search.errors import WeightsError
    from vit_search.model.pretrained import describe
    from vit_search.schema import InitSpec

    with pytest.raises(WeightsError) as raised:
        describe(InitSpec.model_validate({"from": "file", "path": str(loop)}))
    assert str(raised.value) == f"{loop}: its symbolic links form a loop; point the path at the weights file itself"


def test_an_init_weights_path_that_is_a_symlink_loop_is_one_line(tmp_path, loop, cli_here):
    spec = spec_with_init(tmp_path, {"from": "file", "path": "a"})
    line = one_line(cli_here("validate", spec, cwd=tmp_path))
    assert f"model.init: {loop}: its symbolic links form a loop" in line


# -- model.init: mlflow -------------------------------------------------------------------------------------
@pytest.mark.parametrize("uri", [f"postgresql://u:{PASSWORD}@127.0.0.1:{{port}}/m", f"http://u:{PASSWORD}@127.0.0.1:{{port}}"])
def test_an_init_run_store_that_does_not_answer_is_one_line_at_once_without_its_password(tmp_path, cli_here, uri):
    if uri.startswith("postgresql"):
        pytest.importorskip("psycopg", reason="psycopg is needed for PostgreSQL stores (pip install -e '.[test]')")
    from conftest import free_port

    spec = spec_with_init(tmp_path, {"from": "mlflow", "run": RUN_ID, "uri": uri.format(port=free_port())})
    started = time.monotonic()
    line = one_line(cli_here("validate", spec, cwd=tmp_path))
    assert time.monotonic() - started < 30  # not MLflow's retries, for minutes
    assert f"MLflow run '{RUN_ID}'" in line and "does not answer" in line and PASSWORD not in line
    assert names(tmp_path) == ["spec.yaml"]


def test_an_init_run_in_a_sqlite_store_that_does_not_exist_says_so_and_makes_no_store(tmp_path, cli_here,
                                                                                     monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # MLflow's default: sqlite:///mlflow.db here
    spec = spec_with_init(tmp_path, {"from": "mlflow", "run": RUN_ID})
    line = one_line(cli_here("validate", spec, cwd=tmp_path))
    assert f"MLflow run '{RUN_ID}': no such MLflow store" in line and "does not exist" in line
    assert names(tmp_path) == ["spec.yaml"]  # validate writes nothing: no mlflow.db


def test_an_init_run_in_an_in_memory_store_is_one_line(tmp_path, cli_here):
    spec = spec_with_init(tmp_path, {"from": "mlflow", "run": RUN_ID, "uri": "sqlite:///:memory:"})
    line = one_line(cli_here("validate", spec, cwd=tmp_path))
    assert "in-memory SQLite database, which holds no runs" in line
    assert names(tmp_path) == ["spec.yaml"]


# -- plugins ------------------------------------------------------------------------------------------------
def test_a_block_argument_annotated_with_a_type_pydantic_cannot_check_is_passed_unchecked():
    from vit_search.registry import Registry

    registry = Registry(builtin_module=None)

    @registry.register("ffn", "tensor_arg")
    class TensorArg:
        def __init__(self, dim: int, thing: torch.Tensor = None, width: int = 1):
            self.thing = thing

    assert registry.check_args("ffn", "tensor_arg", {"thing": 3, "width": "2"}, "model.ffn") == {"thing": 3, "width": 2}


def test_a_plugin_block_with_an_annotation_pydantic_cannot_check_validates(tmp_path, cli_here):
    (tmp_path / "edge_plugin.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn

        from vit_search import register


        @register("ffn", "edge_tensor_thing")
        class TensorThing(nn.Module):
            def __init__(self, dim, thing: "torch.Tensor" = None):
                super().__init__()
                self.fc = nn.Linear(dim, dim)

            def forward(self, x):
                return self.fc(x)
    '''))
    raw = yaml.safe_load(DIGITS.read_text())
    raw["plugins"] = ["edge_plugin.py"]
    raw["model"]["ffn"] = {"type": "edge_tensor_thing", "thing": 3}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    said = cli_here("validate", tmp_path / "spec.yaml", cwd=tmp_path)
    assert said.returncode == 0 and "Traceback" not in said.stderr, said.stderr[-2000:]
    assert "ok" in said.stdout


# -- a reader that goes away --------------------------------------------------------------------------------
def test_a_reader_that_closes_the_pipe_stops_the_command_quietly_as_sigpipe_would():
    import signal
    import sys

    # The reader closes before the command has imported anything: its first print meets a closed pipe.
    process = subprocess.Popen([sys.executable, "-m", "vit_search", "summary", str(DIGITS)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 128 + signal.SIGPIPE
    assert stderr == ""  # no traceback, no "Exception ignored ... BrokenPipeError"


def test_a_ctrl_c_after_the_command_is_over_leaves_with_its_code_and_no_traceback():
    import sys

    # A study's last trial done, main() returned: a Ctrl-C then (here, sent by the program to itself as the
    # exit begins) printed a KeyboardInterrupt traceback out of the exit's own work.
    script = textwrap.dedent("""
        import os, signal, sys
        import vit_search.cli as cli

        cli.main = lambda argv: 3
        parser = cli.build_parser
        def late_ctrl_c():
            os.kill(os.getpid(), signal.SIGINT)
            return parser()
        cli.build_parser = late_ctrl_c
        sys.argv = ["vit-search", "validate", "x.yaml"]
        cli.entry()
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3 and done.stderr == "", done.stderr[-2000:]
