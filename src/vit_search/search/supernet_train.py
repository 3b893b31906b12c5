"""Phase 1 of a supernet study: the supernet trained by the sandwich rule, through ``train()``.

Each step trains the largest subnet, the smallest and ``random_subnets`` random ones on the same batch,
their gradients added up before one optimizer step (Yu et al., BigNAS / slimmable networks: the
largest and smallest bound the space, so every width in between gets trained). The data, optimizer,
schedule, checkpoints, ``--resume`` and MLflow logging are :func:`~vit_search.train.train`'s own; the
per-epoch validation it logs is the largest subnet's.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..model.elastic import set_subnet
from ..schema import ModelSpec, Spec
from ..spec import load_spec
from .supernet_space import SupernetSpace

MAX_DRAWS = 50  # random draws before a step makes do with fewer random subnets (infeasible spaces)


class SubnetDraw:
    """The subnets of each step: largest, smallest, then random ones seeded by (seed, step), so that a
    resumed run draws what an unbroken one would."""

    def __init__(self, space: SupernetSpace, seed: int, random_subnets: int):
        self.space, self.seed, self.random_subnets = space, seed, random_subnets
        self.largest = space.model(space.extreme(True))
        self.smallest = space.model(space.extreme(False))
        self._cache: dict[str, ModelSpec | None] = {}

    def subnets(self, step: int, runnable: Any) -> list[ModelSpec]:
        """Step ``step``'s subnets; ``runnable(model)`` says whether the supernet can run one."""
        rng = random.Random(f"{self.seed}:{step}")
        chosen = [self.largest, self.smallest]
        for _ in range(MAX_DRAWS):
            if len(chosen) >= 2 + self.random_subnets:
                break
            values = self.space.random(rng)
            key = repr(sorted(values.items()))
            if key not in self._cache:  # a subnet's model section is validated once
                try:
                    model = self.space.model(values)
                    self._cache[key] = model if runnable(model) else None
                except ValueError:
                    self._cache[key] = None
            if self._cache[key] is not None:
                chosen.append(self._cache[key])
        return chosen


class SandwichStep:
    """One optimizer step over several subnets of the same batch (a :data:`~vit_search.train.StepFactory`)."""

    def __init__(self, draw: SubnetDraw, model: Any, optimizer: Any, scheduler: Any, criterion: Any,
                 grad_clip: float | None, accelerator: Any):
        self.draw, self.model, self.optimizer, self.scheduler = draw, model, optimizer, scheduler
        self.criterion, self.grad_clip, self.accelerator = criterion, grad_clip, accelerator
        self.vit = accelerator.unwrap_model(model, keep_torch_compile=False)
        self.micro = 0  # batches since the last optimizer step (gradient accumulation)
        set_subnet(self.vit, draw.largest)  # what evaluation sees until the first step

    def _runnable(self, model: ModelSpec) -> bool:
        try:
            set_subnet(self.vit, model)
            return True
        except ValueError:
            return False

    def __call__(self, images: Tensor, labels: Tensor, sync: bool = True) -> Tensor:
        """Train every subnet of this step on the batch; returns their mean loss (detached)."""
        # The scheduler counts optimizer steps, and is restored on resume: the step's number.
        step = int(self.scheduler.last_epoch) * 1000 + self.micro
        subnets = self.draw.subnets(step, self._runnable)
        total = torch.zeros((), device=images.device)
        for subnet in subnets:
            set_subnet(self.vit, subnet)
            loss = self.criterion(self.model(images), labels)
            self.accelerator.backward(loss)  # gradients add up over the subnets
            total += loss.detach()
        set_subnet(self.vit, self.draw.largest)  # validation after the epoch: the largest subnet
        self.micro += 1
        if sync:
            if self.grad_clip:
                self.accelerator.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.micro = 0
        return total / len(subnets)


def supernet_spec(spec: Spec, space: SupernetSpace) -> Spec:
    """The plain spec phase 1 trains: the model at the supernet's size, ``search.supernet.epochs`` epochs."""
    raw = spec.raw
    raw.pop("search", None)
    raw["model"] = space.model(space.capacity()).model_dump(mode="json", by_alias=True)
    raw.setdefault("train", {})["epochs"] = spec.search.supernet.epochs or spec.train.epochs
    return load_spec(raw, check_model=True)


def train_supernet(spec: Spec, space: SupernetSpace, checkpoint_dir: Path, run_id: str | None,
                   progress: bool = False, stop: Any = None, seconds: Any = None, on_epoch: Any = None) -> Path:
    """Train (or resume) the supernet; returns its checkpoint file, whose ``model`` holds the weights.
    ``on_epoch(epoch, metrics)`` as :func:`~vit_search.train.train` takes it (the epoch lines of logs)."""
    from functools import partial

    from ..checkpoints import CHECKPOINT_FILE, FewerEpochsThanTrained
    from ..errors import CheckpointMismatch, UnreadableCheckpoint
    from ..train import train

    draw = SubnetDraw(space, spec.seed, spec.search.supernet.random_subnets)
    way_out = (f"run with the spec it started with, or give the study a new search.study_name (or delete "
               f"{checkpoint_dir} to train its supernet afresh)")
    phase = supernet_spec(spec, space)
    try:
        train(phase, resume=True, checkpoint_dir=checkpoint_dir, run_id=run_id,
              make_step=partial(SandwichStep, draw), progress=progress, stop=stop,
              tags={"supernet.phase": "1: supernet"}, seconds=seconds, on_epoch=on_epoch)
    except FewerEpochsThanTrained as err:  # said by the key the user set: train() knows phase 1's as train.epochs
        key = "search.supernet.epochs" if spec.search.supernet.epochs else "train.epochs"
        raise CheckpointMismatch(f"the study's supernet, stopped in phase 1, cannot go on under this spec: {key} "
                                 f"{phase.train.epochs} is fewer than the {err.trained} epochs it has trained",
                                 f"set {key} to {err.trained} or more, or {way_out}") from None
    except CheckpointMismatch as err:
        # train's own advice is about `train --resume`, which a study's phase 1 always does; say its way out.
        raise CheckpointMismatch(f"the study's supernet, stopped in phase 1, cannot go on under this spec: "
                                 f"{err.what.removeprefix('--resume: ')}", way_out) from None
    except UnreadableCheckpoint as err:  # `run` has no --resume to leave out: the checkpoint goes, or the study
        raise UnreadableCheckpoint(f"the study's supernet, stopped in phase 1, cannot go on: {err.what}",
                                   f"delete {checkpoint_dir} to train its supernet afresh, or give the study a new "
                                   f"search.study_name") from None
    return checkpoint_dir / CHECKPOINT_FILE
