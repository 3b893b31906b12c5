"""Progress for logs: with stdout not a terminal, `run` prints a line per trial and `train` per epoch
(every VIT_SEARCH_LOG_SECONDS); `--quiet` turns them off; `run` ends saying what to do next."""

from __future__ import annotations

import io
import re
import sys

import optuna
import pytest

from vit_search.search.next_steps import next_steps

SPEC = """
name: logged
seed: 0
data: {dataset: digits, image_size: 8}
model: {dim: 16, depth: 1, patch_embed: {type: conv, patch_size: 2}, attention: {type: sdpa, heads: 2}}
train: {epochs: 2, batch_size: 64}
search:
  n_trials: 2
  sampler: random
  pruner: none
  space: {model.depth: {int: [1, 2]}}
tracking: {experiment: logged, plots: false}
"""

TRIAL_LINE = re.compile(r"^trial (\d) COMPLETE val_accuracy \d\.\d{4} in \d+\.\d s \[model\.depth=[12]\]$")
EPOCH_LINE = re.compile(r"^trial (\d) epoch ([12])/2: val_accuracy \d\.\d{4}, [\d,]+ img/s$")


@pytest.fixture
def command(tmp_path, monkeypatch, capsys, sqlite_uri):
    """The command line in this process (no start-up to pay; capsys's stdout is no terminal), in
    tmp_path, on the session's MLflow store, an epoch line every epoch: ``command(*args)`` returns
    (exit code, stdout)."""
    from vit_search.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    monkeypatch.setenv("VIT_SEARCH_LOG_SECONDS", "0")

    def run(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        code = main(list(args))
        captured = capsys.readouterr()
        assert code == 0, captured.err[-3000:]
        return code, captured.out

    return run


@pytest.mark.slow
def test_run_without_a_terminal_prints_a_line_per_trial_and_per_epoch_then_what_to_do_next(write_spec, command):
    spec = write_spec(SPEC)
    _, stdout = command("run", str(spec), "--set", "train.lr=0.002")
    lines = stdout.splitlines()
    trials = [m.group(1) for m in map(TRIAL_LINE.match, lines) if m]
    epochs = [(m.group(1), m.group(2)) for m in map(EPOCH_LINE.match, lines) if m]
    assert sorted(trials) == ["0", "1"], stdout
    assert sorted(epochs) == [("0", "1"), ("0", "2"), ("1", "1"), ("1", "2")], stdout
    assert any(re.fullmatch(r"best: trial [01] \(\d\.\d{4}, test_accuracy \d\.\d{4}\)", line) for line in lines)
    assert f"  vit-search best {spec} --set=train.lr=0.002 --export best.yaml   # the best trial as a plain spec" in lines
    assert f"  vit-search ui {spec} --set=train.lr=0.002   # compare the trials in MLflow's UI" in lines


@pytest.mark.slow
def test_quiet_run_prints_only_the_table_and_what_to_do_next(write_spec, command):
    spec = write_spec(SPEC.replace("n_trials: 2", "n_trials: 1").replace("logged", "logged-quiet"))
    _, stdout = command("run", str(spec), "--quiet")
    assert not any(TRIAL_LINE.match(line) or EPOCH_LINE.match(line) for line in stdout.splitlines())
    assert "study 'logged-quiet': 1 complete, 0 pruned, 0 failed" in stdout
    assert "next:" in stdout


@pytest.mark.slow
def test_train_without_a_terminal_prints_its_epochs(write_spec, command):
    spec = write_spec(SPEC)
    _, stdout = command("train", str(spec))
    epochs = [line for line in stdout.splitlines() if re.fullmatch(
        r"logged epoch [12]/2: val_accuracy \d\.\d{4}, [\d,]+ img/s", line)]
    assert len(epochs) == 2, stdout


def finished_study() -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    trial.suggest_int("model.depth", 1, 2)
    trial.set_user_attr("test_accuracy", 0.95)
    study.tell(trial, 0.9)
    return study


def test_next_steps_carry_a_plain_storage_but_never_a_password():
    plain = next_steps("s.yaml", [], "sqlite:///studies/optuna.db", finished_study())
    assert plain[0] == "best: trial 0 (0.9000, test_accuracy 0.9500)"
    assert "  vit-search best s.yaml --storage=sqlite:///studies/optuna.db --export best.yaml" \
           "   # the best trial as a plain spec" in plain
    secret = next_steps("s.yaml", ["model.dim=32"], "postgresql://me:s3cretPW@db/studies?password=x", finished_study())
    assert not any("s3cretPW" in line or "password=x" in line or "--storage" in line for line in secret)
    assert "the storage holds a password: set VIT_SEARCH_STORAGE to its URL before these commands" in secret
    assert "  vit-search best s.yaml --set=model.dim=32 --export best.yaml   # the best trial as a plain spec" in secret


def test_next_steps_leave_out_a_set_that_holds_a_password_and_say_where_it_goes_instead():
    sets = ["model.dim=32", "search.storage=postgresql://me:s3cretPW@db/studies", "tracking.uri=http://u:tRkPw@h:5000"]
    lines = next_steps("s.yaml", sets, None, finished_study())
    assert not any("s3cretPW" in line or "tRkPw" in line for line in lines), lines
    assert "--set search.storage=... holds a password and is left out of these commands: set VIT_SEARCH_STORAGE to " \
           "its URL before them" in lines
    assert "--set tracking.uri=... holds a password and is left out of these commands: set MLFLOW_TRACKING_URI to " \
           "its URL before them" in lines
    assert "  vit-search best s.yaml --set=model.dim=32 --export best.yaml   # the best trial as a plain spec" in lines


def test_a_pruned_or_failed_trials_line_says_where_it_stood_and_why(monkeypatch):
    from optuna.trial import TrialState

    from vit_search.log_lines import EpochLines, trial_line

    distributions = {"model.depth": optuna.distributions.IntDistribution(1, 4)}
    pruned = optuna.trial.create_trial(state=TrialState.PRUNED, params={"model.depth": 3}, distributions=distributions,
                                       intermediate_values={0: 0.25, 1: 0.375},
                                       user_attrs={"pruned_reason": "pruned by median after epoch 2"})
    # (A trial made outside a study is numbered -1.)
    assert re.fullmatch(r"trial -1 PRUNED val_accuracy 0\.3750 at epoch 2 in \d+\.\d s \[model\.depth=3\]: "
                        r"pruned by median after epoch 2", trial_line(pruned, ["val_accuracy"]))
    failed = optuna.trial.create_trial(state=TrialState.FAIL, params={"model.depth": 1}, distributions=distributions,
                                       user_attrs={"error": "RuntimeError: plugin bug"})
    assert re.fullmatch(r"trial -1 FAIL in \d+\.\d s \[model\.depth=1\]: RuntimeError: plugin bug",
                        trial_line(failed, ["val_accuracy"]))
    monkeypatch.delenv("VIT_SEARCH_LOG_SECONDS", raising=False)
    assert EpochLines("run", 10).every == 60  # a line a minute, unless set
    monkeypatch.setenv("VIT_SEARCH_LOG_SECONDS", "0")
    assert EpochLines("run", 10).every == 0


@pytest.mark.parametrize("value", ["abc", "-5", "nan", "inf"])
def test_a_log_interval_that_is_no_number_of_seconds_is_one_line_before_anything_runs(tmp_path, cli_here, value):
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: x\ndata: {dataset: digits, image_size: 8}\n")
    said = cli_here("train", spec, cwd=tmp_path, env={"VIT_SEARCH_LOG_SECONDS": value})
    assert said.returncode == 2 and said.stderr.splitlines() == [
        f"error: VIT_SEARCH_LOG_SECONDS={value!r}: not a number of seconds between epoch lines; set it to 0 (every "
        f"epoch) or more, or unset it for 60"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]  # no run, no store


def test_no_command_is_one_error_line_naming_the_commands(cli_here):
    said = cli_here()
    assert said.returncode == 2 and said.stdout == "" and said.stderr.splitlines() == [
        "error: vit-search: a command is needed (blocks, validate, summary, train, prepare, run, best, ui); "
        "see 'vit-search --help'"]


class _Terminal(io.StringIO):
    """stdout and stderr both on one terminal, as `run | tee log` shows them: bars and lines on one screen."""

    def isatty(self) -> bool:
        return True


def test_a_resumed_run_on_a_terminal_counts_its_bar_from_the_trials_done_and_never_runs_a_line_into_it(
        write_spec, tmp_path, monkeypatch, sqlite_uri):
    from vit_search.search.run import run_search
    from vit_search.spec import load_spec

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    spec = load_spec(write_spec(SPEC.replace("logged", "resumed-bar")), ["train.epochs=1"])
    spec.search.n_trials = 1
    run_search(spec, progress=False)
    spec.search.n_trials = 2
    screen = _Terminal()
    monkeypatch.setattr(sys, "stdout", screen)
    monkeypatch.setattr(sys, "stderr", screen)
    run_search(spec, progress=True, lines=True)
    shown = screen.getvalue()
    # The bar started at the trial the study had (it drew 0/2, then stopped at 1/2 with the study done).
    assert "1/2 [" in shown and "2/2 [" in shown and "0/2" not in shown, shown
    at = shown.index("trial 1 COMPLETE")
    assert shown[at - 1] in "\r\n", shown  # the bar was cleared for the line, not run into it
