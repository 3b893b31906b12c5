"""Data loading, splitting, normalisation, batching and augmentation.

torchvision sets are tested with tiny fake copies written in their documented on-disk formats
(no download: there is no network here).
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from vit_search.data import DataError, TensorSplit, load_data, make_loader, stratified_split
from vit_search.data.augment import BatchAugment, random_crop, random_hflip
from vit_search.data.sources import imagefolder_parts
from vit_search.schema import AugmentSpec, DataSpec


def spec(**kwargs) -> DataSpec:
    kwargs.setdefault("num_workers", 0)
    return DataSpec(**kwargs)


@pytest.fixture(scope="module")
def digits():
    return load_data(spec(), seed=0)


# -- splitting --------------------------------------------------------------------------------
def test_stratified_split_is_disjoint_seeded_and_keeps_class_shares():
    labels = np.repeat(np.arange(5), [100, 50, 30, 10, 10])
    kept, held = stratified_split(labels, 0.2, seed=3)
    assert len(held) == 40 and sorted(np.concatenate([kept, held])) == list(range(200))
    assert np.bincount(labels[held]).tolist() == [20, 10, 6, 2, 2]
    again, _ = stratified_split(labels, 0.2, seed=3)
    other, _ = stratified_split(labels, 0.2, seed=4)
    assert np.array_equal(kept, again) and not np.array_equal(kept, other)


def test_stratified_split_falls_back_when_a_class_has_one_image():
    kept, held = stratified_split(np.array([0, 0, 0, 1, 1, 1, 2]), 0.3, seed=0)
    assert len(kept) + len(held) == 7 and len(set(kept) & set(held)) == 0


def test_a_class_of_one_image_is_kept_for_training_and_the_other_classes_stay_stratified():
    # It turned stratification off for every class: a plain shuffle could leave a class out of val.
    labels = np.array([0] * 12 + [1] * 12 + [2] * 12 + [3])
    for seed in range(20):
        kept, held = stratified_split(labels, 0.1, seed=seed)
        assert len(held) == 4 and len(kept) == 33  # as many held out as 0.1 of all 37 says
        assert set(labels[held]) == {0, 1, 2} and 36 in kept  # every class held out; the lone image kept


def test_digits_splits_shapes_and_stratification(digits):
    assert (digits.in_channels, digits.num_classes, digits.on_device) == (1, 10, True)
    assert (len(digits.train), len(digits.val), len(digits.test)) == (1293, 144, 360)
    assert digits.train.images.shape == (1293, 1, 16, 16) and digits.train.images.dtype == torch.float32
    for split, n in ((digits.train, 1293), (digits.test, 360)):
        shares = torch.bincount(split.labels, minlength=10) / n
        assert torch.allclose(shares, torch.full((10,), 0.1), atol=0.01)


def test_digits_split_is_fixed_by_the_seed(digits):
    again = load_data(spec(), seed=0)
    other = load_data(spec(), seed=1)
    assert torch.equal(again.test.images, digits.test.images) and torch.equal(again.train.labels, digits.train.labels)
    assert not torch.equal(other.test.images, digits.test.images)


def test_a_set_made_in_memory_is_made_once_per_process_and_shared_by_the_runs_that_ask_for_it():
    import threading

    first = load_data(spec(image_size=12), seed=3)
    assert load_data(spec(image_size=12), seed=3) is first  # a search's next trial: not made again
    assert load_data(spec(image_size=12), seed=4) is not first
    assert load_data(spec(image_size=10), seed=3).train.images.shape[-1] == 10
    got, ready = [], threading.Barrier(4)

    def packed_trial():  # trials packed into threads start together: one makes it, all share it
        ready.wait()
        got.append(load_data(spec(image_size=14), seed=3))

    threads = [threading.Thread(target=packed_trial) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got) == 4 and all(data is got[0] for data in got)


def test_normalisation_uses_the_training_split_stats(digits):
    x = digits.train.images
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(1), atol=1e-5)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(1), atol=1e-3)
    raw = load_data(spec(normalize=False), seed=0)
    assert raw.mean is None and 0 <= raw.train.images.min() and raw.train.images.max() <= 1
    assert digits.mean[0] == pytest.approx(raw.train.images.mean().item(), abs=1e-5)
    restored = digits.test.images * digits.std[0] + digits.mean[0]
    assert torch.allclose(restored, raw.test.images, atol=1e-5)  # val/test use the train stats too


# -- synthetic --------------------------------------------------------------------------------
def test_synthetic_any_shape_deterministic_and_learnable():
    s = spec(dataset="synthetic", channels=4, num_classes=5, num_samples=600, image_size=[12, 20])
    data = load_data(s, seed=7)
    assert (data.in_channels, data.num_classes) == (4, 5)
    assert data.train.images.shape[1:] == (4, 12, 20) and len(data.train) + len(data.val) + len(data.test) == 600
    assert torch.equal(load_data(s, seed=7).train.images, data.train.images)
    # Nearest class mean, fitted on train, must beat chance (0.2) by far on test.
    x, y = data.train.images.flatten(1), data.train.labels
    centroids = torch.stack([x[y == c].mean(0) for c in range(5)])
    predicted = torch.cdist(data.test.images.flatten(1), centroids).argmin(1)
    assert (predicted == data.test.labels).float().mean() > 0.6


@pytest.mark.parametrize("shape, size", [((3, 1, 8, 8), (16, 16)), ((2, 3, 32, 24), (8, 12)), ((5, 4, 4, 4), (12, 20)),
                                         ((1, 3, 7, 9), (7, 9))])
def test_the_float_resize_is_torchvisions_to_the_last_bit(shape, size):
    from torchvision.transforms.v2 import functional as TF

    from vit_search.data.resize import resize_float

    images = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(resize_float(images, size), TF.resize(images, list(size), antialias=True))


def test_training_on_digits_never_imports_torchvision(tmp_path):
    # torchvision's import takes a process about 1.5 s (see data/resize.py); digits and synthetic data need none of it.
    import subprocess
    import sys

    probe = ("import sys\nfrom vit_search.data import load_data\nfrom vit_search.data.augment import BatchAugment\n"
             "from vit_search.schema import AugmentSpec, DataSpec\n"
             "for name in ('digits', 'synthetic'):\n"
             "    data = load_data(DataSpec(dataset=name, image_size=16), seed=0)\n"
             "    BatchAugment(AugmentSpec(random_crop_padding=1, hflip=True), data.num_classes, 16)(\n"
             "        data.train.images[:8], data.train.labels[:8])\n"
             "print(sorted(m for m in sys.modules if m.startswith('torchvision')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


# -- batching ---------------------------------------------------------------------------------
def test_tensor_split_batches_are_slices_of_one_seeded_order_per_epoch():
    ds = TensorSplit(torch.arange(100.0).view(100, 1, 1, 1), torch.arange(100))
    loader = make_loader(ds, 32, shuffle=True, seed=0)
    batches = list(loader)
    assert [len(b[1]) for b in batches] == [32, 32, 32, 4]
    images, labels = batches[0]
    assert torch.equal(images.view(-1), labels.float())  # images and labels stay paired
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == list(range(100))
    first = [b[1] for b in make_loader(ds, 32, shuffle=True, seed=0)]
    assert all(torch.equal(a, b[1]) for a, b in zip(first, batches))  # same seed, same order
    loader.set_epoch(1)
    assert not torch.equal(next(iter(loader))[1], batches[0][1])  # next epoch, new order
    loader.set_epoch(0)
    assert torch.equal(next(iter(loader))[1], batches[0][1])  # a resumed epoch draws its own order again
    dropped = make_loader(ds, 32, shuffle=True, seed=0, drop_last=True)
    assert len(dropped) == 3 and all(len(b[1]) == 32 for b in dropped)  # training: one shape every step


def test_device_batches_shard_a_split_over_processes_without_overlap(digits):
    shards = [torch.cat([y for _, y in make_loader(digits.val, 64, shuffle=False, seed=0, rank=r, num_processes=2)])
              for r in (0, 1)]
    assert sorted(torch.cat(shards).tolist()) == sorted(digits.val.labels.tolist())  # each sample once
    numbered = TensorSplit(torch.arange(101.0).view(101, 1, 1, 1), torch.arange(101))
    train = [make_loader(numbered, 16, shuffle=True, seed=0, drop_last=True, rank=r, num_processes=2) for r in (0, 1)]
    taken = [torch.cat([y for _, y in t]).tolist() for t in train]
    assert len(train[0]) == len(train[1]) == 3  # the processes step together: 50 each, 3 full batches
    assert not set(taken[0]) & set(taken[1])  # no sample on both


# -- augmentation -----------------------------------------------------------------------------
def test_random_crop_is_a_window_of_the_padded_image():
    images = torch.rand(6, 2, 5, 7)
    out = random_crop(images, 2)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    assert out.shape == images.shape
    for i in range(6):
        assert any(
            torch.equal(out[i], padded[i, :, t : t + 5, left : left + 7]) for t in range(5) for left in range(5)
        )


def test_hflip_flips_some_images_whole():
    torch.manual_seed(0)
    images = torch.rand(64, 3, 4, 4)
    out = random_hflip(images)
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, images)]
    assert all(f or torch.equal(o, i) for f, o, i in zip(flipped, out, images)) and 10 < sum(flipped) < 54


def test_batch_augment_shapes_and_soft_labels():
    torch.manual_seed(0)
    aug = BatchAugment(
        AugmentSpec(random_crop_padding=2, hflip=True, randaugment=True, mixup_alpha=0.2, cutmix_alpha=1.0, randaugment_chunk=8),
        num_classes=10, image_size=16, mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.2],
    )
    assert aug.enabled and aug.soft_labels
    images, labels = aug(torch.randn(20, 3, 16, 16), torch.randint(0, 10, (20,)))
    assert images.shape == (20, 3, 16, 16) and torch.isfinite(images).all()
    assert labels.shape == (20, 10) and labels.dtype == torch.float32
    assert torch.allclose(labels.sum(1), torch.ones(20))


def test_mixup_and_cutmix_both_on_mix_each_batch_by_one_of_the_two():
    torch.manual_seed(0)
    aug = BatchAugment(AugmentSpec(mixup_alpha=1.0, cutmix_alpha=1.0), num_classes=8, image_size=8)
    # Image i is the constant i + 1: MixUp blends whole images (one value, not a whole number), CutMix
    # pastes a box of another image (only the two images' own whole numbers).
    originals = torch.arange(1.0, 9.0).view(8, 1, 1, 1).expand(8, 3, 8, 8).contiguous()
    kinds = []
    for _ in range(40):
        images, _ = aug(originals.clone(), torch.arange(8))
        values = [image.unique() for image in images]
        whole = all(bool((v == v.round()).all()) for v in values)
        if whole and all(len(v) <= 2 for v in values):
            kinds.append("cutmix")
        elif all(len(v) == 1 for v in values) and not whole:
            kinds.append("mixup")
        else:
            kinds.append(f"neither: {values}")
    assert set(kinds) == {"mixup", "cutmix"}, kinds


def test_batch_augment_off_is_identity_and_randaugment_checks_channels():
    aug = BatchAugment(AugmentSpec(), num_classes=3, image_size=8)
    images, labels = torch.rand(4, 5, 8, 8), torch.arange(4)
    assert not aug.enabled and aug(images, labels) == (images, labels)
    with pytest.raises(ValueError, match="1 or 3 image channels"):
        BatchAugment(AugmentSpec(randaugment=True), num_classes=3, image_size=8)(images, labels)
    with pytest.raises(ValueError, match="data.augment.randaugment needs 1 or 3 channels, the data has 4"):
        spec(dataset="synthetic", channels=4, augment={"randaugment": True})  # at the spec: validate says it
    changed = spec(dataset="synthetic", channels=4)
    changed.augment.randaugment = True  # a nested assignment checks the augment section, not data's channels
    with pytest.raises(DataError, match="1 or 3 channels"):
        load_data(changed, seed=0)


def test_validate_refuses_randaugment_on_data_of_other_than_1_or_3_channels_at_its_line(write_spec, cli_here):
    path = write_spec("""
        name: t
        data:
          dataset: synthetic
          channels: 4
          augment: {randaugment: true}
        """)
    said = cli_here("validate", path)
    assert said.returncode == 2 and said.stderr.splitlines() == [
        f"error: {path}:2: data: data.augment.randaugment needs 1 or 3 channels, the data has 4"]


# -- torchvision sets from fake files ---------------------------------------------------------
def _idx(path: Path, array: np.ndarray) -> None:
    """An MNIST idx file: magic 0x08 (uint8) + ndim, big-endian sizes, then the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


