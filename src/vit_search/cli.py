"""``vit-search``: the command line. Heavy imports happen inside each command, so --help is instant.

Exit codes: 0 success, 1 a failure at run time, 2 a bad input (spec, arguments, plugin).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from .errors import RunFailed, UserError
from .redaction import remember_passwords, scrub
from .registry import KINDS
from .stopping import Terminated, exit_code, jobs_worker, sigterm_interrupts, trials_left_behind

EXIT_BAD_INPUT = 2


class BadInput(UserError):
    """A bad command-line argument: printed as one line, exit code 2, no traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse, refusing in one line as every other bad input is (argparse's own prints the usage first)."""

    def error(self, message: str) -> NoReturn:
        """Exit 2 with what argparse found wrong and where the usage is."""
        self.exit(EXIT_BAD_INPUT, f"error: {scrub(f'{self.prog}: {message}')}; see '{self.prog} --help'\n")


def _say_error(message: object) -> None:
    """``error: MESSAGE`` on stderr, as one line with no password in it, whatever the message repeats
    of the input (a --set, a key with a newline in it, a URL refused), and of a readable length: a
    message that repeats a huge key or value keeps its start (where) and its end (how to fix)."""
    line = scrub(str(message))
    if len(line) > _LONGEST_ERROR:
        line = f"{line[:_LONGEST_ERROR - 400]} [... {len(line) - _LONGEST_ERROR + 5:,} characters ...] {line[-400:]}"
    print(f"error: {line}", file=sys.stderr)


_LONGEST_ERROR = 2000


def _spec_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="YAML spec file")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
        help="override a spec value, e.g. --set model.depth=6 (repeatable)",
    )


def _load(args: argparse.Namespace, check_model: bool = True):
    from .spec import load_spec

    return load_spec(args.spec, args.overrides, check_model=check_model)


def cmd_blocks(args: argparse.Namespace) -> int:
    """List registered blocks, or describe one."""
    from .registry import REGISTRY, RegistryError

    for plugin in args.plugins:  # a spec's `plugins:` entries, as the spec would load them (from here)
        REGISTRY.load_plugin(plugin, Path.cwd())
    if args.name:
        try:
            info = REGISTRY.describe(args.kind, args.name)
        except RegistryError as err:
            if args.plugins:
                raise
            raise BadInput(f"{err.message} (a block of a spec's plugins: add --plugin FILE.py or --plugin MODULE)") from None
        print(f"{info.kind} '{info.name}': {info.summary}")
        dist = REGISTRY.distribution_of(info)
        module = sys.modules.get(info.module)  # a plugin file is imported under a name of ours: its path says more
        origin = module.__file__ if info.module.startswith("vit_search_plugin_") and module else info.module
        print(f"  from {origin}" + (f" (distribution {dist})" if dist else ""))
        if not info.args and not info.accepts_any:
            print("  no arguments")
        for arg in info.args:
            default = "required" if arg.required else f"default {arg.default!r}"
            print(f"  {arg.name}: {arg.type_name} ({default})")
        if info.accepts_any:
            print("  any other key: passed to it unchecked (it takes **kwargs)")
        return 0
    listing = REGISTRY.list(args.kind)
    for kind in KINDS if args.kind is None else (args.kind,):
        print(f"{kind}:")
        for name in listing[kind]:
            print(f"  {name:<12} {REGISTRY.describe(kind, name).summary}")
    return 0


def _load_study_spec(args: argparse.Namespace):
    """The spec, with its search section checked too (a typo fails now, not an hour in)."""
    from .spec import SpecError

    spec = _load(args)
    if spec.search is None:
        raise BadInput(f"{args.spec}: no 'search:' section; add one (see experiments/digits.yaml), "
                       f"or use 'vit-search train' for a single run")
    problems = _space_problems(spec)
    if problems:
        raise SpecError(problems)
    if getattr(args, "command", None) == "run" and not getattr(args, "worker", False):  # once, by the command
        _note_searched_overrides(spec, args.overrides)
    if getattr(args, "n_trials", None) is not None and spec.search.strategy == "supernet":
        raise BadInput("--n-trials: a supernet study's size is search.supernet.n_subnets (subnets scored) and "
                       "search.supernet.finalists (trained); set those instead (--set search.supernet.n_subnets=N)")
    return spec


def _note_searched_overrides(spec, overrides: Sequence[str]) -> None:
    """A note (stderr) for each ``--set`` of a value the search draws: every trial's draw replaces it."""
    from .safe_yaml import clip
    from .search.space import parse_space
    from .spec import parse_override

    dims = parse_space(spec.search.space or {})
    for item in overrides:
        path = tuple(parse_override(item)[0])  # read as the spec read it: valid, as the spec loaded
        searched = next((dim.key for dim in dims if path[:len(dim.path)] == dim.path[:len(path)]), None)
        if searched is not None:
            print(f"note: --set {clip(item)}: {searched} is searched (search.space), so each trial draws its own "
                  f"value over it; to fix it, remove {searched} from search.space", file=sys.stderr)


