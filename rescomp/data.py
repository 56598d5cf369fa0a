"""Datasets as uint8 tensors, decoded once and cached; a loader that augments whole batches on the device.

Sources: torchvision's CIFAR-10/100 files (optionally downloaded), an ImageFolder tree with train/
and test/ (a folder, or a .tar/.tar.gz of one, like the offline CIFAR-10 copy), and synthetic data
of CIFAR's shape for tests. Every source ends as `Splits`: uint8 (N, 3, H, W) images and int64
labels. Augmentation (random crop after padding, flip, rotation) and normalisation run on batches on
whatever device holds the data, so a GPU never waits for worker processes.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import shutil
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from rescomp.config import AugmentConfig, DataConfig
from rescomp.errors import DataError

# Per-channel statistics of the official training sets (used by the usual CIFAR ResNet repositories).
NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
OFFLINE_CIFAR10 = "cifar10-jpeg.tar.gz"


@dataclass
class Splits:
    train_x: torch.Tensor  # uint8 (N, C, H, W)
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    source: str  # where the images came from, for provenance
    val_x: Optional[torch.Tensor] = None
    val_y: Optional[torch.Tensor] = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def stamp(self) -> dict[str, Any]:
        """What a summary records of its data: where it came from and how many images trained and tested."""
        return {"data_source": self.source, "train_images": len(self.train_y), "test_images": len(self.test_y),
                **({"val_images": len(self.val_y)} if self.val_y is not None else {})}


# ---------------------------------------------------------------------------------------------
# Sources


def synthetic(cfg: DataConfig, seed: int = 1234) -> Splits:
    """Learnable random data of CIFAR's shape: each class has its own colour pattern plus noise.

    The seed is fixed so that every run and test sees the same images.
    """
    s = cfg.synthetic
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(s.num_classes, 3, 8, 8, generator=g)
    prototypes = F.interpolate(prototypes, size=(32, 32), mode="bilinear", align_corners=False)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % s.num_classes
        y = y[torch.randperm(n, generator=g)]
        x = prototypes[y] * 0.6 + torch.rand(n, 3, 32, 32, generator=g) * 0.4
        return (x * 255).round().to(torch.uint8), y.long()

    tx, ty = make(s.train_size)
    vx, vy = make(s.test_size)
    return Splits(tx, ty, vx, vy, [f"class{i}" for i in range(s.num_classes)], "synthetic")


TORCHVISION_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def _torchvision_class(dataset: str):
    from torchvision import datasets

    return {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[dataset]


def _download(cfg: DataConfig, root: Path, looked: list[str]) -> None:
    """Fetch the official files through torchvision (with its progress bar) into a temporary folder
    and move the finished, checksum-verified folder into `root`: a failed or interrupted download
    leaves nothing behind, not even `root`."""
    cls = _torchvision_class(cfg.dataset)
    tmp = Path(tempfile.mkdtemp(prefix=f"rescomp-{cfg.dataset}-download-"))
    try:
        print(f"downloading {cfg.dataset} through torchvision into {root} (no local copy found)", file=sys.stderr)
        cls(str(tmp), train=True, download=True)
        cls(str(tmp), train=False, download=False)  # verifies the test files of the same archive
        root.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp / TORCHVISION_FOLDERS[cfg.dataset]), str(root / TORCHVISION_FOLDERS[cfg.dataset]))
    except Exception as e:  # noqa: BLE001 - any failure becomes one line for the user; nothing is kept
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        where = f" (looked in: {', '.join(looked)})" if looked else ""
        raise DataError(
            f"no local copy of {cfg.dataset} was found{where} and downloading it through torchvision failed: "
            f"{reason}. Point data.path (or $RESCOMP_DATA) at a copy, or run where the download can reach the "
            f"internet"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _from_torchvision(cfg: DataConfig, root: Path, looked: list[str]) -> Splits:
    if not is_torchvision_root(root, cfg.dataset):
        if cfg.download is False:
            raise DataError(
                f"{cfg.dataset} not found under '{root}'. Set data.download=auto (or true) to fetch it with "
                f"torchvision, or data.path to a folder or archive that holds it"
            )
        _download(cfg, root, looked)
    cls = _torchvision_class(cfg.dataset)
    try:
        train = cls(str(root), train=True, download=False)
        test = cls(str(root), train=False, download=False)
    except RuntimeError as e:  # torchvision's integrity check failed: a damaged copy
        raise DataError(f"the {cfg.dataset} files under '{root}' are damaged ({e}); delete "
                        f"'{root / TORCHVISION_FOLDERS[cfg.dataset]}' and run again to re-download them") from None

    def arrays(ds) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        return x, torch.tensor(ds.targets, dtype=torch.long)

    # Named by what it is, never by where it lay: the official files, whose md5 torchvision checked.
    return Splits(*arrays(train), *arrays(test), list(train.classes),
                  f"{cfg.dataset}: torchvision's official files (md5 verified)")


def _decode(blob: bytes, size: Optional[tuple[int, int]]) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(blob)) as im:
        im = im.convert("RGB")
        if size is not None and im.size != size:
            im = im.resize(size, Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def _folder_images(path: Path) -> list[Path]:
    """Every image file under a folder, in order."""
    return [f for f in sorted(path.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]


def _imagefolder_entries(path: Path) -> Iterator[tuple[str, bytes]]:
    """(relative path, bytes) of every image file in a folder or tar archive."""
    if path.is_dir():
        for f in _folder_images(path):
            yield f.relative_to(path).as_posix(), f.read_bytes()
        return
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                if m.isfile() and m.name.lower().endswith(IMAGE_SUFFIXES):
                    yield m.name, tar.extractfile(m).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        why = lines[-1].lstrip("- ")  # tarfile lists every method it tried, the plain tar reader's last
        why = why[:-1] if why.count(")") > why.count("(") else why
        raise DataError(f"'{path}' is not a readable tar archive ({why}); re-copy or re-download it") from None


def _from_imagefolder(path: Path) -> Splits:
    """Read <root>/{train,test}/<class>/<image> (any prefix before train/ and test/ is allowed)."""
    found: dict[str, list[tuple[tuple[str, ...], str, np.ndarray]]] = {"train": [], "test": []}
    size = None
    for name, blob in _imagefolder_entries(path):
        parts = name.split("/")
        if len(parts) < 3 or parts[-3] not in found:
            continue
        try:
            img = _decode(blob, size)
        except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError (an OSError), truncated files
            raise DataError(f"'{path}': {name} is not a readable image ({type(e).__name__}: {str(e)[:120]}); "
                            f"replace or delete it") from None
        size = size or (img.shape[1], img.shape[0])
        found[parts[-3]].append((tuple(parts), parts[-2], img))
    # a folder's order, whatever order an archive holds its members in: one seed, the same subsets and splits
    per_split = {split: [(c, im) for _, c, im in sorted(items, key=lambda t: t[0])] for split, items in found.items()}
    if not per_split["train"] or not per_split["test"]:
        raise DataError(
            f"'{path}' holds no images in the ImageFolder layout train/<class>/<image> and "
            f"test/<class>/<image>; point data.path at such a folder or archive"
        )
    classes = sorted({c for c, _ in per_split["train"]})
    index = {c: i for i, c in enumerate(classes)}
    unknown = {c for c, _ in per_split["test"]} - set(index)
    if unknown:
        raise DataError(f"'{path}': test/ has classes that train/ lacks: {sorted(unknown)}")

    def arrays(items):
        x = torch.from_numpy(np.stack([im for _, im in items])).permute(0, 3, 1, 2).contiguous()
        return x, torch.tensor([index[c] for c, _ in items], dtype=torch.long)

    splits = Splits(*arrays(per_split["train"]), *arrays(per_split["test"]), classes, "")
    splits.source = _describe_copy(path, splits)
    return splits


def _describe_copy(path: Path, splits: Splits) -> str:
    """Provenance of an ImageFolder copy by kind and checksum, never by where it lay on this machine:
    an archive by the sha256 of its file (as SOURCES.md gives it), a folder by that of its decoded
    pixels and labels."""
    h = hashlib.sha256()
    if path.is_file():
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return f"ImageFolder archive {path.name}, sha256 {h.hexdigest()}"
    for t in (splits.train_x, splits.train_y, splits.test_x, splits.test_y):
        h.update(t.contiguous().numpy().tobytes())
    return f"ImageFolder folder {path.name}/, pixels+labels sha256 {h.hexdigest()}"


def cache_root(cfg: DataConfig) -> Path:
    """data.cache_dir, else $RESCOMP_CACHE, else ~/.cache/rescomp: decoded-image caches and downloads."""
    if cfg.cache_dir:
        return cfg.at(cfg.cache_dir)
    return Path(os.environ.get("RESCOMP_CACHE") or Path.home() / ".cache" / "rescomp").expanduser()


def download_root(cfg: DataConfig) -> Path:
    """Where a download lands: <cache root>/datasets, searched by later runs like any local copy."""
    return cache_root(cfg) / "datasets"


def search_paths(cfg: DataConfig) -> list[Path]:
    """Where a run looks for a local copy when data.path is not set, in order: $RESCOMP_DATA, ./data,
    the checkout's data/ and ../shared/data, then the download root."""
    env = os.environ.get("RESCOMP_DATA")
    roots = [Path(env)] if env else []
    here = Path.cwd()
    repo = Path(__file__).resolve().parent.parent
    for base in dict.fromkeys([here, repo]):
        roots += [base / "data", base.parent / "shared" / "data"]
    roots.append(download_root(cfg))  # where `download: auto` puts what it fetches
    found = []
    for r in roots:
        if cfg.dataset == "cifar10":
            found += [r / OFFLINE_CIFAR10, r / "cifar10-jpeg", r / "cifar10"]
        found += [r]
    return found


