"""The paths that only a CUDA device takes: the training step captured as a CUDA graph (and its
fallback when capture fails), bf16 under ``mixed_precision: auto``. Skipped without a CUDA device,
as on CI; on a GPU machine ``pytest tests/test_gpu.py`` runs them. ``benchmarks/gpu_suite.py``
measures these paths' speed; these tests check that they train what the eager path trains."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from vit_search.registry import register
from vit_search.spec import load_spec
from vit_search.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device: these tests check the GPU-only paths")

TINY = {
    "name": "gpu",
    "seed": 3,
    "data": {"dataset": "digits", "image_size": 8, "on_device": "yes"},
    "model": {"dim": 32, "depth": 2, "patch_embed": {"type": "conv", "patch_size": 2},
              "attention": {"type": "sdpa", "heads": 2}, "ffn": {"type": "mlp", "ratio": 2}},
    "train": {"epochs": 3, "batch_size": 32, "lr": 3.0e-3, "warmup_epochs": 0.5, "grad_clip": 1.0},
}


@pytest.fixture
def workdir(tmp_path, monkeypatch, sqlite_uri):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    return tmp_path


def tiny_spec(experiment: str, model: dict | None = None, **train_keys):
    return load_spec({**TINY, "tracking": {"experiment": experiment}, "model": {**TINY["model"], **(model or {})},
                      "train": {**TINY["train"], **train_keys}})


def tags(result) -> dict[str, str]:
    return MlflowClient().get_run(result.run_id).data.tags


def test_a_captured_step_trains_as_the_eager_step_does(workdir):
    # fp32 without TF32, so that both paths do the same arithmetic; they may pick other kernels.
    graphed = train(tiny_spec("graphed", mixed_precision="no", tf32=False, cuda_graph=True), progress=False)
    eager = train(tiny_spec("eager", mixed_precision="no", tf32=False, cuda_graph=False), progress=False)
    assert tags(graphed)["cuda_graph"] == "on"
    assert tags(eager)["cuda_graph"] == "off: train.cuda_graph is false"
    # The capture's warm-up steps are undone: each epoch's loss is the eager run's, not three steps ahead.
    for ours, theirs in zip(graphed.history, eager.history, strict=True):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-3)
        assert ours["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-3)
    assert graphed.metrics["val_accuracy"] > 0.4  # chance: 0.1


def test_bf16_under_auto_is_captured_too(workdir):
    result = train(tiny_spec("auto", mixed_precision="auto", epochs=1), progress=False)
    run_tags = tags(result)
    assert run_tags["mixed_precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "no")
    assert run_tags["cuda_graph"] == "on" and result.history[0]["train_loss"] > 0


@register("ffn", "test_host_sync_mlp")
class HostSyncMlp:
    """An MLP whose forward reads a number back to the host: allowed eagerly, not inside a capture."""

    def __new__(cls, dim: int):
        class Mlp(torch.nn.Sequential):
            def forward(self, x):
                if float(x.detach().abs().amax()) > 1e30:  # a host synchronisation on every call
                    raise ValueError("activations blew up")
                return super().forward(x)

        return Mlp(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))


def test_a_step_that_cannot_be_captured_trains_eagerly_and_its_tag_says_why(workdir):
    result = train(tiny_spec("fallback", model={"ffn": {"type": "test_host_sync_mlp"}}, epochs=2), progress=False)
    reason = tags(result)["cuda_graph"]
    assert reason.startswith("off: capture failed: "), reason
    assert len(result.history) == 2 and result.metrics["val_accuracy"] > 0.2