def _space_problems(spec) -> list[str]:
    """Problems with the search space, one line each; a supernet study's must also share weights."""
    from .search.space import check_space

    supernet = spec.search is not None and spec.search.strategy == "supernet"
    if supernet and spec.model.init is not None:  # else each searched size is said not to fit weights it never takes
        from .search.supernet_space import init_problem

        return [init_problem(spec)]
    problems = check_space(spec)
    if not problems and supernet:
        from .search.supernet_space import check_supernet_space

        problems = check_supernet_space(spec)
    return problems


def _supernet_report(spec) -> list[str]:
    """What a supernet study varies, and its largest and smallest subnets with their sizes."""
    import torch

    from .model import build_vit, count_parameters
    from .search.supernet_space import SupernetSpace, describe_subnet

    space = SupernetSpace.of(spec)
    size = space.size()
    lines = [f"  supernet over {', '.join(d.key for d in space.dims) or 'nothing'} "
             f"({'continuous' if size is None else f'{size:,}'} subnets)"]
    for label, largest in (("largest", True), ("smallest", False)):
        model = space.model(space.extreme(largest))
        with torch.device("meta"):
            parameters = count_parameters(build_vit(model))
        lines.append(f"  {label} subnet: {describe_subnet(model)} ({parameters:,} parameters)")
    return lines


def cmd_validate(args: argparse.Namespace) -> int:
    """Check a spec (search section included) without running anything."""
    from .spec import SpecError

    spec = _load(args)
    problems = _space_problems(spec)
    if problems:
        raise SpecError(problems)
    searched = f", {len(spec.search.space)} searched values" if spec.search else ""
    print(f"{args.spec}: ok ({spec.name}{searched})")
    if spec.search is not None and spec.search.strategy == "supernet":
        print("\n".join(_supernet_report(spec)))
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    """Print the model's per-stage table, parameters and FLOPs."""
    from .model.summary import summarize

    spec = _load(args)
    channels, classes = spec.model.in_channels, spec.model.num_classes
    print(f"{spec.name}: image {spec.model.image_size}, {channels} channel{'s' * (channels != 1)}, "
          f"{classes} class{'es' * (classes != 1)}")
    if spec.model.init is not None:
        from .model.pretrained import init_report

        print(f"weights: {init_report(spec.model)}")
    print(summarize(spec.model).table())
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train one spec (its search section is ignored) and log the run to MLflow."""
    from .checkpoints import CheckpointNotWritten
    from .log_lines import EpochLines, wanted
    from .train import train

    spec = _load(args)
    _prepare_weights(spec)
    # With --resume and no checkpoint to continue, train() says so once nothing can refuse the run any more.
    lines = EpochLines(spec.name, spec.train.epochs) if wanted(args.quiet) else None
    try:  # diverged (TrainingFailed): main() says it, once under a launch
        result = train(spec, resume=args.resume, checkpoint_dir=args.checkpoint_dir, on_epoch=lines,
                       progress=not args.quiet)
    except CheckpointNotWritten as err:  # the folder's last checkpoint is whole: mended there, the run goes on
        raise type(err)(err.what, f"{err.in_place}, then run the same command with --resume to go on from its last "
                                  f"checkpoint", err.in_place) from None
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under `accelerate launch`, one report is enough
        return 0
    if result.already_finished:
        epochs = spec.train.epochs
        print(f"vit-search: --resume: MLflow run {result.run_id} had finished ({epochs} of {epochs} epochs, tested); "
              f"nothing was trained or logged (raise train.epochs to train it on, or run without --resume to train "
              f"afresh)", file=sys.stderr)
    metrics = "  ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
    print(f"{spec.name}: {metrics}  ({result.parameters:,} parameters, {result.train_seconds:.1f} s training)")
    if result.run_id:
        print(f"mlflow run {result.run_id}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Build the decoded cache a spec's data trains from (once per data set and size), and say where it is."""
    from .data.loading import prepare_cache
    from .schema import DataSpec
    from .search.space import parse_space

    spec = _load(args)
    sizes = [spec.data]
    searched = next((d for d in parse_space(spec.search.space) if d.path == ("data", "image_size")), None) \
        if spec.search else None
    if searched is not None and searched.kind == "choice":  # one cache per size the study trains at
        base = spec.data.model_dump(by_alias=True)
        sizes = [DataSpec.model_validate({**base, "image_size": size}) for size in searched.choices]
    elif searched is not None:
        print(f"{spec.name}: data.image_size is searched over a range: only the spec's own size is prepared; the first "
              f"trial at each other size builds its cache")
    for data in sizes:
        cache = prepare_cache(data, spec.seed)
        if cache is None:
            reason = "data.cache is off" if spec.data.cache == "off" else "the set is held as tensors without one"
            print(f"{spec.name}: no decoded cache ({reason})")
            return 0
        count = sum(part.shape[0] for part in cache.parts.values())
        print(f"{spec.name}: decoded cache {cache.folder} ({count:,} images, {cache.nbytes / 2**20:,.1f} MB)")
    return 0