def is_torchvision_root(p: Path, dataset: str) -> bool:
    return (p / TORCHVISION_FOLDERS[dataset]).is_dir()


def _is_imagefolder(p: Path) -> bool:
    if p.is_file():
        return p.name.endswith(ARCHIVE_SUFFIXES)
    return (p / "train").is_dir() and (p / "test").is_dir()


def resolve_source(cfg: DataConfig) -> tuple[str, Path, list[str]]:
    """('torchvision' | 'folder', path, folders searched) for a CIFAR dataset, or why there is none."""
    if cfg.path is not None:
        p = cfg.at(cfg.path)
        if cfg.source == "torchvision" or (cfg.source == "auto" and (cfg.download is True or is_torchvision_root(p, cfg.dataset))):
            if cfg.download is False and not is_torchvision_root(p, cfg.dataset):  # what loading would say, said first
                raise DataError(f"{cfg.dataset} not found under '{p}'. Set data.download=auto (or true) to fetch it "
                                f"with torchvision, or data.path to a folder or archive that holds it")
            return "torchvision", p, []
        if not p.exists():
            raise DataError(f"data.path '{p}' does not exist; fix the path, or remove data.path to use a local copy "
                            f"or a download")
        if _is_imagefolder(p):
            return "folder", p, []
        raise DataError(
            f"data.path '{p}' is neither a torchvision {cfg.dataset} root nor an ImageFolder folder or "
            f"archive with train/ and test/; set data.source to say which it is"
        )
    looked = []
    for p in search_paths(cfg):
        looked.append(str(p))
        if not p.exists():
            continue
        if p.is_dir() and is_torchvision_root(p, cfg.dataset):
            return "torchvision", p, looked
        if cfg.source in ("auto", "folder") and cfg.download is not True and _is_imagefolder(p):
            return "folder", p, looked
    if cfg.download is not False and cfg.source != "folder":
        return "torchvision", download_root(cfg), looked
    raise DataError(
        f"no {cfg.dataset} found; looked in: {', '.join(looked)}. Set data.download=auto to fetch it "
        f"with torchvision, or data.path (or $RESCOMP_DATA) to where it is"
    )


