"""Faults and hostile input: one line and the right exit code, bounded time and memory, nothing lost,
nothing half-written, no secret shown."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import trials_watch
from test_study import study_raw

REPO = Path(__file__).resolve().parents[1]
TINY = {"name": "tiny", "seed": 0, "data": {"dataset": "digits", "image_size": 8},
        "model": {"dim": 16, "depth": 1, "patch_embed": {"type": "conv", "patch_size": 4},
                  "attention": {"type": "sdpa", "heads": 2}},
        "train": {"epochs": 2, "batch_size": 64}, "tracking": {"enabled": False}}


@pytest.fixture
def workdir(tmp_path, monkeypatch, sqlite_uri):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    return tmp_path


def bounded_cli(*args: str, cwd: Path, memory_gb: float = 6, env: dict | None = None) -> subprocess.CompletedProcess:
    """The command line under an address-space cap: a regression that expands its input fails on
    memory (exit 1 with a traceback), not on a clock."""
    limit = int(memory_gb * 2**30)
    cap = f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))"
    return subprocess.run([sys.executable, "-c", f"{cap}\nfrom vit_search.cli import main\nraise SystemExit(main())", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


@pytest.fixture
def in_process(capsys, monkeypatch):
    """The command line in this process, with no start-up to pay (MLflow's global state is reset after
    each test): ``in_process(*args, env={...})`` returns its exit code and its stderr's last line."""
    from vit_search.cli import main

    def run(*args: str, env: dict | None = None) -> tuple[int, str]:
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        capsys.readouterr()
        code = main(list(args))  # an exception out of main would be a traceback: the test errors
        return code, (capsys.readouterr().err.strip().splitlines() or [""])[-1]

    return run


def one_line(result: subprocess.CompletedProcess, code: int = 2) -> str:
    assert result.returncode == code, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and len(lines[0]) < 1000, lines[:3]  # one line, never a value expanded into it
    return lines[0]


def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


# -- hostile specs ----------------------------------------------------------------------------------
BOMB = "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9))


@pytest.mark.parametrize("text, expected", [
    (BOMB, "YAML aliases expand to more than"),
    ("name: x\nmodel:\n  attention:\n" + textwrap.indent(BOMB, "    "), "YAML aliases expand to more than"),
    ("name: x\nseed: " + "[" * 20000 + "]" * 20000 + "\n", "nested more than 50 levels"),
    ("name: x\nseed: " + "9" * 5000 + "\n", "has more than 100 digits"),
    ("name: x\ntrain: {lr: .inf}\n", "train.lr: .inf is not a finite number"),
    ("name: x\ntrain: {epochs: 1.0e+12}\n", "train.epochs: Input should be less than or equal to 1000000"),
    ("name: x\nmodel: {depth: 1000000000}\n", "model.depth: Input should be less than or equal to 1024"),
    ("name: x\nmodel: {ffn: {type: mlp, hidden_dim: 1000000000}}\n", "parameters is more than"),
    ("name: x\nsearch: {stride: 2}\n", "search.stride: unknown key 'stride'"),
    ("name: x\ntrain: {interval: 1}\n", "train.interval: unknown key 'interval'"),
])
def test_a_hostile_spec_is_one_line_and_exit_2_in_bounded_memory(workdir, text, expected):
    spec = write(workdir / "spec.yaml", text)
    assert expected in one_line(bounded_cli("validate", str(spec), cwd=workdir))


def test_a_huge_spec_file_is_refused_before_it_is_read(workdir):
    spec = workdir / "spec.yaml"
    with open(spec, "w") as handle:
        handle.write("name: x\n")
        handle.write("# padding\n" * 5_000_000)  # 50 MB
    assert "a spec is a few KB" in one_line(bounded_cli("validate", str(spec), cwd=workdir))


@pytest.mark.parametrize("override, expected", [
    ("seed=[&a [1,2,3], *a, *a]", None),  # modest aliases: fine
    ("seed=" + "[&a0 [" + ", ".join(["x"] * 9) + "], " + ", ".join(
        f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)) + "]", "YAML aliases expand to more than"),
    ("model.depth=1000000000", "less than or equal to 1024"),
    ("train.lr=.nan", "is not a finite number"),
])
def test_a_hostile_set_value_is_one_short_line(workdir, override, expected):
    spec = write(workdir / "spec.yaml", TINY)
    result = bounded_cli("validate", str(spec), "--set", override, cwd=workdir)
    if expected is None:
        assert result.returncode == 2 and "seed" in result.stderr  # a list is no seed: refused, not expanded
    else:
        assert expected in one_line(result)


def test_a_search_range_that_ends_beyond_the_limits_is_refused_at_its_line(workdir):
    raw = {**TINY, "search": {"space": {"model.depth": {"int": [1, 1000000000]}}}}
    line = one_line(bounded_cli("validate", str(write(workdir / "spec.yaml", raw)), cwd=workdir))
    assert "search.space.model.depth: value 1000000000 does not fit" in line


def test_a_search_over_a_seeds_four_billion_values_draws_in_bounded_memory(workdir):
    # The space's size was counted by listing every value: a MemoryError (or the OOM killer) at the first draw.
    spec = write(workdir / "spec.yaml", study_raw("seeds", space={"seed": {"int": [0, 2**32 - 1]}}))
    result = bounded_cli("run", str(spec), "--dry-run", "2", cwd=workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    seeds = {line.split("[seed=")[1] for line in result.stdout.splitlines() if "[seed=" in line}
    assert len(seeds) == 2  # two configurations drawn, each its own seed


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_grid_too_large_to_list_is_one_line_before_anything_is_written(workdir, command):
    # Optuna's grid sampler lists every point: 2**32 seeds took all the memory there was.
    spec = write(workdir / "spec.yaml", study_raw("huge-grid", sampler="grid", space={"seed": {"int": [0, 2**32 - 1]}}))
    result = bounded_cli(command, str(spec), cwd=workdir)
    assert result.returncode == 2 and result.stderr.strip().endswith(
        "search.space: the grid has 4,294,967,296 points, too many to list (at most 1,000,000); widen steps, narrow "
        "ranges, or use another search.sampler"), result.stderr[-2000:]
    assert sorted(p.name for p in workdir.iterdir()) == ["spec.yaml"]


def test_a_plugin_that_calls_sys_exit_is_a_plugin_error(workdir):
    write(workdir / "quitter.py", "import sys\nsys.exit(0)\n")
    spec = write(workdir / "spec.yaml", {**TINY, "plugins": ["quitter.py"]})
    line = one_line(bounded_cli("validate", str(spec), cwd=workdir))
    assert "plugins.0: plugin file" in line and "SystemExit" in line


# -- damaged files ------------------------------------------------------------------------------------
def _snapshot(folder: Path) -> dict[str, bytes]:
    """Each file's bytes; a SQLite database's rows instead (a WAL checkpoint moves its bytes, not its rows)."""
    return {p.name: _rows_or_bytes(p) for p in folder.iterdir()
            if p.is_file() and not p.name.endswith(("-wal", "-shm"))}


def _rows_or_bytes(path: Path) -> bytes:
    # Only SQLite may open a database this process holds: our own open() and close() would drop its locks.
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)  # writes nothing, even to a damaged file
    try:
        return "\n".join(connection.iterdump()).encode()
    except sqlite3.DatabaseError:  # no database, or a damaged one: its bytes
        return path.read_bytes()
    finally:
        connection.close()


@pytest.mark.parametrize("content", ["garbage", "truncated"])
@pytest.mark.parametrize("command", ["run", "best"])
def test_a_damaged_optuna_db_is_one_line_and_nothing_changes(workdir, content, command):
    raw = {**study_raw("damaged"), "tracking": {"enabled": False}}
    raw["search"]["storage"] = "sqlite:///optuna.db"
    spec = write(workdir / "spec.yaml", raw)
    if content == "garbage":
        (workdir / "optuna.db").write_bytes(os.urandom(5000))
    else:
        good = workdir / "good.db"
        optuna.create_study(study_name="damaged", storage=f"sqlite:///{good}")
        (workdir / "optuna.db").write_bytes(good.read_bytes()[:20000])
        good.unlink()
    before = _snapshot(workdir)
    line = one_line(bounded_cli(command, str(spec), cwd=workdir))
    assert "optuna.db:" in line and "move it away" in line
    assert _snapshot(workdir) == before


@pytest.mark.parametrize("storage, said", [
    ("journal:{tmp}/folder", "a folder, not a storage file; name a file in it (e.g. {tmp}/folder/study.log)"),
    ("sqlite:///{tmp}/folder", "a folder, not a storage file; name a file in it (e.g. {tmp}/folder/optuna.db)"),
    ("journal:{tmp}/a-file/study.log", "its folder {tmp}/a-file cannot be made (a file is in the way)"),
])
def test_a_storage_file_that_cannot_be_one_is_one_line_and_exit_2(workdir, cli_here, storage, said):
    spec = write(workdir / "spec.yaml", {**study_raw("nowhere"), "tracking": {"enabled": False}})
    (workdir / "folder").mkdir()
    (workdir / "a-file").write_text("")
    before = sorted(p.name for p in workdir.iterdir())
    line = one_line(cli_here("run", str(spec), "--storage", storage.format(tmp=workdir), cwd=workdir))
    assert said.format(tmp=workdir) in line
    assert sorted(p.name for p in workdir.iterdir()) == before and not list((workdir / "folder").iterdir())


