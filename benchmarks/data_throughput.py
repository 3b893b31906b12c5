"""Image-folder throughput: decoded per epoch by DataLoader workers vs read from the decoded cache.

Writes a folder of JPEGs (``--images`` of ``--side`` px, 10 classes) unless ``--folder`` is given,
then prints every figure:

1. the decode path (``data.cache: off``, ``--workers`` DataLoader workers), img/s, with and
   without RandAugment (batch crop + flip on the main process as in training);
2. the cache build, img/s (once per data set and size);
3. training batches from the cache: uint8 read, made float and normalised, crop + flip (and
   RandAugment) on ``--device``, img/s, and the ratio to (1);
4. the peak resident memory of a process reading the whole cache, against the cache's size and the
   float32 size of the set (it should not grow with either);
5. a ``--epochs`` trial on the folder end to end (a small ViT, so the data path is what counts),
   cache warm vs ``data.cache: off``.

    python benchmarks/data_throughput.py                      # CPU, 3,000 JPEGs of 256 px at 224
    python benchmarks/data_throughput.py --device cuda --vit-ti  # GPU: augmentation there, ViT-Ti/16 rate
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the command line sets it (cli.main), before torch
TRIAL_PATCH = 32  # the end-to-end trial's patch side: --image-size must be a multiple


def write_folder(folder: Path, images: int, side: int, classes: int = 10) -> None:
    """JPEGs with some structure (smooth colour fields plus noise), ``images`` in ``classes`` folders."""
    from PIL import Image

    def one(i: int) -> None:
        rng = np.random.default_rng(i)
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((side, side), Image.BILINEAR), dtype=np.int16)
        pixels = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        path = folder / f"class_{i % classes}" / f"{i:06d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)

    for c in range(classes):
        (folder / f"class_{c}").mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(one, range(images)))


def written_train_images(images: int, classes: int = 10) -> int:
    """How many of ``images`` written JPEGs the train split keeps: the seeded split load_data makes (seed 0)."""
    from vit_search.data.sources import stratified_split
    from vit_search.schema import DataSpec

    fields = DataSpec.model_fields
    labels = np.arange(images) % classes
    rest, _ = stratified_split(labels, fields["test_fraction"].default, 0, "data.test_fraction")
    train, _ = stratified_split(labels[rest], fields["val_fraction"].default, 0)
    return len(train)


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, in one line each, what would fail only after minutes of work: the numbers, the device, the
    folder, and too few train images for the batches the rates time (one warm-up, then ``--batches``)."""
    import torch

    for name in ("images", "side", "image_size", "batch", "batches"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    for name in ("workers", "epochs"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} {getattr(args, name)}: must be 0 or more")
    if args.epochs and args.image_size % TRIAL_PATCH:
        parser.error(f"--image-size {args.image_size}: the end-to-end trial (--epochs) cuts {TRIAL_PATCH} px patches, "
                     f"so a multiple of {TRIAL_PATCH} (or --epochs 0 to skip the trial)")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device}: not a device (cpu, cuda, cuda:1...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here (torch.cuda.is_available() is False)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        parser.error(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    need = args.batch * (args.batches + 1)
    shortfall = (f"the rates time --batches {args.batches} of --batch {args.batch} after one warm-up batch: "
                 f"they need {need:,} train images")
    if args.folder is not None:
        from pydantic import ValidationError

        from vit_search.data.sources import imagefolder_parts
        from vit_search.errors import DataError

        try:
            _, splits, _ = imagefolder_parts(data_spec(args, "off"), 0)
        except ValidationError as err:
            parser.error(f"--folder {args.folder}: " + "; ".join(e["msg"].removeprefix("Value error, ")
                                                                 for e in err.errors()))
        except DataError as err:
            parser.error(f"--folder {args.folder}: {err}")
        train = len(splits["train"][1])
        if train < need:
            parser.error(f"--folder {args.folder}: its train split holds {train:,} images; {shortfall} "
                         f"(a smaller --batch or --batches)")
        return
    if args.images < 10:  # write_folder spreads them over 10 class folders: none may stay empty
        parser.error(f"--images {args.images}: at least 10, one for each class folder written")
    train = written_train_images(args.images)
    if train < need:
        least = max(10, int(need / 0.72) - 10)  # train keeps about 72%: (1 - test 20%) x (1 - val 10%)
        while written_train_images(least) < need:
            least += 1
        parser.error(f"--images {args.images}: the train split keeps {train:,} of them; {shortfall}, so --images "
                     f"{least:,} or more (or a smaller --batch or --batches)")


def data_spec(args: argparse.Namespace, cache: str, randaugment: bool = False):
    from vit_search.schema import DataSpec

    return DataSpec(dataset="imagefolder", root=str(args.folder), image_size=args.image_size, on_device="no",
                    num_workers=args.workers, cache=cache,
                    augment={"random_crop_padding": 16, "hflip": True, "randaugment": randaugment})


def batch_rate(data, args: argparse.Namespace) -> float:
    """img/s of training batches, augmented on the device, over ``--batches`` batches after one warm-up."""
    import torch

    from vit_search.data import make_loader

    device = torch.device(args.device)
    loader = make_loader(data.train, args.batch, shuffle=True, seed=0, num_workers=args.workers, drop_last=True)
    seen, start = 0, None
    for step, (images, labels) in enumerate(loader):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        images, labels = data.augment(images, labels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step == 0:
            start = time.perf_counter()  # after the workers' start and the first batch
            continue
        seen += len(images)
        if step >= args.batches:
            break
    return seen / (time.perf_counter() - start)


RSS = """
import resource, sys, time
import numpy as np
from vit_search.data import load_data, make_loader
from vit_search.data.sources import imagefolder_parts
from vit_search.schema import DataSpec
imagefolder_parts(DataSpec(dataset="imagefolder", root=sys.argv[1]), 0)  # the libraries a reader imports
imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
spec = DataSpec(dataset="imagefolder", root=sys.argv[1], image_size=int(sys.argv[2]), on_device="no", normalize=False)
data = load_data(spec, 0)
after_open = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
limit = int(sys.argv[3])
for split in (data.train, data.val, data.test):
    for i, _ in enumerate(make_loader(split, 64, shuffle=True, seed=0)):
        if limit and i >= limit:
            break
print(imported, after_open, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss(args: argparse.Namespace, limit: int) -> tuple[float, float, float]:
    """(MB after its imports, after opening the cache, peak) of a fresh process reading ``limit`` batches
    per split (0: all)."""
    out = subprocess.run([sys.executable, "-c", RSS, str(args.folder), str(args.image_size), str(limit)],
                         capture_output=True, text=True, check=True, env=os.environ.copy()).stdout.split()
    return int(out[0]) / 1024, int(out[1]) / 1024, int(out[2]) / 1024


def trial_seconds(args: argparse.Namespace, cache: str) -> float:
    from vit_search.spec import load_spec
    from vit_search.train import train

    raw = {"name": f"data-{cache}", "seed": 0,
           "data": data_spec(args, cache).model_dump(),
           "model": {"dim": 64, "depth": 2, "patch_embed": {"type": "conv", "patch_size": TRIAL_PATCH},
                     "attention": {"type": "sdpa", "heads": 2}, "ffn": {"type": "mlp", "ratio": 2}},
           "train": {"epochs": args.epochs, "batch_size": args.batch, "warmup_epochs": 0},
           "tracking": {"enabled": False}}
    start = time.perf_counter()
    train(load_spec(raw), progress=False, checkpoint_dir=Path(args.work) / f"ckpt-{cache}")
    return time.perf_counter() - start


def vit_ti_rate(args: argparse.Namespace) -> float:
    """img/s a ViT-Ti/16 trains at on ``--device`` (bf16 on CUDA), synthetic batches: the rate to feed."""
    import torch

    from vit_search.model import build_model
    from vit_search.spec import load_spec

    spec = load_spec({"name": "ti", "data": {"dataset": "synthetic", "image_size": args.image_size},
                      "model": {"preset": "vit_ti_16"}, "tracking": {"enabled": False}})
    device = torch.device(args.device)
    model = build_model(spec).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    seconds, steps = 0.0, 3 if device.type == "cpu" else 30
    for step in range(steps + 2):
        if step == 2:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return steps * args.batch / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="an existing image folder (default: write one)")
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--side", type=int, default=256, help="side of the written JPEGs")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the decode path")
    parser.add_argument("--batches", type=int, default=30, help="batches timed per rate")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the end-to-end trial (0: skip it)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vit-ti", action="store_true", help="also time ViT-Ti/16 training on --device")
    args = parser.parse_args()
    check_arguments(parser, args)
    sys.stdout.reconfigure(line_buffering=True)  # each figure as soon as it is measured

    import torch

    from vit_search.data import load_data

    with tempfile.TemporaryDirectory(prefix="vit-search-data-bench-") as work:
        args.work = work
        os.environ["VIT_SEARCH_CACHE"] = str(Path(work) / "cache")  # a cold cache, removed afterwards
        if args.folder is None:
            args.folder = Path(work) / "images"
            start = time.perf_counter()
            write_folder(args.folder, args.images, args.side)
            print(f"wrote {args.images:,} JPEGs of {args.side} px in {time.perf_counter() - start:.1f} s")
        print(f"device {args.device}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores, "
              f"batch {args.batch}, image_size {args.image_size}, {args.workers} workers on the decode path")

        decode = batch_rate(load_data(data_spec(args, "off"), 0, device=args.device), args)
        print(f"1. decode path (workers, crop+flip):              {decode:8,.0f} img/s")
        decode_ra = batch_rate(load_data(data_spec(args, "off", randaugment=True), 0, device=args.device), args)
        print(f"   decode path with RandAugment (per image):       {decode_ra:8,.0f} img/s")

        start = time.perf_counter()
        data = load_data(data_spec(args, "auto"), 0, device=args.device)
        build = sum(p.shape[0] for p in data.cache.parts.values()) / (time.perf_counter() - start)
        megabytes = data.cache.nbytes / 2**20
        print(f"2. cache build (decode + resize once):            {build:8,.0f} img/s  "
              f"({megabytes:,.0f} MB at {data.cache.folder})")

        cached = batch_rate(data, args)
        print(f"3. cache batches (crop+flip on {args.device}):              {cached:8,.0f} img/s  "
              f"= {cached / decode:.1f}x the decode path")
        cached_ra = batch_rate(load_data(data_spec(args, "auto", randaugment=True), 0, device=args.device), args)
        print(f"   cache batches with RandAugment (per 16 images):  {cached_ra:8,.0f} img/s  "
              f"= {cached_ra / decode_ra:.1f}x the decode path with RandAugment")

        float_mb = megabytes * 4
        imported, opened, few = peak_rss(args, limit=3)
        _, _, everything = peak_rss(args, limit=0)
        print(f"4. peak resident memory of a reader: {imported:,.0f} MB after importing torch, torchvision and "
              f"scikit-learn, {opened:,.0f} MB after opening the cache, {few:,.0f} MB after 3 batches per split, "
              f"{everything:,.0f} MB after reading the whole cache ({megabytes:,.0f} MB; the set as float32: "
              f"{float_mb:,.0f} MB)")

        if args.epochs:
            warm = trial_seconds(args, "auto")
            today = trial_seconds(args, "off")
            print(f"5. {args.epochs}-epoch trial end to end: cache warm {warm:,.1f} s, decode per epoch {today:,.1f} s "
                  f"({today / warm:.1f}x)")
        if args.vit_ti:
            print(f"   ViT-Ti/16 trains at {vit_ti_rate(args):,.0f} img/s on {args.device}; "
                  f"the cache feeds {cached:,.0f} img/s ({cached_ra:,.0f} with RandAugment)")


if __name__ == "__main__":
    main()
