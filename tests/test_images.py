import io

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_blocks.data.images import (
    build_image_dataloader,
    CropFlip,
    ImageShape,
    load_job_split,
    load_split,
    ShuffledImageDataset,
    sharded_batches,
    stratified_holdout,
)
from torchtitan.components.dataloader import ParallelAwareDataloader
from vision_helpers import job_config

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
    (b"", r"is empty \(0 bytes\)"),
    (b"hello, text\n", r"is not a .npz archive .* starts with b'hell'"),
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


def shifted(image_CHW, dy, dx, padding):
    """The image padded by `padding` black (-1) pixels per side, cropped at (dy, dx)."""
    _, h, w = image_CHW.shape
    padded = torch.full((image_CHW.shape[0], h + 2 * padding, w + 2 * padding), -1.0)
    padded[:, padding : padding + h, padding : padding + w] = image_CHW
    return padded[:, dy : dy + h, dx : dx + w]


def crop_flips_giving(out, image, padding):
    """Every (dy, dx, flip) for which crop + flip of `image` is `out`."""
    side = 2 * padding + 1
    return [
        (dy, dx, flip) for dy in range(side) for dx in range(side) for flip in (False, True)
        if torch.equal(out, shifted(image, dy, dx, padding).flip(-1) if flip else shifted(image, dy, dx, padding))
    ]


def test_crop_flip_keeps_the_shape_and_shifts_or_mirrors_the_image():
    torch.manual_seed(0)
    image = torch.rand(3, 8, 6) * 1.8 - 0.9  # no pixel is black
    original = image.clone()
    augment = CropFlip(padding=2, seed=0)
    seen = set()
    for index in range(200):
        out = augment(image, 0, index)
        assert out.shape == image.shape
        matches = crop_flips_giving(out, image, 2)
        assert len(matches) == 1, index
        seen.add(matches[0])
    assert {(dy, dx) for dy, dx, _ in seen} == {(dy, dx) for dy in range(5) for dx in range(5)}
    assert {flip for *_, flip in seen} == {False, True}
    assert torch.equal(image, original)  # the source is never written to


def test_crop_flip_is_seeded_by_seed_epoch_and_index():
    image = torch.rand(1, 8, 8)
    draws = lambda seed, epoch: torch.stack([CropFlip(4, seed)(image, epoch, i) for i in range(20)])
    assert torch.equal(draws(0, 0), draws(0, 0))
    assert not torch.equal(draws(0, 0), draws(1, 0))
    assert not torch.equal(draws(0, 0), draws(0, 1))  # new crops every epoch


def test_stream_augments_each_image_by_its_epoch_and_index():
    split = load_split("digits", None, "test", GREY8, 0.2)
    split.images_NCHW, split.labels_N = split.images_NCHW[:12], split.labels_N[:12]
    augment = CropFlip(4, seed=5)
    stream = iter(ShuffledImageDataset(split, 1, 2, seed=5, augment=augment))
    plain = ShuffledImageDataset(split, 1, 2, seed=5)
    for epoch in range(3):  # 6 images per rank and epoch
        for i in plain.epoch_indices(epoch).tolist():
            image = next(stream)[0]["input"]
            assert torch.equal(image, augment(split.images_NCHW[i], epoch, i))


def tiny_npz(path):
    """20 training and 10 test 8x8 grey images, classes 0..9."""
    generator = np.random.default_rng(0)
    np.savez(
        path, images=generator.integers(0, 256, (20, 8, 8), dtype=np.uint8), labels=np.arange(20) % 10,
        test_images=generator.integers(0, 256, (10, 8, 8), dtype=np.uint8), test_labels=np.arange(10),
    )
    return str(path)


def training_inputs(cfg, batches=3, state=None):
    loader = build_image_dataloader(1, 0, None, cfg)
    if state is not None:
        loader.load_state_dict(state)
    it = iter(loader)
    return [next(it)[0]["input"] for _ in range(batches)], loader


def test_augmentation_changes_training_images_by_seed_and_never_test_images(tmp_path):
    path = tiny_npz(tmp_path / "tiny.npz")
    data = ["--training.dataset", "npz", "--training.dataset_path", path, "--training.local_batch_size", "8"]
    plain = job_config("vit_digits.toml", *data)
    assert plain.data.augment == "none"  # the digits recipe: no augmentation
    augmented = job_config("vit_digits.toml", *data, "--data.augment", "crop_flip")
    reseeded = job_config("vit_digits.toml", *data, "--data.augment", "crop_flip", "--data.shuffle_seed", "1")
    train_before = load_job_split(plain, "train").images_NCHW.clone()
    raw, _ = training_inputs(plain)
    assert all(split_rows(train_before, batch) is not None for batch in raw)  # unchanged images
    crops, _ = training_inputs(augmented, batches=5)  # crosses an epoch (20 images)
    # the same images in the same order, each cropped and maybe flipped
    for raw_batch, crop_batch in zip(raw, crops):
        assert crop_batch.shape == (8, 1, 8, 8)
        assert all(crop_flips_giving(c, r, 4) for r, c in zip(raw_batch, crop_batch))
    assert not any(torch.equal(a, b) for a, b in zip(raw, crops))
    assert torch.equal(training_inputs(augmented, batches=5)[0][4], crops[4])  # seeded
    assert not torch.equal(training_inputs(reseeded)[0][0], crops[0])
    # a resumed stream draws the same crops
    _, loader = training_inputs(augmented, batches=2)
    resumed, _ = training_inputs(augmented, batches=3, state=loader.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(resumed, crops[2:5]))
    # neither split is changed: the training images stay, the test split is never augmented
    assert torch.equal(load_job_split(augmented, "train").images_NCHW, train_before)
    with np.load(path) as archive:
        expected_test = torch.from_numpy(archive["test_images"]).float()[:, None] / 127.5 - 1
    torch.testing.assert_close(load_job_split(augmented, "test").images_NCHW, expected_test)
    assert torch.equal(load_job_split(augmented, "test").images_NCHW, load_job_split(plain, "test").images_NCHW)


def split_rows(images_NCHW, batch):
    """The row of `images_NCHW` equal to each image of `batch` (None if one is missing)."""
    rows = []
    for image in batch:
        hits = [i for i, candidate in enumerate(images_NCHW) if torch.equal(candidate, image)]
        if not hits:
            return None
        rows.append(hits[0])
    return rows