def test_best_on_an_empty_optuna_db_says_there_is_no_study_and_leaves_it_empty(workdir, cli_here):
    raw = {**study_raw("empty"), "tracking": {"enabled": False}}
    raw["search"]["storage"] = "sqlite:///optuna.db"
    spec = write(workdir / "spec.yaml", raw)
    (workdir / "optuna.db").write_bytes(b"")
    assert "no study 'empty'" in one_line(cli_here("best", str(spec), cwd=workdir))
    assert (workdir / "optuna.db").stat().st_size == 0


@pytest.mark.parametrize("command", ["run", "best"])
@pytest.mark.parametrize("server", ["postgresql://someone:hunter2@127.0.0.1:{port}/test",
                                    "redis://:hunter2@127.0.0.1:{port}"])
def test_a_storage_server_that_does_not_answer_is_one_line_without_its_password(workdir, cli_here, command, server):
    pytest.importorskip(server.split(":")[0].replace("postgresql", "psycopg"),
                        reason="psycopg and redis are needed for those storages (pip install -e '.[test]')")
    from conftest import free_port

    spec = write(workdir / "spec.yaml", {**study_raw("no-server"), "tracking": {"experiment": "no-server"}})
    url = server.format(port=free_port())  # nothing listens there
    line = one_line(cli_here(command, str(spec), "--storage", url, cwd=workdir,
                             env={"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"}))
    assert "refused" in line and "hunter2" not in line
    assert sorted(p.name for p in workdir.iterdir()) == ["spec.yaml"]  # no MLflow store either


@pytest.mark.parametrize("command, uri, said", [("train", "garbage://x", "unsupported URI 'garbage://x'"),
                                                ("train", "file:///{tmp}/mlruns", "filesystem tracking backend"),
                                                ("run", "{tmp}/mlruns", "filesystem tracking backend")])
def test_a_tracking_uri_mlflow_has_no_store_for_is_one_line_in_its_words_before_anything_is_written(
        workdir, in_process, command, uri, said):
    raw = {**TINY, "search": study_raw("refused")["search"]} if command == "run" else TINY
    spec = write(workdir / "spec.yaml", {**raw, "tracking": {"experiment": "refused"}})
    uri = uri.format(tmp=workdir)
    code, line = in_process(command, str(spec), env={"MLFLOW_TRACKING_URI": uri})
    assert code == 2 and line.startswith(f"error: MLflow store {uri}: ") and said in line
    assert sorted(p.name for p in workdir.iterdir()) == ["spec.yaml"]  # no study, no runs folder


@pytest.mark.parametrize("store, said", [("{tmp}/folder", "a folder, not MLflow's store file"),
                                         ("{tmp}/spec.yaml/mlflow.db", "spec.yaml is a file")])
def test_an_mlflow_store_file_that_cannot_be_one_is_one_line_before_anything_is_written(workdir, in_process, store,
                                                                                       said):
    (workdir / "folder").mkdir()
    spec = write(workdir / "spec.yaml", {**TINY, "search": study_raw("x")["search"], "tracking": {"experiment": "x"}})
    uri = "sqlite:///" + store.format(tmp=workdir)
    code, line = in_process("run", str(spec), env={"MLFLOW_TRACKING_URI": uri})
    assert code == 2 and line.startswith("error: ") and said in line
    assert sorted(p.name for p in workdir.iterdir()) == ["folder", "spec.yaml"]
    assert not list((workdir / "folder").iterdir())


@pytest.mark.parametrize("uri, said", [
    ("postgresql://someone:hunter2@127.0.0.1:{port}/test", "does not answer"),
    ("mysql+nosuchdriver://someone:hunter2@127.0.0.1:{port}/test", "is not a database URL"),
])
def test_a_tracking_database_that_cannot_be_used_is_one_line_at_once_without_its_password(workdir, in_process, uri,
                                                                                          said):
    pytest.importorskip("psycopg", reason="psycopg is needed for PostgreSQL stores (pip install -e '.[test]')")
    from conftest import free_port

    spec = write(workdir / "spec.yaml", {**TINY, "tracking": {"experiment": "no-database"}})
    uri = uri.format(port=free_port())  # nothing listens there
    # One line: not MLflow's own retries, which warn for two minutes before they give up.
    code, line = in_process("train", str(spec), env={"MLFLOW_TRACKING_URI": uri})
    assert code == 2 and line.startswith("error: MLflow store ") and said in line and "hunter2" not in line


def test_an_optuna_database_that_does_not_answer_is_one_line_before_jobs_make_the_mlflow_store(workdir, in_process):
    pytest.importorskip("psycopg", reason="psycopg is needed for PostgreSQL storages (pip install -e '.[test]')")
    from conftest import free_port

    spec = write(workdir / "spec.yaml", {**study_raw("no-database"), "tracking": {"experiment": "no-database"}})
    url = f"postgresql://someone:hunter2@127.0.0.1:{free_port()}/test"  # nothing listens there
    code, line = in_process("run", str(spec), "--jobs", "2",
                            env={"VIT_SEARCH_STORAGE": url, "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"})
    assert code == 2 and line.startswith(f"error: Optuna storage {url.replace('hunter2', '***')} does not answer (")
    assert "hunter2" not in line and line.endswith("then run the command again")
    assert sorted(p.name for p in workdir.iterdir()) == ["spec.yaml"]  # no MLflow store, no runs folder


def test_a_tracking_server_that_does_not_answer_at_the_start_is_one_line_without_its_password(workdir, in_process):
    from conftest import free_port

    spec = write(workdir / "spec.yaml", study_raw("no-server-yet", n_trials=1))
    port = free_port()  # nothing listens there
    code, line = in_process("run", str(spec), env={"MLFLOW_TRACKING_URI": f"http://someone:hunter2@127.0.0.1:{port}"})
    assert code == 2 and line.startswith(f"error: MLflow tracking server http://someone:***@127.0.0.1:{port} does not "
                                         f"answer (") and "hunter2" not in line
    assert line.endswith("start it (or point MLFLOW_TRACKING_URI at a store that answers), then run the command again")
    assert sorted(p.name for p in workdir.iterdir()) == ["spec.yaml"]  # no study made


@pytest.mark.parametrize("storage, tracking, said", [
    (None, "http://someone:hunter2@127.0.0.1:50x9", "MLflow tracking server URL http://someone:***@127.0.0.1:50x9 is "
                                                    "not a valid URL (Port could not be cast to integer value as '50x9')"),
    (None, "http://someone:hunter2@[127.0.0.1:5077", "MLflow tracking server URL http://someone:***@[127.0.0.1:5077 is "
                                                     "not a valid URL (Invalid IPv6 URL)"),
    ("redis://:hunter2@127.0.0.1:63x9/0", None, "Optuna storage redis://:***@127.0.0.1:63x9/0 is not a valid URL (Port "
                                                "could not be cast to integer value as '63x9')"),
], ids=["tracking-port", "tracking-bracket", "redis-port"])
def test_a_storage_or_tracking_url_that_is_no_url_is_one_line_without_its_password(workdir, in_process, storage,
                                                                                    tracking, said):
    if storage:
        pytest.importorskip("redis", reason="redis is needed for Redis storages (pip install -e '.[test]')")
    spec = write(workdir / "spec.yaml", study_raw("no-url", n_trials=1))
    code, line = in_process("run", str(spec), *(["--storage", storage] if storage else []),
                            env={"MLFLOW_TRACKING_URI": tracking or "sqlite:///mlflow.db"})
    assert code == 2 and line.startswith(f"error: {said}") and "hunter2" not in line, line
    assert sorted(p.name for p in workdir.iterdir()) == ["spec.yaml"]  # nothing made


def test_a_password_is_masked_wherever_a_message_repeats_its_url():
    from vit_search.redaction import redact_in

    url = "postgresql://someone:p%40ss@db.example:5432/x"
    said = f"could not connect to {url}: password 'p@ss' refused for someone"
    assert redact_in(said, url) == "could not connect to postgresql://someone:***@db.example:5432/x: " \
                                   "password '***' refused for someone"


def test_a_password_with_a_slash_or_an_at_sign_is_masked_as_the_driver_reads_it():
    from vit_search.redaction import redact, redact_in

    # SQLAlchemy reads a password up to the first '@' of the part before the host; '/' is part of it.
    assert redact("postgresql://user:pa/hunter2@127.0.0.1/test") == "postgresql://user:***@127.0.0.1/test"
    url = "postgresql://user:pa@hunter2@127.0.0.1/test"
    assert redact(url) == "postgresql://user:***@127.0.0.1/test"
    # ... and the driver then names the rest as the host: that piece is hidden too.
    assert "hunter2" not in redact_in(f"failed to resolve host 'hunter2@127.0.0.1' for {url}", url)
    assert redact("sqlite:////tmp/a@b/optuna.db") == "sqlite:////tmp/a@b/optuna.db"  # an '@' in a path: no password