def _fake_mnist(root: Path, folder: str, n_train: int = 60, n_test: int = 20) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        arrays[prefix] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[prefix + "_labels"] = (np.arange(n) % 10).astype(np.uint8)
        _idx(root / folder / "raw" / f"{prefix}-images-idx3-ubyte", arrays[prefix])
        _idx(root / folder / "raw" / f"{prefix}-labels-idx1-ubyte", arrays[prefix + "_labels"])
    return arrays


@pytest.mark.parametrize("dataset, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_like_from_raw_idx_files(tmp_path, dataset, folder):
    arrays = _fake_mnist(tmp_path, folder)
    data = load_data(spec(dataset=dataset, root=str(tmp_path), image_size=28, normalize=False, val_fraction=0.2), seed=0)
    assert (data.in_channels, data.num_classes, data.on_device) == (1, 10, True)
    assert (len(data.train), len(data.val), len(data.test)) == (48, 12, 20)  # official test split kept whole
    assert torch.equal((data.test.images[:, 0] * 255).round().byte(), torch.from_numpy(arrays["t10k"]))
    assert set(data.val.labels.tolist()) == set(range(10))  # stratified: 12 val images cover every class


def test_mnist_worker_path_matches_the_tensor_path(tmp_path):
    _fake_mnist(tmp_path, "MNIST")
    common = dict(dataset="mnist", root=str(tmp_path), image_size=14, augment={"randaugment": True})
    held = load_data(spec(**common), seed=0)
    streamed = load_data(spec(on_device="no", cache="off", **common), seed=0)
    assert not streamed.on_device and not isinstance(streamed.test, TensorSplit)
    assert held.augment.randaugment and not streamed.augment.randaugment  # workers ran it per image
    images, labels = next(iter(make_loader(streamed.test, 20, shuffle=False, seed=0)))
    assert images.shape == (20, 1, 14, 14) and torch.equal(labels, held.test.labels)
    # Same pixels up to uint8 rounding of the resize, same training-set normalisation (all 48 sampled).
    assert streamed.mean == pytest.approx(held.mean, abs=0.01) and streamed.std == pytest.approx(held.std, abs=0.01)
    assert torch.allclose(images, held.test.images, atol=0.05)
    train_images, _ = next(iter(make_loader(streamed.train, 8, shuffle=True, seed=0)))
    assert train_images.shape == (8, 1, 14, 14)


def _fake_cifar(root: Path, cls: type, n: int = 10) -> np.ndarray:
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    label_key = "labels" if cls is torchvision.datasets.CIFAR10 else "fine_labels"
    classes = 10 if cls is torchvision.datasets.CIFAR10 else 100
    data = None
    for name, _ in cls.train_list + cls.test_list:
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, label_key: [i % classes for i in range(n)]}, f)
    with open(folder / cls.meta["filename"], "wb") as f:
        pickle.dump({cls.meta["key"]: [f"name{i}" for i in range(classes)]}, f)
    return data  # the test batch, written last


