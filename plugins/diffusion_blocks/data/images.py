"""Labelled images from local files for the ViT and the DiT, normalised to [-1, 1].

`[training] dataset` picks a loader, `[training] dataset_path` says where its files are:

- `digits`: scikit-learn's bundled handwritten digits (1,797 8x8 grey images, 10
  classes); needs no files and no network.
- `image_folder`: `<path>/<class>/<image>` (one sub-folder per class, sorted names give
  the class indices), decoded by Pillow, converted to the model's channels and resized
  to its image size. Explicit splits: `<path>/train/<class>/...` and `<path>/test/...`.
- `npz`: a NumPy archive with `images` (N, H, W) or (N, H, W, C) and `labels` (N,);
  uint8 images are read as 0..255, float images must be finite and lie in [0, 1];
  labels are integer class indices. Explicit test
  split: `test_images` and `test_labels`.

Without an explicit test split, `[data] holdout_fraction` of every class (a fixed,
seeded choice) is the test split. Training batches come from torchtitan's
ParallelAwareDataloader over `ShuffledImageDataset`: infinite, reshuffled each epoch
identically on every rank, each data-parallel rank taking its own share, and Stateful
so a checkpoint resumes mid-epoch. Batches are `({"input": images_BCHW}, labels_B)`.
`[data] augment = "crop_flip"` crops and flips the training stream's images (`CropFlip`);
the test split is never augmented.
"""

from __future__ import annotations

import functools
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset

from torchtitan.components.dataloader import ParallelAwareDataloader

from ..errors import ConfigError, origin_of

HOLDOUT_SEED = 0
SPLITS = ("train", "test")


@dataclass(frozen=True)
class ImageShape:
    """What the model expects: channels, side length, number of classes."""

    channels: int
    size: int
    num_classes: int


@dataclass
class ImageSplit:
    images_NCHW: torch.Tensor  # float32 in [-1, 1]
    labels_N: torch.Tensor     # int64

    def __len__(self) -> int:
        return len(self.labels_N)


@dataclass
class LoadedImages:
    train: ImageSplit
    test: ImageSplit | None  # None: carve a holdout out of train


# ---------------------------------------------------------------------------
# Conversions


def to_unit_range(images: np.ndarray, max_value: float) -> torch.Tensor:
    """[0, max_value] -> float32 [-1, 1]."""
    return torch.from_numpy(np.asarray(images, dtype=np.float32) * (2.0 / max_value) - 1.0)


def channels_first(images_NHWC: torch.Tensor) -> torch.Tensor:
    return images_NHWC.permute(0, 3, 1, 2).contiguous()