def test_a_tracking_servers_password_is_printed_nowhere_by_a_study(workdir, mlflow_server):
    url = mlflow_server.replace("http://", "http://someone:s3cretTrk@")  # the server takes any credentials
    raw = study_raw("trk-password", n_trials=1)
    spec = write(workdir / "spec.yaml", {**raw, "train": {**raw["train"], "epochs": 1}})
    result = subprocess.run([sys.executable, "-m", "vit_search", "run", str(spec)], cwd=workdir, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "MLFLOW_TRACKING_URI": url})
    assert result.returncode == 0, result.stderr[-2000:]
    # MLflow prints a link to each run it ends, the URL's password in it, unless told not to.
    assert "s3cretTrk" not in result.stdout + result.stderr, (result.stdout + result.stderr)[-2000:]


def test_weights_from_a_tracking_server_with_a_password_leave_it_out_of_params_artifacts_exports_and_checkpoints(
        workdir, mlflow_server, monkeypatch, cli_here):
    import mlflow
    import yaml as pyyaml

    from vit_search.spec import load_spec
    from vit_search.train import train

    url = mlflow_server.replace("http://", "http://someone:s3cretInit@")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    tiny = {"data": {"dataset": "digits", "image_size": 8}, "train": {"epochs": 1, "batch_size": 64}}
    source = train(load_spec({**tiny, "name": "init-source", "model": {"dim": 16, "depth": 1, "patch_embed": {
        "type": "conv", "patch_size": 2}, "attention": {"heads": 2}}}), checkpoint_dir=workdir / "a").run_id
    spec = load_spec({**tiny, "name": "init-user", "model": {"init": {"from": "mlflow", "run": source}}})
    assert spec.model.init.uri == url  # the store the weights are read from
    result = train(spec, checkpoint_dir=workdir / "b")

    run = mlflow.MlflowClient().get_run(result.run_id)
    assert not [key for key, value in run.data.params.items() if "s3cretInit" in value]
    for artifact in ("spec.yaml", "model/spec.yaml"):
        assert "s3cretInit" not in mlflow.artifacts.load_text(f"runs:/{result.run_id}/{artifact}")
    assert b"s3cretInit" not in (workdir / "b" / "checkpoint.pt").read_bytes()
    exported = spec.to_yaml(exclude_search=True)
    assert "s3cretInit" not in exported
    assert load_spec(pyyaml.safe_load(exported)).model.init.uri == url  # taken from the environment again
    # The command line reads the weights' record without MLflow's download bars (stderr is no terminal here).
    checked = cli_here("validate", write(workdir / "again.yaml", pyyaml.safe_load(exported)))
    assert checked.returncode == 0 and checked.stderr == "", checked.stderr


def test_a_password_with_a_question_mark_is_masked_and_a_query_after_the_host_is_not_the_password():
    from vit_search.redaction import redact

    # SQLAlchemy reads 'Qx?Secret9' as the password: the query starts after the host.
    assert redact("postgresql://auditor:Qx?Secret9@127.0.0.1:5432/test") == "postgresql://auditor:***@127.0.0.1:5432/test"
    assert redact("postgresql://u:pw@h/db?application_name=a@b") == "postgresql://u:***@h/db?application_name=a@b"


def test_an_error_that_repeats_a_huge_key_is_one_short_line_at_once(workdir):
    spec = workdir / "spec.yaml"
    spec.write_text("name: x\n? " + "k" * 900_000 + "\n: 1\n")  # under the 1 MiB file limit
    # A regular expression that backtracked made this minutes; the subprocess's timeout bounds it.
    said = bounded_cli("validate", str(spec), cwd=workdir)
    assert said.returncode == 2 and len(said.stderr.splitlines()) == 1, said.stderr[:500]
    assert len(said.stderr) < 2100 and "characters ...]" in said.stderr  # where it is, and what is allowed there:
    assert said.stderr.rstrip().endswith("allowed: name, seed, plugins, data, model, train, search, tracking")


@pytest.mark.parametrize("override", ["search.storag=postgresql://user:s3cret@127.0.0.1/test",
                                      "search.storage=[postgresql://user:s3cret@127.0.0.1/test]",
                                      "tracking.uri={u: 'http://u:s3cret@127.0.0.1:5000'}",
                                      # a space or a quote ends a URL in free text: the password is masked anyway
                                      "search.storage=[postgresql://user:s3 cret@127.0.0.1/test]",
                                      "search.storag=postgresql://user:s3'cret@127.0.0.1/test"])
def test_a_refused_override_that_repeats_a_password_shows_it_masked(workdir, cli_here, override):
    spec = write(workdir / "spec.yaml", study_raw("masked"))
    said = cli_here("validate", spec, "--set", override)
    assert said.returncode == 2 and len(said.stderr.splitlines()) == 1 and said.stderr.startswith("error: ")
    assert "cret" not in said.stderr and ":***@127.0.0.1" in said.stderr, said.stderr


def test_a_given_password_that_is_an_ordinary_word_is_masked_in_its_url_but_not_in_the_words_around_it(monkeypatch):
    from vit_search import redaction

    monkeypatch.setattr(redaction, "_GIVEN", set())  # this process's passwords: the other tests' lines keep theirs
    redaction.remember_passwords(["postgresql://postgres:postgres@127.0.0.1/test", "postgresql://u:a b@127.0.0.1/t",
                                  "postgresql://u:pa ss@127.0.0.1/test"])
    assert redaction.scrub("storage postgresql://postgres:postgres@127.0.0.1/test: database postgres refused "
                           "'pa ss' in a batch") == \
        "storage postgresql://postgres:***@127.0.0.1/test: database postgres refused '***' in a batch"


def test_a_spec_loaded_in_python_masks_an_overrides_password_with_a_space_in_its_problems(monkeypatch):
    from vit_search import redaction
    from vit_search.redaction import scrub
    from vit_search.spec import SpecError, load_spec

    monkeypatch.setattr(redaction, "_GIVEN", set())

    with pytest.raises(SpecError) as refused:
        load_spec(study_raw("masked"), ["search.storage=[postgresql://user:load spec9@127.0.0.1/test]"])
    (problem,) = refused.value.problems
    assert "load spec9" in problem and "load spec9" not in scrub(problem)  # as every error line shows it


def test_a_spec_value_that_repeats_a_password_with_a_space_in_it_shows_it_masked(workdir, cli_here):
    raw = study_raw("masked")
    raw["search"]["storage"] = ["postgresql://user:s3 cret@127.0.0.1/test"]
    said = cli_here("validate", write(workdir / "spec.yaml", raw))
    assert said.returncode == 2 and len(said.stderr.splitlines()) == 1 and said.stderr.startswith("error: ")
    assert "cret" not in said.stderr and ":***@127.0.0.1" in said.stderr, said.stderr


def test_a_key_with_a_newline_in_it_is_still_one_error_line(workdir, cli_here):
    spec = workdir / "spec.yaml"
    spec.write_text('name: x\n"mo\\ndel\\nerror: fake": 1\n')
    said = cli_here("validate", spec)
    assert said.returncode == 2 and said.stderr.count("\n") == 1, said.stderr
    assert "mo\\ndel\\nerror: fake" in said.stderr  # shown escaped, as YAML wrote it


def test_a_damaged_mlflow_db_is_one_line_and_nothing_is_created(workdir, in_process):
    raw = study_raw("mlflow-damaged")
    raw["search"]["storage"] = "sqlite:///optuna.db"
    spec = write(workdir / "spec.yaml", raw)
    (workdir / "mlflow.db").write_bytes(os.urandom(5000))
    before = _snapshot(workdir)
    code, line = in_process("run", str(spec), env={"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"})
    assert code == 2 and "mlflow.db: not a SQLite database" in line
    assert _snapshot(workdir) == before


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_study_whose_parent_run_is_not_in_the_tracking_store_is_one_line_and_nothing_changes(workdir, jobs):
    from vit_search.search.study import PARENT_RUN, open_study
    from vit_search.spec import load_spec

    raw = study_raw("elsewhere")
    raw["search"]["storage"] = "sqlite:///optuna.db"
    spec = write(workdir / "spec.yaml", raw)
    # The study was logged to another MLflow store: this one has never seen its parent run.
    open_study(load_spec(spec), "sqlite:///optuna.db").set_attr(PARENT_RUN, "f" * 32)
    before = _snapshot(workdir)
    result = bounded_cli("run", str(spec), "--jobs", jobs, cwd=workdir)
    # Optuna's resume note, and with --jobs the workers' thread settings; the refusal is the command's,
    # made before its workers touch anything: said once.
    result.stderr = "".join(ln for ln in result.stderr.splitlines(True) if not ln.startswith(("[I ", "worker ")))
    line = one_line(result)
    assert "'elsewhere'" in line and "f" * 32 in line and "MLFLOW_TRACKING_URI" in line
    assert "retried" not in result.stdout + result.stderr and "trial" not in result.stdout  # no table, no blame
    after = {name: data for name, data in _snapshot(workdir).items() if not name.endswith(".lock")}  # workers' lock
    assert after == before
    assert not (workdir / "runs").exists()
    assert MlflowClient().get_experiment_by_name("elsewhere") is None  # nothing made in the wrong store


