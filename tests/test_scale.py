"""Scale: several workers on one machine (--jobs), dead workers, device options, many hosts."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from vit_search.model import build_model
from vit_search.search.jobs import jobs_exit_code, plan_workers, wait_for_the_command
from vit_search.search.run import run_search
from vit_search.search.study import WORKER, _worker_dead, _worker_id
from vit_search.spec import load_spec
from vit_search.train import train

from conftest import launched_pid, trials_watch, two_process_launch
from test_study import STUDY, study_raw


@pytest.fixture
def workdir(tmp_path, monkeypatch, sqlite_uri):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    return tmp_path


def test_cpu_workers_share_the_cores_out():
    assert [p.env["OMP_NUM_THREADS"] for p in plan_workers(2, 1, gpus=0, cpus=2)] == ["1", "1"]
    assert [p.env["OMP_NUM_THREADS"] for p in plan_workers(3, 1, gpus=0, cpus=8)] == ["3", "3", "2"]
    assert [p.env["OMP_NUM_THREADS"] for p in plan_workers(4, 1, gpus=0, cpus=2)] == ["1"] * 4
    assert len(plan_workers(0, 1, gpus=0, cpus=2)) == 2  # 0: one per core


def test_jobs_0_puts_trials_per_gpu_worker_processes_on_each_gpu():
    plans = plan_workers(0, 3, gpus=2, cpus=16)  # 3 trials at once per GPU: 3 processes each, one trial each
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in plans] == ["0", "1", "0", "1", "0", "1"]
    assert [p.trials_at_once for p in plans] == [1] * 6
    # workers sharing GPUs share the cores too: a small trial's host work is most of it
    assert [p.env["OMP_NUM_THREADS"] for p in plans] == ["3", "3", "3", "3", "2", "2"]
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in plan_workers(None, 1, gpus=2, cpus=16)] == ["0", "1"]


def test_explicit_jobs_on_gpus_pack_trials_per_gpu_into_each_workers_threads():
    plans = plan_workers(2, 4, gpus=1, cpus=16)
    assert [(p.env["CUDA_VISIBLE_DEVICES"], p.trials_at_once) for p in plans] == [("0", 4), ("0", 4)]
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in plan_workers(4, 1, gpus=2, cpus=16)] == ["0", "1", "0", "1"]
    assert [p.env["OMP_NUM_THREADS"] for p in plan_workers(8, 1, gpus=1, cpus=16)] == ["2"] * 8
    assert "trials-at-once=4" in plans[0].describe()


def test_cpu_workers_pack_trials_per_gpu_into_their_threads():
    assert [p.trials_at_once for p in plan_workers(0, 2, gpus=0, cpus=2)] == [2, 2]
    with pytest.raises(ValueError, match="at least 1"):
        plan_workers(2, 0, gpus=1, cpus=2)


@pytest.mark.skipif(not shutil.which("taskset") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs taskset and two cores to pin the run to one")
def test_jobs_0_with_one_usable_core_is_one_worker_in_the_commands_own_process(workdir):
    spec_path = workdir / "study.yaml"
    spec_path.write_text(yaml.safe_dump(study_raw("one-core", n_trials=2)))
    result = subprocess.run(["taskset", "-c", "0", sys.executable, "-m", "vit_search", "run", str(spec_path),
                             "--jobs", "0", "--set=train.epochs=1"], cwd=workdir, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "worker 0:" not in result.stderr  # no worker process was started
    assert "this worker: 2 trials" in result.stdout  # this process trained the study itself


@pytest.mark.parametrize("arguments, said", [
    (["--checkpoint-dir", "/dev/null/x"], "error: cannot write checkpoints in /dev/null/x/"),
    (["--trials-per-gpu", "2", "--set", 'search.space={"train.tf32": {"choice": [true, false]}}', "--set",
      "search.enqueue=[]"], "train.tf32 cannot be searched with --trials-per-gpu above 1"),
], ids=["checkpoint-folder", "packed-space"])
def test_what_a_worker_would_refuse_is_refused_once_by_the_jobs_command_before_the_stores_are_made(
        workdir, cli_here, arguments, said):
    spec_path = workdir / "study.yaml"
    raw = study_raw("refused-by-the-command", n_trials=2)
    raw["search"]["storage"] = f"sqlite:///{workdir / 'study.db'}"
    spec_path.write_text(yaml.safe_dump(raw))
    result = cli_here("run", str(spec_path), "--jobs", "2", *arguments, cwd=workdir)
    assert result.returncode == 2
    (error,) = result.stderr.splitlines()
    assert said in error, error
    assert not (workdir / "study.db").exists()


def test_a_spec_refused_under_jobs_is_one_line_and_leaves_no_worker_running(workdir, cli_here):
    # The workers start before the command has checked the spec (they import meanwhile): a refusal
    # must kill them before they touch anything, and say it once.
    spec_path = workdir / "study.yaml"
    spec_path.write_text(yaml.safe_dump(study_raw("refused-under-jobs", n_trials=2)))
    result = cli_here("run", str(spec_path), "--jobs", "2", "--set", "model.depth=0", cwd=workdir)
    assert result.returncode == 2
    (error,) = result.stderr.splitlines()  # the workers' plan lines come only once the input is taken
    assert error.startswith("error: --set model.depth=0: model.depth")
    running = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "--worker" in text and str(spec_path) in text:
            running.append(text)
    assert running == []
    assert not (workdir / "optuna.db").exists() and not (workdir / "runs").exists()


def test_a_worker_takes_the_commands_word_and_leaves_when_none_comes(monkeypatch):
    word = {"env": {"VIT_SEARCH_STORAGE": "sqlite:///x.db"}, "overrides": ["train.epochs=2"]}
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(word) + "\n"))
    assert wait_for_the_command() == word
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # the command exited without a word
    assert wait_for_the_command() is None


def run_jobs(spec_path, cwd, *extra):
    return subprocess.Popen([sys.executable, "-m", "vit_search", "run", str(spec_path), "--jobs", "2", *extra],
                            cwd=cwd, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_a_dead_worker_does_not_stop_the_others_and_its_trial_is_retried(workdir):
    spec_path = workdir / "study.yaml"
    spec_path.write_text(yaml.safe_dump(study_raw("jobs-death", n_trials=3)))
    storage = study_raw("jobs-death")["search"]["storage"]
    proc = run_jobs(spec_path, workdir, "--set", "train.epochs=3")
    client, deadline, victim = MlflowClient(), time.monotonic() + 200, None
    while victim is None:  # a worker mid-way through training a trial
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
        experiment = client.get_experiment_by_name("jobs-death")
        if experiment is None:
            continue
        running = [r for r in client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")
                   if "optuna.trial_number" in r.data.tags]
        if running:
            number = int(running[0].data.tags["optuna.trial_number"])
            trial = optuna.load_study(study_name="jobs-death", storage=storage).get_trials()[number]
            victim = int(trial.system_attrs[WORKER].rsplit(":", 1)[1])
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 1 and "exited -9" in err
    assert "next:" in out  # the study ended all the same: its best is worth the commands
    trials = optuna.load_study(study_name="jobs-death", storage=storage).get_trials()
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3
    (dead,) = [t for t in trials if t.state == TrialState.FAIL]
    assert dead.user_attrs["error"].startswith("worker died")
    assert not [r for r in client.search_runs([client.get_experiment_by_name("jobs-death").experiment_id])
                if r.info.status == "RUNNING"]


def test_interrupted_workers_exit_130_refusing_ones_2_and_only_dead_ones_exit_1():
    assert jobs_exit_code([0, 0], interrupted=False) == (0, None)
    assert jobs_exit_code([130, 130], interrupted=False) == (130, None)  # Ctrl-C reached the workers only
    assert jobs_exit_code([130, 0], interrupted=True) == (130, None)
    assert jobs_exit_code([-signal.SIGINT, 130], interrupted=False) == (130, None)  # one died in its imports
    assert jobs_exit_code([143, 143], interrupted=False) == (143, None)  # SIGTERM reached the workers only
    assert jobs_exit_code([-signal.SIGTERM, 130], interrupted=False) == (143, None)
    assert jobs_exit_code([2, 2], interrupted=False) == (2, None)  # each refused the input and said why
    assert jobs_exit_code([0, -9], interrupted=False) == (
        1, "worker 1 exited -9 (any trial it was training was failed and retried by the others)")
    assert jobs_exit_code([1, 1], interrupted=False) == (  # none went on to retry anything (a full disk, say)
        1, "worker 0 exited 1; worker 1 exited 1 (their trials are queued again: mend what each said, then run the "
           "same command)")


def test_jobs_workers_on_a_terminal_print_trial_lines_and_draw_no_bars_of_their_own(workdir):
    # One bar per worker on the command's terminal shared a line, each stuck at its share of the trials.
    import pty

    spec_path = workdir / "study.yaml"
    spec_path.write_text(yaml.safe_dump(study_raw("jobs-on-a-terminal", n_trials=2)))
    leader, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "vit_search", "run", str(spec_path), "--jobs", "2",
                             "--set", "train.epochs=1"], cwd=workdir, stdin=subprocess.DEVNULL, stdout=terminal,
                            stderr=terminal)
    os.close(terminal)
    said = b""
    while True:  # the terminal's whole output, until the command and its workers have closed it
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: no process holds the terminal any more
            break
        if not chunk:
            break
        said += chunk
    os.close(leader)
    assert proc.wait(timeout=300) == 0, said.decode(errors="replace")[-3000:]
    text = said.decode(errors="replace")
    assert "trials:" not in text, text[-3000:]  # no bar
    assert text.count(" COMPLETE val_accuracy ") == 2 and "study 'jobs-on-a-terminal': 2 complete" in text, text[-3000:]


@pytest.mark.slow
def test_sigterm_sent_to_jobs_alone_stops_every_worker_without_blaming_them(workdir):
    # As a scheduler or `timeout` sends it: to the command alone, which passes it on. Ctrl-C takes the same
    # path (the workers have a session of their own: a terminal's Ctrl-C reaches the command alone too):
    # passed on as the test below checks.
    signum, code, cause = signal.SIGTERM, 143, "SIGTERM"
    name = "jobs-sigterm"
    spec_path = workdir / "study.yaml"
    spec_path.write_text(yaml.safe_dump(study_raw(name, n_trials=2)))
    storage = study_raw(name)["search"]["storage"]
    proc = subprocess.Popen([sys.executable, "-m", "vit_search", "run", str(spec_path), "--jobs", "2",
                             "--set", "train.epochs=50"], cwd=workdir, env=os.environ.copy(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, watched = time.monotonic() + 200, trials_watch(name, storage)
    while True:  # both workers training
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.2)
        trials = watched()
        # The worker's id is written just after its trial starts RUNNING: wait for both.
        if sum(t.state == TrialState.RUNNING and WORKER in t.system_attrs for t in trials) == 2:
            break
    workers = [int(t.system_attrs[WORKER].rsplit(":", 1)[1]) for t in trials]
    # Each in a session of its own: a terminal's Ctrl-C reaches the command alone, which passes it on once.
    assert len({os.getsid(pid) for pid in workers} | {os.getsid(proc.pid)}) == 3
    proc.send_signal(signum)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)  # docs/search.md: a second SIGTERM changes nothing (unlike a second Ctrl-C)
    out, err = proc.communicate(timeout=200)
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err and "retried by the others" not in err
    assert f"study '{name}': 0 complete, 0 pruned, 2 failed, 2 queued" in out
    # Said once by the command, not once per worker; then how to go on
    assert err.count("stopping (SIGTERM): ") == 1 and "interrupted" not in err, err[-3000:]
    assert "stopped: run the same command to go on (2 trials queued)" in out
    assert sorted(line.split(":")[0] for line in out.splitlines() if line.startswith("worker ")) == ["worker 0", "worker 1"]
    for pid in workers:  # no worker is left training without its parent
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    interrupted = [t for t in trials if t.state == TrialState.FAIL]
    assert {t.user_attrs["error"] for t in interrupted} == {f"interrupted ({cause})"}
    # Both queued again with their values, for the re-run: an interruption uses up no trial.
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert sorted(t.user_attrs["retry_of"] for t in waiting) == sorted(t.number for t in interrupted)
    assert all(t.system_attrs["fixed_params"] == trials[t.user_attrs["retry_of"]].params for t in waiting)
    (parent,) = [r for r in MlflowClient().search_runs([MlflowClient().get_experiment_by_name(name).experiment_id])
                 if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "KILLED"


def test_each_stop_the_command_gets_is_passed_on_to_every_worker_still_running(tmp_path):
    from vit_search.search.jobs import _stop_workers
    from vit_search.stopping import Terminated

    def worker_process(name: str) -> subprocess.Popen:
        code = (f"import signal, sys, time\n"
                f"for s in (signal.SIGINT, signal.SIGTERM):\n"
                f"    signal.signal(s, lambda n, _: (open({str(tmp_path / name)!r}, 'a').write(signal.Signals(n).name + ' '),"
                f" sys.exit(0)))\n"
                f"print('ready', flush=True)\ntime.sleep(60)\n")
        # In a session of their own, as run_workers starts them: no terminal signal reaches them but through here.
        proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "ready\n"
        return proc

    for request, said in ((KeyboardInterrupt(), "SIGINT "), (Terminated("SIGTERM"), "SIGTERM ")):
        workers = [worker_process(f"{said.strip()}-{i}") for i in range(2)]
        assert _stop_workers(workers, request) == [0, 0]
        assert [(tmp_path / f"{said.strip()}-{i}").read_text() for i in range(2)] == [said, said]


@pytest.mark.skipif(sys.platform != "linux", reason="a worker learns of its command's death by prctl (Linux)")
def test_a_worker_whose_command_is_killed_gets_sigterm(tmp_path):
    heard = tmp_path / "heard"
    worker_code = (f"import signal, sys, time\n"
                   f"signal.signal(signal.SIGTERM, lambda *_: (open({str(heard)!r}, 'w').write('SIGTERM'), sys.exit(0)))\n"
                   f"print('ready', flush=True)\ntime.sleep(120)\n")
    command_code = ("import subprocess, sys, time\nfrom vit_search.search.jobs import _stop_when_orphaned\n"
                    f"w = subprocess.Popen([sys.executable, '-c', {worker_code!r}], start_new_session=True, "
                    "preexec_fn=_stop_when_orphaned, stdout=subprocess.PIPE, text=True)\n"
                    "w.stdout.readline()\nprint(w.pid, flush=True)\ntime.sleep(120)\n")
    command = subprocess.Popen([sys.executable, "-c", command_code], stdout=subprocess.PIPE, text=True)
    worker_pid = int(command.stdout.readline())
    command.kill()  # SIGKILL: the command has no say
    command.wait()
    deadline = time.monotonic() + 30
    while not (heard.exists() and heard.read_text() == "SIGTERM"):  # polled: the file is made, then written
        assert time.monotonic() < deadline, "the worker trained on without its command"
        time.sleep(0.05)
    while True:  # and it left
        try:
            os.kill(worker_pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="zombie detection reads /proc (Linux)")
def test_an_exited_but_unreaped_worker_counts_as_dead_and_one_this_process_cannot_see_does_not():
    host, pid = _worker_id().rsplit(":", 1)
    assert pid == str(os.getpid()) and host.startswith(f"{socket.gethostname()}@")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        while not _worker_dead(f"{host}:{child.pid}"):  # exited, not yet waited for: a zombie
            assert time.monotonic() < deadline, "an exited child never counted as dead"
            time.sleep(0.05)
    finally:
        child.wait()
    assert _worker_dead(f"{host}:{child.pid}")  # reaped
    assert not _worker_dead(f"{host}:{os.getpid()}")  # this process is alive
    # Where the PID means another process (another machine, or a container of the same hostname with its
    # own PID namespace, or a worker id without the namespace), only heartbeats tell.
    name, (boot, namespace) = host.split("@")[0], host.split("@")[1].split(".")
    for elsewhere in ("another-host", name, f"{name}@{boot}.1", f"{name}@0badb00t.{namespace}"):
        assert not _worker_dead(f"{elsewhere}:{child.pid}"), elsewhere


def test_device_options_fall_back_cleanly_on_cpu_and_metrics_are_logged(workdir):
    raw = {**STUDY, "name": "devices", "tracking": {"experiment": "devices"}}
    raw.pop("search")
    # train.cpu: on the CPU where a GPU is as well, so that this holds on a GPU machine too
    spec = load_spec(raw, ["train.epochs=1", "train.mixed_precision=auto", "train.compile=false", "train.cpu=true",
                           "train.fused_optimizer=true", "train.tf32=true", "train.peak_tflops=0.5"])
    result = train(spec)
    run = MlflowClient().get_run(result.run_id)
    assert run.data.tags["mixed_precision"] == "no"  # auto: fp32 without a GPU
    assert run.data.tags["attention_kernel"] in ("flash", "efficient", "math")
    assert run.data.tags["cuda_graph"] == "off: no CUDA device"  # the eager step, and the tag says why
    assert run.data.metrics["peak_memory_mb"] > 10
    assert 0 < run.data.metrics["mfu"] < 1  # measured against the spec's peak


def test_a_step_without_graph_capture_says_why_in_its_tag(workdir):
    from vit_search.train_step import graph_blocker

    spec = load_spec({**STUDY, "name": "graphs", "search": None, "tracking": {"enabled": False}})
    cuda = torch.device("cuda")
    assert graph_blocker(cuda, True, "bf16", spec.train, 1) is None  # where a GPU is, this run is captured
    train = spec.train.model_copy(update={"grad_accum_steps": 2})
    assert graph_blocker(cuda, True, "no", train, 1) == "gradient accumulation"
    assert graph_blocker(cuda, False, "no", spec.train, 1) == "data not held on the device"
    assert graph_blocker(cuda, True, "fp16", spec.train, 1) == "fp16 needs a loss scaler"
    assert graph_blocker(cuda, True, "no", spec.train, 2) == "several processes"
    assert graph_blocker(torch.device("cpu"), True, "no", spec.train, 1) == "no CUDA device"


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = build_model({"dim": 32, "depth": 3, "patch_embed": {"type": "conv", "patch_size": 4},
                         "attention": {"type": "sdpa", "heads": 4}, "image_size": 16, "in_channels": 3,
                         "num_classes": 5})
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(checkpointing)
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_trials_may_differ_in_mixed_precision_within_one_worker(workdir):
    spec = load_spec(study_raw("precisions", n_trials=2, space={"train.mixed_precision": {"choice": ["no", "bf16"]}},
                               enqueue=[{"train.mixed_precision": "bf16"}, {"train.mixed_precision": "no"}]),
                     ["train.epochs=1"])
    trials = run_search(spec, progress=False).study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2


@pytest.mark.slow
def test_three_workers_on_postgresql_and_an_mlflow_server(workdir, mlflow_server, postgres_url):
    url = postgres_url
    name = f"hosts-{os.getpid()}-{int(time.time())}"
    spec_path = workdir / "study.yaml"
    spec_path.write_text(yaml.safe_dump(study_raw(name, n_trials=6)))
    # What each host runs: the same command, pointed at one storage and one tracking server.
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    workers = [subprocess.Popen([sys.executable, "-m", "vit_search", "run", str(spec_path), "--storage", url],
                                cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(3)]
    for w in workers:
        out, err = w.communicate(timeout=400)
        assert w.returncode == 0, err[-3000:]
    trials = optuna.load_study(study_name=name, storage=url).get_trials()
    assert len(trials) == 6 and {t.state for t in trials} == {TrialState.COMPLETE}
    client = MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    numbers = sorted(int(r.data.tags["optuna.trial_number"]) for r in runs if "optuna.trial_number" in r.data.tags)
    assert numbers == list(range(6))
    assert all(t.user_attrs["mlflow_run_id"] in {r.info.run_id for r in runs} for t in trials)
    optuna.delete_study(study_name=name, storage=url)


def test_a_launched_study_goes_on_after_a_trial_that_diverges_and_stops_whole_when_only_the_main_process_fails(
        workdir):
    raw = study_raw("launched-nan", n_trials=3, enqueue=[{"train.lr": 1.0e7}, {"train.lr": 3.0e-3}, {"train.lr": 1.0e-3}],
                    space={"train.lr": {"choice": [3.0e-3, 1.0e7, 1.0e-3]}})
    # Shifted crops: their batches' strides made DDP warn of the 1-channel patch weight's gradient strides,
    # which differ only in a dimension of size 1 (the same layout): not shown.
    data = {**raw["data"], "augment": {"random_crop_padding": 2}}
    (workdir / "study.yaml").write_text(yaml.safe_dump({**raw, "data": data, "train": {**raw["train"], "epochs": 1}}))
    # Trial 2's checkpoint cannot be written: a failure of the main process alone (it writes them). The
    # other process stops with it rather than wait in the next collective (the launched study hung).
    (workdir / "runs" / "launched-nan" / "trial-2" / "checkpoint.pt").mkdir(parents=True)
    result = subprocess.run(two_process_launch("-m", "vit_search", "run", "study.yaml"), cwd=workdir,
                            env=os.environ.copy(), capture_output=True, text=True, timeout=400)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
    assert "cannot write the epoch checkpoint" in errors[0] and "trial 2 is queued again" in errors[0]
    assert "Grad strides" not in result.stderr, result.stderr[-3000:]
    trials = optuna.load_study(study_name="launched-nan", storage=raw["search"]["storage"]).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING], \
        [t.user_attrs for t in trials]
    assert trials[0].user_attrs["error"].startswith("TrainingDiverged: loss became")  # and the study went on


RANK_1_FAILS = """
import os

