import io

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_blocks.data.images import (
    ImageShape,
    load_split,
    ShuffledImageDataset,
    sharded_batches,
    stratified_holdout,
)
from torchtitan.components.dataloader import ParallelAwareDataloader

GREY8 = ImageShape(channels=1, size=8, num_classes=10)


def test_digits_split_is_fixed_stratified_disjoint_and_normalised():
    train = load_split("digits", None, "train", GREY8, 0.2)
    test = load_split("digits", None, "test", GREY8, 0.2)
    assert len(train) + len(test) == 1797 and len(test) == 359
    assert train.images_NCHW.shape[1:] == (1, 8, 8)
    assert train.images_NCHW.min() == -1.0 and train.images_NCHW.max() == 1.0
    assert torch.bincount(test.labels_N, minlength=10).min() >= 35  # every class held out
    # fixed: the same split every time, and no test image is a training image
    again = load_split("digits", None, "test", GREY8, 0.2)
    assert torch.equal(again.images_NCHW, test.images_NCHW)
    train_rows = {tuple(x.flatten().tolist()) for x in train.images_NCHW}
    overlap = sum(tuple(x.flatten().tolist()) in train_rows for x in test.images_NCHW)
    assert overlap <= 2  # the digits set itself holds a couple of identical images


def test_stratified_holdout_takes_the_fraction_of_each_class():
    labels = torch.tensor([0] * 10 + [1] * 20 + [2] * 5)
    train_idx, test_idx = stratified_holdout(labels, 0.2)
    assert sorted(torch.cat([train_idx, test_idx]).tolist()) == list(range(35))
    assert torch.bincount(labels[test_idx]).tolist() == [2, 4, 1]


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_with_train_and_test_splits(tmp_path):
    # grey 8x8 images; one RGB 12x12 image that must be converted and resized
    write_png(tmp_path / "train" / "cat" / "a.png", np.full((8, 8), 255, np.uint8))
    write_png(tmp_path / "train" / "cat" / "b.png", np.zeros((12, 12, 3), np.uint8))
    write_png(tmp_path / "train" / "dog" / "c.png", np.zeros((8, 8), np.uint8))
    write_png(tmp_path / "test" / "dog" / "d.png", np.full((8, 8), 255, np.uint8))
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    shape = ImageShape(1, 8, 2)
    train = load_split("image_folder", str(tmp_path), "train", shape, 0.2)
    test = load_split("image_folder", str(tmp_path), "test", shape, 0.2)
    assert train.images_NCHW.shape == (3, 1, 8, 8)
    assert train.labels_N.tolist() == [0, 0, 1]  # sorted class folders: cat = 0, dog = 1
    assert train.images_NCHW[0].eq(1.0).all() and train.images_NCHW[1].eq(-1.0).all()
    assert test.labels_N.tolist() == [1] and test.images_NCHW.eq(1.0).all()


def test_image_folder_without_splits_holds_out_per_class_rgb(tmp_path):
    for cls in ("a", "b"):
        for i in range(5):
            write_png(tmp_path / cls / f"{i}.png", np.full((4, 4, 3), 40 * i, np.uint8))
    shape = ImageShape(3, 4, 2)
    train = load_split("image_folder", str(tmp_path), "train", shape, 0.2)
    test = load_split("image_folder", str(tmp_path), "test", shape, 0.2)
    assert train.images_NCHW.shape == (8, 3, 4, 4) and test.labels_N.tolist() == [0, 1]


def test_npz_uint8_and_float_with_explicit_test(tmp_path):
    path = tmp_path / "tiny.npz"
    images = np.zeros((6, 8, 8), np.uint8)
    images[0] = 255
    test_images = np.full((2, 8, 8, 1), 0.5, np.float32)
    np.savez(path, images=images, labels=np.arange(6) % 3, test_images=test_images,
             test_labels=np.array([2, 1]))
    shape = ImageShape(1, 8, 3)
    train = load_split("npz", str(path), "train", shape, 0.2)
    test = load_split("npz", str(path), "test", shape, 0.2)
    assert train.images_NCHW.shape == (6, 1, 8, 8) and train.images_NCHW[0].eq(1).all()
    assert train.labels_N.tolist() == [0, 1, 2, 0, 1, 2]
    assert test.images_NCHW.eq(0.0).all() and test.labels_N.tolist() == [2, 1]


LABELS2 = np.zeros(2, np.int64)