def test_a_study_whose_parent_run_was_deleted_is_one_line_with_the_restore_command_and_goes_on_once_restored(
        workdir, in_process):
    from vit_search.search.study import PARENT_RUN, open_study
    from vit_search.spec import load_spec

    raw = study_raw("deleted-parent", n_trials=1)
    raw["search"]["storage"] = "sqlite:///optuna.db"
    spec = write(workdir / "spec.yaml", raw)
    assert in_process("run", str(spec), "--quiet")[0] == 0
    parent = open_study(load_spec(spec), "sqlite:///optuna.db").attr(PARENT_RUN)
    MlflowClient().delete_run(parent)  # as the UI's delete does
    before = _snapshot(workdir)
    # It once stopped with MLflow's "must be in the 'active' state" as an internal error (exit 1).
    code, line = in_process("run", str(spec), "--n-trials", "2", "--quiet")
    assert code == 2 and "'deleted-parent'" in line and "was deleted in the store" in line
    assert f"mlflow runs restore --run-id {parent}" in line and "--resume" not in line  # `run` has no --resume
    assert _snapshot(workdir) == before
    MlflowClient().restore_run(parent)
    assert in_process("run", str(spec), "--n-trials", "2", "--quiet")[0] == 0
    trials = open_study(load_spec(spec), "sqlite:///optuna.db").study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert MlflowClient().get_run(parent).info.status == "FINISHED"


def test_resuming_a_run_logged_to_another_tracking_store_is_one_line_and_creates_nothing_there(workdir):
    import torch

    from vit_search.spec import load_spec
    from vit_search.train import train

    spec = write(workdir / "spec.yaml", {**TINY, "name": "resume-elsewhere",
                                         "tracking": {"experiment": "resume-elsewhere"}})
    train(load_spec(spec), progress=False)
    path = workdir / "runs" / "resume-elsewhere" / "checkpoint.pt"
    checkpoint = torch.load(path, weights_only=True)
    MlflowClient().delete_experiment(MlflowClient().get_experiment_by_name("resume-elsewhere").experiment_id)
    checkpoint["run_id"] = "e" * 32  # as if logged to another store: this one never saw the run
    torch.save(checkpoint, path)
    line = one_line(bounded_cli("train", str(spec), "--resume", cwd=workdir))
    assert "e" * 32 in line and "MLFLOW_TRACKING_URI" in line and "without --resume" in line
    assert MlflowClient().get_experiment_by_name("resume-elsewhere").lifecycle_stage == "deleted"  # not made again


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "keyless"])
def test_resuming_from_a_damaged_checkpoint_is_one_line_naming_it(workdir, damage):
    import numpy as np
    import torch

    spec = write(workdir / "spec.yaml", TINY)
    checkpoint = workdir / "runs" / "tiny" / "checkpoint.pt"
    checkpoint.parent.mkdir(parents=True)
    if damage in ("truncated", "keyless"):
        torch.save({"model": {"w": torch.zeros(1000)}}, checkpoint)
        if damage == "truncated":
            checkpoint.write_bytes(checkpoint.read_bytes()[:500])
    else:
        # Garbage that opens like a pickle of an unknown protocol (torch warns of it), then noise.
        noise = b"\x80\x09" + np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()
        checkpoint.write_bytes(noise if damage == "garbage" else b"")
    line = one_line(bounded_cli("train", str(spec), "--resume", cwd=workdir))
    assert str(checkpoint) in line.replace(str(workdir) + "/", "") or "checkpoint.pt" in line
    assert "without --resume" in line and "weights_only" not in line


# -- a full disk, a folder that cannot be written --------------------------------------------------
def _tmpfs(mount: Path, size: str):
    """A tmpfs of ``size`` at ``mount``: a disk that fills up (skips where this process cannot mount one)."""
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here to fill a disk ({result.stderr.strip() or 'not root'})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MB disk."""
    yield from _tmpfs(tmp_path / "disk", "1m")


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB disk: room for a new MLflow store (about 1 MB) and its runs."""
    yield from _tmpfs(tmp_path / "store-disk", "4m")


def test_a_full_disk_stops_train_with_one_line_and_leaves_no_temporary_file(workdir, tiny_disk):
    raw = {**TINY, "model": {**TINY["model"], "dim": 256, "depth": 2}}  # checkpoints of a few MB
    spec = write(workdir / "spec.yaml", raw)
    line = one_line(bounded_cli("train", str(spec), "--checkpoint-dir", str(tiny_disk), cwd=workdir), code=1)
    # Another --checkpoint-dir, which it once offered, would resume nothing: the run goes on where its checkpoint is.
    assert line == (f"error: no space left in {tiny_disk} for the epoch checkpoint; free some space, then run the same "
                    f"command with --resume to go on from its last checkpoint")
    assert not list(tiny_disk.glob("*.tmp"))


def test_a_checkpoint_folder_made_read_only_mid_run_is_one_line_and_the_run_resumes_once_it_is_writable(
        workdir, tiny_disk):
    import torch

    spec = write(workdir / "spec.yaml", {**TINY, "train": {**TINY["train"], "epochs": 500}})
    proc = subprocess.Popen([sys.executable, "-m", "vit_search", "train", str(spec), "--checkpoint-dir", str(tiny_disk),
                             "--quiet"], cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoint, deadline = tiny_disk / "checkpoint.pt", time.monotonic() + 300
    while not checkpoint.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)  # as a failing disk is remounted
    _, err = proc.communicate(timeout=300)
    # It was an internal error: removing the temporary file raised EROFS too, over the line that says what happened.
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f"error: cannot write the epoch checkpoint {checkpoint}: Read-only file system; make {tiny_disk} writable "
        f"again, then run the same command with --resume to go on from its last checkpoint")
    saved = torch.load(checkpoint, weights_only=True)["epoch"]  # the last one written is whole
    subprocess.run(["mount", "-o", "remount,rw", str(tiny_disk)], check=True)
    result = bounded_cli("train", str(spec), "--checkpoint-dir", str(tiny_disk), "--resume",
                         f"--set=train.epochs={saved + 2}", "--quiet", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(checkpoint, weights_only=True)["epoch"] == saved + 1


@pytest.mark.slow
def test_a_study_whose_checkpoints_fill_the_disk_stops_in_one_line_with_its_trial_queued_again(workdir, tiny_disk):
    raw = study_raw("full-disk", n_trials=2)  # MLflow's store on another disk, with room
    raw["model"] = {**raw["model"], "dim": 256}
    spec = write(workdir / "spec.yaml", raw)
    result = bounded_cli("run", str(spec), "--checkpoint-dir", str(tiny_disk), cwd=workdir)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: no space left in {tiny_disk}/") and line.endswith(
        "(trial 0 is queued again; then run the same command)")
    trials = optuna.load_study(study_name="full-disk", storage=raw["search"]["storage"]).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]  # the one trial queued, none lost
    assert not list(tiny_disk.rglob("*.tmp"))
    assert not (tiny_disk / "full-disk" / "trial-0").exists()  # its retry trains afresh: the space is given back
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("full-disk").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "KILLED"
    assert [r.info.status for r in runs if r.data.tags.get("optuna.trial_number") == "0"] == ["FAILED"]


