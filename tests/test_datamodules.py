"""Data sets: the real files in ../shared/data, generated files in tmp_path, synthetic data."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import DATASETS, build_datamodule, dataset_info
from datamodules.base import LabelledImageDataset
from user_errors import DataError, UserError

NAMES = [
    "MNIST_GRAY",
    "MNIST",
    "CIFAR100",
    "ImageNet",
    "SYNTH_MNIST",
    "SYNTH_CIFAR100",
    "SYNTH_IMAGENET",
]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        pytest.fail(f"the shared real data sets are missing: expected them in {path}")
    return path


@pytest.fixture(scope="module")
def mnist_val(shared_data) -> LabelledImageDataset:
    return build_datamodule("MNIST_GRAY", data_root=shared_data, download=False).dataset("val")


def write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def write_mnist(raw: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    write_idx(raw / f"{prefix}-images-idx3-ubyte{suffix}", 2051, images)
    write_idx(raw / f"{prefix}-labels-idx1-ubyte{suffix}", 2049, labels)


def pixels_of(dataset: LabelledImageDataset, images: torch.Tensor) -> np.ndarray:
    """Undo the normalisation: back to uint8 pixels."""
    raw = (images * dataset.std + dataset.mean) * 255
    return raw.round().to(torch.uint8).numpy()


def write_pickle(path: Path, obj, protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def write_image(path: Path, color: tuple[int, int, int], size=(300, 260)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


# --- registry --------------------------------------------------------------------------


def test_registry_names_and_info():
    assert list(DATASETS) == NAMES
    assert dataset_info("MNIST_GRAY") == (10, (1, 28, 28), False)
    assert dataset_info("MNIST") == (10, (3, 28, 28), False)
    assert dataset_info("CIFAR100") == (100, (3, 32, 32), False)
    assert dataset_info("ImageNet") == (1000, (3, 224, 224), False)
    assert dataset_info("SYNTH_MNIST") == (10, (1, 28, 28), True)
    assert dataset_info("SYNTH_CIFAR100") == (100, (3, 32, 32), True)
    assert dataset_info("SYNTH_IMAGENET") == (1000, (3, 224, 224), True)
    for name in NAMES:
        module = DATASETS[name]
        assert len(module.mean) == len(module.std) == module.input_shape[0]


def test_unknown_names_are_user_errors(tmp_path):
    expected = f"unknown dataset 'mnist'; valid datasets: {', '.join(NAMES)}"
    with pytest.raises(UserError) as info:
        build_datamodule("mnist", data_root=tmp_path)
    assert str(info.value) == expected
    with pytest.raises(UserError, match="unknown dataset 'CIFAR10'"):
        dataset_info("CIFAR10")
    with pytest.raises(UserError, match="unknown split 'test'; valid splits: train, val, all"):
        build_datamodule("SYNTH_MNIST", split="test")
    with pytest.raises(UserError, match="val_fraction"):
        build_datamodule("SYNTH_MNIST", train_partition="val", val_fraction=1.0)
    with pytest.raises(UserError, match="unknown split 'test'"):
        build_datamodule("SYNTH_MNIST").dataset("test")


# --- MNIST -----------------------------------------------------------------------------


def test_mnist_gray_val_from_shared(shared_data, mnist_val):
    with gzip.open(shared_data / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz") as f:
        official = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    assert len(mnist_val) == 10000
    assert mnist_val.targets.dtype == torch.long
    assert torch.equal(mnist_val.targets, torch.from_numpy(official.astype(np.int64)))
    counts = torch.bincount(mnist_val.targets, minlength=10)
    assert counts.tolist() == np.bincount(official).tolist()
    assert counts[0] == 980 and counts[1] == 1135
    image, label = mnist_val[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert isinstance(label, int) and label == int(official[0])
    images, labels = mnist_val.load(range(0, 10000, 4))
    assert images.shape == (2500, 1, 28, 28)
    assert torch.equal(labels, mnist_val.targets[::4])
    assert abs(images.mean().item()) < 0.05
    assert 0.9 < images.std().item() < 1.1
    assert mnist_val.source == str(shared_data / "MNIST" / "raw")


def test_mnist_three_channels_repeat_the_digits(shared_data, mnist_val):
    rgb = build_datamodule("MNIST", data_root=shared_data, download=False).dataset("val")
    assert len(rgb) == 10000
    images, labels = rgb.load([0, 17, 9999])
    gray, _ = mnist_val.load([0, 17, 9999])
    assert images.shape == (3, 3, 28, 28)
    assert torch.equal(labels, rgb.targets[[0, 17, 9999]])
    for channel in range(3):
        assert torch.allclose(images[:, channel], gray[:, 0])


def test_mnist_missing_train_split_message(shared_data):
    dm = build_datamodule("MNIST_GRAY", data_root=shared_data, download=False)
    with pytest.raises(DataError) as info:
        dm.dataset("train")
    raw = shared_data / "MNIST" / "raw"
    assert str(info.value) == (
        "MNIST train split not found: expected train-images-idx3-ubyte(.gz) and "
        f"train-labels-idx1-ubyte(.gz) in {raw} (download disabled); only the val split is on "
        "disk: attack.py --split val (or fit_train/fit_val), train.py --train_partition val"
    )


def test_mnist_failed_download_becomes_one_line(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading t10k-images-idx3-ubyte.gz:\nno network")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(DataError) as info:
        build_datamodule("MNIST_GRAY", data_root=tmp_path).dataset("val")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("MNIST val split not found: expected t10k-images-idx3-ubyte(.gz)")
    # Only the cause: torchvision's "Error downloading <file>" names whatever file it tried first.
    assert message.endswith("(download failed: no network)")


def test_an_offline_download_is_said_in_four_words(tmp_path, monkeypatch):
    import socket
    import urllib.error

    import torchvision.datasets

    def offline(*args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(DataError) as info:
        build_datamodule("MNIST_GRAY", data_root=tmp_path).dataset("val")
    assert str(info.value).endswith("(no network to download it)")


def test_mnist_all_is_the_present_splits(shared_data, mnist_val):
    everything = build_datamodule("MNIST_GRAY", data_root=shared_data, download=False).dataset(
        "all"
    )
    assert len(everything) == 10000
    assert torch.equal(everything.targets, mnist_val.targets)


def test_idx_round_trip_gz_and_plain(tmp_path):
    rng = np.random.default_rng(0)
    train_images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    train_labels = np.array([0, 9, 3, 3, 1, 5, 2], dtype=np.uint8)
    val_images = rng.integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    val_labels = np.array([8, 7, 6, 0], dtype=np.uint8)
    raw = tmp_path / "MNIST" / "raw"
    write_mnist(raw, "train", train_images, train_labels, gz=False)
    write_mnist(raw, "t10k", val_images, val_labels, gz=True)
    dm = build_datamodule("MNIST_GRAY", data_root=tmp_path, download=False)
    for split, images, labels in [
        ("train", train_images, train_labels),
        ("val", val_images, val_labels),
        (
            "all",
            np.concatenate([train_images, val_images]),
            np.concatenate([train_labels, val_labels]),
        ),
    ]:
        dataset = dm.dataset(split)
        assert torch.equal(dataset.targets, torch.from_numpy(labels.astype(np.int64)))
        loaded, loaded_labels = dataset.load(range(len(labels)))
        assert np.array_equal(pixels_of(dataset, loaded)[:, 0], images)
        assert torch.equal(loaded_labels, dataset.targets)


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_idx_names_the_file(tmp_path, gz):
    raw = tmp_path / "MNIST" / "raw"
    write_mnist(raw, "t10k", np.zeros((5, 28, 28), np.uint8), np.zeros(5, np.uint8), gz=gz)
    name = "t10k-images-idx3-ubyte" + (".gz" if gz else "")
    path = raw / name
    if gz:
        with gzip.open(path) as f:
            data = f.read()
        with gzip.open(path, "wb") as f:
            f.write(data[: 16 + 3 * 784])
    else:
        path.write_bytes(path.read_bytes()[: 16 + 3 * 784])
    with pytest.raises(DataError) as info:
        build_datamodule("MNIST_GRAY", data_root=tmp_path, download=False).dataset("val")
    message = str(info.value)
    assert message.startswith(f"{path}: truncated IDX file") and "\n" not in message


def test_bad_idx_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_mnist(raw, "t10k", np.zeros((5, 28, 28), np.uint8), np.zeros(4, np.uint8), gz=False)
    dm = build_datamodule("MNIST_GRAY", data_root=tmp_path, download=False)
    with pytest.raises(DataError, match="4 labels for the 5 images"):
        dm.dataset("val")
    write_idx(raw / "t10k-labels-idx1-ubyte", 2051, np.zeros((5, 28, 28), np.uint8))
    with pytest.raises(DataError, match="magic number 2051, expected 2049"):
        dm.dataset("val")
    write_idx(raw / "t10k-labels-idx1-ubyte", 2049, np.zeros(5, np.uint8))
    write_idx(raw / "t10k-images-idx3-ubyte", 2051, np.zeros((5, 32, 32), np.uint8))
    with pytest.raises(DataError, match="images are 32x32"):
        dm.dataset("val")
    (raw / "t10k-images-idx3-ubyte").unlink()
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00broken")
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: cannot read"):
        dm.dataset("val")


# --- CIFAR-100 -------------------------------------------------------------------------


def test_cifar100_val_from_shared(shared_data):
    dataset = build_datamodule("CIFAR100", data_root=shared_data, download=False).dataset("val")
    assert len(dataset) == 10000
    assert torch.bincount(dataset.targets, minlength=100).tolist() == [100] * 100
    images, labels = dataset.load(range(0, 10000, 5))
    assert images.shape == (2000, 3, 32, 32) and images.dtype == torch.float32
    assert torch.equal(labels, dataset.targets[::5])
    assert images.mean(dim=(0, 2, 3)).abs().max() < 0.1
    with pytest.raises(DataError, match="CIFAR100 train split not found"):
        build_datamodule("CIFAR100", data_root=shared_data, download=False).dataset("train")


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_pickle_round_trip(tmp_path, protocol):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, size=(6, 3072), dtype=np.uint8)
    labels = [99, 0, 5, 5, 42, 7]
    folder = tmp_path / "cifar-100-python"
    write_pickle(folder / "test", {"data": data, "fine_labels": labels}, protocol)
    write_pickle(folder / "train", {"data": data[:2], "fine_labels": labels[:2]}, protocol)
    dm = build_datamodule("CIFAR100", data_root=tmp_path, download=False)
    dataset = dm.dataset("val")
    assert dataset.targets.tolist() == labels
    images, _ = dataset.load(range(6))
    # each row holds the R, G and B planes of a 32x32 image
    assert np.array_equal(pixels_of(dataset, images), data.reshape(6, 3, 32, 32))
    assert dm.dataset("all").targets.tolist() == labels[:2] + labels


def test_cifar_pickle_with_wrong_keys(tmp_path):
    path = tmp_path / "cifar-100-python" / "test"
    write_pickle(path, {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]})
    dm = build_datamodule("CIFAR100", data_root=tmp_path, download=False)
    with pytest.raises(DataError) as info:
        dm.dataset("val")
    assert str(info.value).startswith(f"{path}: expected a dict with 'data' and 'fine_labels'")
    write_pickle(path, {"data": np.zeros((2, 1024), np.uint8), "fine_labels": [0, 1]})
    with pytest.raises(DataError, match="'data' must be uint8 N x 3072"):
        dm.dataset("val")
    path.write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8)})[:50])
    with pytest.raises(DataError, match="cannot unpickle"):
        dm.dataset("val")


class _RunsACommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "cifar-100-python" / "test"
    write_pickle(path, {"data": _RunsACommand(marker), "fine_labels": [0]})
    with pytest.raises(DataError, match="refusing to unpickle") as info:
        build_datamodule("CIFAR100", data_root=tmp_path, download=False).dataset("val")
    assert str(path) in str(info.value)
    assert not marker.exists()


# --- ImageNet --------------------------------------------------------------------------


def test_imagenet_sample_from_shared(shared_data):
    folder = shared_data / "imagenet-sample"
    dm = build_datamodule("ImageNet", data_root=shared_data, imagenet_dir=folder)
    dataset = dm.dataset("val")
    assert len(dataset) == 1000
    assert torch.equal(dataset.targets, torch.arange(1000))
    assert dm.class_names() == sorted(os.listdir(folder / "val"))
    images, labels = dataset.load([0, 999])
    assert images.shape == (2, 3, 224, 224) and images.dtype == torch.float32
    assert labels.tolist() == [0, 999]
    assert images.abs().max() < 3
    with pytest.raises(DataError, match="ImageNet train split not found"):
        dm.dataset("train")


def test_imagenet_default_folder_and_missing_layout(tmp_path):
    write_image(tmp_path / "ImageNet" / "val" / "n02" / "a.JPEG", (255, 0, 0))
    write_image(tmp_path / "ImageNet" / "val" / "n01" / "b.png", (0, 0, 255))
    write_image(tmp_path / "ImageNet" / "train" / "n03" / "c.JpG", (0, 255, 0))
    (tmp_path / "ImageNet" / "val" / "n01" / "notes.txt").write_text("not an image")
    dm = build_datamodule("ImageNet", data_root=tmp_path)
    # the class list spans the splits, so a split with some classes keeps the indices
    assert dm.class_names() == ["n01", "n02", "n03"]
    assert dm.dataset("val").targets.tolist() == [0, 1]
    assert dm.dataset("train").targets.tolist() == [2]
    assert dm.dataset("all").targets.tolist() == [2, 0, 1]
    images, _ = dm.dataset("val").load([0, 1])
    blue = (torch.tensor([0.0, 0.0, 1.0]) - torch.tensor(dm.mean)) / torch.tensor(dm.std)
    assert torch.allclose(images[0, :, 100, 100], blue, atol=1e-3)
    with pytest.raises(DataError) as info:
        build_datamodule("ImageNet", data_root=tmp_path / "elsewhere").dataset("val")
    assert "ImageNet val split not found: expected" in str(info.value)
    assert "val/<wnid>/*.JPEG" in str(info.value)


def test_imagenet_folder_without_images(tmp_path):
    (tmp_path / "val" / "n01440764").mkdir(parents=True)
    (tmp_path / "val" / "n01440764" / "readme.txt").write_text("nothing here")
    dm = build_datamodule("ImageNet", imagenet_dir=tmp_path)
    with pytest.raises(DataError, match="ImageNet val split has no images"):
        dm.dataset("val")


def test_corrupt_jpeg_names_the_file(tmp_path):
    write_image(tmp_path / "val" / "n01" / "good.JPEG", (10, 20, 30))
    bad = tmp_path / "val" / "n02" / "bad.JPEG"
    bad.parent.mkdir()
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    good_bytes = (tmp_path / "val" / "n01" / "good.JPEG").read_bytes()
    truncated = tmp_path / "val" / "n03" / "truncated.jpeg"
    truncated.parent.mkdir()
    truncated.write_bytes(good_bytes[: len(good_bytes) // 2])
    dataset = build_datamodule("ImageNet", imagenet_dir=tmp_path).dataset("val")
    assert dataset.targets.tolist() == [0, 1, 2]  # labels come from the file list alone
    assert dataset[0][0].shape == (3, 224, 224)
    for index, path in [(1, bad), (2, truncated)]:
        with pytest.raises(DataError) as info:
            dataset.load([0, index])
        assert str(info.value).startswith(f"{path}: cannot decode the image")


# --- synthetic -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, sizes, shape",
    [
        ("SYNTH_MNIST", (60000, 10000), (1, 28, 28)),
        ("SYNTH_CIFAR100", (50000, 10000), (3, 32, 32)),
        ("SYNTH_IMAGENET", (1300000, 50000), (3, 224, 224)),
    ],
)
def test_synthetic_sizes_and_classes(name, sizes, shape):
    dm = build_datamodule(name, seed=3)
    assert dm.is_synthetic
    for split, size in zip(["train", "val"], sizes):
        dataset = dm.dataset(split)
        assert len(dataset) == size
        counts = torch.bincount(dataset.targets, minlength=dm.num_classes)
        assert counts.tolist() == [size // dm.num_classes] * dm.num_classes
        assert dataset.source == "synthetic (generated in memory, seed 3)"
    assert not torch.equal(dm.dataset("train").targets[:100], torch.arange(100) % dm.num_classes)
    assert len(dm.dataset("all")) == sum(sizes)
    last = sizes[1] - 1
    images, labels = dm.dataset("val").load([0, 5, last])
    assert images.shape == (3, *shape) and images.dtype == torch.float32
    assert torch.equal(labels, dm.dataset("val").targets[[0, 5, last]])


def test_synthetic_is_deterministic_and_seeded():
    first = build_datamodule("SYNTH_CIFAR100", seed=7).dataset("train")
    again = build_datamodule("SYNTH_CIFAR100", seed=7).dataset("train")
    other = build_datamodule("SYNTH_CIFAR100", seed=8).dataset("train")
    index = [0, 1, 2, 49999, 1234]
    images, labels = first.load(index)
    assert torch.equal(images, again.load(index)[0]) and torch.equal(labels, again.load(index)[1])
    assert torch.equal(first.targets, again.targets)
    assert not torch.equal(first.targets, other.targets)
    assert not torch.allclose(images, other.load(index)[0])
    # an image does not depend on the batch it is loaded with
    assert torch.equal(first[1234][0], images[4])
    assert torch.equal(first.load([1234, 3])[0][0], images[4])
    # train and val images differ, and ``all`` is train then val
    val = build_datamodule("SYNTH_CIFAR100", seed=7).dataset("val")
    assert not torch.allclose(val.load([0])[0], images[:1])
    everything = build_datamodule("SYNTH_CIFAR100", seed=7).dataset("all")
    assert torch.equal(everything.load([50000])[0], val.load([0])[0])
    assert torch.equal(everything.load([1234])[0], images[4:5])


def test_synthetic_images_depend_on_the_class():
    dataset = build_datamodule("SYNTH_CIFAR100", seed=0).dataset("val")
    classes = range(6)
    halves = []
    for half in range(2):
        means = []
        for c in classes:
            members = torch.nonzero(dataset.targets == c).flatten()[half * 25 : (half + 1) * 25]
            means.append(dataset.load(members)[0].mean(dim=0).flatten())
        halves.append(torch.stack(means))
    within = (halves[0] - halves[1]).norm(dim=1)
    between = torch.cdist(halves[0], halves[0]) + torch.eye(len(classes)) * 1e9
    assert between.min() > 3 * within.max()


def test_synthetic_imagenet_batch_is_cheap():
    dataset = build_datamodule("SYNTH_IMAGENET").dataset("train")
    images, labels = dataset.load(torch.arange(0, 1300000, 100000))
    assert images.shape == (13, 3, 224, 224)
    assert images.abs().max() < 5


# --- partitions and dataloaders --------------------------------------------------------


def test_train_partition_of_the_val_split(shared_data):
    def partition(seed):
        dm = build_datamodule(
            "MNIST_GRAY",
            data_root=shared_data,
            train_partition="val",
            val_fraction=0.2,
            seed=seed,
            download=False,
        )
        dm.setup("fit")
        return dm, dm.train_set.indices, dm.val_set.indices

    dm, train, val = partition(seed=5)
    assert len(val) == 2000 and len(train) == 8000
    assert not set(train) & set(val)
    assert sorted(train + val) == list(range(10000))
    assert (train, val) == partition(seed=5)[1:]
    assert val != partition(seed=6)[2]
    x, y = next(iter(dm.val_dataloader()))
    assert torch.equal(y, dm.dataset("val").targets[val[: len(y)]])
    # only the val split exists, yet fit and validate run
    dm.prepare_data()


def test_dataloaders_yield_batches(shared_data):
    dm = build_datamodule(
        "CIFAR100",
        data_root=shared_data,
        batch_size=16,
        train_partition="val",
        augment=True,
        download=False,
    )
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (16,) and y.dtype == torch.long
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        x, y = next(iter(loader))
        assert x.shape == (16, 3, 32, 32) and y.shape == (16,)
    # augmentation reaches only the training loader, never dataset(split)
    assert dm.train_set.dataset.augment
    assert not dm.val_set.dataset.augment and not dm.dataset("val").augment

    synthetic = build_datamodule("SYNTH_MNIST", batch_size=8)
    synthetic.setup("fit")
    x, y = next(iter(synthetic.train_dataloader()))
    assert x.shape == (8, 1, 28, 28) and y.shape == (8,)
    assert len(synthetic.val_dataloader().dataset) == 10000

    # worker processes get a picklable copy of the (augmented) data set
    workers = build_datamodule("SYNTH_CIFAR100", batch_size=4, num_workers=1, augment=True)
    x, y = next(iter(workers.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and y.shape == (4,)


def test_augmentation_changes_training_images_only():
    dataset = build_datamodule("SYNTH_CIFAR100").dataset("val")
    augmented = dataset.augmented()
    assert augmented.augment and not dataset.augment
    torch.manual_seed(0)
    plain, _ = dataset.load(range(8))
    assert not torch.equal(augmented.load(range(8))[0], plain)
    assert torch.equal(dataset.load(range(8))[0], plain)
    mnist = build_datamodule("SYNTH_MNIST").dataset("val")
    assert mnist.augmented() is mnist


def test_trainer_runs_the_lightning_hooks(tmp_path):
    import pytorch_lightning as pl

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(28 * 28, 10)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.layer(x.flatten(1)), y)

        def validation_step(self, batch, batch_idx):
            return self.training_step(batch, batch_idx)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(
        fast_dev_run=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(Tiny(), datamodule=build_datamodule("SYNTH_MNIST", batch_size=4, augment=True))
    assert trainer.state.finished