@pytest.mark.parametrize(
    "arrays,fragment",
    [
        ({"images": np.full((2, 8, 8), 3.0), "labels": LABELS2}, "must lie in [0, 1]"),
        ({"pixels": np.zeros((2, 8, 8), np.uint8), "labels": LABELS2}, "lacks ['images']"),
        ({"images": np.zeros((2, 8, 8), np.uint8), "labels": np.zeros(3, np.int64)}, "2 'images' but 3 'labels'"),
        ({"images": np.zeros((2, 4, 4), np.uint8), "labels": LABELS2}, "flavor expects (1, 8, 8)"),
        ({"images": np.zeros((2, 8, 8), np.uint8), "labels": np.array([0, 12])}, "has 10 classes"),
        ({"images": np.zeros((2, 8, 8), np.uint8), "labels": np.array([0, -1])}, "labels in [-1, 0]"),
        # float labels would be truncated (2.7 -> 2): refused, even when whole
        ({"images": np.zeros((2, 8, 8), np.uint8), "labels": np.array([0.0, 2.7])}, "'labels' has dtype float64"),
        ({"images": np.zeros((2, 8, 8), np.uint8), "labels": np.zeros(2)}, "class labels must be integers"),
        ({"images": np.zeros((2, 8, 8), np.uint8), "labels": np.zeros((2, 1), np.int64)}, "expected (N,) class indices"),
        # NaN compares false with every bound: it passed the [0, 1] check before
        ({"images": np.where(np.eye(8) > 0, np.nan, 0.5)[None].repeat(2, 0), "labels": LABELS2},
         "16 non-finite pixels (nan at index (0, 0, 0))"),
        ({"images": np.full((2, 8, 8), np.inf), "labels": LABELS2}, "non-finite pixels (inf"),
        ({"images": np.zeros((2, 8, 8), np.uint8), "labels": np.array([0, None])}, "'labels' cannot be read"),
    ],
)
def test_npz_mistakes_are_explained(tmp_path, arrays, fragment):
    path = tmp_path / f"bad_{abs(hash(fragment))}.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError) as info:
        load_split("npz", str(path), "train", GREY8, 0.2)
    assert fragment in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("content,fragment", [
    (b"PK\x03\x04 not really a zip", "is not a readable .npz archive"),
    (b"", "is not a readable .npz archive"),
])
def test_npz_that_is_not_an_archive_is_named(tmp_path, content, fragment):
    path = tmp_path / "broken.npz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"^{path} {fragment}"):
        load_split("npz", str(path), "train", GREY8, 0.2)


def png_bytes(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8), value).save(buffer, format="PNG")
    return buffer.getvalue()


def truncated_png() -> bytes:
    """Header and the start of the pixel data: Pillow opens it, fails when decoding."""
    noise = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    return buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3]


@pytest.mark.parametrize("damage,reason", [
    ("truncated", "image file is truncated"),
    ("not_an_image", "cannot identify image file"),
])
def test_image_folder_names_the_first_unreadable_file(tmp_path, damage, reason):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(3):
            (tmp_path / label / f"{i}.png").write_bytes(png_bytes(50 * i))
    bad = truncated_png() if damage == "truncated" else b"hello, not a png"
    (tmp_path / "b" / "1.png").write_bytes(bad)
    (tmp_path / "b" / "2.png").write_bytes(bad)
    first = tmp_path / "b" / "1.png"
    with pytest.raises(ValueError, match=f"^{first} is not a readable image: {reason}"):
        load_split("image_folder", str(tmp_path), "train", GREY8, 0.2)


def test_image_folder_class_without_images_is_named(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "0.png").write_bytes(png_bytes(9))
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match=f"class folder {tmp_path / 'b'} holds no images"):
        load_split("image_folder", str(tmp_path), "train", GREY8, 0.2)


def test_unknown_dataset_and_missing_path_are_explained():
    with pytest.raises(ValueError, match="available: \\['digits', 'image_folder', 'npz'\\]"):
        load_split("cifar", None, "train", GREY8, 0.2)
    with pytest.raises(ValueError, match="needs \\[training\\] dataset_path"):
        load_split("image_folder", None, "train", GREY8, 0.2)
    with pytest.raises(ValueError, match="flavor expects \\(3, 32, 32\\)"):
        load_split("digits", None, "train", ImageShape(3, 32, 100), 0.2)


def first_labels(loader, count):
    batches = iter(loader)
    return [next(batches)[1] for _ in range(count)]


def test_stream_is_sharded_by_rank_and_resumes_from_its_state():
    split = load_split("digits", None, "test", GREY8, 0.2)  # 359 images
    ranks = [ShuffledImageDataset(split, r, 2, seed=3) for r in range(2)]
    shares = [set(d.epoch_indices(0).tolist()) for d in ranks]
    assert not shares[0] & shares[1] and len(shares[0]) == len(shares[1]) == 179
    assert ranks[0].epoch_indices(1).tolist() != ranks[0].epoch_indices(0).tolist()

    def loader():
        return ParallelAwareDataloader(
            ShuffledImageDataset(split, 0, 2, seed=3), dp_rank=0, dp_world_size=2, batch_size=32
        )

    original = loader()
    batches = iter(original)
    for _ in range(7):  # crosses the epoch boundary (179 / 32 < 6)
        inputs, labels = next(batches)
    assert inputs["input"].shape == (32, 1, 8, 8) and labels.dtype == torch.long
    state = original.state_dict()
    expected = [next(batches)[1] for _ in range(3)]
    resumed = loader()
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(first_labels(resumed, 3), expected))
    fresh = first_labels(loader(), 3)
    assert not all(torch.equal(a, b) for a, b in zip(fresh, expected))


def test_evaluation_batches_cover_each_image_once_with_equal_counts():
    split = load_split("digits", None, "test", GREY8, 0.2)
    seen, counts = [], []
    for rank in range(3):
        batches = list(sharded_batches(split, 50, rank, 3))
        counts.append(len(batches))
        for images, labels, valid in batches:
            assert images.shape[0] == 50
            seen += labels[valid].tolist()
    assert len(set(counts)) == 1
    assert sorted(seen) == sorted(split.labels_N.tolist())