@pytest.mark.slow
def test_a_study_on_a_file_that_is_no_image_stops_in_one_line_and_loses_no_trial(workdir, in_process):
    import numpy as np
    from PIL import Image

    for c, name in enumerate(["cat", "dog"]):
        (workdir / "images" / name).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(np.full((8, 8, 3), 40 + 150 * c + i, np.uint8)).save(workdir / "images" / name / f"{i}.png")
    bad = workdir / "images" / "dog" / "notes.png"
    bad.write_text("not an image")
    raw = {**study_raw("no-image", n_trials=1, space={"train.lr": {"float": [1e-3, 1e-2], "log": True}}),
           "data": {"dataset": "imagefolder", "root": str(workdir / "images"), "image_size": 8},
           "train": {**study_raw("x")["train"], "batch_size": 4}}
    spec = write(workdir / "spec.yaml", raw)
    # Every trial would read the set and fail alike: the worker stops at the first, exit 2, the trial queued again.
    result = bounded_cli("run", str(spec), "--quiet", cwd=workdir)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: cannot decode an image: {bad} (cannot identify image file); remove or replace the files, "
        f"then run again (trial 0 is queued again)")
    storage = raw["search"]["storage"]
    trials = optuna.load_study(study_name="no-image", storage=storage).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("no-image").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FAILED", "KILLED"]  # the trial's run, the parent's

    bad.unlink()  # the same command once the file is gone: the queued trial trains, the parent finishes
    code, said = in_process("run", str(spec), "--quiet")
    assert code == 0, said
    trials = optuna.load_study(study_name="no-image", storage=storage).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    runs = client.search_runs([client.get_experiment_by_name("no-image").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED", "FINISHED"]


def test_a_weights_file_removed_mid_study_stops_in_one_line_and_prunes_no_trial(workdir, in_process):
    import torch

    from vit_search.model import build_model
    from vit_search.spec import load_spec

    raw = study_raw("weights-gone", n_trials=2, space={"train.lr": {"float": [1e-3, 1e-2], "log": True}})
    raw["tracking"] = {**raw["tracking"], "log_model": False}
    weights = workdir / "weights.pt"
    state = build_model(load_spec({key: value for key, value in raw.items() if key != "search"})).state_dict()
    torch.save(state, weights)
    spec = write(workdir / "spec.yaml", {**raw, "model": {**raw["model"], "init": {"from": "file", "path": "weights.pt"}},
                                         "train": {**raw["train"], "epochs": 60}})
    proc = subprocess.Popen([sys.executable, "-m", "vit_search", "run", str(spec), "--quiet"], cwd=workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (workdir / "runs" / "weights-gone" / "trial-0" / "checkpoint.pt").exists():  # trial 0 has its weights
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.02)
    weights.unlink()  # cleaned away while the study runs: trial 1 cannot start from it
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 2 and "Traceback" not in err, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: <spec>: model.init: ") and f"{weights}: no such file" in line, line
    assert line.endswith("(trial 1 is queued again; mend it, then run the same command)"), line
    storage = raw["search"]["storage"]
    trials = optuna.load_study(study_name="weights-gone", storage=storage).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]  # none pruned
    # MLflow agrees: trial 1 has its FAILED run (it failed as its values were drawn, before any run), and the parent
    # is KILLED with its leaderboard (the best trial's spec, which names the file, could not be exported).
    client = MlflowClient()
    runs = {r.info.run_id: r for r in client.search_runs([client.get_experiment_by_name("weights-gone").experiment_id])}
    failed = runs[trials[1].user_attrs["mlflow_run_id"]]
    assert failed.info.status == "FAILED" and failed.data.tags["trial.state"] == "FAIL"
    (parent,) = [r for r in runs.values() if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "KILLED" and "mlflow.note.content" in parent.data.tags

    torch.save(state, weights)  # put back: the same command trains the queued trial
    code, said = in_process("run", str(spec), "--quiet", "--set", "train.epochs=2")
    assert code == 0, said
    trials = optuna.load_study(study_name="weights-gone", storage=storage).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]


def test_a_model_too_large_for_memory_is_one_line_exit_1_and_a_failed_run(workdir):
    raw = {**TINY, "name": "too-large", "tracking": {"experiment": "too-large"},
           "model": {**TINY["model"], "dim": 12288, "depth": 1}}  # 7 GiB of weights: over the 6 GB cap, not the RAM
    result = bounded_cli("train", str(write(workdir / "spec.yaml", raw)), cwd=workdir)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: out of memory on cpu: ") and line.endswith(
        "; lower train.batch_size or the model's size (dim, depth, mlp ratio), or set train.mixed_precision")
    (run,) = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("too-large").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith("TrainingOutOfMemory: out of memory")


def test_a_model_whose_weights_outgrow_the_machine_is_one_line_exit_2_before_anything_is_allocated(workdir):
    # 96 billion parameters: 360 GiB of weights, allocated a gigabyte at a time until the OOM killer came.
    raw = {**TINY, "name": "far-too-large", "tracking": {"experiment": "far-too-large"},
           "model": {**TINY["model"], "dim": 16384, "depth": 30, "attention": {"type": "sdpa", "heads": 16}}}
    result = bounded_cli("train", str(write(workdir / "spec.yaml", raw)), cwd=workdir)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: model: 96,6") and "GiB for their weights alone, more than the " in line
    assert line.endswith("GiB of cpu; lower model.dim, model.depth or the blocks' sizes"), line
    assert MlflowClient().get_experiment_by_name("far-too-large") is None  # no run for a bad input


def test_a_trial_out_of_memory_fails_in_one_line_and_the_next_trial_trains_in_the_memory_it_let_go(workdir):
    # Under the same 6 GB cap: trial 0's 7 GiB of weights fail; trial 1 then trains in what it let go.
    raw = study_raw("oom-study", n_trials=2, space={"model.dim": {"choice": [16, 12288]}},
                    enqueue=[{"model.dim": 12288}, {"model.dim": 16}])
    result = bounded_cli("run", str(write(workdir / "spec.yaml", raw)), cwd=workdir)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    trials = optuna.load_study(study_name="oom-study", storage=raw["search"]["storage"]).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]  # not retried: it would fail again
    assert trials[0].user_attrs["error"].startswith("TrainingOutOfMemory: out of memory on cpu: ")
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("oom-study").experiment_id],
                              filter_string="tags.`optuna.trial_number` = '0'")
    assert [r.info.status for r in runs] == ["FAILED"] and runs[0].data.tags["error"] == trials[0].user_attrs["error"]

def _wait_until_trial_0_trains(proc: subprocess.Popen, client: MlflowClient, experiment: str,
                               timeout: float = 240) -> None:
    """Poll until trial 0's MLflow run has an epoch's metrics (its run started, its spec.yaml stored)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        found = client.get_experiment_by_name(experiment)
        if found and client.search_runs([found.experiment_id],
                                        filter_string="tags.`optuna.trial_number` = '0' and metrics.val_accuracy > -1"):
            return
        time.sleep(0.2)


def _fill(disk: Path) -> Path:
    """Write a file until the disk has no byte left; returns it (delete it to free the space)."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError:  # no space left
            pass
    return filler


def test_a_storage_or_mlflow_store_on_a_full_disk_is_one_line_and_exit_2_before_the_study_is_made(
        workdir, tiny_disk, in_process):
    spec = write(workdir / "spec.yaml", {**study_raw("full-storage", n_trials=1), "tracking": {"enabled": False}})
    _fill(tiny_disk)
    for storage in (f"journal:{tiny_disk}/study.log", f"sqlite:///{tiny_disk}/optuna.db"):
        assert in_process("run", str(spec), "--storage", storage) == (
            2, f"error: storage '{storage}': no space left on its disk; free space, or pass another --storage")
    spec = write(workdir / "spec.yaml", study_raw("full-store", n_trials=1))
    store = f"sqlite:///{tiny_disk}/mlflow.db"
    assert in_process("run", str(spec), env={"MLFLOW_TRACKING_URI": store}) == (
        2, f"error: MLflow store {store}: no space left on its disk; free space, or set MLFLOW_TRACKING_URI to another "
           f"store")
    assert not (workdir / "optuna.db").exists()


def _training_trial_0(spec: Path, study: str, storage: str, workdir: Path, epochs: int = 200) -> subprocess.Popen:
    """``vit-search run SPEC --storage STORAGE`` at ``epochs`` epochs, returned once its trial 0 trains."""
    proc = subprocess.Popen([sys.executable, "-m", "vit_search", "run", str(spec), "--storage", storage,
                             "--set", f"train.epochs={epochs}"], cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline, trials = time.monotonic() + 120, trials_watch(study, storage)
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        if [t for t in trials() if t.params]:
            return proc
        time.sleep(0.1)


@pytest.mark.slow
def test_a_storage_whose_disk_fills_mid_trial_is_one_line_and_the_resumed_study_loses_no_trial(workdir, tiny_disk, in_process):
    storage = f"sqlite:///{tiny_disk}/optuna.db"
    spec = write(workdir / "spec.yaml", {**study_raw("fills", n_trials=1), "tracking": {"enabled": False}})
    proc = _training_trial_0(spec, "fills", storage, workdir)
    filler = _fill(tiny_disk)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f"error: Optuna storage {storage}: no space left on its disk: the trials this worker was training are "
        f"retried when the study resumes; free space, then run the same command")

    filler.unlink()
    code, said = in_process("run", str(spec), "--storage", storage)
    assert code == 0, said
    trials = optuna.load_study(study_name="fills", storage=storage).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[0].user_attrs["error"] == "worker died (no heartbeat)"
    assert trials[1].params == trials[0].params  # the same point, trained again


def test_a_checkpoint_past_the_file_size_limit_is_one_line_and_its_trial_is_queued_not_lost(workdir, in_process):
    import resource

    raw = {**study_raw("capped", n_trials=1), "tracking": {"enabled": False}}
    raw["model"] = {**raw["model"], "dim": 128, "depth": 2}  # a checkpoint of about 5 MB, weights and AdamW's moments
    spec = write(workdir / "spec.yaml", raw)
    limit = 2 * 2**20  # the study's database stays far below it

    def capped() -> None:  # `ulimit -f`: a write past it fails with EFBIG (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run([sys.executable, "-m", "vit_search", "run", str(spec), "--quiet"], cwd=workdir,
                            capture_output=True, text=True, timeout=300, preexec_fn=capped)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: cannot write the epoch checkpoint runs/capped/trial-0/checkpoint.pt: ") and (
        f"files are limited to {limit:,} bytes here (ulimit -f); lift the limit (ulimit -f unlimited) (trial 0 is "
        f"queued again; then run the same command)") in line, line
    assert not list((workdir / "runs" / "capped" / "trial-0").glob("*.tmp"))

    code, said = in_process("run", str(spec), "--quiet")
    assert code == 0, said
    trials = optuna.load_study(study_name="capped", storage=raw["search"]["storage"]).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]  # no trial of n_trials lost
    assert trials[1].params == trials[0].params