@pytest.mark.parametrize(
    "dataset, cls", [("cifar10", torchvision.datasets.CIFAR10), ("cifar100", torchvision.datasets.CIFAR100)]
)
def test_cifar_from_python_pickles(tmp_path, dataset, cls):
    test_data = _fake_cifar(tmp_path, cls, n=100 if dataset == "cifar100" else 10)
    data = load_data(spec(dataset=dataset, root=str(tmp_path), image_size=32, normalize=False, val_fraction=0.2), seed=0)
    n_train = 100 if dataset == "cifar100" else 50
    assert data.in_channels == 3 and data.num_classes == len(data.classes) == (100 if dataset == "cifar100" else 10)
    assert len(data.train) + len(data.val) == n_train and len(data.test) == len(test_data)
    expected = torch.from_numpy(test_data.reshape(-1, 3, 32, 32))
    assert torch.equal((data.test.images * 255).round().byte(), expected)  # channel-major rows, as documented


def test_non_official_cifar_files_are_said_in_one_warning_line_once_per_process(tmp_path, capsys):
    # It was Python's two-line UserWarning, our source line shown, on every train, prepare and trial.
    _fake_cifar(tmp_path, torchvision.datasets.CIFAR10)
    for seed in (0, 1):  # a study's trials read the set again and again
        load_data(spec(dataset="cifar10", root=str(tmp_path), image_size=8), seed=seed)
    assert capsys.readouterr().err.splitlines() == [
        f"vit-search: warning: {tmp_path / 'cifar-10-batches-py'}: not the official release's files (md5 differs); "
        f"reading them as CIFAR pickles"]