def stratified_holdout(
    labels_N: torch.Tensor, fraction: float, seed: int = HOLDOUT_SEED
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_indices, test_indices): round(fraction * n_c) images of every class c,
    chosen by a seeded permutation, go to test."""
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label in torch.unique(labels_N, sorted=True):
        members = torch.nonzero(labels_N == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_test = int(round(fraction * len(members)))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(test)).values


def subset(split: ImageSplit, indices: torch.Tensor) -> ImageSplit:
    return ImageSplit(split.images_NCHW[indices], split.labels_N[indices])


# ---------------------------------------------------------------------------
# Loaders: (dataset_path, shape) -> LoadedImages


def load_digits(path: str | None, shape: ImageShape) -> LoadedImages:
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = to_unit_range(digits.images, max_value=16.0)[:, None]  # pixels are 0..16
    return LoadedImages(ImageSplit(images, torch.from_numpy(digits.target).long()), None)


def _image_files(folder: Path) -> list[Path]:
    from PIL import Image

    extensions = {ext.lower() for ext in Image.registered_extensions()}
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in extensions)


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir())


def _decode(path: Path, shape: ImageShape) -> np.ndarray:
    """The image at `path` as uint8 (size, size, channels); a file Pillow cannot read
    whole (truncated, corrupt, not an image) is a ValueError naming it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("L" if shape.channels == 1 else "RGB")  # decodes it all
            if image.size != (shape.size, shape.size):
                image = image.resize((shape.size, shape.size), Image.Resampling.BICUBIC)
            array = np.asarray(image, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # Pillow: UnidentifiedImageError (an OSError), "image file is truncated", ...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path} is not a readable image: {reason}") from None
    return array[..., None] if array.ndim == 2 else array


def _read_class_tree(root: Path, class_names: list[str], shape: ImageShape) -> ImageSplit:
    images, labels = [], []
    for folder in _class_folders(root):
        if folder.name not in class_names:
            raise ValueError(
                f"{folder} is a class folder that the training split does not have; "
                f"training classes: {class_names}"
            )
        files = _image_files(folder)
        if not files:
            raise ValueError(f"class folder {folder} holds no images")
        for file in files:
            images.append(_decode(file, shape))
            labels.append(class_names.index(folder.name))
    if not images:
        raise ValueError(f"no images found under {root}/<class>/")
    pixels = channels_first(to_unit_range(np.stack(images), max_value=255.0))
    return ImageSplit(pixels, torch.tensor(labels, dtype=torch.long))


def load_image_folder(path: str | None, shape: ImageShape) -> LoadedImages:
    root = _existing_path(path, "image_folder")
    if not root.is_dir():
        raise ValueError(f"[training] dataset_path {str(root)!r} is not a folder")
    has_splits = (root / "train").is_dir()
    train_root = root / "train" if has_splits else root
    class_names = [p.name for p in _class_folders(train_root)]
    if not class_names:
        raise ValueError(
            f"{train_root} has no class sub-folders; expected {train_root}/<class>/<image>"
        )
    train = _read_class_tree(train_root, class_names, shape)
    test_root = root / "test"
    test = _read_class_tree(test_root, class_names, shape) if has_splits and test_root.is_dir() else None
    return LoadedImages(train, test)


def _npz_array(archive, key: str, file: Path) -> np.ndarray:
    try:
        return archive[key]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        # a damaged member, or an object array (pickles are not loaded)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{file}: '{key}' cannot be read: {reason}") from None


def _npz_split(archive, images_key: str, labels_key: str, file: Path) -> ImageSplit:
    images, labels = _npz_array(archive, images_key, file), _npz_array(archive, labels_key, file)
    stored_shape = images.shape
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(
            f"{file}: '{images_key}' has shape {images.shape}; expected (N, H, W) or "
            "(N, H, W, C), channels last"
        )
    if len(images) != len(labels):
        raise ValueError(
            f"{file}: {len(images)} '{images_key}' but {len(labels)} '{labels_key}'"
        )
    labels = _npz_labels(labels, labels_key, file)
    if images.dtype == np.uint8:
        pixels = to_unit_range(images, max_value=255.0)
    elif np.issubdtype(images.dtype, np.floating):
        finite = np.isfinite(images)
        if not finite.all():
            first = tuple(int(i) for i in np.argwhere(~finite)[0])[: len(stored_shape)]
            raise ValueError(
                f"{file}: float '{images_key}' has {int((~finite).sum())} non-finite "
                f"pixels ({images.reshape(stored_shape)[first]} at index {first}); pixels "
                "must be finite, in [0, 1]"
            )
        if images.size and (images.min() < 0.0 or images.max() > 1.0):
            raise ValueError(
                f"{file}: float '{images_key}' must lie in [0, 1], found "
                f"[{images.min():.3g}, {images.max():.3g}]; store uint8 0..255 or rescale"
            )
        pixels = to_unit_range(images, max_value=1.0)
    else:
        raise ValueError(f"{file}: '{images_key}' has dtype {images.dtype}; use uint8 or float")
    return ImageSplit(channels_first(pixels), torch.from_numpy(labels).long())


def _npz_labels(labels: np.ndarray, key: str, file: Path) -> np.ndarray:
    """Class indices: a 1-D integer array (floats would be truncated, so refused)."""
    if labels.ndim != 1:
        raise ValueError(f"{file}: '{key}' has shape {labels.shape}; expected (N,) class indices")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{file}: '{key}' has dtype {labels.dtype}; class labels must be integers "
            "(store them as an integer array, e.g. labels.astype(np.int64))"
        )
    return np.asarray(labels, dtype=np.int64)


def load_npz(path: str | None, shape: ImageShape) -> LoadedImages:
    file = _existing_path(path, "npz")
    _check_zip_archive(file)
    try:
        archive = np.load(file)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{file} is not a readable .npz archive: {reason}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{file} holds one array, not a .npz archive of 'images' and 'labels'")
    with archive:
        missing = {"images", "labels"} - set(archive.files)
        if missing:
            raise ValueError(
                f"{file} lacks {sorted(missing)}; it has {sorted(archive.files)}"
            )
        train = _npz_split(archive, "images", "labels", file)
        test = None
        if {"test_images", "test_labels"} <= set(archive.files):
            test = _npz_split(archive, "test_images", "test_labels", file)
    return LoadedImages(train, test)