def _cache_path(cfg: DataConfig, kind: str, path: Path) -> Path:
    """The decoded copy's cache file, keyed by what its content depends on: an archive's size and time, or
    every image file's in a folder (editing or adding one changes neither the folder's size nor its time)."""
    if path.is_dir():
        h = hashlib.sha256()
        for f in _folder_images(path):
            st = f.stat()
            h.update(f"{f.relative_to(path).as_posix()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        stamp = h.hexdigest()
    else:
        st = path.stat()
        stamp = f"{st.st_size}|{int(st.st_mtime)}"
    key = f"{cfg.dataset}|{kind}|{path.resolve()}|{stamp}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root(cfg) / f"{cfg.dataset}-{kind}-{digest}.pt"


def load_splits(cfg: DataConfig) -> Splits:
    """All images of the configured dataset, decoded once and cached as uint8 tensors."""
    if cfg.dataset == "synthetic":
        return synthetic(cfg)
    kind, path, looked = resolve_source(cfg)
    if kind == "torchvision":
        return _from_torchvision(cfg, path, looked)  # already uint8 arrays on disk: nothing to cache
    cache = _cache_path(cfg, kind, path)
    if cache.is_file():
        try:
            d = torch.load(cache, weights_only=True)
            return Splits(d["train_x"], d["train_y"], d["test_x"], d["test_y"], d["classes"], d["source"])
        except Exception:
            cache.unlink(missing_ok=True)  # a torn cache is rebuilt, never trusted
    splits = _from_imagefolder(path)
    if splits.num_classes != cfg.num_classes:
        raise DataError(f"'{path}' has {splits.num_classes} classes but data.dataset={cfg.dataset} needs {cfg.num_classes}")
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    payload = {k: getattr(splits, k) for k in ("train_x", "train_y", "test_x", "test_y", "classes", "source")}
    torch.save(payload, tmp)
    os.replace(tmp, cache)
    return splits


def prepare(cfg: DataConfig, seed: int) -> Splits:
    """Load, then carve the seeded validation split and subsets the config asks for. Under several
    processes rank 0 loads first (decoding and caching once), then the others read its cache."""
    from rescomp.distributed import main_first

    with main_first():
        s = load_splits(cfg)
    if s.num_classes != cfg.num_classes:
        raise DataError(f"dataset has {s.num_classes} classes, config expects {cfg.num_classes}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(s.train_y), generator=g)  # never by index range: files are sorted by class
    if cfg.val_fraction > 0:
        n_val = max(1, int(round(len(perm) * cfg.val_fraction)))
        s.val_x, s.val_y = s.train_x[perm[:n_val]], s.train_y[perm[:n_val]]
        perm = perm[n_val:]
        if not len(perm):  # else a division by zero when the schedule counts steps per epoch
            raise DataError(f"data.val_fraction {cfg.val_fraction:g} holds out {n_val} of the {n_val} training images, "
                            f"leaving none to train on; lower it")
    if cfg.train_limit is not None:
        perm = perm[: cfg.train_limit]
    if cfg.val_fraction > 0 or cfg.train_limit is not None:
        s.train_x, s.train_y = s.train_x[perm], s.train_y[perm]
    if cfg.test_limit is not None:
        tp = torch.randperm(len(s.test_y), generator=g)[: cfg.test_limit]
        s.test_x, s.test_y = s.test_x[tp], s.test_y[tp]
    return s


# ---------------------------------------------------------------------------------------------
# Batched, on-device augmentation


Part = Optional[tuple[int, int, int]]  # (images in the global batch, first, end): this rank's rows of it


def _draws(n: int, part: Part, draw) -> torch.Tensor:
    """draw(count) for the whole global batch, this rank's rows of it: every rank draws what the
    one-process run draws, so a shard is augmented as those images would be in one process."""
    total, lo, hi = part or (n, 0, n)
    return draw(total)[lo:hi]


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Draws made on the CPU, on `device`. To a GPU through pinned memory without waiting: a copy from
    pageable memory first waits for every kernel queued on the GPU, so each batch would wait for the
    previous training step and the CPU could not queue the next one meanwhile."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def random_crop(x: torch.Tensor, padding: int, g: torch.Generator, part: Part = None) -> torch.Tensor:
    """Per-image random crop of x (B, C, H, W) after zero-padding, as torchvision's RandomCrop."""
    if padding == 0:
        return x
    b, c, h, w = x.shape
    xp = F.pad(x, (padding, padding, padding, padding))
    offsets = lambda k: torch.randint(0, 2 * padding + 1, (k,), generator=g)  # noqa: E731
    oy = _to(_draws(b, part, offsets), x.device)
    ox = _to(_draws(b, part, offsets), x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None].expand(b, c, h, w + 2 * padding)
    xp = xp.gather(2, rows)
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :].expand(b, c, h, w)
    return xp.gather(3, cols)


def random_flip(x: torch.Tensor, g: torch.Generator, part: Part = None) -> torch.Tensor:
    mask = _to(_draws(x.shape[0], part, lambda k: torch.rand(k, generator=g)) < 0.5, x.device)
    return torch.where(mask[:, None, None, None], x.flip(3), x)


def random_rotate(x: torch.Tensor, degrees: float, g: torch.Generator, part: Part = None) -> torch.Tensor:
    angle = (_draws(x.shape[0], part, lambda k: torch.rand(k, generator=g)) * 2 - 1) * math.radians(degrees)
    cos, sin = angle.cos(), angle.sin()
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(_to(theta, x.device).to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augment_batch(x: torch.Tensor, aug: AugmentConfig, g: torch.Generator, part: Part = None) -> torch.Tensor:
    """x in [0, 1]; the order follows the usual torchvision pipeline: crop, flip, then rotation. `part`:
    x is these rows of a larger batch, whose draws are made (rescomp.distributed)."""
    x = random_crop(x, aug.crop_padding, g, part)
    if aug.flip:
        x = random_flip(x, g, part)
    if aug.rotate_degrees > 0:
        x = random_rotate(x, aug.rotate_degrees, g, part)
    return x


class BatchLoader:
    """Iterate (images, labels) batches from uint8 tensors that stay on `device`.

    Shuffling and augmentation draw from a generator seeded by (seed, epoch): an epoch is the same
    whether or not the run was interrupted before it, which is what makes resume exact. With
    `world` > 1 (rescomp.distributed) every batch is the one-process batch, and this loader yields
    rank `rank`'s contiguous slice of it, augmented with that batch's draws: the union of the ranks'
    slices is the one-process epoch, whatever the number of processes.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device,
        train: bool = False,
        augment: Optional[AugmentConfig] = None,
        image_size: int = 32,
        seed: int = 0,
        channels_last: bool = False,
        max_steps: Optional[int] = None,
        drop_last: Optional[bool] = None,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.x, self.y = x.to(device), y.to(device)
        self.batch_size, self.device, self.train = batch_size, device, train
        self.augment = augment if train else None
        self.image_size, self.seed, self.channels_last = image_size, seed, channels_last
        # a divisor on the device: CUDA divides by a CPU scalar as a product with its reciprocal, which
        # differs from the CPU's division in the last bit for half of the 256 byte values
        self.scale = torch.tensor(255.0, device=device)
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.drop_last = train and len(y) > batch_size if drop_last is None else drop_last
        self.max_steps = max_steps
        self.rank, self.world = rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.y) // self.batch_size if self.drop_last else math.ceil(len(self.y) / self.batch_size)
        return min(n, self.max_steps) if self.max_steps else n

    @property
    def sharded(self) -> bool:
        return self.world > 1

    def batch_total(self, i: int) -> int:
        """Images in global batch i (all ranks' slices together)."""
        return min(self.batch_size, len(self.y) - i * self.batch_size)

    def to_input(self, xb: torch.Tensor, g: Optional[torch.Generator] = None, part: Part = None) -> torch.Tensor:
        x = xb.float().div_(self.scale)
        if self.augment is not None and g is not None:
            x = augment_batch(x, self.augment, g, part)
        x = (x - self.mean) / self.std
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n = len(self.y)
        order = _to(torch.randperm(n, generator=g), self.device) if self.train else None
        for i in range(len(self)):
            start, total = i * self.batch_size, self.batch_total(i)
            lo, hi = total * self.rank // self.world, total * (self.rank + 1) // self.world
            sl = slice(start + lo, start + hi)
            idx = order[sl] if order is not None else sl
            yield self.to_input(self.x[idx], g, (total, lo, hi) if self.sharded else None), self.y[idx]


def make_loaders(splits: Splits, cfg: DataConfig, *, batch_size: int, eval_batch_size: int, device: torch.device,
                 seed: int, max_steps: Optional[int] = None, rank: int = 0, world: int = 1) -> dict[str, BatchLoader]:
    """Train, test (and val) loaders; with world > 1, each yields rank `rank`'s slice of every batch."""
    mean, std = NORMALIZATION[cfg.dataset]
    # No layout here: batches follow the model's (Trainer / evaluate, rescomp.hardware.training_layout).
    common = dict(mean=mean, std=std, device=device, image_size=cfg.image_size, rank=rank, world=world)
    loaders = {
        "train": BatchLoader(splits.train_x, splits.train_y, batch_size, train=True, augment=cfg.augment,
                             seed=seed, max_steps=max_steps, **common),
        "test": BatchLoader(splits.test_x, splits.test_y, eval_batch_size, **common),
    }
    if splits.val_x is not None:
        loaders["val"] = BatchLoader(splits.val_x, splits.val_y, eval_batch_size, **common)
    return loaders


def sample_loader(splits: Splits, cfg: DataConfig, n: int, seed: int, device: torch.device,
                  batch_size: int = 250) -> BatchLoader:
    """n training images, a seeded random choice, seen as the test set is (no augmentation): for
    calibration and for scoring criteria."""
    order = torch.randperm(len(splits.train_y), generator=torch.Generator().manual_seed(seed))[:n]
    mean, std = NORMALIZATION[cfg.dataset]
    return BatchLoader(splits.train_x[order], splits.train_y[order], batch_size, mean=mean, std=std, device=device,
                       image_size=cfg.image_size)