def test_a_new_mlflow_store_that_could_not_be_made_whole_is_removed_so_the_next_command_makes_it(workdir, in_process):
    import resource

    store = workdir / "store" / "mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    spec = write(workdir / "spec.yaml", {**TINY, "name": "half-made", "tracking": {"experiment": "half-made"}})

    def capped() -> None:  # MLflow's tables stop part-way: a write past 200 KB fails
        resource.setrlimit(resource.RLIMIT_FSIZE, (200 * 1024, 200 * 1024))

    result = subprocess.run([sys.executable, "-m", "vit_search", "train", str(spec), "--quiet"], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=300, preexec_fn=capped)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: MLflow store sqlite:///{store} cannot be opened: ")
    assert list(store.parent.iterdir()) == []  # no half-made store that no later command could open
    code, _ = in_process("train", str(spec), "--quiet", env={"MLFLOW_TRACKING_URI": f"sqlite:///{store}"})
    assert code == 0
    assert MlflowClient(f"sqlite:///{store}").get_experiment_by_name("half-made") is not None


def test_a_storage_file_removed_mid_study_is_one_line_not_a_silent_success(workdir):
    folder = workdir / "store"
    folder.mkdir()
    storage = f"sqlite:///{folder}/optuna.db"
    spec = write(workdir / "spec.yaml", {**study_raw("removed", n_trials=2), "tracking": {"enabled": False}})
    proc = _training_trial_0(spec, "removed", storage, workdir, epochs=30)  # each trial's end is looked at
    for path in folder.iterdir():  # SQLite keeps writing to the open, removed file: the study would vanish at exit
        path.unlink()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f"error: Optuna storage {storage}: its file was removed or replaced while the study ran; the trials recorded "
        f"in it are gone with it (their MLflow runs stay); run the same command to start the study afresh")


def _immutable(*paths: Path, on: bool) -> None:
    """``chattr +i`` (or ``-i``): writes to the files fail with EPERM, root's included (chmod would not stop root)."""
    result = subprocess.run(["chattr", "+i" if on else "-i", *map(str, paths)], capture_output=True, text=True)
    if on and result.returncode != 0:
        pytest.skip(f"chattr +i is not available here ({result.stderr.strip()[:120]}): it makes the write error")


def test_a_storage_file_that_stops_taking_writes_mid_trial_is_one_line_and_the_resumed_study_loses_no_trial(workdir, in_process):
    folder = workdir / "store"
    folder.mkdir()
    storage = f"sqlite:///{folder}/optuna.db"
    spec = write(workdir / "spec.yaml", study_raw("frozen", n_trials=1))
    proc = _training_trial_0(spec, "frozen", storage, workdir)
    deadline = time.monotonic() + 120
    while not (workdir / "runs" / "frozen" / "trial-0" / "checkpoint.pt").exists():  # its run made, its epochs reported
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    # The database and its write-ahead log, not the -shm index: SQLite maps that, and a write refused under a
    # mapping is SIGBUS, not an error it could report.
    files = [path for path in folder.iterdir() if not path.name.endswith("-shm")]
    try:
        _immutable(*files, on=True)  # a write error that is no full disk: SQLite says "disk I/O error"
        out, err = proc.communicate(timeout=120)
    finally:
        _immutable(*files, on=False)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: Optuna storage {storage} could not be written (") and line.endswith(
        "): the trials this worker was training are retried when the study resumes; check its file and disk (or its "
        "server), then run the same command"), line
    # Its trial's run says so in the same words, not in Optuna's ("invalid data in the commit").
    client = MlflowClient()
    (trial_run,) = [r for r in client.search_runs([client.get_experiment_by_name("frozen").experiment_id])
                    if r.data.tags.get("optuna.trial_number") == "0"]
    assert trial_run.info.status == "FAILED"
    assert re.fullmatch(r"ReportNotStored: the Optuna storage did not take epoch \d+'s report \(disk I/O error\); the "
                        r"trial is retried when the study resumes", trial_run.data.tags["error"]), trial_run.data.tags["error"]

    code, said = in_process("run", str(spec), "--storage", storage)
    assert code == 0, said
    trials = optuna.load_study(study_name="frozen", storage=storage).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].params == trials[0].params  # the same point, trained again


