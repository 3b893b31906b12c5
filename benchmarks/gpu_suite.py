"""Trials per GPU-hour, in one command on one H100: every figure of the trials-per-GPU work.

Prints, with the device's name:

1. the quickstart trial (experiments/digits.yaml, 100 epochs): training seconds and the process's
   wall (seed 0, alone on the device), and its test accuracy over 3 seeds (median; target >= 0.985;
   seeds 1 and 2 train at once, after seed 0);
2. trials/hour of a study of distinct enqueued quickstart-size trials with ``--jobs 0 --trials-per-gpu 1``
   and ``8`` (no pruning) and the ratio (target >= 4x): with the start-up, and once the workers are up,
   with each trial's own seconds, and where its run's time went (the set-up, the step's capture, the
   evaluation and the epochs each run logged; the workers' sums, pruned trials included);
3. ``vit-search run experiments/digits.yaml --jobs 0 --trials-per-gpu 8``: wall with start-up
   (target <= 60 s for its 16 trials), and repeated points among its trials (target 0: one is
   enqueued, the other 15 drawn by the seeded sampler, 8 at once at the start), with its runs'
   ``cuda_graph`` and ``attention_kernel`` tags;
4. ViT-B/16 bf16 batch 256 training img/s and MFU, eager and compiled: ours beside timm's
   ``vit_base_patch16_224`` measured the same way in the same process (timm if installed).

Those are the default parts (trial, packing, study, vit); each part's seconds, and the suite's, are
printed as it ends (the target for the default parts: under 5 minutes). Measured one by one on an H100
(2026-11-28), before 9771995 overlapped the workers' start-up with the command's checks: trial
about 70 s, packing 82 s, study 65 s; vit's eager half ran within 100 s, its compiled half was not
timed. Parts run on request: ``repeats`` (a seeded study of 8 trials drawn at once, nothing
enqueued), ``tags`` (a 2-epoch tracked ``train``: its run's tags), and, to find where packing's
time goes, ``designs`` (the same study as worker processes x packed trials, e.g. ``--layouts
1x1,8x1,1x8``), ``contention`` (8 processes at once against one: start-up, ``train`` untracked,
``train`` on one MLflow store), ``capture`` (a trial's pieces on the device one at a time: the model,
an eager step, a validation pass, the warm-up and capture, the capture as ``torch.cuda.graph`` does
it against ``capture_begin``/``capture_end``) and ``storage`` (one SQLite write transaction in the folder the
stores go to; ``--tmp /dev/shm`` moves them off the disk).

    python benchmarks/gpu_suite.py               # on a GPU machine
    python benchmarks/gpu_suite.py --parts storage,designs --layouts 1x1,8x1 [--tmp /dev/shm]
    python benchmarks/gpu_suite.py --cpu-smoke   # tiny sizes on the CPU: checks the script, measures nothing
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quickstart_points import distinct_points  # noqa: E402  (a module beside this script)

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "experiments" / "digits.yaml"
PART_TIMEOUT = 240  # seconds: one command of the suite that runs longer has hung
DEFAULT_PARTS = "trial,packing,study,vit"
PARTS = ("tags", "trial", "packing", "repeats", "study", "storage", "contention", "designs", "vit", "capture")


def cli(args: list[str], cwd: str, env: dict[str, str] | None = None) -> tuple[str, float]:
    """Run ``python -m vit_search ARGS``; returns (stdout, wall seconds)."""
    (out,), wall = cli_at_once([args], cwd, env)
    return out, wall


def cli_at_once(commands: list[list[str]], cwd: str, env: dict[str, str] | None = None) -> tuple[list[str], float]:
    """Run ``python -m vit_search ARGS`` for each ARGS at once; returns (their stdouts, wall seconds)."""
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "vit_search", *args], cwd=cwd, env={**os.environ, **(env or {})},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for args in commands]
    try:
        outs = [proc.communicate(timeout=PART_TIMEOUT) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    wall = time.perf_counter() - started
    for args, proc, (_, err) in zip(commands, procs, outs):
        if proc.returncode != 0:  # the suite goes on with its other parts; this one says why it stopped
            raise RuntimeError(f"vit-search {' '.join(args)} exited {proc.returncode}: ...{err[-1500:]}")
    return [out for out, _ in outs], wall


def quickstart_trial(epochs: int, seeds: int) -> None:
    """The quickstart's single trial: training seconds and wall of seed 0 alone on the device, and the
    test accuracy of every seed (the others trained at once, sharing the device: their accuracy is
    what they are run for, and running them one by one would add their start-up to the suite's time)."""
    def train(seed: int) -> list[str]:
        return ["train", str(QUICKSTART), f"--set=seed={seed}", f"--set=train.epochs={epochs}",
                "--set=tracking.enabled=false", f"--checkpoint-dir=ckpt-{seed}"]

    with tempfile.TemporaryDirectory() as tmp:
        out, wall = cli(train(0), tmp)
        others, _ = cli_at_once([train(seed) for seed in range(1, seeds)], tmp) if seeds > 1 else ([], 0.0)
    accuracies = [float(re.search(r"test_accuracy ([0-9.]+)", said).group(1)) for said in [out, *others]]
    training = float(re.search(r"([0-9.]+) s training", out).group(1))
    print(f"quickstart trial ({epochs} epochs): training {training:.2f} s, process wall {wall:.1f} s (seed 0 alone); "
          f"test accuracy median of {seeds} seeds {statistics.median(accuracies):.4f} "
          f"({', '.join(f'{a:.4f}' for a in accuracies)})", flush=True)


def graph_tag() -> None:
    """The quickstart run's tags: does the step run as one CUDA graph here, and on which attention kernel?"""
    with tempfile.TemporaryDirectory() as tmp:
        _, wall = cli(["train", str(QUICKSTART), "--set=train.epochs=2"], tmp,
                      env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"})
        import mlflow

        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        (run,) = mlflow.search_runs(experiment_names=["digits-vit"], output_format="list")
    tags = {k: run.data.tags.get(k, "?") for k in ("cuda_graph", "attention_kernel", "mixed_precision", "device")}
    print(f"quickstart run, 2 epochs, tracked ({wall:.1f} s wall): {tags}", flush=True)


def outcome(storage: str, name: str = "digits-vit") -> str:
    """A study's trial states, and each distinct error of its failed trials: a benchmark whose trials
    failed measured nothing, and must say so."""
    import optuna

    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    counts = Counter(t.state.name.lower() for t in trials)
    errors = Counter(str(t.user_attrs.get("error", "?"))[:300] for t in trials if t.state.name == "FAIL")
    said = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    return said + "".join(f"\n  {n} failed with: {error}" for error, n in errors.most_common(3))


def run_tags(tmp: str, name: str = "digits-vit") -> str:
    """How the trials' steps ran (their runs' ``cuda_graph`` tags, counted), from the study's MLflow store."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=[name], output_format="list")
    tags = Counter(r.data.tags["cuda_graph"][:80] for r in runs if "cuda_graph" in r.data.tags)
    kernels = Counter(r.data.tags["attention_kernel"] for r in runs if "attention_kernel" in r.data.tags)
    # Where a trial's time goes: its run's seconds (MLflow's start to end, inside train()), split into
    # what the run logged of its set-up (model, data on the device), its step's warm-up and capture,
    # its evaluation, and its epochs (the steps); the rest is checkpoints, reports and the run's end.
    # The first epoch against the later ones: first use.
    client = mlflow.MlflowClient()
    phases: dict[str, list[float]] = {}
    first, later = [], []
    for run in [r for r in runs if "setup_seconds" in r.data.metrics and r.info.end_time][:8]:
        seconds = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "epoch_seconds"),
                                           key=lambda m: m.step)]
        if len(seconds) > 1:
            logged = {name: run.data.metrics[f"{name}_seconds"] for name in ("setup", "capture", "eval")}
            for name, value in {"run": (run.info.end_time - run.info.start_time) / 1e3, **logged,
                                "epochs": sum(seconds)}.items():
                phases.setdefault(name, []).append(value)
            first.append(seconds[0])
            later.append(statistics.median(seconds[1:]))
    epochs = (f"; median of {len(first)} runs: " + ", ".join(
        f"{statistics.median(values):.3f} s {name}" for name, values in phases.items())
        + f" (the first epoch {statistics.median(first):.3f} s, later ones {statistics.median(later):.4f} s)"
    ) if first else ""
    return ("cuda_graph " + ", ".join(f"{tag}: {n}" for tag, n in tags.most_common()) + "; attention_kernel "
            + ", ".join(f"{kernel}: {n}" for kernel, n in kernels.most_common()) + epochs)


def study(trials: int, epochs: int, per_gpu: int, enqueue: bool, jobs: str = "1") -> tuple[float, list, str, float]:
    """A quickstart-space study of ``trials`` trials; returns (wall seconds, the trials' points, their outcome:
    states, errors, the worker's own account of its time, and how the steps ran; trials/hour once started)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = yaml.safe_load(QUICKSTART.read_text())
        spec["search"].update(n_trials=trials, pruner="none", timeout=None,
                              enqueue=distinct_points(trials) if enqueue else [])
        spec["train"]["epochs"] = epochs
        spec["tracking"]["plots"] = False
        path = Path(tmp) / "study.yaml"
        path.write_text(yaml.safe_dump(spec))
        out, wall = cli(["run", str(path), "--jobs", jobs, "--trials-per-gpu", str(per_gpu)], tmp,
                        env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"})
        import optuna

        done = optuna.load_study(study_name=spec["name"], storage=f"sqlite:///{tmp}/optuna.db").get_trials()
        points = [tuple(sorted(t.params.items())) for t in done]
        said = outcome(f"sqlite:///{tmp}/optuna.db", spec["name"])
        steady, span = steady_rate(done)
        said += f"; {steady:,.0f} trials/hour once started ({span:.1f} s from the first trial's start); {durations(done)}"
        # "[this ]worker: N trials in W s (T s training: S s set-up, ...)": T sums the trials' own train() times,
        # pruned ones included, packed ones overlapping; then T phase by phase
        worker = " | ".join(line.split("; storage")[0] for line in out.splitlines()
                            if line.startswith(("this worker:", "worker:")))
        said = "; ".join(part for part in (said, worker, run_tags(tmp, spec["name"])) if part)
    return wall, points, said, steady


def steady_rate(trials: list) -> tuple[float, float]:
    """Trials/hour once the workers are up, and the seconds it is over: from the first trial's start to
    the last one's end, so without the imports and CUDA start-up that a long study pays once per worker."""
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    if not starts or not ends:
        return 0.0, 0.0
    span = (max(ends) - min(starts)).total_seconds()
    return len(ends) / span * 3600, span


def durations(trials: list) -> str:
    """The trials' own seconds (Optuna's start to end), median: each worker's first trial, which pays
    for what the worker sets up once (CUDA's libraries, the data), and its later ones."""
    from vit_search.search.study import WORKER

    by_worker: dict[str, list[float]] = {}
    for t in sorted((t for t in trials if t.datetime_start and t.datetime_complete), key=lambda t: t.datetime_start):
        by_worker.setdefault(str(t.system_attrs.get(WORKER)), []).append(
            (t.datetime_complete - t.datetime_start).total_seconds())
    first = [seconds[0] for seconds in by_worker.values()]
    later = [s for seconds in by_worker.values() for s in seconds[1:]]
    said = f"a trial's seconds: {len(by_worker)} workers' first {statistics.median(first):.2f}" if first else "no trial"
    return said + (f", later ones {statistics.median(later):.2f}" if later else "")


def packing(trials: int, epochs: int, packed: int) -> None:
    """``--jobs 0 --trials-per-gpu 1`` against ``8`` (8 worker processes on the GPU)."""
    one, _, one_said, one_steady = study(trials, epochs, 1, enqueue=True, jobs="0")
    many, _, many_said, many_steady = study(trials, epochs, packed, enqueue=True, jobs="0")
    print(f"{trials} distinct enqueued trials of {epochs} epochs, no pruning: --trials-per-gpu 1: "
          f"{trials / one * 3600:,.0f} trials/hour ({one:.1f} s; {one_said}); --trials-per-gpu {packed}: "
          f"{trials / many * 3600:,.0f} trials/hour ({many:.1f} s; {many_said}); ratio {one / many:.2f}x with the "
          f"start-up, {many_steady / max(one_steady, 1e-9):.2f}x once started", flush=True)


def repeats(epochs: int, packed: int) -> None:
    """Repeated points in a seeded study of ``packed`` trials drawn at once, nothing enqueued (the
    quickstart study's part counts them too, among its drawn trials)."""
    _, points, said, _ = study(packed, epochs, packed, enqueue=False, jobs="0")
    print(f"seeded study of {packed} trials packed {packed} at once, nothing enqueued: "
          f"{len(points) - len(set(points))} repeated points of {len(points)} ({said})", flush=True)


def designs(trials: int, epochs: int, layouts: list[tuple[int, int]]) -> None:
    """The same study as worker processes x trials packed in each, all on one GPU: which layout pays."""
    walls = {}
    for jobs, per_gpu in layouts:
        walls[jobs, per_gpu], _, said, _ = study(trials, epochs, per_gpu, enqueue=True, jobs=str(jobs))
        print(f"{trials} distinct enqueued trials of {epochs} epochs, --jobs {jobs} --trials-per-gpu {per_gpu}: "
              f"{trials / walls[jobs, per_gpu] * 3600:,.0f} trials/hour ({walls[jobs, per_gpu]:.1f} s; {said})", flush=True)
    base = walls.get((1, 1))
    if base:
        print("ratios to --jobs 1 --trials-per-gpu 1: " + ", ".join(
            f"{jobs}x{per_gpu} {base / wall:.2f}x" for (jobs, per_gpu), wall in walls.items()), flush=True)


def contention(copies: int, epochs: int) -> None:
    """What ``copies`` processes at once on one GPU share: start-up alone (imports and a CUDA context),
    then quickstart ``train`` runs without tracking, then with one shared MLflow SQLite store. Each
    against one process alone: equal walls mean they overlap fully, ``copies`` times the wall none."""
    start_up = ("import torch, vit_search.train, mlflow, optuna; "
                "torch.zeros(1, device='cuda' if torch.cuda.is_available() else 'cpu')")

    def train(tmp: str, i: int, *tracking: str) -> list[str]:
        return [sys.executable, "-m", "vit_search", "train", str(QUICKSTART), f"--set=seed={i}",
                f"--set=train.epochs={epochs}", f"--checkpoint-dir={tmp}/ckpt-{i}", *tracking]

    kinds = {"start-up": lambda tmp, i: [sys.executable, "-c", start_up],
             "train, untracked": lambda tmp, i: train(tmp, i, "--set=tracking.enabled=false"),
             "train, one MLflow store": train}
    for kind, command in kinds.items():
        said = []
        for n in (1, copies):
            with tempfile.TemporaryDirectory() as tmp:
                env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
                       "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n))}
                if kind == "train, one MLflow store":  # the store made first: its making is not what is measured
                    subprocess.run([sys.executable, "-c", "import mlflow; mlflow.set_experiment('digits-vit')"],
                                   cwd=tmp, env=env, check=True, capture_output=True, timeout=PART_TIMEOUT)
                started = time.perf_counter()
                procs = [subprocess.Popen(command(tmp, i), cwd=tmp, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True) for i in range(n)]
                outs = [proc.communicate(timeout=PART_TIMEOUT) for proc in procs]
                wall = time.perf_counter() - started
                if any(proc.returncode for proc in procs):
                    raise RuntimeError(f"{kind}: {next(err for (_, err), proc in zip(outs, procs) if proc.returncode)[-800:]}")
                training = [float(m.group(1)) for out, _ in outs if (m := re.search(r"([0-9.]+) s training", out))]
                trained = f", training {statistics.median(training):.2f} s median" if training else ""
                said.append(f"{n} at once {wall:.1f} s{trained}")
        print(f"contention, {kind}: {'; '.join(said)}", flush=True)


def storage_latency(commits: int = 200) -> None:
    """How long one SQLite write transaction takes where the suite's stores are (its temporary folder):
    every trial writes dozens (Optuna's reports and attributes, MLflow's metrics), one writer at a time."""
    import sqlite3

    said = []
    for journal, synchronous in (("DELETE", "FULL"), ("WAL", "FULL"), ("WAL", "NORMAL")):
        with tempfile.TemporaryDirectory() as tmp:
            db = sqlite3.connect(f"{tmp}/latency.db", isolation_level=None)
            db.execute(f"PRAGMA journal_mode={journal}")
            db.execute(f"PRAGMA synchronous={synchronous}")
            db.execute("CREATE TABLE t (value INTEGER)")
            started = time.perf_counter()
            for i in range(commits):
                db.execute("BEGIN")
                db.execute("INSERT INTO t VALUES (?)", (i,))
                db.execute("COMMIT")
            said.append(f"{journal.lower()}/{synchronous.lower()} {(time.perf_counter() - started) / commits * 1e3:.2f} ms")
            db.close()
    print(f"SQLite write transaction in {tempfile.gettempdir()}: {', '.join(said)}", flush=True)


def quickstart_study(packed: int, cpu_smoke: bool, jobs: int = 0) -> None:
    """The quickstart study as the README runs it, with ``packed`` trials per GPU: its wall, its
    outcome, and repeated points among its trials (one is enqueued, the others drawn by the seeded
    sampler, ``packed`` at once at the start)."""
    import optuna

    with tempfile.TemporaryDirectory() as tmp:
        extra = ["--set=train.epochs=2", "--n-trials=4"] if cpu_smoke else []
        out, wall = cli(["run", str(QUICKSTART), "--jobs", str(jobs), "--trials-per-gpu", str(packed), *extra], tmp,
                        env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"})
        said = outcome(f"sqlite:///{tmp}/optuna.db")
        points = [tuple(sorted(t.params.items())) for t in
                  optuna.load_study(study_name="digits-vit", storage=f"sqlite:///{tmp}/optuna.db").get_trials()]
        runs = run_tags(tmp)
    best = next((line for line in out.splitlines() if line.startswith("best: ")), "no best trial")
    print(f"vit-search run experiments/digits.yaml --jobs {jobs} --trials-per-gpu {packed}: {wall:.1f} s wall with "
          f"start-up; {said}; {best}; {len(points) - len(set(points))} repeated points of {len(points)}; {runs}",
          flush=True)


def capture_cost(cpu_smoke: bool, repeats: int = 5) -> None:
    """What a quickstart trial pays on the device around its steps, one piece at a time, each a fresh
    model as a new trial's: building it there, its optimizer, one eager step, the step's warm-up and
    capture as ``train()`` makes it (``GraphedStep``), a validation pass; then the capture alone, as
    ``torch.cuda.graph`` does it (a device synchronize and emptied caches first) against
    ``CUDAGraph.capture_begin``/``capture_end`` directly, and one replayed step. Medians of ``repeats``."""
    import torch

    from vit_search.model import build_model
    from vit_search.spec import load_spec
    from vit_search.train import evaluate, param_groups
    from vit_search.train_step import WARMUP_STEPS, EagerStep, GraphedStep, device_learning_rates

    class Plain:  # what EagerStep and evaluate use of an Accelerator, for one process
        device = torch.device("cpu" if cpu_smoke else "cuda")
        num_processes = 1

        def backward(self, loss):
            loss.backward()

        def clip_grad_norm_(self, parameters, norm):
            torch.nn.utils.clip_grad_norm_(parameters, norm)

    accelerator, cuda = Plain(), not cpu_smoke
    device = accelerator.device
    spec = load_spec(QUICKSTART)
    cfg = spec.train
    images = torch.randn(cfg.batch_size, spec.model.in_channels, 16, 16, device=device)
    labels = torch.randint(0, spec.model.num_classes, (cfg.batch_size,), device=device)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    val = [(torch.randn(360, spec.model.in_channels, 16, 16, device=device),
            torch.randint(0, spec.model.num_classes, (360,), device=device))]
    times: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def timed(name: str) -> Iterator[None]:
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize()
        times.setdefault(name, []).append(time.perf_counter() - started)

    for _ in range(repeats):
        with timed("model on the device"):
            model = build_model(spec).to(device)
        with timed("AdamW"):
            optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, fused=cuda,
                                          capturable=cuda)
        if cuda:
            device_learning_rates(optimizer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        with timed("one eager step"):
            EagerStep(model, optimizer, scheduler, criterion, cfg.grad_clip, accelerator)(images, labels)
        with timed("validation pass"):
            evaluate(model, val, accelerator, "val")
        model.train()
        if not cuda:
            continue
        with timed(f"warm-up ({WARMUP_STEPS} steps) and capture"):
            step = GraphedStep(model, optimizer, scheduler, criterion, cfg.grad_clip, images, labels)
        with timed("one replayed step"):
            step(images, labels)
        with timed("synchronize and empty the caches"):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        side = torch.cuda.Stream()  # warmed up once, as the step's own stream is before its capture
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step._step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with timed("capture alone, torch.cuda.graph"):
            with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                step._step()
        graph = torch.cuda.CUDAGraph()
        with timed("capture alone, capture_begin/capture_end"):
            with torch.cuda.stream(side):
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    step._step()
                finally:
                    graph.capture_end()
    print("a quickstart trial's pieces on the device, median of "
          f"{repeats} fresh models: " + "; ".join(f"{name} {statistics.median(values) * 1e3:.1f} ms"
                                                  for name, values in times.items())
          + ("" if cuda else " (on the CPU: no capture)"), flush=True)


def vit_b16(cpu_smoke: bool) -> None:
    """Ours and timm's ViT-B/16, bf16, eager and compiled: img/s and MFU, same steps, same process."""
    import torch

    from vit_search.model import build_model
    from vit_search.model.cost import flop_count
    from vit_search.performance import enable_tf32, peak_tflops

    device = torch.device("cpu" if cpu_smoke else "cuda")
    preset, size, batch, steps = ("vit_ti_16", 32, 4, 2) if cpu_smoke else ("vit_b_16", 224, 256, 30)
    enable_tf32(True)
    models = {"ours": lambda: build_model({"preset": preset, "image_size": size, "in_channels": 3,
                                           "num_classes": 1000})}
    try:
        import timm

        name = "vit_tiny_patch16_224" if cpu_smoke else "vit_base_patch16_224"
        models["timm"] = lambda: timm.create_model(name, pretrained=False, img_size=size, num_classes=1000)
    except ImportError:
        print("timm is not installed: ours only (pip install timm to compare)")
    flops = flop_count(models["ours"]().eval(), torch.zeros(1, 3, size, size))
    peak = peak_tflops(device, "bf16", None)
    for compiled in (False, True):
        rates = {}
        for label, make in models.items():
            rates[label] = _img_per_second(make().to(device), device, batch, size, steps, compiled)
        mfu = {k: f", MFU {3 * flops * v / (peak * 1e12):.1%}" if peak else "" for k, v in rates.items()}
        line = "; ".join(f"{k} {v:,.0f} img/s{mfu[k]}" for k, v in rates.items())
        ratio = f"; ours/timm {rates['ours'] / rates['timm']:.3f}x" if "timm" in rates else ""
        print(f"{preset} bf16 batch {batch} {'compiled' if compiled else 'eager'}: {line}{ratio}", flush=True)


def _img_per_second(model, device, batch: int, size: int, steps: int, compiled: bool) -> float:
    import torch

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    forward = torch.compile(model) if compiled else model
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(forward(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(min(5, steps)):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: checks the script")
    parser.add_argument("--parts", default=DEFAULT_PARTS,
                        help=f"comma-separated parts to run, in this order (default: {DEFAULT_PARTS}; on request: "
                             f"{', '.join(p for p in PARTS if p not in DEFAULT_PARTS.split(','))})")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip")
    parser.add_argument("--layouts", default="1x1,8x1,4x2",
                        help="part 'designs': worker processes x trials packed in each, comma-separated")
    parser.add_argument("--layout-trials", type=int, default=32, help="part 'designs': trials per study")
    parser.add_argument("--study-jobs", type=int, default=0, help="part 'study': --jobs (0: the planned default)")
    parser.add_argument("--study-packed", type=int, default=0, help="part 'study': --trials-per-gpu (0: 8)")
    parser.add_argument("--tmp", help="folder for the studies' stores and checkpoints (default: the system's; "
                                      "/dev/shm takes the disk out of the figures)")
    args = parser.parse_args()
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))} (known: {', '.join(PARTS)})")
    unknown = set(args.skip.split(",")) - set(PARTS) - {""}
    if unknown:
        parser.error(f"--skip: unknown {', '.join(sorted(unknown))} (known: {', '.join(PARTS)})")
    if not re.fullmatch(r"\d+x\d+(,\d+x\d+)*", args.layouts):
        parser.error(f"--layouts {args.layouts}: comma-separated JOBSxPACKED, e.g. 1x1,8x1,4x2")
    if args.layout_trials < 1 or args.study_jobs < 0 or args.study_packed < 0:
        parser.error(f"--layout-trials {args.layout_trials} --study-jobs {args.study_jobs} --study-packed "
                     f"{args.study_packed}: the first at least 1, the others 0 or more")
    if args.tmp and not Path(args.tmp).is_dir():
        parser.error(f"--tmp {args.tmp}: no such folder")
    tempfile.tempdir = args.tmp
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this suite measures a GPU (--cpu-smoke checks the script)")
    print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() and not args.cpu_smoke else 'CPU'}; "
          f"torch {torch.__version__}", flush=True)
    skip = set(args.skip.split(","))
    epochs, seeds, trials, packed = (2, 2, 4, 2) if args.cpu_smoke else (100, 3, 16, 8)
    parts = {
        "tags": graph_tag,
        "trial": lambda: quickstart_trial(epochs, seeds),
        "packing": lambda: packing(trials, 2 if args.cpu_smoke else 20, packed),
        "repeats": lambda: repeats(2 if args.cpu_smoke else 20, packed),
        "study": lambda: quickstart_study(args.study_packed or packed, args.cpu_smoke, args.study_jobs),
        "storage": storage_latency,
        "contention": lambda: contention(2 if args.cpu_smoke else 8, 2 if args.cpu_smoke else 20),
        "designs": lambda: designs(4 if args.cpu_smoke else args.layout_trials, 2 if args.cpu_smoke else 20,
                                   [tuple(int(n) for n in layout.split("x")) for layout in args.layouts.split(",")]),
        "vit": lambda: vit_b16(args.cpu_smoke),
        "capture": lambda: capture_cost(args.cpu_smoke),
    }
    assert set(parts) == set(PARTS), "PARTS names every part"
    failed, suite_started = [], time.perf_counter()
    for name in args.parts.split(","):
        if name in skip:
            continue
        part = parts[name]
        started = time.perf_counter()
        try:
            part()
            print(f"part {name}: {time.perf_counter() - started:.0f} s", flush=True)
        except Exception as err:  # one part's failure leaves the others' figures standing
            failed.append(name)
            print(f"part {name} failed after {time.perf_counter() - started:.0f} s: {type(err).__name__}: {err}",
                  flush=True)
    print(f"suite: {time.perf_counter() - suite_started:.0f} s for the parts {args.parts} (the default parts' target: "
          f"under 300 s on one H100)", flush=True)
    if failed:
        raise SystemExit(f"parts failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