def _repickle(path: Path, **changes) -> None:
    with open(path, "rb") as f:
        entry = pickle.load(f)
    with open(path, "wb") as f:
        pickle.dump({**entry, **changes}, f)


REPLACE = "delete it and download the set again (data.download: true), or put the release's file there"


@pytest.mark.parametrize("labels, said", [
    (list(range(9)), "holds 10 images but 9 labels"),  # every later image paired with another's label
    ([0, 1, 2, 50, 4, -1, 6, 7, 8, 9], "holds 2 labels outside 0 to 9, the classes of cifar10 (the first: 50)"),
    ([0.5] * 10, "its labels are not class numbers (a list of float64 of shape (10,))"),
])
def test_cifar_pickles_whose_labels_do_not_fit_their_images_are_one_data_error_naming_the_file(tmp_path, labels,
                                                                                                said):
    _fake_cifar(tmp_path, torchvision.datasets.CIFAR10)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    _repickle(batch, labels=labels)
    with pytest.raises(DataError) as raised:
        load_data(spec(dataset="cifar10", root=str(tmp_path), image_size=8), seed=0)
    separator = ": " if said.startswith("its") else " "
    assert str(raised.value) == f"cifar10: {batch}{separator}{said}; {REPLACE}"


def test_a_cifar_meta_file_naming_another_number_of_classes_is_one_data_error(tmp_path):
    _fake_cifar(tmp_path, torchvision.datasets.CIFAR10)
    meta = tmp_path / "cifar-10-batches-py" / "batches.meta"
    _repickle(meta, label_names=["cat", "dog"])
    with pytest.raises(DataError) as raised:
        load_data(spec(dataset="cifar10", root=str(tmp_path), image_size=8), seed=0)
    assert str(raised.value) == f"cifar10: {meta} names 2 classes, cifar10 has 10; {REPLACE}"


@pytest.mark.parametrize("spoil, said", [
    (lambda path: path.write_bytes(path.read_bytes()[:100]), "UnpicklingError: pickle data was truncated"),
    (lambda path: _repickle(path, data=None), "TypeError: int() argument must be a string"),
])
def test_a_damaged_cifar_file_is_named_itself_not_its_folder(tmp_path, spoil, said):
    _fake_cifar(tmp_path, torchvision.datasets.CIFAR10)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    spoil(batch)
    with pytest.raises(DataError) as raised:
        load_data(spec(dataset="cifar10", root=str(tmp_path), image_size=8), seed=0)
    assert str(raised.value).startswith(f"cifar10: cannot read {batch} ({said}")
    assert str(raised.value).endswith(f"); {REPLACE}")


