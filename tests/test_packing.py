"""Packed trials: K trials at once in one worker process, each in its own thread (own CUDA stream on a GPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import optuna
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from vit_search.checkpoints import check_writable
from vit_search.search.run import run_search
from vit_search.search.study import PARENT_RUN, open_study
from vit_search.spec import load_spec
from vit_search.train import train
from vit_search.train_step import CAPTURE_GATE, CaptureGate, EagerStep

from conftest import trials_watch
from test_study import STUDY, children_of, study_raw


@pytest.fixture
def workdir(tmp_path, monkeypatch, sqlite_uri):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    return tmp_path


def test_packed_trials_in_one_worker_finish_exactly_n_trials_each_with_its_mlflow_run(workdir):
    spec = load_spec(study_raw("packed", n_trials=5), ["train.epochs=2"])
    result = run_search(spec, progress=False, trials_at_once=2)
    trials = result.study.get_trials()
    assert len(trials) == 5 and {t.state for t in trials} == {TrialState.COMPLETE}
    assert result.trials_run == [0, 1, 2, 3, 4]
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 5  # distinct points, drawn by two threads
    # The two slots trained at the same time: some trial started before another one ended.
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trials)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))
    parent = open_study(spec).attr(PARENT_RUN)
    client = MlflowClient()
    children = children_of(client, parent)
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == [0, 1, 2, 3, 4]
    assert {r.info.status for r in children} == {"FINISHED"}
    assert {r.data.tags["trial.state"] for r in children} == {"COMPLETE"}
    # Each trial's run says it was packed, and whether it had a CUDA stream of its own (on the CPU: one queue).
    stream = "own" if torch.cuda.is_available() else "off: no CUDA device"
    assert {(r.data.tags["trials_at_once"], r.data.tags["cuda_stream"]) for r in children} == {("2", stream)}
    for run in children:  # each run holds its own trial's values, not the other thread's
        number = int(run.data.tags["optuna.trial_number"])
        assert int(run.data.params["model.depth"]) == trials[number].params["model.depth"]
        assert float(run.data.metrics["val_accuracy"]) == pytest.approx(trials[number].user_attrs["val_accuracy"])
    assert client.get_run(parent).info.status == "FINISHED"


def test_ctrl_c_stops_every_packed_trial_and_queues_each_again(workdir):
    spec_path = workdir / "study.yaml"
    spec_path.write_text(yaml.safe_dump(study_raw("packed-ctrl-c", n_trials=2)))
    storage = study_raw("packed-ctrl-c")["search"]["storage"]
    proc = subprocess.Popen([sys.executable, "-m", "vit_search", "run", str(spec_path), "--trials-per-gpu", "2",
                             "--set", "train.epochs=50"], cwd=workdir, env=os.environ.copy(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, trials = time.monotonic() + 200, trials_watch("packed-ctrl-c", storage)
    while sum(t.state == TrialState.RUNNING and "model.depth" in t.params for t in trials()) < 2:  # both slots training
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=200)
    assert proc.returncode == 130, err[-3000:]
    trials = optuna.load_study(study_name="packed-ctrl-c", storage=storage).get_trials()
    interrupted = [t for t in trials if t.state == TrialState.FAIL]
    assert len(interrupted) == 2 and {t.user_attrs["error"] for t in interrupted} == {"interrupted (Ctrl-C)"}
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert sorted(t.user_attrs["retry_of"] for t in waiting) == sorted(t.number for t in interrupted)
    experiment = MlflowClient().get_experiment_by_name("packed-ctrl-c").experiment_id
    runs = MlflowClient().search_runs([experiment])
    assert {r.info.status for r in runs if "mlflow.parentRunId" in r.data.tags} == {"KILLED"}
    assert not [r for r in runs if r.info.status == "RUNNING"]


def test_a_second_ctrl_c_counts_every_trial_the_slots_ran_and_reports_each_once(workdir, monkeypatch, capsys):
    # The slots' threads are left mid-step: the worker's summary ("this worker: N trials") said only the two
    # trials it ended from outside, after the slots had trained two more; and a slot let go afterwards
    # reported its trial a second time.
    from vit_search.search import run as run_module

    real_run, stops = run_module.TrialRunner.run, []
    release, blocked = threading.Event(), threading.Semaphore(0)

    def run(self, trial, drawn):
        if trial.number < 2:
            return real_run(self, trial, drawn)
        stops.append(self.stop)
        blocked.release()
        release.wait(120)  # a step that does not end until the test lets it
        raise KeyboardInterrupt

    def two_ctrl_cs():
        for _ in range(2):  # both slots in their never-ending step
            assert blocked.acquire(timeout=200)
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 60
        while not stops[0].is_set():  # the first is taken (the slots are asked to stop) before the second
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(run_module.TrialRunner, "run", run)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    sender = threading.Thread(target=two_ctrl_cs, daemon=True)
    sender.start()
    try:
        result = run_search(load_spec(study_raw("packed-twice", n_trials=4), ["train.epochs=1"]),
                            progress=False, trials_at_once=2, lines=True)
    finally:
        signal.signal(signal.SIGINT, previous)
        release.set()
        for thread in threading.enumerate():
            if thread.name.startswith("trial-slot-"):
                thread.join(timeout=60)
    sender.join(timeout=10)
    assert result.interrupted and result.trials_run == [0, 1, 2, 3]
    states = [(t.number, t.state) for t in result.study.get_trials()]
    assert states[:4] == [(0, TrialState.COMPLETE), (1, TrialState.COMPLETE), (2, TrialState.FAIL), (3, TrialState.FAIL)]
    assert sorted(t.user_attrs["retry_of"] for t in result.study.get_trials(states=(TrialState.WAITING,))) == [2, 3]
    said = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("trial ")]
    assert sorted(said) == ["0", "1", "2", "3"]  # the slots, let go after it, did not say their trials again


@pytest.mark.parametrize("key, values, why", [
    ("train.mixed_precision", ["no", "bf16"], "Accelerate keeps one precision per process"),
    ("train.grad_accum_steps", [1, 2], "Accelerate keeps one gradient accumulation count per process"),
    ("train.tf32", [True, False], "TF32 matmuls are a process-wide torch setting"),
])
def test_packing_refuses_a_searched_process_wide_setting_with_one_line(workdir, cli_here, key, values, why):
    spec_path = workdir / "study.yaml"
    space = {**study_raw("x")["search"]["space"], key: {"choice": values}}
    raw = study_raw("packed-setting", n_trials=2, space=space)
    spec_path.write_text(yaml.safe_dump(raw))
    result = cli_here("run", str(spec_path), "--trials-per-gpu", "2", cwd=workdir)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert f"{key} cannot be searched with --trials-per-gpu above 1 (packed trials share one process, and {why})" in line
    assert sorted(p.name for p in workdir.iterdir()) == ["study.yaml"]  # nothing made


def test_the_pruners_verdict_on_an_epoch_stops_the_trial_one_epoch_later():
    from vit_search.search.epoch_reports import EpochReports

    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=0.5))
    trial = study.ask()
    reports = EpochReports(trial, "val_accuracy", "threshold")
    reports(0, {"val_accuracy": 0.1})  # below the threshold: pruned, but the verdict arrives in the background
    with pytest.raises(optuna.TrialPruned, match="pruned after epoch 1"):
        reports(1, {"val_accuracy": 0.9})
    reports.close()
    assert trial.user_attrs["pruned_reason"] == "pruned by threshold after epoch 1"
    frozen = study.get_trials(deepcopy=False)[0]
    assert frozen.intermediate_values == {0: 0.1, 1: 0.9}  # every epoch that trained is reported


def test_a_study_that_prunes_nothing_never_waits_for_its_reports():
    from vit_search.search.epoch_reports import EpochReports

    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    storage_free, report = threading.Event(), trial.report

    def slow_report(value, step):  # a storage busy with other trials' writes
        assert storage_free.wait(30)
        report(value, step)

    trial.report = slow_report
    reports = EpochReports(trial, "val_accuracy", "none")
    epochs = threading.Thread(target=lambda: [reports(e, {"val_accuracy": 0.1 * e}) for e in range(4)])
    epochs.start()
    epochs.join(30)
    assert not epochs.is_alive(), "training waited for the storage"  # all four epochs, none reported yet
    assert study.get_trials(deepcopy=False)[0].intermediate_values == {}
    storage_free.set()
    reports.close()  # every report is in before the trial is told its end
    assert study.get_trials(deepcopy=False)[0].intermediate_values == {e: pytest.approx(0.1 * e) for e in range(4)}


def test_a_capture_waits_for_the_packed_steps_in_flight_and_holds_new_ones_back():
    # Packed trials share one CUDA generator, which fails a draw made while another thread captures:
    # the gate keeps captures and steps apart.
    gate, order = CaptureGate(), []
    in_step, finish_step = threading.Event(), threading.Event()

    def step(name: str, hold: bool = False) -> None:
        with gate.shared():
            if hold:
                in_step.set()
                assert finish_step.wait(30)
            order.append(name)

    def capture() -> None:
        with gate.exclusive():
            order.append("capture")
            with gate.exclusive(), gate.shared():  # its own capture's warm-up steps pass through
                order.append("warm-up inside the capture")

    threads = [threading.Thread(target=step, args=("step in flight", True))]
    threads[0].start()
    assert in_step.wait(30)
    threads.append(threading.Thread(target=capture))
    threads[1].start()
    deadline = time.monotonic() + 30
    while gate.waiting != 1:  # the capture waits for the step in flight
        assert time.monotonic() < deadline, "the capture never waited"
        time.sleep(0.01)
    threads.append(threading.Thread(target=step, args=("step after",)))  # waits behind the capture
    threads[2].start()
    finish_step.set()
    for thread in threads:
        thread.join(30)
    assert order == ["step in flight", "capture", "warm-up inside the capture", "step after"]
    assert gate.stepping == 0 and gate.waiting == 0


def test_no_packed_step_runs_while_a_trial_probes_its_attention_kernel():
    # The probe allows one SDPA kernel at a time, a process-wide setting: a neighbour stepping (or
    # capturing) meanwhile would run on it, and a second probe at once would restore it for good.
    from vit_search.performance import fused_attention_kernel

    seen, done = set(), threading.Event()

    def packed_steps() -> None:
        while not done.is_set():
            with CAPTURE_GATE.shared():
                seen.add(torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
                         and torch.backends.cuda.math_sdp_enabled())
            time.sleep(0)

    stepper = threading.Thread(target=packed_steps)
    stepper.start()
    try:
        for head_dim in (3, 5, 7, 9, 11, 13):  # shapes not probed before in this process
            fused_attention_kernel(torch.device("cpu"), torch.float32, head_dim)
    finally:
        done.set()
        stepper.join(30)
    assert seen == {True}
    assert CAPTURE_GATE.stepping == 0 and CAPTURE_GATE.waiting == 0


def test_every_training_step_holds_the_capture_gate(workdir):
    inside = []

    def make_step(*args):
        eager = EagerStep(*args)

        def step(images, labels, sync=True):
            inside.append(CAPTURE_GATE.stepping)
            return eager(images, labels, sync)
        return step

    spec = load_spec({**STUDY, "name": "gated", "search": None, "tracking": {"enabled": False}}, ["train.epochs=1"])
    train(spec, progress=False, make_step=make_step)
    assert inside and set(inside) == {1}  # every step of this run, and no other, inside the gate
    assert CAPTURE_GATE.stepping == 0


def test_packed_trials_never_empty_the_environment_under_each_other(workdir):
    # Accelerate empties os.environ and puts it back around each of its kwargs handlers (building an
    # Accelerator; preparing a model with bf16 autocast). Two such windows at once in packed threads
    # can leave the process with no environment (the second saves the empty one and restores it).
    # Each window is held open 0.2 s here, so that two trials starting together would meet in one.
    environ = type(os.environ)
    clear, open_in, met, guard = environ.clear, set(), [], threading.Lock()

    def watched_clear(self):
        me = threading.get_ident()
        with guard:
            opening = me not in open_in
            if opening:
                met.extend(sorted(open_in))  # another thread's window is open as this one opens
                open_in.add(me)
            else:
                open_in.discard(me)
        clear(self)
        if opening:
            time.sleep(0.2)

    spec = load_spec({**STUDY, "name": "environ", "search": None, "tracking": {"enabled": False}},
                     ["train.epochs=1", "train.mixed_precision=bf16"])
    before, start, errors = dict(os.environ), threading.Barrier(2), []

    def trial(folder: str) -> None:
        start.wait()
        try:
            train(spec, progress=False, checkpoint_dir=str(workdir / folder))
        except BaseException as err:  # noqa: BLE001  (reported below)
            errors.append(err)

    environ.clear = watched_clear
    try:
        threads = [threading.Thread(target=trial, args=(f"t{i}",)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
    finally:
        del environ.clear  # MutableMapping's again
    assert environ.clear is clear
    assert not errors and not met
    assert {key: os.environ.get(key) for key in before} == before  # nothing lost (torch adds a few of its own)


def test_packed_trials_checking_one_checkpoint_folder_at_once_never_trip_over_each_others_probe(tmp_path):
    # Packed trials share a process id: a probe file named after it alone was written by one thread
    # and deleted by another, and the first then failed ("cannot write checkpoints ... No such file").
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def check() -> None:
        start.wait()
        for i in range(150):
            try:
                check_writable(tmp_path / "runs" / "study" / f"trial-{i}")
            except BaseException as err:  # noqa: BLE001 (any error is the failure this test looks for)
                errors.append(err)

    threads = [threading.Thread(target=check) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    assert list(tmp_path.iterdir()) == []  # and it leaves nothing behind


@pytest.mark.parametrize("wake", ["a neighbour's trial ends", "stop is set"])
def test_a_slot_with_nothing_to_take_wakes_when_a_neighbours_trial_ends_or_stop_is_set(wake):
    from vit_search.search.study import _TrialEnds

    ends, stop = _TrialEnds(), threading.Event()
    seen = ends.count
    waiter = threading.Thread(target=ends.wait, args=(seen, 600.0, stop))
    waiter.start()
    ends.ended() if wake == "a neighbour's trial ends" else stop.set()
    waiter.join(timeout=60)  # without the wake-up it would sleep out its 600 s
    assert not waiter.is_alive()
    started = time.monotonic()
    ends.wait(ends.count - 1, 600.0, None)  # a trial ended since it looked: no wait at all
    assert time.monotonic() - started < 60