@pytest.mark.slow
def test_an_mlflow_store_whose_disk_fills_mid_study_is_one_line_and_the_same_command_loses_no_trial(
        workdir, small_disk, in_process):
    store = f"sqlite:///{small_disk}/mlflow.db"
    env = {"MLFLOW_TRACKING_URI": store}
    raw = study_raw("store-fills", n_trials=1)
    spec, storage = write(workdir / "spec.yaml", raw), raw["search"]["storage"]
    client = MlflowClient(store)
    client.search_experiments()  # the store made here first: not by this process and the worker at once
    proc = subprocess.Popen([sys.executable, "-m", "vit_search", "run", str(spec), "--set", "train.epochs=200"],
                            cwd=workdir, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_until_trial_0_trains(proc, client, "store-fills", timeout=120)
    filler = _fill(small_disk)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]  # MLflow's own log of it included
    assert err.strip().splitlines()[-1] == (
        f"error: MLflow store {store}: no space left on its disk: trial 0 is queued again; free space, then run the "
        f"same command to resume")
    # `train` into the full store: one line too, and --resume goes on once there is space. (In this
    # process from here: no start-up to pay.)
    plain = write(workdir / "plain.yaml", {**TINY, "tracking": {"experiment": "store-fills"}})
    assert in_process("train", str(plain), "--quiet", env=env) == (
        1, f"error: MLflow store {store}: no space left on its disk; free space, then run the same command with "
           f"--resume")
    filler.unlink()
    assert in_process("train", str(plain), "--resume", "--quiet")[0] == 0  # what the line says to run
    assert in_process("run", str(spec), "--quiet")[0] == 0
    trials = optuna.load_study(study_name="store-fills", storage=storage).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].params == trials[0].params  # the same point, trained again
    runs = client.search_runs([client.get_experiment_by_name("store-fills").experiment_id])
    children = {r.data.tags["optuna.trial_number"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert {n: (r.info.status, r.data.tags.get("trial.state")) for n, r in children.items()} == {
        "0": ("FAILED", "FAIL"), "1": ("FINISHED", "COMPLETE")}
    assert [r.info.status for r in runs if "mlflow.parentRunId" not in r.data.tags] == ["FINISHED"] * 2  # + train's


def test_a_full_disk_is_said_to_be_mlflows_only_when_mlflow_could_not_write(workdir, tiny_disk, sqlite_uri):
    from vit_search.files import disk_full
    from vit_search.tracking import mlflow_disk_full

    client = MlflowClient(sqlite_uri)
    experiment = client.create_experiment(f"artifacts-{time.time_ns()}", artifact_location=str(tiny_disk))
    run = client.create_run(experiment)
    big = workdir / "weights.bin"
    big.write_bytes(b"\0" * 2**21)  # 2 MB: more than the disk holds
    with pytest.raises(OSError) as raised:
        client.log_artifact(run.info.run_id, str(big))
    assert mlflow_disk_full(raised.value) == (
        f"MLflow artifacts {tiny_disk / run.info.run_id / 'artifacts'}: no space left on their disk")
    for leftover in tiny_disk.rglob("weights.bin"):
        leftover.unlink()
    _fill(tiny_disk)
    with pytest.raises(Exception) as raised:  # Optuna's storage on the full disk: not MLflow's to say
        optuna.create_study(storage=f"sqlite:///{tiny_disk / 'optuna.db'}")
    assert disk_full(raised.value) and mlflow_disk_full(raised.value) is None


def test_a_checkpoint_folder_that_cannot_be_written_is_refused_before_training(workdir):
    (workdir / "a-file").write_text("")
    spec = write(workdir / "spec.yaml", TINY)
    line = one_line(bounded_cli("train", str(spec), "--checkpoint-dir", str(workdir / "a-file" / "sub"), cwd=workdir))
    assert "cannot write checkpoints in" in line and "--checkpoint-dir" in line



def test_a_study_whose_checkpoint_folder_cannot_be_written_is_refused_before_anything_is_made(workdir, in_process):
    (workdir / "a-file").write_text("")
    spec = write(workdir / "spec.yaml", study_raw("unwritable-checkpoints", n_trials=1))
    code, line = in_process("run", str(spec), "--checkpoint-dir", str(workdir / "a-file" / "sub"))
    assert code == 2 and "cannot write checkpoints in" in line and "--checkpoint-dir" in line, line
    assert sorted(p.name for p in workdir.iterdir()) == ["a-file", "spec.yaml"]  # no study
    assert MlflowClient().get_experiment_by_name("unwritable-checkpoints") is None

# -- secrets ---------------------------------------------------------------------------------------
SECRET = "s3cretPW"


@pytest.mark.slow
def test_a_storage_password_is_never_printed_logged_written_or_on_a_command_line(workdir, postgres_url, sqlite_uri):
    url = postgres_url.replace("postgres@", f"postgres:{SECRET}@")  # trust auth: any password is let in
    name = f"secret-{os.getpid()}-{int(time.time())}"
    raw = {**study_raw(name, n_trials=2), "tracking": {"experiment": name}}
    raw["search"]["storage"] = url + "?connect_timeout=10"  # in the spec too: its study.yaml artifact is redacted
    spec = write(workdir / "spec.yaml", raw)
    # A --set with the password too: the workers take it by their standard input, never on their command line.
    proc = subprocess.Popen([sys.executable, "-m", "vit_search", "run", str(spec), "--jobs", "2",
                             "--set", f"search.storage={url}?connect_timeout=10"], cwd=workdir,
                            env={**os.environ, "VIT_SEARCH_STORAGE": url}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen_workers = False
    while proc.poll() is None:  # every vit-search process's command line, while they run
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "vit_search" in text and "--worker" in text:
                seen_workers = True
                assert SECRET not in text
        time.sleep(0.1)
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    assert seen_workers and SECRET not in out + err
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert len(runs) == 3
    for run in runs:
        assert SECRET not in repr(run.data.tags) + repr(run.data.params)
        for artifact in client.list_artifacts(run.info.run_id):
            if artifact.path.endswith(".yaml"):
                text = Path(client.download_artifacts(run.info.run_id, artifact.path, str(workdir))).read_text()
                assert SECRET not in text
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags][0]
    assert parent.data.tags["optuna.storage"].startswith("postgresql://postgres:***@")
    optuna.delete_study(study_name=name, storage=postgres_url)


# -- Ctrl-C anywhere --------------------------------------------------------------------------------
@pytest.mark.slow
def test_ctrl_c_as_the_first_trial_starts_exits_130_with_its_trial_queued_again(workdir):
    # SIGTERM takes the same path (vit_search.stopping): tested on `run --jobs` and `train`.
    name = "early-ctrl-c"
    spec = write(workdir / "spec.yaml", study_raw(name, n_trials=2))
    storage = study_raw(name)["search"]["storage"]
    proc = subprocess.Popen([sys.executable, "-m", "vit_search", "run", str(spec), "--set", "train.epochs=30"],
                            cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, trials = time.monotonic() + 120, trials_watch(name, storage)
    while not trials():  # the first trial exists: it is being drawn, or set up, or training
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert "stopped: run the same command to go on (1 trial queued)" in out, out  # and the next lines still say best
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert [t.user_attrs.get("error") for t in trials if t.state == TrialState.FAIL] == ["interrupted (Ctrl-C)"]
    assert len([t for t in trials if t.state == TrialState.WAITING]) == 1
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert runs and {r.info.status for r in runs} == {"KILLED"}  # the parent, and the trial's run if it began
    # Run again: the interrupted trial used up none of n_trials.
    from vit_search.search.run import run_search
    from vit_search.spec import load_spec

    trials = run_search(load_spec(spec), progress=False).study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]


# An attention block whose training step holds for two minutes while a file named `hold` lies beside
# it: a step far longer than a test waits, as a large model's step on a slow device is.
HOLDING_BLOCK = '''
import time
from pathlib import Path

from torch import nn

from vit_search import register


@register("attention", "holding")
class Holding(nn.Module):
    """A linear map of the tokens whose training step holds while the file ``hold`` exists."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens):
        here = Path(__file__).parent
        if self.training and (here / "hold").exists():
            (here / "holding").touch()
            time.sleep(120)
        return self.proj(tokens)
'''


def test_a_second_ctrl_c_that_lands_in_a_finalizer_still_stops_at_once_without_a_traceback(capsys):
    # It raised inside SQLAlchemy's weakref callback: Python printed "Exception ignored in ..." with a traceback,
    # and dropped the stop.
    import threading

    from vit_search.stopping import requests_set

    class Finalised:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, taken while the finalizer runs
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                pass

    stop = threading.Event()
    with pytest.raises(KeyboardInterrupt):
        with requests_set(stop):
            stop.set()  # the first Ctrl-C came
            Finalised()  # collected at once
            time.sleep(5)  # where the stop lands instead
    assert "Exception ignored" not in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("packed", [1, 2], ids=["one-trial", "packed-2"])
def test_a_second_ctrl_c_stops_at_once_while_the_first_waits_for_the_step_and_the_trial_is_queued_again(
        workdir, packed):
    # docs/search.md: "The first Ctrl-C lets each trial in training finish its current step; a second stops at once."
    # Packed trials train in threads, which no signal reaches: the worker leaves them mid-step.
    name = f"second-ctrl-c-{packed}"
    write(workdir / "holding_block.py", HOLDING_BLOCK)
    raw = {**study_raw(name, n_trials=2), "plugins": ["holding_block.py"]}
    raw["model"] = {**raw["model"], "attention": {"type": "holding"}}
    spec = write(workdir / "spec.yaml", raw)
    (workdir / "hold").touch()
    with open(workdir / "stdout.txt", "w") as stdout, open(workdir / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "vit_search", "run", str(spec), "--trials-per-gpu", str(packed)],
                                cwd=workdir, stdout=stdout, stderr=stderr, text=True)

    def wait_for(what, done) -> None:
        deadline = time.monotonic() + 120
        while not done():
            assert proc.poll() is None and time.monotonic() < deadline, \
                f"{what}: {(workdir / 'stderr.txt').read_text()[-2000:]}"
            time.sleep(0.05)

    try:
        wait_for("the first step holding", (workdir / "holding").exists)
        wait_for(f"{packed} trials in training", lambda: len(optuna.load_study(
            study_name=name, storage=raw["search"]["storage"]).get_trials(states=(TrialState.RUNNING,))) == packed)
        proc.send_signal(signal.SIGINT)
        wait_for("the first Ctrl-C said", lambda: "Ctrl-C again to stop at once" in (workdir / "stderr.txt").read_text())
        time.sleep(1)
        assert proc.poll() is None  # the first waits for the step, which holds for two minutes
        stopped_at = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:  # a second Ctrl-C that did not stop it leaves no process holding for minutes
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out, err = (workdir / "stdout.txt").read_text(), (workdir / "stderr.txt").read_text()
    assert time.monotonic() - stopped_at < 60 and proc.returncode == 130, err[-2000:]
    assert "Traceback" not in out + err, err[-2000:]
    stopped = [line for line in out.splitlines() if line.startswith("trial ") and " FAIL " in line]
    assert len(stopped) == packed and all(line.endswith("interrupted (Ctrl-C)") for line in stopped), out
    trials = optuna.load_study(study_name=name, storage=raw["search"]["storage"]).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * packed + [TrialState.WAITING] * packed  # queued again
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert {r.info.status for r in runs} == {"KILLED"}  # the study's run, and each stopped trial's

    # The same command again: the trial stopped mid-step is retried, and the study ends with its two trials.
    (workdir / "hold").unlink()
    again = subprocess.run([sys.executable, "-m", "vit_search", "run", str(spec)], cwd=workdir,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    trials = optuna.load_study(study_name=name, storage=raw["search"]["storage"]).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * packed + [TrialState.COMPLETE] * 2
    assert {t.params["train.lr"] for t in trials[:packed]} == {t.params["train.lr"] for t in trials[packed:2 * packed]}
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert not [r for r in runs if r.info.status == "RUNNING"]


# -- the tracking server goes away ------------------------------------------------------------------
@pytest.mark.slow
def test_a_tracking_servers_full_artifact_disk_mid_study_is_one_line_the_trial_is_queued_and_a_rerun_agrees(
        workdir, tmp_path, small_disk, in_process):
    # The server proxies artifacts (--artifacts-destination) to a disk that fills while trial 0 trains:
    # the client sees HTTP 500s or a dropped connection, never the server's "no space left".
    from conftest import free_port, kill_group, start_mlflow_server

    store, port = tmp_path / "server", free_port()
    store.mkdir()
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
           "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0"}
    name = "artifacts-full"
    raw = study_raw(name, n_trials=1)
    spec = write(workdir / "spec.yaml", raw)
    command = [sys.executable, "-m", "vit_search", "run", str(spec), "--set", "train.epochs=40"]
    server = start_mlflow_server(store, port, artifacts=small_disk)
    try:
        client = MlflowClient(uri)
        filler = _fill(small_disk)  # full from the start: the study's run cannot store its study.yaml
        mlflow_env = {k: env[k] for k in env if k.startswith("MLFLOW_")}
        code, said = in_process(*command[3:], "--quiet", env=mlflow_env)  # a refusal: no process of its own
        assert code == 1 and said.startswith(f"error: MLflow tracking server {uri} did not store an artifact ("), said
        assert not optuna.load_study(study_name=name, storage=raw["search"]["storage"]).get_trials()
        assert not client.search_runs([client.get_experiment_by_name(name).experiment_id])  # no run left RUNNING
        filler.unlink()

        proc = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_until_trial_0_trains(proc, client, name)
        filler = _fill(small_disk)
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"error: MLflow tracking server {uri} did not store an artifact (") and line.endswith(
            "its log says which: trial 0 is queued again; free space, then run the same command to resume"), line
        trials = optuna.load_study(study_name=name, storage=raw["search"]["storage"]).get_trials()
        assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]  # queued again, none lost
        runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
        assert sorted((r.data.tags.get("optuna.trial_number", "parent"), r.info.status) for r in runs) == [
            ("0", "FAILED"), ("parent", "RUNNING")]  # the store still takes writes; the study resumes

        filler.unlink()  # space again: the same command finishes the study, and MLflow agrees with Optuna
        # (at the spec's 2 epochs, with a note: the 40 only kept trial 0 training for the fill; in this process: no
        # start-up)
        code, said = in_process("run", str(spec), "--quiet", env=mlflow_env)
        assert code == 0 and said.startswith(f"note: train.epochs 2 differs from study '{name}', whose first trials "
                                             f"were trained with 40"), said
        trials = optuna.load_study(study_name=name, storage=raw["search"]["storage"]).get_trials()
        assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
        runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
        assert not [r for r in runs if r.info.status == "RUNNING"]
        by_trial = {r.data.tags.get("optuna.trial_number"): r.info.status for r in runs}
        assert by_trial["0"] == "FAILED" and by_trial["1"] == "FINISHED"
        assert [r.info.status for r in runs if "mlflow.parentRunId" not in r.data.tags] == ["FINISHED"]  # one parent
    finally:
        kill_group(server)