def _prepare_weights(spec) -> None:
    """Download or read ``model.init``'s weights before anything runs: a missing file is one line (exit 2)
    here, not a failed MLflow run or one failed trial after another."""
    if spec.model.init is not None:
        from .errors import WeightsError
        from .model.pretrained import prepare
        from .spec import SpecError

        try:
            prepare(spec.model)
        except WeightsError as err:
            raise SpecError([f"{spec.locate(('model', 'init'))}: model.init: {err}"]) from None


# What to do about an option given an empty value, by option.
_EMPTY = {
    "storage": "give the study's storage (sqlite:///FILE, journal:FILE, postgresql://..., redis://...), or leave "
               "--storage out for search.storage",
    "checkpoint_dir": "name a folder, or leave --checkpoint-dir out for train.checkpoint_dir",
    "export": "name the file to write",
}


def _check_not_empty(args: argparse.Namespace) -> None:
    """Refuse an option given an empty value (an unset shell variable, say), which would otherwise quietly
    mean the option's default (BadInput, exit 2)."""
    for name, fix in _EMPTY.items():
        value = getattr(args, name, None)
        if value is not None and not value.strip():
            raise BadInput(f"--{name.replace('_', '-')} {value!r}: empty; {fix}")


MAX_DRY_RUN = 10_000  # configurations a dry run samples: a look at the space, not a search of it
MAX_TRIALS_AT_ONCE = 64  # --trials-per-gpu: beyond this, a GPU's kernels of the trials queue rather than overlap
MAX_JOBS_PER_CORE = 8  # worker processes --jobs may start per core (a GPU's workers use the host's cores)


def _check_run_numbers(args: argparse.Namespace) -> None:
    """Refuse counts that make no sense before anything is loaded or written (BadInput, exit 2)."""
    if args.jobs < 0:
        raise BadInput(f"--jobs {args.jobs}: must be 0 (--trials-per-gpu workers per GPU, else one per core) or more")
    if args.jobs != 1 and _launched():
        raise BadInput(f"--jobs {args.jobs} starts worker processes of its own; under accelerate launch each trial "
                       f"already spans the launched processes: drop one of the two")
    if args.n_trials is not None and args.n_trials < 1:
        raise BadInput(f"--n-trials {args.n_trials}: must be at least 1 (trials in the whole study)")
    if args.dry_run is not None and not 1 <= args.dry_run <= MAX_DRY_RUN:
        raise BadInput(f"--dry-run {args.dry_run}: must be from 1 to {MAX_DRY_RUN:,} (configurations to sample), "
                       f"or leave N out for 5")
    most = max(MAX_JOBS_PER_CORE * (os.cpu_count() or 1), MAX_JOBS_PER_CORE)
    if args.jobs > most:  # each worker is a process of its own, of hundreds of MB, however few trials
        raise BadInput(f"--jobs {args.jobs}: at most {most} workers on this machine ({MAX_JOBS_PER_CORE} a core); "
                       f"more only contend for it, or use --jobs 0 (one a core, or --trials-per-gpu a GPU)")
    if not 1 <= args.trials_per_gpu <= MAX_TRIALS_AT_ONCE:
        raise BadInput(f"--trials-per-gpu {args.trials_per_gpu}: must be from 1 to {MAX_TRIALS_AT_ONCE} (trials at once "
                       f"in each worker; each holds its model, optimizer and batches)")


