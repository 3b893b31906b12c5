"""The decoded cache: its content, concurrent and killed builds, changed sources, sharded reading,
and what a run logs about it. Caches go to the session's folder ($VIT_SEARCH_CACHE, conftest.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from vit_search.data import load_data, make_loader
from vit_search.data.cache import cache_root
from vit_search.data.cache_batches import CachedSplit
from vit_search.data.loading import _transform
from vit_search.schema import DataSpec

from conftest import two_process_launch
from test_data import _fake_mnist


def folder_of_images(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    """PNGs of several sizes (so the resize matters) in root/<class>/."""
    rng = np.random.default_rng(seed)
    for c, (name, count) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            h, w = (20, 24) if i % 2 else (31, 13)
            pixels = np.clip(rng.normal(60 + 60 * c, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def folder_spec(root: Path, **kwargs) -> DataSpec:
    kwargs = {"dataset": "imagefolder", "root": str(root), "image_size": 12, "on_device": "no", "num_workers": 0,
              **kwargs}
    return DataSpec(**kwargs)


def cache_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir())


def test_cached_images_equal_the_decoded_and_resized_images_and_batches_equal_the_worker_path(tmp_path):
    images = folder_of_images(tmp_path / "images", {"cat": 9, "dog": 7})
    spec = folder_spec(images, cache=str(tmp_path / "cache"))
    cached = load_data(spec, seed=0)
    assert cached.cache is not None and cached.cache.folder.parent == tmp_path / "cache"
    assert isinstance(cached.train, CachedSplit) and cached.classes == ["cat", "dog"]
    part = cached.cache.parts["train"]
    base = __import__("torchvision").datasets.ImageFolder(str(images))
    decode = _transform((12, 12), scale=False)  # what a DataLoader worker does to each image
    expected = torch.stack([decode(base[i][0]) for i in range(len(base))])
    assert torch.equal(part.read(np.arange(len(base))), expected)
    assert part.labels.tolist() == base.targets
    # Batches from the cache: the worker path's images, normalisation included.
    streamed = load_data(folder_spec(images, cache="off"), seed=0)
    assert cached.mean == pytest.approx(streamed.mean, abs=1e-6) and cached.std == pytest.approx(streamed.std, abs=1e-6)
    for split in ("val", "test"):
        x, y = next(iter(make_loader(getattr(cached, split), 16, shuffle=False, seed=0)))
        wx, wy = next(iter(make_loader(getattr(streamed, split), 16, shuffle=False, seed=0)))
        assert torch.equal(y, wy) and torch.allclose(x, wx, atol=1e-5)


def test_training_batches_cover_the_split_once_per_epoch_in_a_seeded_order(tmp_path):
    data = load_data(folder_spec(folder_of_images(tmp_path / "images", {"a": 10, "b": 10})), seed=0)
    loader = make_loader(data.train, 4, shuffle=True, seed=5, drop_last=True)
    first = [y for _, y in loader]
    assert len(first) == len(data.train) // 4 and all(len(y) == 4 for y in first)
    orders = []
    for epoch in (0, 1, 0):
        loader.set_epoch(epoch)
        orders.append(loader.positions().tolist())
    assert orders[0] == orders[2] != orders[1]
    assert all(len(set(o)) == len(o) == 4 * len(first) and set(o) <= set(range(len(data.train))) for o in orders)


def test_an_abandoned_epoch_stops_its_reader_thread(tmp_path):
    import threading

    data = load_data(folder_spec(folder_of_images(tmp_path / "images", {"a": 12, "b": 12})), seed=0)
    before = threading.active_count()
    iterator = iter(make_loader(data.train, 2, shuffle=True, seed=0))
    next(iterator)
    iterator.close()
    assert threading.active_count() == before


def test_small_image_folders_held_as_tensors_are_filled_from_the_cache(tmp_path):
    images = folder_of_images(tmp_path / "images", {"a": 6, "b": 6})
    held = load_data(folder_spec(images, on_device="auto", cache=str(tmp_path / "cache")), seed=0)
    decoded = load_data(folder_spec(images, on_device="auto", cache="off"), seed=0)
    assert held.on_device and held.cache is not None and decoded.cache is None
    assert torch.allclose(held.train.images, decoded.train.images, atol=1e-6)


def test_torchvision_sets_too_large_for_tensors_are_cached_and_match_the_worker_path(tmp_path):
    _fake_mnist(tmp_path, "MNIST")
    common = dict(dataset="mnist", root=str(tmp_path), image_size=14, num_workers=0, max_on_device_mb=0.01)
    cached = load_data(DataSpec(**common), seed=0)
    streamed = load_data(DataSpec(cache="off", **common), seed=0)
    assert isinstance(cached.test, CachedSplit) and set(cached.cache.parts) == {"train", "test"}
    assert cached.augment.randaugment is False and not cached.on_device
    x, y = next(iter(make_loader(cached.test, 20, shuffle=False, seed=0)))
    wx, wy = next(iter(make_loader(streamed.test, 20, shuffle=False, seed=0)))
    assert torch.equal(y, wy) and torch.allclose(x, wx, atol=1e-5)


BUILD = """
import sys
from vit_search.data import load_data
from vit_search.schema import DataSpec
data = load_data(DataSpec(dataset="imagefolder", root=sys.argv[1], image_size=12, on_device="no", num_workers=0), 0)
print(data.cache.folder)
"""


@pytest.mark.slow
def test_a_run_trains_the_same_weights_with_the_cache_on_or_off(tmp_path, monkeypatch):
    # Decoding without the cache drew from torch's generator: the model started from other weights, so a
    # setting that only says how fast (data.cache may differ between a study's workers) changed the result.
    from vit_search.spec import load_spec
    from vit_search.train import train

    folder_of_images(tmp_path / "images" / "train", {"a": 10, "b": 10})
    folder_of_images(tmp_path / "images" / "val", {"a": 4, "b": 4}, seed=1)
    monkeypatch.setenv("VIT_SEARCH_CACHE", str(tmp_path / "cache"))

    def trained(cache: str) -> dict[str, float]:
        raw = {"name": f"cache-{cache}", "data": {**folder_spec(tmp_path / "images", cache=cache).model_dump(),
                                                  "test_fraction": 0.25},
               "model": {"dim": 16, "depth": 1, "patch_embed": {"type": "conv", "patch_size": 4},
                         "attention": {"type": "sdpa", "heads": 2}},
               "train": {"epochs": 1, "batch_size": 4}, "tracking": {"enabled": False}}
        return train(load_spec(raw), checkpoint_dir=tmp_path / cache, progress=False).metrics

    off, auto = trained("off"), trained("auto")
    assert off == pytest.approx(auto, rel=1e-5)  # the cache's float images match the decoded ones to rounding


def test_concurrent_builders_produce_one_cache(tmp_path):
    images = folder_of_images(tmp_path / "images", {"a": 60, "b": 60})
    env = {**os.environ, "VIT_SEARCH_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", BUILD, str(images)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert len({out.strip() for out, _ in outputs}) == 1
    assert sum("decoding 120 images" in err for _, err in outputs) == 1  # one built, the others read it
    (folder,) = cache_folders(tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir() if ".building-" in p.name]
    assert json.loads((folder / "manifest.json").read_text())["parts"] == {"train": {"count": 120}}


HANG = """
import sys, time
import vit_search.data.cache as cache
decode = cache.decode_dataset
def decode_then_hang(*args, **kwargs):  # a build that gets killed part-way: after writing, before the rename
    decode(*args, **kwargs)
    print("written", flush=True)
    time.sleep(600)