from torch import nn

from vit_search import register


@register("head", "test_fails_on_rank_1")
class FailsOnRank1(nn.Linear):
    def __init__(self, dim: int, num_classes: int):
        super().__init__(dim, num_classes)

    def forward(self, pooled):
        if self.training and os.environ.get("RANK") == "1":
            raise ValueError("boom on rank 1")
        return super().forward(pooled)
"""


def test_a_launched_trial_that_fails_on_one_other_process_alone_stops_in_bounded_time_and_is_queued_again(workdir):
    # Rank 1 raised and went back to wait for the next trial while rank 0 waited for it in the step's
    # collectives: the launched study hung until the launcher's timeout, its trial RUNNING.
    (workdir / "rank1.py").write_text(RANK_1_FAILS)
    raw = study_raw("rank1-fails", n_trials=1)
    raw = {**raw, "plugins": ["rank1.py"], "model": {**raw["model"], "head": {"type": "test_fails_on_rank_1"}},
           "train": {**raw["train"], "epochs": 1}}
    (workdir / "study.yaml").write_text(yaml.safe_dump(raw))
    result = subprocess.run(two_process_launch("-m", "vit_search", "run", "study.yaml"), cwd=workdir,
                            env=os.environ.copy(), capture_output=True, text=True, timeout=300)
    ours = result.stderr.split("torch/distributed/elastic")[0]  # the launcher's own report follows
    errors = [line for line in ours.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and "Traceback" not in ours, result.stderr[-3000:]
    assert errors[0] == ("error: process 1 of the launch: ValueError: boom on rank 1; it stops, and the main process "
                         "queues the trial again"), errors
    # The main process queues the trial again, as a lost peer or, should the launcher's SIGTERM come first, as
    # interrupted: either way nothing else is said as an internal fault.
    assert all("another process of the launch stopped" in e for e in errors[1:]), errors
    trials = optuna.load_study(study_name="rank1-fails", storage=raw["search"]["storage"]).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING], [t.user_attrs for t in trials]


@pytest.mark.slow
def test_a_launched_study_whose_main_process_is_killed_does_not_say_the_main_process_queues_its_trial(workdir):
    spec_path = workdir / "study.yaml"
    spec_path.write_text(yaml.safe_dump(study_raw("main-killed", n_trials=1)))
    mark = f"VIT_SEARCH_TEST_LAUNCH={os.getpid()}-{time.monotonic_ns()}"
    env = {**os.environ, mark.split("=")[0]: mark.split("=")[1]}
    proc = subprocess.Popen(two_process_launch("-m", "vit_search", "run", str(spec_path), "--set", "train.epochs=300"),
                            cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (workdir / "runs" / "main-killed" / "trial-0" / "checkpoint.pt").exists():  # training on both
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    os.kill(launched_pid(mark, "0"), signal.SIGKILL)
    err = proc.communicate(timeout=300)[1]
    said = [line for line in err.splitlines() if line.startswith("error:")]
    # The other process met the broken collective and said the main process would queue the trial again (it was
    # dead), or the launcher's SIGTERM came first and it said nothing: either way, no promise of a dead process.
    assert said in ([], ["error: process 1 of the launch: another process of the launch stopped (its connection to "
                         "this one was lost); run the same command to go on (its trial is queued again then)"]), err[-3000:]
    trials = optuna.load_study(study_name="main-killed", storage=study_raw("main-killed")["search"]["storage"]).get_trials()
    assert [t.state for t in trials] == [TrialState.RUNNING]  # the next worker fails it as a dead worker's, and retries it


@pytest.mark.slow
def test_a_launched_study_trains_on_two_processes_reports_once_and_resumes_after_sigterm(workdir):
    spec_path = workdir / "study.yaml"
    spec_path.write_text(yaml.safe_dump(study_raw("launched", n_trials=2, pruner="successive_halving")))
    # Stopped as a scheduler stops it: SIGTERM to the launcher, which passes it on to both processes.
    proc = subprocess.Popen(two_process_launch("-m", "vit_search", "run", str(spec_path), "--set", "train.epochs=300"),
                            cwd=workdir, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (workdir / "runs" / "launched" / "trial-0" / "checkpoint.pt").exists():  # training
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    # Each process stops by itself: none waits for one already gone (the launcher would kill it after 30 s).
    assert "Unable to shutdown process" not in err and "[rank" not in err, err[-3000:]
    assert "trial 0 FAIL" in out and "interrupted (SIGTERM)" in out
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("launched").experiment_id])
    assert {r.info.status for r in runs} == {"KILLED"} and len(runs) == 2  # the study's run and trial 0's

    result = subprocess.run(
        two_process_launch("-m", "vit_search", "run", str(spec_path), "--set", "train.epochs=3"),
        cwd=workdir, env=os.environ.copy(), capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("study 'launched':") == 1  # the main process reports
    trials = optuna.load_study(study_name="launched", storage=study_raw("launched")["search"]["storage"]).get_trials()
    assert [t.state for t in trials].count(TrialState.FAIL) == 1  # the one SIGTERM stopped, queued again
    assert len(trials) == 3 and {t.state for t in trials[1:]} <= {TrialState.COMPLETE, TrialState.PRUNED}
    children = [r for r in client.search_runs([client.get_experiment_by_name("launched").experiment_id])
                if "optuna.trial_number" in r.data.tags]
    assert len(children) == 3 and {r.data.tags["num_processes"] for r in children} == {"2"}
    assert sorted(r.info.status for r in children)[-1] == "KILLED"
    from vit_search.search.fixed import LAUNCH

    storage = optuna.storages.RDBStorage(study_raw("launched")["search"]["storage"])
    assert storage.get_study_system_attrs(storage.get_study_id_from_name("launched"))[LAUNCH] == 2  # a worker's note