def cmd_run(args: argparse.Namespace) -> int:
    """Run the spec's Optuna study (or join it as one more worker); trials are logged to MLflow."""
    _check_run_numbers(args)
    if args.worker and not _wait_for_the_command(args):
        return EXIT_BAD_INPUT  # the command refused the input, and said why
    if args.jobs != 1 and args.dry_run is None:
        plans = _worker_plans(args)
        if len(plans) > 1:
            return _run_jobs(args, plans)
        # One worker (one GPU, or one core): this process is it, and start-up is paid once.
    spec = _load_study_spec(args)
    if args.n_trials is not None:
        spec.search.n_trials = args.n_trials
    if args.dry_run is not None:
        return 0 if _repeats_the_main_process() else _dry_run(spec, args.dry_run)  # under a launch: printed once
    _prepare_weights(spec)
    from .log_lines import wanted
    from .redaction import redact
    from .search.next_steps import next_steps
    from .search.report import all_failed, top_table
    from .search.run import run_search

    _check_supernet_run(spec, args)
    # A --jobs worker draws no bar (its command's terminal would show one per worker, each at its share):
    # it prints a line per trial, as in a log.
    progress, lines = not args.quiet and not args.worker, not args.quiet and (args.worker or wanted(args.quiet))
    if spec.search.strategy == "supernet":
        from .search.supernet import run_supernet_search

        result = run_supernet_search(spec, storage=args.storage, checkpoint_dir=args.checkpoint_dir,
                                     progress=progress, lines=lines, outcome_here=not args.worker)
    else:
        result = run_search(spec, storage=args.storage, trials_at_once=args.trials_per_gpu,
                            checkpoint_dir=args.checkpoint_dir, progress=progress, lines=lines)
    if result.study is None:  # a non-main process under `accelerate launch`: the main one reports
        return 0
    failed = all_failed(result.study, result.trials_run)
    if result.stopped:  # the tracking server went away, the data cannot be read: one line, its trial queued again
        _say_error(result.stopped)
        return result.stopped.exit_code
    if args.worker:  # one of --jobs: the parent prints the study's table
        print(f"worker {jobs_worker()}: {_trials(len(result.trials_run))} in {result.wall_seconds:.1f} s "
              f"({result.train_seconds:.1f} s training: {result.seconds.summary()})")
        return exit_code() if result.interrupted else 1 if failed else 0
    if spec.search.strategy == "supernet":
        from .search.supernet import outcome_lines

        _print_lines(outcome_lines(spec, result.study, result.storage, result.interrupted, said_lines=lines))
    if result.study.get_trials(deepcopy=False) or spec.search.strategy != "supernet":
        print(top_table(result.study))
    if failed and not result.interrupted:
        _say_error(failed)
        return 1
    print(f"this worker: {_trials(len(result.trials_run))} in {result.wall_seconds:.1f} s "
          f"({result.train_seconds:.1f} s training: {result.seconds.summary()}); storage {redact(result.storage)}")
    _print_lines([*(_to_go_on(result.study) if result.interrupted else []),
                  *next_steps(args.spec, args.overrides, args.storage, result.study, spec.tracking.enabled, spec)])
    return exit_code() if result.interrupted else 0


def _check_supernet_run(spec, args: argparse.Namespace) -> None:
    """Refuse what a supernet study cannot run under (BadInput, exit 2), before anything is written."""
    if spec.search.strategy != "supernet":
        return
    if args.trials_per_gpu != 1:
        raise BadInput("--trials-per-gpu: a supernet study trains one model at a time in each worker; drop it")
    if _launched():  # its phases are one process's: the others would wait for a trial that never comes
        raise BadInput(f"{spec.locate(('search', 'strategy'))}: search.strategy supernet trains in one process; "
                       f"run it without accelerate launch (--jobs starts several workers)")


def _to_go_on(study: Any) -> list[str]:
    """The line after a study stopped on request: how to go on, and what waits for it."""
    from optuna.trial import TrialState

    queued = sum(t.state == TrialState.WAITING for t in study.get_trials(deepcopy=False))
    return ["stopped: run the same command to go on" + (f" ({_trials(queued)} queued)" if queued else "")]


def _trials(count: int) -> str:
    return f"{count} trial" + ("" if count == 1 else "s")


def _print_lines(lines: list[str]) -> None:
    """Print ``lines``, if any (none: not an empty line)."""
    if lines:
        print("\n".join(lines))


def _worker_plans(args: argparse.Namespace) -> list:
    """The worker processes ``--jobs`` asks for on this machine (one per GPU, or cores shared out)."""
    import torch

    from .performance import usable_cores
    from .search.jobs import plan_workers

    try:
        return plan_workers(args.jobs, args.trials_per_gpu, torch.cuda.device_count(), usable_cores())
    except ValueError as err:
        raise BadInput(str(err)) from None