def test_a_tracking_server_error_met_while_it_was_down_is_an_outage_though_it_answers_again(mlflow_server, monkeypatch):
    # A server killed and back within an epoch: the trial's metrics, written meanwhile, failed with this error, and
    # the health check made after it found the server up, so the trial failed for good as if its own fault.
    from mlflow.exceptions import MlflowException

    from conftest import free_port
    from vit_search.tracking_store import store_fault

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(MlflowException) as met:  # what MLflow raised while nothing answered on its port
        MlflowClient(f"http://127.0.0.1:{free_port()}").get_experiment("0")
    assert store_fault(met.value, mlflow_server) == (
        f"MLflow tracking server {mlflow_server} did not answer for a while (ConnectionError; it may answer again now)",
        "check that it stays up")
    assert store_fault(ValueError("a trial's own error"), mlflow_server) is None


def test_a_tracking_server_gone_as_a_study_makes_its_parent_run_is_one_line(mlflow_server, workdir, monkeypatch):
    # It was MLflow's "API request to ... failed with exception HTTPConnectionPool(...)" as a fault of ours (exit 1).
    import mlflow

    from conftest import free_port
    from vit_search.errors import RunFailed
    from vit_search.search.study import open_study
    from vit_search.search.study_runs import StudyRuns
    from vit_search.spec import load_spec

    spec = load_spec({**study_raw("parent-gone"), "tracking": {"uri": mlflow_server, "experiment": "parent-gone"}})
    runs = StudyRuns(spec, open_study(spec))  # the store checked and the experiment made: then the server is gone
    gone = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    mlflow.set_tracking_uri(gone)
    runs.client = MlflowClient(gone)
    with pytest.raises(RunFailed) as said:
        runs.create_parent()
    assert re.fullmatch(rf"MLflow tracking server {gone} does not answer \(.*\): the study's MLflow parent run was "
                        rf"not made; start the server, then run the same command", str(said.value)), str(said.value)


@pytest.mark.slow
def test_a_tracking_server_that_dies_mid_trial_is_one_line_the_trial_is_queued_and_a_rerun_agrees(workdir, tmp_path,
                                                                                                   in_process):
    from conftest import free_port, kill_group, start_mlflow_server

    store, port = tmp_path / "server", free_port()
    store.mkdir()
    uri = f"http://127.0.0.1:{port}"
    # One retry at once rather than the default 3 with waits, so the outage is heard sooner: what follows is the same.
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
           "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0"}
    spec = write(workdir / "spec.yaml", study_raw("outage", n_trials=1))
    command = [sys.executable, "-m", "vit_search", "run", str(spec), "--set", "train.epochs=60"]
    server = start_mlflow_server(store, port)
    try:
        proc = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        client = MlflowClient(uri)
        _wait_until_trial_0_trains(proc, client, "outage")
        kill_group(server)
        out, err = proc.communicate(timeout=180)  # MLflow's retries are bounded: well under this
        line = err.strip().splitlines()[-1]
        assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
        assert f"MLflow tracking server {uri} does not answer" in line and "trial 0 is queued again" in line, err[-2000:]
        trials = optuna.load_study(study_name="outage", storage=study_raw("outage")["search"]["storage"]).get_trials()
        assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
        assert trials[1].system_attrs["fixed_params"] == trials[0].params and "does not answer" in trials[0].user_attrs["error"]

        server = start_mlflow_server(store, port)
        # The queued trial again, at the spec's 2 epochs (with a note): the first run's 60 only kept it training for
        # the kill. (In this process: no start-up to pay.)
        code, said = in_process("run", str(spec), "--quiet", env={k: env[k] for k in env if k.startswith("MLFLOW_")})
        assert code == 0 and said.startswith("note: train.epochs 2 differs from study 'outage', whose first trials "
                                             "were trained with 60"), said
        trials = optuna.load_study(study_name="outage", storage=study_raw("outage")["search"]["storage"]).get_trials()
        assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
        runs = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
        children = {r.data.tags["optuna.trial_number"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
        assert {n: (r.info.status, r.data.tags.get("trial.state")) for n, r in children.items()} == {
            "0": ("FAILED", "FAIL"), "1": ("FINISHED", "COMPLETE")}
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        assert [p.info.status for p in parents] == ["FINISHED"]
    finally:
        if server.poll() is None:
            kill_group(server)


def test_a_tracking_server_that_dies_mid_train_is_one_line_and_resume_finishes_the_same_run(workdir, tmp_path,
                                                                                            in_process):
    from conftest import free_port, kill_group, start_mlflow_server

    store, port = tmp_path / "server", free_port()
    store.mkdir()
    uri = f"http://127.0.0.1:{port}"
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
           "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0"}
    spec = write(workdir / "spec.yaml", {**TINY, "name": "train-outage", "train": {**TINY["train"], "epochs": 400},
                                         "tracking": {"experiment": "train-outage"}})
    server = start_mlflow_server(store, port)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "vit_search", "train", str(spec), "--quiet"], cwd=workdir,
                                env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        client = MlflowClient(uri)
        deadline = time.monotonic() + 240
        while True:  # until an epoch's metrics are stored: the run is training
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
            found = client.get_experiment_by_name("train-outage")
            if found and client.search_runs([found.experiment_id], filter_string="metrics.val_accuracy > -1"):
                break
            time.sleep(0.2)
        kill_group(server)
        _, err = proc.communicate(timeout=180)  # MLflow's retries are bounded: well under this
        assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
        ours = [line for line in err.splitlines() if " INFO mlflow." not in line]  # MLflow's own notes aside
        assert ours == [
            f"error: MLflow tracking server {uri} does not answer ([Errno 111] Connection refused): nothing more reaches "
            f"it, so the run stays RUNNING there; start the server, then run the same command with --resume"], err[-3000:]

        server = start_mlflow_server(store, port)
        [run] = client.search_runs([client.get_experiment_by_name("train-outage").experiment_id])
        assert run.info.status == "RUNNING"
        code, said = in_process("train", str(spec), "--resume", "--quiet", "--set", "train.epochs=3", env=env)
        assert code == 0, said
        [resumed] = client.search_runs([client.get_experiment_by_name("train-outage").experiment_id])
        assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    finally:
        if server.poll() is None:
            kill_group(server)


def test_an_mlflow_retry_setting_mlflow_cannot_read_is_one_line_and_exit_2(workdir, in_process):
    spec = workdir / "tiny.yaml"
    spec.write_text(yaml.safe_dump({**TINY, "tracking": {"experiment": "retries"}}))
    code, line = in_process("train", str(spec), env={"MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0.5"})
    assert code == 2
    assert line.startswith("error: MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR='0.5': MLflow reads a whole number")
    assert "unset it" in line
    assert not (workdir / "runs").exists()  # nothing trained, nothing written


def test_mlflow_retries_default_to_three_with_a_ten_second_timeout_and_a_users_settings_stay(monkeypatch):
    from vit_search.tracking import bound_http_retries

    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.setenv(key, "")  # recorded, so that what bound_http_retries sets is undone after the test
        monkeypatch.delenv(key)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    bound_http_retries()
    assert [os.environ[f"MLFLOW_HTTP_REQUEST_{k}"] for k in ("MAX_RETRIES", "BACKOFF_FACTOR", "BACKOFF_JITTER",
                                                              "TIMEOUT")] == ["3", "1", "0.5", "30"]


@pytest.mark.parametrize("key, value", [("MLFLOW_HTTP_REQUEST_TIMEOUT", "ten"),
                                        ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "-1"),
                                        ("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "a little")])
def test_every_mlflow_retry_setting_is_read_as_mlflow_reads_it(monkeypatch, key, value):
    from vit_search.tracking import TrackingError, bound_http_retries

    monkeypatch.setenv(key, value)
    with pytest.raises(TrackingError, match=f"^{key}='{value}': MLflow reads a"):
        bound_http_retries()
    monkeypatch.setenv(key, "2")  # what MLflow reads is accepted as it is
    bound_http_retries()
    assert os.environ[key] == "2"