def test_torchvision_sets_live_in_vit_search_data_else_in_the_home_cache(tmp_path, monkeypatch):
    from vit_search.data.sources import default_root

    monkeypatch.setenv("VIT_SEARCH_DATA", str(tmp_path / "sets"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_root() == tmp_path / "sets"
    arrays = _fake_mnist(tmp_path / "sets", "MNIST")  # data.root unset: read from $VIT_SEARCH_DATA
    data = load_data(spec(dataset="mnist", image_size=28, normalize=False), seed=0)
    assert torch.equal((data.test.images[:, 0] * 255).round().byte(), torch.from_numpy(arrays["t10k"]))
    monkeypatch.delenv("VIT_SEARCH_DATA")
    home_cache = tmp_path / "home" / ".cache" / "vit-search" / "data"
    assert default_root() == home_cache
    with pytest.raises(DataError) as err:  # the files in $VIT_SEARCH_DATA are no longer where it looks
        load_data(spec(dataset="mnist"), seed=0)
    assert f"data files not found in {home_cache / 'MNIST' / 'raw'} " in str(err.value)


@pytest.mark.parametrize("dataset, expected", [("mnist", "MNIST/raw"), ("cifar10", "cifar-10-batches-py")])
def test_missing_files_error_names_the_expected_place(tmp_path, dataset, expected):
    with pytest.raises(DataError) as err:
        load_data(spec(dataset=dataset, root=str(tmp_path)), seed=0)
    message = str(err.value)
    assert str(tmp_path / expected) in message and "data.download: true" in message and "\n" not in message


def test_failed_download_is_a_data_error(tmp_path, monkeypatch):
    def offline(self):
        raise URLError("no network")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    with pytest.raises(DataError, match="could not download.*no network"):
        load_data(spec(dataset="mnist", root=str(tmp_path), download=True), seed=0)


def test_a_failed_download_says_torchvisions_reason_from_the_lines_after_its_first(tmp_path, monkeypatch):
    def failing(self):  # torchvision's own wording: the reason is on the lines after the first
        Path(self.raw_folder).mkdir(parents=True, exist_ok=True)  # as torchvision's download does first
        (Path(self.raw_folder) / "train-images-idx3-ubyte.gz").write_bytes(b"part")
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://example/x, got:\n"
                           "<urlopen error [Errno -3] Temporary failure in name resolution>\n")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", failing)
    with pytest.raises(DataError) as raised:
        load_data(spec(dataset="mnist", root=str(tmp_path / "dl"), download=True), seed=0)
    assert "Temporary failure in name resolution" in str(raised.value) and "\n" not in str(raised.value)
    assert list(tmp_path.iterdir()) == []  # the folders made for the download are gone with it


def test_unreadable_data_files_name_the_reason_even_when_the_error_has_no_text(tmp_path, monkeypatch):
    from vit_search.data import sources

    _fake_cifar(tmp_path, torchvision.datasets.CIFAR10)

    def empty_error(*args):
        raise EOFError()

    monkeypatch.setattr(sources, "_unpickle", empty_error)
    with pytest.raises(DataError, match=r"cannot read .*cifar-10-batches-py/data_batch_1 \(EOFError\); delete it"):
        load_data(spec(dataset="cifar10", root=str(tmp_path)), seed=0)


@pytest.mark.parametrize("spoil, said", [
    ("cut", "its header says 20 x 28 x 28 = 15,680 bytes follow, 15,580 do: cut short or padded"),
    ("empty", "not an idx file of 3-dimensional bytes (it starts empty, not 00000803)"),
    ("labels", "not an idx file of 3-dimensional bytes (it starts 00000801, not 00000803)"),
])
def test_a_damaged_mnist_file_is_named_with_what_is_wrong_with_it(tmp_path, spoil, said):
    # It was the folder, with "(AssertionError)" or "(ValueError: torchvision did not accept them)".
    _fake_mnist(tmp_path, "MNIST")
    raw = tmp_path / "MNIST" / "raw"
    images = raw / "t10k-images-idx3-ubyte"
    if spoil == "cut":
        images.write_bytes(images.read_bytes()[:-100])
    elif spoil == "empty":
        images.write_bytes(b"")
    else:  # the labels file where the images should be
        images.write_bytes((raw / "t10k-labels-idx1-ubyte").read_bytes())
    with pytest.raises(DataError) as raised:
        load_data(spec(dataset="mnist", root=str(tmp_path)), seed=0)
    assert str(raised.value) == f"mnist: cannot read {images} (ValueError: {said}); {REPLACE}"


def test_mnist_labels_that_do_not_fit_the_images_are_one_data_error_naming_the_file(tmp_path):
    _fake_mnist(tmp_path, "FashionMNIST")
    labels = tmp_path / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte"
    _idx(labels, np.arange(50, dtype=np.uint8) % 10)  # 60 images
    with pytest.raises(DataError) as raised:
        load_data(spec(dataset="fashion_mnist", root=str(tmp_path)), seed=0)
    assert str(raised.value) == (f"fashion_mnist: {labels} holds 50 labels but {labels.parent / 'train-images-idx3-ubyte'} "
                                 f"holds 60 images; delete them and download the set again (data.download: true), "
                                 f"or put the release's files there")
    _idx(labels, np.where(np.arange(60) % 7 == 0, 12, 1).astype(np.uint8))
    with pytest.raises(DataError) as raised:
        load_data(spec(dataset="fashion_mnist", root=str(tmp_path)), seed=0)
    assert str(raised.value) == (f"fashion_mnist: {labels} holds 9 labels outside 0 to 9, the classes of fashion_mnist "
                                 f"(the first: 12); {REPLACE}")


# -- image folders ----------------------------------------------------------------------------
def _pngs(folder: Path, classes: dict[str, int], size=(10, 6)) -> None:
    rng = np.random.default_rng(0)
    for c, (name, count) in enumerate(classes.items()):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = np.clip(rng.normal(60 + 60 * c, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i}.png")


def test_imagefolder_split_from_one_folder(tmp_path):
    _pngs(tmp_path, {"cat": 10, "dog": 10})
    data = load_data(spec(dataset="imagefolder", root=str(tmp_path), image_size=8), seed=0)
    assert data.on_device and data.classes == ["cat", "dog"] and (data.in_channels, data.num_classes) == (3, 2)
    assert (len(data.train), len(data.val), len(data.test)) == (14, 2, 4)
    assert data.train.images.shape == (14, 3, 8, 8)
    assert torch.bincount(data.test.labels).tolist() == [2, 2]


def test_imagefolder_train_val_folders_and_worker_path(tmp_path):
    _pngs(tmp_path / "train", {"a": 6, "b": 6, "c": 6})
    _pngs(tmp_path / "val", {"b": 2, "c": 3})  # a val folder may lack a class: indices follow train's
    common = dict(dataset="imagefolder", root=str(tmp_path), image_size=[8, 6], num_workers=2)
    held = load_data(spec(**common), seed=0)
    streamed = load_data(spec(on_device="no", cache="off", **common), seed=0)
    assert len(held.val) == 5 and held.val.labels.tolist() == [1, 1, 2, 2, 2]
    assert len(held.train) + len(held.test) == 18 and len(held.test) == 4  # test carved from train
    loader = make_loader(streamed.val, 5, shuffle=False, seed=0, num_workers=2)
    images, labels = next(iter(loader))
    assert images.shape == (5, 3, 8, 6) and labels.tolist() == [1, 1, 2, 2, 2]
    assert streamed.mean == pytest.approx(held.mean, abs=1e-4)  # all 14 training images sampled
    assert torch.allclose(images, held.val.images, atol=1e-4)  # same decode, resize and normalisation


def _spoil(folder: Path) -> list[Path]:
    """One file that is no image and one cut short, among good ones."""
    (folder / "dog" / "notes.png").write_bytes(b"not an image")
    good = (folder / "cat" / "0.png").read_bytes()
    (folder / "cat" / "cut.png").write_bytes(good[: len(good) // 2])
    return [folder / "cat" / "cut.png", folder / "dog" / "notes.png"]


def test_images_that_cannot_be_decoded_are_all_named_in_one_line_and_no_cache_is_left(tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_SEARCH_CACHE", str(tmp_path / "cache"))
    _pngs(tmp_path / "images", {"cat": 6, "dog": 6})
    cut, notes = _spoil(tmp_path / "images")
    with pytest.raises(DataError) as caught:
        load_data(spec(dataset="imagefolder", root=str(tmp_path / "images"), image_size=8), seed=0)
    (line,) = str(caught.value).splitlines()
    assert line == (f"cannot decode 2 images: {cut} (image file is truncated); {notes} (cannot identify image file); "
                    f"remove or replace the files, then run again")
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []
    first = cut.rename(cut.with_name("!cut.png"))  # the folder's first image: it alone was named
    with pytest.raises(DataError) as caught:
        load_data(spec(dataset="imagefolder", root=str(tmp_path / "images"), image_size=8), seed=0)
    assert str(caught.value).startswith(f"cannot decode 2 images: {first} (image file is truncated); {notes} (")


def _png_header(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width`` x ``height`` RGB pixels (its one IDAT chunk is empty)."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def test_past_three_images_that_cannot_be_decoded_the_line_says_how_many_more_and_a_decompression_bomb_is_one(
        tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_SEARCH_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "images"
    _pngs(folder, {"cat": 6, "dog": 6})
    bomb = folder / "cat" / "bomb.png"
    bomb.write_bytes(_png_header(100_000, 100_000))  # 1e10 pixels: past PIL's limit, whatever the file's size
    with pytest.raises(Image.DecompressionBombError) as pil:
        Image.open(bomb)
    cut, notes = _spoil(folder)
    (folder / "dog" / "empty.png").write_bytes(b"")
    (folder / "dog" / "text.png").write_text("hello")
    with pytest.raises(DataError) as caught:
        load_data(spec(dataset="imagefolder", root=str(folder), image_size=8), seed=0)
    (line,) = str(caught.value).splitlines()
    # In the folder's order: cat/bomb, cat/cut, dog/empty; then dog/notes and dog/text are counted, not named.
    assert line == (f"cannot decode 5 images: {bomb} ({pil.value}); {cut} (image file is truncated); "
                    f"{folder / 'dog' / 'empty.png'} (cannot identify image file) and 2 more; "
                    f"remove or replace the files, then run again")
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def test_an_image_that_cannot_be_decoded_in_a_dataloader_worker_is_one_line_naming_it(tmp_path):
    _pngs(tmp_path, {"cat": 6, "dog": 6})
    cut, _ = _spoil(tmp_path)
    streamed = load_data(spec(dataset="imagefolder", root=str(tmp_path), image_size=8, on_device="no", cache="off",
                              normalize=False), seed=0)
    with pytest.raises(DataError) as caught:  # raised in a worker process, raised again here
        for split in (streamed.train, streamed.val, streamed.test):
            list(make_loader(split, 64, shuffle=False, seed=0, num_workers=1))
    (line,) = str(caught.value).splitlines()
    assert line.startswith("cannot decode an image: ") and line.endswith("; remove or replace the files, then run again")
    assert f"{cut} (image file is truncated)" in line or "notes.png (cannot identify image file)" in line


@pytest.mark.parametrize("link", ["loop", "val_to_train"])
def test_a_folder_reached_twice_through_a_symbolic_link_is_one_data_error(tmp_path, link):
    _pngs(tmp_path / "train", {"a": 3, "b": 3})
    if link == "loop":  # ImageFolder follows it down until the path is too long: the set multiplied
        (tmp_path / "train" / "a" / "again").symlink_to(tmp_path / "train")
        twice = tmp_path / "train" / "a" / "again" / "a"
    else:  # the test set would be training images
        (tmp_path / "val").mkdir()
        (tmp_path / "val" / "b").symlink_to(tmp_path / "train" / "b")
        twice = tmp_path / "val" / "b"
    with pytest.raises(DataError) as raised:
        load_data(spec(dataset="imagefolder", root=str(tmp_path), image_size=8), seed=0)
    said = str(raised.value)
    assert said.startswith(f"imagefolder: {twice} is {tmp_path / 'train' / twice.name} again, through a symbolic link")
    assert said.endswith("remove the link, or make it point outside data.root")


def test_16_bit_and_float_images_are_scaled_to_8_bits_not_clipped(tmp_path):
    from vit_search.data.sources import read_rgb

    gradient = np.arange(0, 256, 4, dtype=np.uint8).reshape(8, 8)
    Image.fromarray(gradient).save(tmp_path / "eight.png")
    Image.fromarray(gradient.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    Image.fromarray(gradient.astype(np.float32) / 255).save(tmp_path / "float.tiff")
    assert [Image.open(tmp_path / name).mode for name in ("sixteen.png", "float.tiff")] == ["I;16", "F"]
    # The same picture in 8 bits, 16 bits and floats: one decode, the gradient kept (not all white, not all black).
    decoded = [np.asarray(read_rgb(str(tmp_path / name))) for name in ("eight.png", "sixteen.png", "float.tiff")]
    assert all(np.array_equal(image, np.stack([gradient] * 3, axis=-1)) for image in decoded)
    _pngs(tmp_path / "set", {"a": 2, "b": 2})
    parts, _, _ = imagefolder_parts(spec(dataset="imagefolder", root=str(tmp_path / "set"), image_size=8), seed=0)
    assert parts["train"].loader is read_rgb


def test_a_float_image_outside_0_to_1_is_named_as_undecodable(tmp_path):
    _pngs(tmp_path, {"a": 2, "b": 2})
    Image.fromarray(np.full((6, 10), 3.5, dtype=np.float32)).save(tmp_path / "b" / "hdr.tiff")
    with pytest.raises(DataError, match=r"cannot decode an image: .*hdr\.tiff \(float pixels from 3\.5 to 3\.5, not "
                                        r"within 0 to 1; save it as an 8- or 16-bit image"):
        load_data(spec(dataset="imagefolder", root=str(tmp_path), image_size=8), seed=0)


def test_imagefolder_rejects_unknown_val_classes(tmp_path):
    _pngs(tmp_path / "train", {"a": 3, "b": 3})
    _pngs(tmp_path / "val", {"zebra": 1})
    with pytest.raises(DataError, match="zebra"):
        load_data(spec(dataset="imagefolder", root=str(tmp_path), image_size=8), seed=0)


def _empty_split(root: Path, split: str) -> str:
    return (f"data.root '{root}': {split}/ holds no images in class folders ({split}/<class>/<image>), so its split "
            f"would be empty; put the {split} images in its class folders, or remove {split}/ to hold out "
            f"data.{split}_fraction of train instead")


@pytest.mark.parametrize("split", ["val", "test"])
@pytest.mark.parametrize("holds", ["a class folder of text", "loose images"])
def test_an_empty_val_or_test_folder_is_an_error_at_data_not_a_split_that_scores_zero(tmp_path, write_spec, split,
                                                                                      holds):
    from vit_search.spec import SpecError, load_spec

    # It trained, and logged val_accuracy 0.0000 and val_loss 0.0000 as the run's metrics: a search optimised a constant.
    # ImageFolder reads a split's class folders only: images straight in val/ made a split of none as well.
    _pngs(tmp_path / "train", {"a": 3, "b": 3})
    if holds == "loose images":
        _pngs(tmp_path, {split: 2})
    else:
        (tmp_path / split / "a").mkdir(parents=True)
        (tmp_path / split / "a" / "readme.txt").write_text("no image")
    path = write_spec(f"name: t\nseed: 0\ndata: {{dataset: imagefolder, root: {tmp_path}, image_size: 16}}\n")
    with pytest.raises(SpecError) as raised:
        load_spec(path)
    assert raised.value.problems == [f"{path}:3: data: {_empty_split(tmp_path, split)}"]


def test_a_val_folder_emptied_of_class_folders_after_validation_is_one_data_error(tmp_path):
    _pngs(tmp_path / "train", {"a": 3, "b": 3})
    _pngs(tmp_path / "val", {"a": 2})
    validated = spec(dataset="imagefolder", root=str(tmp_path), image_size=8)
    for image in (tmp_path / "val" / "a").iterdir():
        image.rename(tmp_path / "val" / image.name)  # loose in val/: ImageFolder reads none of them
    with pytest.raises(DataError) as raised:
        imagefolder_parts(validated, seed=0)
    assert str(raised.value) == f"imagefolder: {_empty_split(tmp_path, 'val')}"


@pytest.mark.parametrize("layout", ["wrapper", "train"])
def test_an_imagefolder_of_one_class_folder_is_refused_at_data_naming_it(tmp_path, write_spec, layout):
    from vit_search.spec import SpecError, load_spec

    # data.root one folder too high made one class of every image: it trained to a perfect, meaningless 1.0000.
    if layout == "wrapper":
        _pngs(tmp_path / "images", {"cat": 2, "dog": 2})
        said = (f"data.root '{tmp_path}' holds one class folder only, 'images/', and a classifier needs at least 2: "
                f"data.root should be the folder that holds the class folders (is it '{tmp_path / 'images'}'?)")
    else:
        _pngs(tmp_path / "train", {"cat": 4})
        said = (f"data.root '{tmp_path}': train/ holds one class folder only, 'cat/'; a classifier needs at least 2: "
                f"put each class's images in a folder of its own under train/")
    path = write_spec(f"name: t\ndata: {{dataset: imagefolder, root: {tmp_path}, image_size: 16}}\n", name="s.yaml")
    with pytest.raises(SpecError) as raised:
        load_spec(path)
    assert raised.value.problems == [f"{path}:2: data: {said}"]


def test_an_imagefolder_root_without_class_folders_is_an_error_at_data(tmp_path, write_spec):
    from vit_search.spec import SpecError, load_spec

    flat = tmp_path / "flat"
    _pngs(tmp_path, {"flat": 3})  # images straight in the root: no class folder holds them
    path = write_spec(f"name: t\nseed: 0\ndata: {{dataset: imagefolder, root: {flat}, image_size: 16}}\n")
    with pytest.raises(SpecError) as raised:
        load_spec(path)
    assert raised.value.problems == [f"{path}:3: data: data.root '{flat}' has no class folders; "
                                     f"imagefolder expects root/<class>/<image>"]
    _pngs(flat, {"cat": 2, "dog": 2})
    assert load_spec(path).model.num_classes == 2  # with class folders the same spec loads
    for root, says in ((tmp_path / "absent", "does not exist"), (flat / "cat" / "0.png", "is not a folder")):
        with pytest.raises(SpecError) as raised:
            load_spec(write_spec(f"name: t\ndata: {{dataset: imagefolder, root: {root}}}\n"))
        assert raised.value.problems[0].endswith(f"data: data.root '{root}' {says}; imagefolder expects "
                                                 f"root/<class>/<image>")


def test_a_class_folder_without_images_is_refused_at_data_before_anything_runs(tmp_path, write_spec):
    from vit_search.spec import SpecError, load_spec

    _pngs(tmp_path, {"cat": 2, "dog": 2})
    (tmp_path / "owl").mkdir()
    (tmp_path / "owl" / "notes.txt").write_text("no image here")
    path = write_spec(f"name: t\ndata: {{dataset: imagefolder, root: {tmp_path}, image_size: 16}}\n")
    with pytest.raises(SpecError) as raised:
        load_spec(path)
    [problem] = raised.value.problems
    assert problem.startswith(f"{path}:2: data: class folder(s) owl under data.root '{tmp_path}' hold no images (.jpg")
    assert problem.endswith("; add images or remove the folder(s)")
    _pngs(tmp_path / "owl" / "nested", {"deeper": 1})  # ImageFolder walks subfolders: so does the check
    assert load_spec(path).model.num_classes == 3


def test_a_class_folder_emptied_after_validation_is_one_data_error(tmp_path):
    _pngs(tmp_path, {"cat": 3, "dog": 3})
    validated = spec(dataset="imagefolder", root=str(tmp_path), image_size=8)
    for image in (tmp_path / "dog").iterdir():
        image.unlink()
    with pytest.raises(DataError) as raised:
        imagefolder_parts(validated, seed=0)
    assert str(raised.value).startswith(f"imagefolder: class folder(s) dog under data.root '{tmp_path}' hold no images")


def test_the_image_suffixes_validate_looks_for_are_the_ones_imagefolder_reads():
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from vit_search.data.sources import IMAGE_SUFFIXES

    assert IMAGE_SUFFIXES == IMG_EXTENSIONS


def test_an_imagefolder_without_data_root_is_read_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_SEARCH_CACHE", str(tmp_path / "cache"))
    _pngs(tmp_path / "here", {"cat": 5, "dog": 5, "owl": 5})
    monkeypatch.chdir(tmp_path / "here")
    data = load_data(spec(dataset="imagefolder", image_size=8), seed=0)
    assert data.classes == ["cat", "dog", "owl"] and len(data.train) + len(data.val) + len(data.test) == 15
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    with pytest.raises(ValueError, match="data.root '.' has no class folders"):
        spec(dataset="imagefolder")


@pytest.mark.parametrize("dataset", ["digits", "imagefolder"])
def test_a_test_fraction_that_leaves_one_image_for_train_and_val_is_blamed_on_test_fraction(tmp_path, dataset):
    # It named data.val_fraction (no value of which could help), and said "1 images".
    if dataset == "imagefolder":
        _pngs(tmp_path / "train", {"a": 6, "b": 6})
    chosen = spec(dataset=dataset, root=str(tmp_path), test_fraction=0.9 if dataset == "imagefolder" else 0.999,
                  image_size=8)
    count = "12 images" if dataset == "imagefolder" else "1,797 images"
    with pytest.raises(DataError) as raised:
        load_data(chosen, seed=0)
    assert str(raised.value) == (f"data.test_fraction {chosen.test_fraction}: holding out that share of {count} for "
                                 f"test leaves 1 image for training and validation, which need one each; lower "
                                 f"data.test_fraction, or add images")


def test_a_split_that_leaves_no_image_names_its_key_not_scikit_learns_words():
    with pytest.raises(DataError) as raised:
        stratified_split(np.arange(12) % 2, 0.95, seed=0, key="data.test_fraction")
    assert str(raised.value) == ("data.test_fraction 0.95: holding out that share of 12 images leaves one side with none; "
                                 "set data.test_fraction so that both keep at least one image, or add images")
    with pytest.raises(DataError, match="that share of 1 image leaves one side with none"):  # not "1 images"
        stratified_split(np.zeros(1), 0.5, seed=0)


def test_digits_and_their_splits_are_scikit_learns_to_the_index_without_importing_it():
    # Importing sklearn.model_selection cost every process that read a data set 1.5-2 s; a split of our own must
    # still be scikit-learn's, or a study resumed under this version would validate on other images.
    import subprocess
    import sys

    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split as theirs

    from vit_search.data.sources import _digits
    from vit_search.data.splits import train_test_split as ours

    images, labels = _digits()
    digits = load_digits()
    assert np.array_equal(images, digits.images) and np.array_equal(labels, digits.target)
    assert (images.dtype, labels.dtype) == (digits.images.dtype, digits.target.dtype)
    rng = np.random.default_rng(0)
    cases = [(digits.target, share, seed) for share in (0.1, 0.15, 0.2) for seed in (0, 1, 2**32 - 1)]
    for _ in range(800):  # small sets, few or many classes, shares and counts, the sizes it refuses included
        count, classes = int(rng.integers(0, 60)), int(rng.integers(1, 8))
        size = float(rng.choice([0.05, 0.1, 0.25, 0.5, 0.95])) if rng.random() < 0.8 else int(rng.integers(-1, count + 2))
        cases.append((rng.integers(0, classes, count), size, int(rng.integers(0, 2**32))))
    for target, size, seed in cases:
        index = np.arange(len(target))
        for stratify in (target, None):
            try:
                expected = [np.sort(side) for side in theirs(index, test_size=size, stratify=stratify, random_state=seed)]
            except ValueError:
                with pytest.raises(ValueError):
                    ours(index, size, seed, stratify=stratify)
                continue
            got = [np.sort(side) for side in ours(index, size, seed, stratify=stratify)]
            assert all(np.array_equal(a, b) for a, b in zip(expected, got)), (len(target), size, seed)
    # And no process of ours imports scikit-learn to read digits.
    code = ("import sys; from vit_search.data.loading import load_data; from vit_search.spec import load_spec; "
            "load_data(load_spec({'name': 'digits', 'data': {'dataset': 'digits', 'image_size': 8}, 'model': {'dim': 16, "
            "'depth': 1, 'patch_embed': {'type': 'conv', 'patch_size': 4}, 'attention': {'type': 'sdpa', 'heads': 2}}}).data, "
            "0); "
            "print(sorted(m for m in sys.modules if m.startswith('sklearn')))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