cache.decode_dataset = decode_then_hang
""" + BUILD


def test_a_killed_build_leaves_nothing_complete_and_is_redone(tmp_path):
    images = folder_of_images(tmp_path / "images", {"a": 5, "b": 5})
    env = {**os.environ, "VIT_SEARCH_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-c", HANG, str(images)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "written"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    leftovers = list((tmp_path / "cache").iterdir())
    assert cache_folders(tmp_path / "cache") == [p for p in leftovers if ".building-" in p.name]  # hidden only
    data = load_data(folder_spec(images, cache=str(tmp_path / "cache")), seed=0)
    assert [p.name for p in cache_folders(tmp_path / "cache")] == [data.cache.folder.name]  # the leftover removed
    assert data.cache.parts["train"].read(np.arange(10)).shape == (10, 3, 12, 12)


@pytest.mark.slow
def test_a_builder_that_finds_the_lock_held_says_it_waits_and_builds_when_the_holder_dies(tmp_path):
    images = folder_of_images(tmp_path / "images", {"a": 5, "b": 5})
    env = {**os.environ, "VIT_SEARCH_CACHE": str(tmp_path / "cache")}
    holder = subprocess.Popen([sys.executable, "-c", HANG, str(images)], env=env, stdout=subprocess.PIPE, text=True)
    waiter = None
    try:
        assert holder.stdout.readline().strip() == "written"  # it holds the lock until it dies
        waiter = subprocess.Popen([sys.executable, "-c", BUILD, str(images)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        said = []
        while not said or "waiting for another process to build the decoded cache" not in said[-1]:
            line = waiter.stderr.readline()
            assert line, f"the waiter ended without saying it waits: {''.join(said)[-2000:]}"
            said.append(line)
        assert waiter.poll() is None  # it waits, it does not build beside the holder
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    out, err = waiter.communicate(timeout=300)
    assert waiter.returncode == 0, err[-2000:]
    assert "decoding 10 images" in err  # the holder's half-built folder is not taken for a cache
    (folder,) = cache_folders(tmp_path / "cache")
    assert out.strip() == str(folder) and not [p for p in (tmp_path / "cache").iterdir() if ".building-" in p.name]


def test_a_changed_source_rebuilds_the_cache_in_place(tmp_path):
    images = folder_of_images(tmp_path / "images", {"a": 4, "b": 4})
    spec = folder_spec(images, cache=str(tmp_path / "cache"))
    first = load_data(spec, seed=0).cache
    again = load_data(spec, seed=0).cache
    assert again.folder == first.folder and (first.folder / "manifest.json").stat().st_mtime_ns == \
        (again.folder / "manifest.json").stat().st_mtime_ns  # not rebuilt
    white = np.full((20, 24, 3), 255, dtype=np.uint8)
    Image.fromarray(white).save(images / "a" / "1.png")
    os.utime(images / "a" / "1.png", ns=(time.time_ns(), time.time_ns() + 10**9))
    rebuilt = load_data(spec, seed=0).cache
    assert rebuilt.folder == first.folder and cache_folders(tmp_path / "cache") == [first.folder]
    assert (rebuilt.parts["train"].read(np.array([1])) == 255).all()
    assert load_data(folder_spec(images, cache=str(tmp_path / "cache"), image_size=10), seed=0).cache.folder != \
        first.folder  # another size, another cache


def test_the_default_cache_folder_is_the_environments():
    assert cache_root("auto") == Path(os.environ["VIT_SEARCH_CACHE"])
    assert cache_root("/some/where") == Path("/some/where")


SHARDS = """
import json, sys
import numpy as np, torch
from accelerate import Accelerator
from vit_search.data import load_data, make_loader
from vit_search.schema import DataSpec
accelerator = Accelerator(cpu=True)
spec = DataSpec(dataset="imagefolder", root=sys.argv[1], image_size=12, on_device="no", num_workers=0,
                normalize=False, cache=sys.argv[2])