def _run_jobs(args: argparse.Namespace, plans: list) -> int:
    """Several worker processes of the study on this machine (cores or GPUs shared out)."""
    from .search.jobs import jobs_exit_code, run_workers
    from .search.next_steps import next_steps
    from .search.report import top_table
    from .search.storage import STORAGE_ENV
    from .search.study import open_study

    checked: dict = {}

    def ready() -> dict[str, Any]:
        """This command's checks, made while the workers import: a bad spec, storage or MLflow store is
        one error line, not one per worker."""
        import optuna

        from .checkpoints import check_writable
        from .search.run import check_packing, checkpoint_root
        from .search.storage import check_server, check_url, study_lock
        from .search.study import storage_url_of

        spec = _load_study_spec(args)
        if args.n_trials is not None:
            spec.search.n_trials = args.n_trials
        # What each worker would refuse, refused here: once, and before the stores are made.
        _check_supernet_run(spec, args)
        check_packing(spec, plans[0].trials_at_once, 1)
        _prepare_weights(spec)
        check_writable(checkpoint_root(spec, args.checkpoint_dir))
        url = storage_url_of(spec, args.storage)  # resolved once: every worker must use the same
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        check_url(url)
        check_server(url)
        if spec.tracking.enabled:
            from .tracking import check_store

            check_store(spec)
        with study_lock(url, spec.search.study_name or spec.name):
            handle = open_study(spec, url)
            if spec.search.strategy != "supernet":  # whose phases make their own runs
                from .search.study_runs import StudyRuns

                StudyRuns(spec, handle)  # a parent run that this MLflow store does not hold: one line here
        checked.update(spec=spec, url=url)
        # The storage and the overrides go to the workers by their standard input, not as arguments: a
        # password in them must not show in `ps`.
        return {"env": {STORAGE_ENV: url}, "overrides": args.overrides}

    arguments = [args.spec, "--worker",
                 *(["--quiet"] if args.quiet else []),
                 *([f"--checkpoint-dir={args.checkpoint_dir}"] if args.checkpoint_dir else [])]
    if args.n_trials is not None:
        arguments.append(f"--n-trials={args.n_trials}")
    codes, interrupted = run_workers(arguments, plans, ready, quiet=args.quiet)
    code, failure = jobs_exit_code(codes, interrupted)
    if code == 2 or not checked:  # every worker refused the input and said why, or a stop before the checks ended
        return code
    spec = checked["spec"]
    study = open_study(spec, checked["url"]).study
    stopped = code in (130, 143)
    if spec.search.strategy == "supernet":  # what phase 2 found: the workers leave it to this command
        from .search.supernet import outcome_lines

        _print_lines(outcome_lines(spec, study, checked["url"], stopped))
    if study.get_trials(deepcopy=False) or spec.search.strategy != "supernet":
        print(top_table(study))
    if failure:
        print(failure, file=sys.stderr)
    # A worker that died leaves the study to the others: its best is still worth the commands.
    _print_lines([*(_to_go_on(study) if stopped else []),
                  *next_steps(args.spec, args.overrides, args.storage, study, spec.tracking.enabled, spec)])
    return code


def _wait_for_the_command(args: argparse.Namespace) -> bool:
    """A worker of ``--jobs``: import what every trial needs while the command that started it checks
    the spec and makes the stores, then take its word (the storage, by environment, and the ``--set``
    overrides); False when it sent none (it refused the input, and said why)."""
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    import torch
    import torch._dynamo  # noqa: F401  (the first backward imports it: 1-2 s)

    from .search import run  # noqa: F401  (Optuna, Accelerate, our training)
    from .search.jobs import wait_for_the_command

    if torch.cuda.is_available():  # the worker's CUDA context, made meanwhile too
        torch.empty(1, device="cuda")
    word = wait_for_the_command()
    if word is None:
        return False
    os.environ.update(word.get("env", {}))
    args.overrides = [*args.overrides, *word.get("overrides", [])]
    remember_passwords([*word.get("env", {}).values(), *args.overrides])  # as main() did with its own
    return True