def _check_zip_archive(file: Path) -> None:
    """An empty file or one that is not a zip (numpy.savez's format) named as such, before
    numpy's messages about pickles or missing data mislead."""
    if file.is_dir():
        raise ValueError(f"{file} is a folder, not a .npz file (dataset = 'image_folder' reads folders)")
    with open(file, "rb") as handle:
        head = handle.read(4)
    if not head:
        raise ValueError(f"{file} is empty (0 bytes), not a .npz archive")
    if head not in (b"PK\x03\x04", b"PK\x05\x06"):
        raise ValueError(
            f"{file} is not a .npz archive (a zip of arrays, as numpy.savez writes): it "
            f"starts with {head!r}"
        )


def _existing_path(path: str | None, dataset: str) -> Path:
    if not path:
        raise ValueError(
            f"[training] dataset = {dataset!r} needs [training] dataset_path: "
            f"{LOCAL_IMAGE_DATASETS[dataset]}"
        )
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise ValueError(f"[training] dataset_path {path!r} does not exist")
    return resolved


# our datasets whose dataset_path names local files: what it must be
LOCAL_IMAGE_DATASETS = {
    "image_folder": "a folder with one sub-folder per class",
    "npz": "a .npz file with 'images' and 'labels' arrays",
}

IMAGE_DATASETS: dict[str, Callable[[str | None, ImageShape], LoadedImages]] = {
    "digits": load_digits,
    "image_folder": load_image_folder,
    "npz": load_npz,
}


# ---------------------------------------------------------------------------
# Splits, checked against the model


def check_fits(
    split: ImageSplit, shape: ImageShape, dataset: str, split_name: str, path: str | None = None
) -> None:
    found = tuple(split.images_NCHW.shape[1:])
    wanted = (shape.channels, shape.size, shape.size)
    source = f"[training] dataset {dataset!r}" + (f" at {path}" if path else "")
    if found != wanted:
        raise ValueError(
            f"{source} ({split_name}) has images of shape "
            f"(C, H, W) = {found} but the model flavor expects {wanted}; pick a flavor "
            "made for this data"
        )
    if len(split) and (split.labels_N.min() < 0 or split.labels_N.max() >= shape.num_classes):
        raise ValueError(
            f"{source} ({split_name}) has labels in "
            f"[{int(split.labels_N.min())}, {int(split.labels_N.max())}] but the model "
            f"flavor has {shape.num_classes} classes"
        )


@functools.lru_cache(maxsize=8)
def _load_cached(dataset: str, path: str | None, shape: ImageShape) -> LoadedImages:
    return IMAGE_DATASETS[dataset](path, shape)


def load_split(
    dataset: str, path: str | None, split: str, shape: ImageShape, holdout_fraction: float
) -> ImageSplit:
    """The `split` ('train' or 'test') of a registered dataset, checked against `shape`."""
    if dataset not in IMAGE_DATASETS:
        raise ValueError(
            f"[training] dataset = {dataset!r} is not an image dataset; "
            f"available: {sorted(IMAGE_DATASETS)}"
        )
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {list(SPLITS)}")
    loaded = _load_cached(dataset, path, shape)
    if loaded.test is not None:
        chosen = loaded.train if split == "train" else loaded.test
    else:
        train_idx, test_idx = stratified_holdout(loaded.train.labels_N, holdout_fraction)
        chosen = subset(loaded.train, train_idx if split == "train" else test_idx)
    check_fits(chosen, shape, dataset, split, path)
    return chosen


def image_shape_of(job_config) -> ImageShape:
    """The image shape and class count of the job's model flavor."""
    from torchtitan.protocols.train_spec import get_train_spec

    args = get_train_spec(job_config.model.name).model_args[job_config.model.flavor]
    return ImageShape(args.in_channels, args.image_size, args.num_classes)


def load_job_split(job_config, split: str) -> ImageSplit:
    """The job's `split`; a data mistake becomes a ConfigError naming the config file."""
    training = job_config.training
    try:
        return load_split(
            training.dataset, training.dataset_path, split, image_shape_of(job_config),
            job_config.data.holdout_fraction,
        )
    except ValueError as e:
        raise ConfigError(f"{origin_of(job_config, 'training', 'dataset')}: {e}") from None