data = load_data(spec, 0, device=accelerator.device)
loader = make_loader(data.train, 4, shuffle=True, seed=0, drop_last=True, rank=accelerator.process_index,
                     num_processes=accelerator.num_processes)
read = []
for images, labels in loader:
    read.append((images * 255).round().to(torch.uint8))
positions = loader.positions()
expected = data.train.part.read(np.sort(data.train.indices[positions]))
got = torch.cat(read)
same = sorted(map(bytes, expected.flatten(1).numpy())) == sorted(map(bytes, got.flatten(1).numpy()))
with open(f"{sys.argv[3]}/{accelerator.process_index}.json", "w") as f:
    json.dump({"indices": data.train.indices[positions].tolist(), "same": same, "folder": str(data.cache.folder),
               "processes": accelerator.num_processes}, f)
"""


@pytest.mark.slow
def test_two_launched_processes_read_disjoint_shards_of_one_cache(tmp_path):
    images = folder_of_images(tmp_path / "images", {"a": 20, "b": 20})
    script = tmp_path / "shards.py"
    script.write_text(SHARDS)
    (tmp_path / "out").mkdir()
    result = subprocess.run(
        two_process_launch(str(script), str(images), str(tmp_path / "cache"), str(tmp_path / "out")),
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = (json.loads((tmp_path / "out" / f"{rank}.json").read_text()) for rank in (0, 1))
    assert first["processes"] == second["processes"] == 2 and first["folder"] == second["folder"]
    assert first["same"] and second["same"]  # each read its images from the one cache
    assert len(first["indices"]) == len(second["indices"]) > 0
    assert not set(first["indices"]) & set(second["indices"])
    assert len(cache_folders(tmp_path / "cache")) == 1


@pytest.mark.slow
def test_prepare_builds_the_cache_and_a_run_logs_where_it_is(tmp_path, cli_here, sqlite_uri):
    images = folder_of_images(tmp_path / "images", {"a": 12, "b": 12})
    raw = {"name": "cached", "data": {"dataset": "imagefolder", "root": str(images), "image_size": 8,
                                      "on_device": "no", "num_workers": 0, "cache": str(tmp_path / "cache")},
           "model": {"dim": 16, "depth": 1, "patch_embed": {"type": "conv", "patch_size": 4},
                     "attention": {"type": "sdpa", "heads": 2}},
           "train": {"epochs": 1, "batch_size": 4, "warmup_epochs": 0}, "tracking": {"experiment": "cached"}}
    spec_path = tmp_path / "cached.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    env = {"MLFLOW_TRACKING_URI": sqlite_uri}
    prepared = cli_here("prepare", str(spec_path), cwd=tmp_path, env=env)  # in this process: no start-up to pay
    assert prepared.returncode == 0, prepared.stderr
    (folder,) = cache_folders(tmp_path / "cache")
    assert f"decoded cache {folder} (24 images" in prepared.stdout
    trained = cli_here("train", str(spec_path), cwd=tmp_path, env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "decoding" not in trained.stderr  # prepared already
    import mlflow

    mlflow.set_tracking_uri(sqlite_uri)
    (run,) = mlflow.search_runs(experiment_names=["cached"], output_format="list")
    assert run.data.tags["data_cache"] == str(folder) and int(run.data.tags["data_cache_bytes"]) == 24 * 3 * 8 * 8
    assert run.data.tags["data_cache_read"] == "batches"  # on_device: no


def test_prepare_builds_a_cache_for_each_image_size_a_study_searches(tmp_path, cli_here):
    images = folder_of_images(tmp_path / "images", {"a": 4, "b": 4})
    raw = {"name": "sizes", "data": {"dataset": "imagefolder", "root": str(images), "image_size": 8, "on_device": "no",
                                     "num_workers": 0, "cache": str(tmp_path / "cache")},
           "model": {"dim": 16, "depth": 1, "patch_embed": {"type": "conv", "patch_size": 4},
                     "attention": {"type": "sdpa", "heads": 2}},
           "search": {"n_trials": 2, "space": {"data.image_size": {"choice": [8, 12]}}}}
    spec_path = tmp_path / "sizes.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    prepared = cli_here("prepare", str(spec_path), cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    folders = cache_folders(tmp_path / "cache")  # the first trial at 12 px built its own before
    assert [f.name.split("-")[1] for f in folders] == ["12x12", "8x8"] and prepared.stdout.count("decoded cache ") == 2
    raw["search"]["space"] = {"data.image_size": {"int": [8, 16], "step": 4}}
    spec_path.write_text(yaml.safe_dump(raw))
    prepared = cli_here("prepare", str(spec_path), cwd=tmp_path)
    assert "data.image_size is searched over a range: only the spec's own size is prepared" in prepared.stdout


def test_a_cache_folder_that_cannot_be_written_is_one_error_line(tmp_path, cli_here):
    images = folder_of_images(tmp_path / "images", {"a": 3, "b": 3})
    (tmp_path / "file").write_text("not a folder")
    spec_path = tmp_path / "bad.yaml"
    spec_path.write_text(textwrap.dedent(f"""
        name: bad
        data: {{dataset: imagefolder, root: {images}, image_size: 16, on_device: "no", cache: {tmp_path / 'file' / 'x'}}}
    """))
    result = cli_here("prepare", str(spec_path), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot write the decoded cache" in result.stderr.strip().splitlines()[-1]


def test_uint8_crop_and_flip_is_a_window_of_the_mean_padded_image():
    from vit_search.data.augment import random_crop_flip_uint8

    torch.manual_seed(0)
    images = torch.randint(0, 200, (16, 3, 6, 5), dtype=torch.uint8)
    out = random_crop_flip_uint8(images, 2, True, fill=[250, 251, 252])
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    padded[:, :, :2], padded[:, :, -2:], padded[:, :, :, :2], padded[:, :, :, -2:] = [
        torch.tensor([250, 251, 252], dtype=torch.uint8).view(1, 3, 1, 1)] * 4
    flipped = 0
    for image, source in zip(out, padded):
        windows = [source[:, y : y + 6, x : x + 5] for y in range(5) for x in range(5)]
        straight = any(torch.equal(image, w) for w in windows)
        mirrored = any(torch.equal(image.flip(-1), w) for w in windows)
        assert straight or mirrored
        flipped += mirrored and not straight
    assert 0 < flipped < 16


@pytest.mark.parametrize("padding, hflip", [(2, True), (0, True), (3, False)])
def test_fused_crop_flip_and_normalize_equals_the_uint8_crop_then_the_float_conversion(padding, hflip):
    from vit_search.data.augment import random_crop_flip_normalize, random_crop_flip_uint8

    images = torch.randint(0, 256, (16, 3, 7, 9), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    fill, mean, std = [120, 110, 100], torch.tensor([0.47, 0.43, 0.39]), torch.tensor([0.25, 0.24, 0.26])
    scale, shift = 1 / (255 * std), mean / std
    cropped = random_crop_flip_uint8(images, padding, hflip, fill, torch.Generator().manual_seed(7))
    expected = cropped.float() * scale.view(1, 3, 1, 1) - shift.view(1, 3, 1, 1)
    fused = random_crop_flip_normalize(images, padding, hflip, fill, scale, shift, torch.Generator().manual_seed(7))
    assert fused.dtype == torch.float32 and fused.shape == images.shape
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-6)


def test_cached_training_batches_are_randaugmented_as_uint8_by_their_loader(tmp_path):
    images = folder_of_images(tmp_path / "images", {"a": 8, "b": 8})
    data = load_data(folder_spec(images, augment={"randaugment": True, "hflip": True, "randaugment_chunk": 2}), seed=0)
    assert not data.augment.randaugment and not data.augment.hflip  # done by the loader, before the float
    assert data.train.randaugment_chunk == 2 and data.val.randaugment_chunk == 0 and not data.val.hflip
    x, y = next(iter(make_loader(data.train, 4, shuffle=True, seed=0, drop_last=True)))
    assert x.shape == (4, 3, 12, 12) and x.dtype == torch.float32 and torch.isfinite(x).all()


def test_cropped_and_flipped_cached_batches_are_the_same_for_the_same_seed_and_epoch(tmp_path):
    images = folder_of_images(tmp_path / "images", {"a": 8, "b": 8})
    data = load_data(folder_spec(images, augment={"random_crop_padding": 3, "hflip": True}), seed=0)
    loader = make_loader(data.train, 4, shuffle=True, seed=1, drop_last=True)
    first, again = list(loader), list(loader)
    loader.set_epoch(1)
    other = list(loader)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first, again))
    assert not all(torch.equal(a, b) for (a, _), (b, _) in zip(first, other))


@pytest.mark.parametrize("preset, seen", [(None, "1"), ("0", "0")])
def test_the_command_line_puts_large_tensors_on_huge_pages_before_torch_is_imported_unless_told_not_to(preset, seen):
    # torch reads THP_MEM_ALLOC_ENABLE once: what counts is its value when torch is first imported.
    probe = ("import contextlib, io, os, sys\nstate = {}\n"
             "class Watch:\n    def find_spec(self, name, path=None, target=None):\n"
             "        if name == 'torch':\n            state.setdefault('seen', os.environ.get('THP_MEM_ALLOC_ENABLE'))\n"
             "sys.meta_path.insert(0, Watch())\nfrom vit_search.cli import main\n"
             "with contextlib.redirect_stdout(io.StringIO()):\n    main(['summary', 'experiments/digits.yaml'])\n"
             "print(state.get('seen'))")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if preset is not None:
        env["THP_MEM_ALLOC_ENABLE"] = preset
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == seen


def test_a_full_disk_under_the_cache_is_one_line_and_leaves_no_half_built_cache(tmp_path, cli):
    from test_faults import _tmpfs

    # The cache was written through a memory map of a sparse file: out of room, the kernel killed the
    # process with SIGBUS (exit 135) without a word, and the half-built folder kept the disk full.
    disk = next(_tmpfs(tmp_path / "disk", "100k"))
    try:
        images = folder_of_images(tmp_path / "images", {"a": 8, "b": 8})  # 16 x 3 x 64 x 64: 196 KB decoded
        spec_path = tmp_path / "full.yaml"
        spec_path.write_text(yaml.safe_dump({"name": "full", "data": {"dataset": "imagefolder", "root": str(images),
                                                                     "image_size": 64, "cache": str(disk / "c")}}))
        result = cli("prepare", str(spec_path), cwd=tmp_path)
        assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
        assert result.stderr.strip().splitlines()[-1] == (
            f"error: no space left for the decoded cache in {disk / 'c'}; free space, set data.cache to another "
            f"folder, or data.cache: off")
        assert not [p for p in (disk / "c").iterdir() if ".building-" in p.name]  # the room is given back
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_symbolic_link_to_nothing_in_an_image_folder_is_a_data_error_naming_it(tmp_path, cli_here):
    # It was "error: FileNotFoundError ... (at cache.py in fingerprint)", exit 1: a fault of ours, and in a
    # study every trial failed with it, using up n_trials.
    images = folder_of_images(tmp_path / "images", {"a": 3, "b": 3})
    (images / "a" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    spec_path = tmp_path / "linked.yaml"
    spec_path.write_text(yaml.safe_dump({"name": "linked", "data": {"dataset": "imagefolder", "root": str(images),
                                                                   "image_size": 16, "cache": str(tmp_path / "c")}}))
    result = cli_here("prepare", str(spec_path), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (f"error: cannot decode an image: {images / 'a' / 'gone.png'} ([Errno 2] No such "
                                     f"file or directory); remove or replace the files, then run again")