def _export(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (beside it, then renamed): a full disk or a
    kill mid-write leaves the file as it was. Anything that cannot be written is one line, exit 2."""
    if path.exists() and not (path.is_file() or path.is_dir()):  # renamed over, /dev/full would become this file
        raise BadInput(f"--export {path}: not a regular file (a device, a pipe or a socket); name a file to write")
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_text(text)
        os.replace(partial, path)
    except OSError as err:
        with contextlib.suppress(OSError):  # a folder that is a file, or none: there is no partial file
            partial.unlink(missing_ok=True)
        raise BadInput(f"--export {path}: cannot write it ({err.strerror or err}); name a file in a folder that "
                       f"exists and can be written") from None


def _dry_run(spec, count: int) -> int:
    """Sample ``count`` configurations in memory and print their sizes; nothing is trained or written."""
    import optuna

    from .model.cost import model_cost
    from .search.run import check_constraints
    from .search.study import make_sampler, sample_spec
    from .spec import SpecError

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    supernet = spec.search.strategy == "supernet"
    if supernet:  # what phase 2 draws; phase 1 (training the supernet) has nothing to sample
        print(f"supernet study: the first {count} subnets phase 2 would draw and score with inherited weights "
              f"(it scores search.supernet.n_subnets: {spec.search.supernet.n_subnets}); nothing is trained or written")
    # In memory, with the study's own sampler: the first points a fresh study would draw.
    study = optuna.create_study(sampler=make_sampler(spec))
    for _ in range(count):
        trial = study.ask()
        try:
            trial_spec, drawn = sample_spec(spec, trial)
        except SpecError as err:  # located in no file (the drawn spec has none): the problem and the values
            problem = err.problems[0].removeprefix("<spec>: ")
            drawn_values = ", ".join(f"{k}={v}" for k, v in trial.params.items())
            print(f"trial {trial.number}: infeasible: {problem}  [{drawn_values}]")
            continue
        parameters, flops = model_cost(trial_spec.model)
        reason = check_constraints(spec.search.constraints, parameters, flops)
        values = ", ".join(f"{k}={v}" for k, v in drawn.items())
        if supernet:
            from .search.supernet_space import describe_subnet

            values = describe_subnet(trial_spec.model)  # the subnet itself: per-layer values beyond depth are unused
        print(f"{'subnet' if supernet else 'trial'} {trial.number}: {parameters:,} parameters, "
              f"{flops / 1e6:,.1f} MFLOPs{'  PRUNED: ' + reason if reason else ''}  [{values}]")
    return 0


def cmd_best(args: argparse.Namespace) -> int:
    """Print the study's best trial; --export writes it as a plain spec for `vit-search train`."""
    import optuna

    from .search.fixed import SHARED_VALUES
    from .search.next_steps import study_command
    from .search.report import best_spec, best_trials, top_table
    from .search.study import open_study

    if args.top < 1:
        raise BadInput(f"--top {args.top}: must be at least 1 (rows of the top-trials table)")
    spec = _load_study_spec(args)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    handle = open_study(spec, args.storage, create=False)
    study = handle.study
    if not best_trials(study):
        run = study_command("run", args.spec, args.overrides, args.storage)
        if spec.search.strategy == "supernet" and not spec.search.supernet.finalists:
            raise BadInput(f"study '{study.study_name}' trains no subnet on its own (search.supernet.finalists: 0): its "
                           f"scores are in the study '{study.study_name}:subnets' and the parent run's subnets.csv; to "
                           f"train the best 3, run '{run} --set search.supernet.finalists=3'")
        raise BadInput(f"study '{study.study_name}' has no completed trial yet; run '{run}'")
    best = best_spec(spec, study, handle.attr(SHARED_VALUES))  # refused before anything is printed
    if args.export:  # written (or refused) first: a command that fails prints no table
        _export(Path(args.export), best.to_yaml(exclude_search=True))
    print(top_table(study, limit=args.top))
    if args.export:
        print(f"wrote {args.export}: vit-search train {args.export}")
    else:
        print(best.to_yaml(exclude_search=True))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """Start the MLflow UI for the study's tracking store on 127.0.0.1 and print the trials' address."""
    import logging
    import os

    import mlflow

    from .tracking import use_store
    from .ui import choose_port, serve, study_view

    spec = _load(args)
    remote = (os.environ.get("MLFLOW_TRACKING_URI") or spec.tracking.uri or "").startswith(("http://", "https://"))
    # Before the store is touched: a bad or busy port is one line, exit 2, and nothing created.
    port = choose_port(args.port, check_free=not remote)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # not MLflow's note that it made the tables
    use_store(spec)
    view = study_view(spec)  # read-only: the experiment is looked up, not created
    uri = mlflow.get_tracking_uri()
    if remote:  # a tracking server serves its own UI
        from .redaction import redact

        print(f"{redact(uri).rstrip('/')}/{view}")
        return 0
    return serve(uri, port, view)


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    _spec_arguments(parser)
    _storage_argument(parser)
    parser.add_argument("--n-trials", type=int, help="trials in the whole study (overrides search.n_trials)")
    parser.add_argument("--dry-run", nargs="?", type=int, const=5, default=None, metavar="N",
                        help="sample N configurations (default 5), print their sizes, train nothing")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="worker processes on this machine (0: --trials-per-gpu per GPU, else one per core)")
    parser.add_argument("--trials-per-gpu", type=int, default=1, metavar="K",
                        help="train K trials at once: with --jobs 0 on GPUs, K worker processes per GPU; "
                             "otherwise K threads in each worker, each on its own CUDA stream")
    parser.add_argument("--checkpoint-dir", type=os.path.expanduser,  # --checkpoint-dir=~/x: the shell leaves ~ there
                        help="where trials' epoch checkpoints go: DIR/<study>/trial-<n> (default: train.checkpoint_dir, "
                             "else runs/)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    _quiet_argument(parser)


def _storage_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage", help="Optuna storage URL or journal file (overrides $VIT_SEARCH_STORAGE and "
                                          "search.storage; a password is better kept in the environment)")


def _quiet_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars, and no progress lines when stdout is not a terminal")


def _best_arguments(parser: argparse.ArgumentParser) -> None:
    _spec_arguments(parser)
    _storage_argument(parser)
    parser.add_argument("--export", metavar="FILE", help="write the best trial as a plain spec")
    parser.add_argument("--top", type=int, default=5, help="rows of the top-trials table")


def _ui_arguments(parser: argparse.ArgumentParser) -> None:
    _spec_arguments(parser)
    parser.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (0: any free port)")


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    _spec_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="continue from the last epoch checkpoint")
    parser.add_argument("--checkpoint-dir", type=os.path.expanduser,  # --checkpoint-dir=~/x: the shell leaves ~ there
                        help="where epoch checkpoints go (default: train.checkpoint_dir)")
    _quiet_argument(parser)


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], Callable[[argparse.ArgumentParser], None]]] = {
    "blocks": (cmd_blocks, lambda p: (
        p.add_argument("kind", nargs="?", help=f"block kind ({', '.join(KINDS)})"),
        p.add_argument("name", nargs="?", help="block name, to describe its arguments"),
        p.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="FILE.py|MODULE",
                       help="load a plugin as a spec's plugins: list does (repeatable); installed ones load anyway"),
    )),
    "validate": (cmd_validate, _spec_arguments),
    "summary": (cmd_summary, _spec_arguments),
    "train": (cmd_train, _train_arguments),
    "prepare": (cmd_prepare, _spec_arguments),
    "run": (cmd_run, _run_arguments),
    "best": (cmd_best, _best_arguments),
    "ui": (cmd_ui, _ui_arguments),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = _Parser(
        prog="vit-search",
        description="Search Vision Transformer architectures and hyperparameters from YAML specs.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (func, add_arguments) in COMMANDS.items():
        p = sub.add_parser(name, help=(func.__doc__ or "").strip().splitlines()[0])
        add_arguments(p)
        p.set_defaults(func=func)
    return parser


def _leave_process_group(together: bool = True) -> None:
    """Under ``accelerate launch``: leave the process group before exiting, all processes together
    unless the command was stopped (Ctrl-C, SIGTERM reach every process, and each stops by itself: one
    already gone would never reach the barrier).

    Left to interpreter exit, gloo's connection threads are torn down while joinable and abort the
    process ("terminate called without an active exception") after a run that succeeded.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    from accelerate import PartialState

    state = PartialState()
    if together:
        try:
            state.wait_for_everyone()
        except RuntimeError:  # another process has gone (gloo: "Connection reset by peer"), having said why
            pass
    state.destroy_process_group()


# Commands that write nothing and leave nothing open (no MLflow run, no store, no file): the program
# may leave without Python's teardown, which takes about 0.35 s once torch is imported (a fifth of a
# `validate` on 2 cores). None: no command (--help, --version).
_NOTHING_TO_CLOSE = frozenset({"validate", "blocks", "summary", None})


def entry() -> None:
    """The ``vit-search`` program: :func:`main`, then exit with its code; commands that leave
    nothing open skip the interpreter's teardown, as does a run whose packed trials a second
    Ctrl-C left mid-step (their study and MLflow runs already say so)."""
    argv = sys.argv[1:]
    try:
        code = main(argv)
    except BrokenPipeError:  # the reader went away (`vit-search summary | head`): stop as a pipe's writer does
        os._exit(128 + signal.SIGPIPE)  # no flush at exit: it would meet the closed pipe again
    if threading.current_thread() is threading.main_thread():
        # The command is over: a Ctrl-C now (after a study's last trial) leaves at once, not in a traceback.
        signal.signal(signal.SIGINT, lambda signum, frame: os._exit(code))
    if build_parser().parse_known_args(argv)[0].command in _NOTHING_TO_CLOSE or trials_left_behind():
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except OSError:  # a reader that went away (`vit-search blocks | head`): nothing more to say
            pass
        os._exit(code)
    raise SystemExit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    # Before torch is imported: large CPU tensors (a 224 px batch is 38 MB) on transparent huge pages.
    # Fresh ones otherwise cost a page fault per 4 KB, which made float batches from the decoded cache
    # 3x slower to fill than reused ones; torch reads this once. THP_MEM_ALLOC_ENABLE=0 turns it off.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    # Before anything can fail: a password in an argument or the environment is masked in every
    # error line, even one that quotes its URL cut short (at a space or a quote in the password).
    remember_passwords([*(sys.argv[1:] if argv is None else argv),
                        *(os.environ.get(name, "") for name in ("VIT_SEARCH_STORAGE", "MLFLOW_TRACKING_URI"))])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(f"vit-search {__version__}")
        return 0
    if getattr(args, "quiet", False) or not sys.stderr.isatty():
        # MLflow draws a bar for each artifact it fetches (a model.init run's weights), a line per
        # redraw in a log: our --quiet and a log take no bars.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if not getattr(args, "func", None):
        _say_error(f"vit-search: a command is needed ({', '.join(COMMANDS)}); see 'vit-search --help'")
        return EXIT_BAD_INPUT
    from .spec import SpecError

    try:
        _check_not_empty(args)
        if args.command in ("train", "run"):
            from .log_lines import every_seconds

            every_seconds()  # a bad VIT_SEARCH_LOG_SECONDS: refused now, not in each trial's thread
            _quiet_libraries()
        with sigterm_interrupts():  # SIGTERM (a scheduler, `timeout`, `docker stop`) stops as Ctrl-C does
            code = args.func(args)
        _leave_process_group(together=code != exit_code())
        return code
    except SpecError as err:
        if not _repeats_the_main_process():
            for problem in err.problems:
                _say_error(problem)
        return EXIT_BAD_INPUT
    except UserError as err:  # registry, data, weights, storage, arguments
        if not _repeats_the_main_process():
            _say_error(err)
        return EXIT_BAD_INPUT
    except RunFailed as err:  # started, then could not go on: a database gone, a diverged run, a full disk
        if not (_repeats_the_main_process() and type(err).__name__ == "TrainingDiverged"):  # decided together
            _say_error(err)
        return 1
    except KeyboardInterrupt as err:
        if args.command == "ui":  # stopping is how a UI ends, its server started or not
            return 0
        if type(err.__context__).__name__ == "LaunchBroken":  # the launcher's stop, sent to the others once one
            _say_error(err.__context__)  # process died, came as this one failed on it: what happened is the death
            _leave_process_group(together=False)
            return 1
        if not _repeats_the_main_process() and jobs_worker() is None:  # a --jobs command says it once, for all
            again = {"run": "; run the same command to go on",
                     "train": "; run the same command with --resume to go on"}.get(args.command, "")
            print(("terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted") + again, file=sys.stderr)
        _leave_process_group(together=False)
        return exit_code()
    except Exception as err:  # a plugin block failing in training, or a fault of ours: one line, and where
        if isinstance(err, BrokenPipeError) or os.environ.get(TRACEBACK_ENV, "").strip() not in ("", "0"):
            raise  # a reader that went away is entry()'s to end quietly
        if _repeats_the_main_process() and type(err).__name__ == "TrainingStopped":
            return 1  # the main process stopped the run, and says why
        _say_error(f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]} ({_where_raised(err)}); "
                   f"set {TRACEBACK_ENV}=1 to see the traceback")
        return 1


def _quiet_libraries() -> None:
    """Our lines say what a run or a study did: not MLflow's link for each ended run (a study's trials printed
    a pair each on stdout; ``ui`` and ``next:`` lines name the runs), its notes that it made a store's tables
    or an experiment, or Optuna's notes that a study was created or loaded. Warnings and errors still come
    through. Set here, once, before the trials' threads start (os.environ is not changed while they copy it)."""
    import logging

    import optuna  # imported already, by the log lines

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    for name in ("mlflow.store.db.utils", "mlflow.tracking.fluent"):  # tables made; "Creating a new experiment"
        logging.getLogger(name).setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


TRACEBACK_ENV = "VIT_SEARCH_TRACEBACK"


def _where_raised(err: BaseException) -> str:
    """``file:line in function`` of the innermost frame outside the libraries (a plugin's forward, or
    ours), else the innermost frame."""
    import traceback

    frames = traceback.extract_tb(err.__traceback__)
    ours = [f for f in frames if not any(part in f.filename for part in ("site-packages", "dist-packages", "<frozen"))
            and not f.filename.startswith(sys.base_prefix)]
    frame = (ours or frames or [None])[-1]
    return f"at {frame.filename}:{frame.lineno} in {frame.name}" if frame else "no traceback"


def _launched() -> bool:
    """Whether a launcher (``accelerate launch``, torchrun) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _repeats_the_main_process() -> bool:
    """Whether this is one of the extra processes a launcher (``accelerate launch``, torchrun) started on
    this machine: each reads the same spec and gets the same signal, so its bad-input and stop lines would
    repeat the main process's word for word. A failure of its own (``RunFailed``) is still said."""
    return os.environ.get("LOCAL_RANK", "0") != "0"


if __name__ == "__main__":
    entry()