# ---------------------------------------------------------------------------
# Training stream and evaluation batches


class CropFlip:
    """The CIFAR training augmentation: pad `padding` black (-1) pixels per side, take
    a random crop of the original size, flip it horizontally with probability 1/2.
    The draw depends only on (seed, epoch, image index): the same on every rank count
    and after a resume, a new crop for the same image every epoch."""

    def __init__(self, padding: int, seed: int):
        self.padding, self.seed = padding, seed

    def __call__(self, image_CHW: torch.Tensor, epoch: int, index: int) -> torch.Tensor:
        mixed = ((self.seed * 1_000_003 + epoch) * 1_000_000_007 + index) * 7919 + 1
        generator = torch.Generator().manual_seed(mixed % 2**63)
        dy, dx = torch.randint(0, 2 * self.padding + 1, (2,), generator=generator).tolist()
        flip = bool(torch.randint(0, 2, (), generator=generator))
        _, height, width = image_CHW.shape
        p = self.padding
        crop = F.pad(image_CHW, (p, p, p, p), value=-1.0)[:, dy : dy + height, dx : dx + width]
        return crop.flip(-1) if flip else crop


def training_augmentation(data_config) -> CropFlip | None:
    """`[data] augment` as a callable (image, epoch, index) -> image, or None."""
    if data_config.augment == "crop_flip":
        return CropFlip(data_config.crop_padding, data_config.shuffle_seed)
    return None


class ShuffledImageDataset(IterableDataset, Stateful):
    """Endless (image, label) stream. Every epoch is a fresh permutation, the same on
    every rank; rank r takes positions r, r + W, ... of it (the tail that does not
    divide by W is dropped so ranks stay in step). `augment(image, epoch, index)`, when
    given, transforms each image as it is yielded (the split itself is never changed)."""

    def __init__(
        self, split: ImageSplit, dp_rank: int, dp_world_size: int, seed: int,
        augment: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None,
    ):
        if len(split) < dp_world_size:
            raise ValueError(
                f"{len(split)} training images cannot feed {dp_world_size} data-parallel ranks"
            )
        self.split = split
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.seed = seed
        self.augment = augment
        self.epoch, self.position = 0, 0

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.split), generator=generator)
        usable = len(order) - len(order) % self.dp_world_size
        return order[:usable][self.dp_rank :: self.dp_world_size]

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        while True:
            indices = self.epoch_indices(self.epoch)
            while self.position < len(indices):
                i = int(indices[self.position])
                self.position += 1
                image = self.split.images_NCHW[i]
                if self.augment is not None:
                    image = self.augment(image, self.epoch, i)
                yield {"input": image}, self.split.labels_N[i]
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


def build_image_dataloader(
    dp_world_size: int, dp_rank: int, tokenizer, job_config, **kwargs
) -> ParallelAwareDataloader:
    """TrainSpec.build_dataloader_fn for the vision models (tokenizer unused)."""
    dataset = ShuffledImageDataset(
        load_job_split(job_config, "train"), dp_rank, dp_world_size,
        seed=job_config.data.shuffle_seed, augment=training_augmentation(job_config.data),
    )
    return ParallelAwareDataloader(
        dataset,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        **asdict(job_config.training.dataloader),
        batch_size=job_config.training.local_batch_size,
    )


def sharded_batches(
    split: ImageSplit, batch_size: int, dp_rank: int = 0, dp_world_size: int = 1
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Fixed-order evaluation batches (images, labels, valid) of rank `dp_rank`'s share.
    Every rank gets the same number of equally sized batches (FSDP needs every rank in
    every forward); padding rows repeat image 0 and have valid = False."""
    share = torch.arange(dp_rank, len(split), dp_world_size)
    per_rank = -(-len(split) // dp_world_size)
    num_batches = max(1, -(-per_rank // batch_size))
    padded = torch.zeros(num_batches * batch_size, dtype=torch.long)
    padded[: len(share)] = share
    valid = torch.arange(len(padded)) < len(share)
    for b in range(num_batches):
        rows = slice(b * batch_size, (b + 1) * batch_size)
        indices = padded[rows]
        yield split.images_NCHW[indices], split.labels_N[indices], valid[rows]
