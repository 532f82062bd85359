"""Broken data files reach the user as one line naming the file, exit code 2, nothing that looks finished."""

import gzip
import pickle
import struct
import subprocess
import sys

import numpy as np
from PIL import Image

from tests.conftest import REPO


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return (
        struct.pack(">I", magic)
        + struct.pack(f">{array.ndim}I", *array.shape)
        + array.astype(np.uint8).tobytes()
    )


def write_mnist(root, images: np.ndarray, labels: np.ndarray, truncate: int = 0):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    data = idx_bytes(images, 2051)
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(data[: len(data) - truncate]))
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels, 2049)))


def attack(tmp_path, *args):
    cmd = [
        sys.executable,
        "attack.py",
        "--quiet",
        "--num_tries",
        "2",
        "--log_dir",
        str(tmp_path / "logs"),
        *args,
    ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attack.py: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in proc.stderr


def test_truncated_idx_file(tmp_path):
    images = np.zeros((40, 28, 28))
    write_mnist(tmp_path, images, np.arange(40) % 10, truncate=100)
    proc = attack(
        tmp_path, "--dataset", "MNIST_GRAY", "--data_root", str(tmp_path), "--split", "val"
    )
    assert_one_line_error(proc, "t10k-images-idx3-ubyte.gz", "bytes")
    assert not (tmp_path / "logs").exists()


def test_images_of_the_wrong_size(tmp_path):
    write_mnist(tmp_path, np.zeros((40, 32, 32)), np.arange(40) % 10)
    proc = attack(
        tmp_path, "--dataset", "MNIST_GRAY", "--data_root", str(tmp_path), "--split", "val"
    )
    assert_one_line_error(proc, "t10k-images-idx3-ubyte.gz", "32x32, MNIST is 28x28")


def test_cifar_pickle_with_wrong_keys(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    with open(folder / "test", "wb") as out:
        pickle.dump({"images": np.zeros((10, 3072), np.uint8), "labels": list(range(10))}, out)
    proc = attack(
        tmp_path,
        "--dataset",
        "CIFAR100",
        "--model",
        "lenet5",
        "--data_root",
        str(tmp_path),
        "--split",
        "val",
    )
    assert_one_line_error(proc, "cifar-100-python/test", "'data' and 'fine_labels'")


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_cifar_pickle_that_would_run_code_is_refused(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    marker = tmp_path / "pwned"
    with open(folder / "test", "wb") as out:
        pickle.dump({"data": _RunsACommand(marker), "fine_labels": [0]}, out)
    proc = attack(
        tmp_path,
        "--dataset",
        "CIFAR100",
        "--model",
        "lenet5",
        "--data_root",
        str(tmp_path),
        "--split",
        "val",
    )
    assert_one_line_error(proc, "cifar-100-python/test")
    assert not marker.exists()


def test_imagenet_folder_without_images(tmp_path):
    (tmp_path / "val" / "n01440764").mkdir(parents=True)
    (tmp_path / "val" / "n01440764" / "notes.txt").write_text("no images here")
    proc = attack(
        tmp_path,
        "--dataset",
        "ImageNet",
        "--model",
        "resnet18",
        "--imagenet_dir",
        str(tmp_path),
        "--split",
        "val",
    )
    assert_one_line_error(proc, "ImageNet val split has no images")


def test_corrupt_jpeg_fails_before_any_work(tmp_path):
    # Two classes of good images and one file that is not a JPEG at all: the batches are drawn
    # from the seed before the run, and every file they use is decoded then, so the error comes
    # before the run folder exists.
    for index, wnid in enumerate(["n01440764", "n01443537"]):
        folder = tmp_path / "val" / wnid
        folder.mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (64, 64), (40 * i, 100 * index, 50)).save(folder / f"img{i}.JPEG")
    broken = tmp_path / "val" / "n01440764" / "broken.JPEG"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    results = tmp_path / "results.json"
    proc = attack(
        tmp_path,
        *(
            "--dataset",
            "ImageNet",
            "--model",
            "resnet18",
            "--imagenet_dir",
            str(tmp_path),
            "--split",
            "val",
        ),
        *("--num_images", "9", "--no-compare"),
        *("--results", str(results)),
    )
    assert_one_line_error(proc, "broken.JPEG: cannot decode the image")
    assert proc.stdout == ""  # no table
    assert not results.exists() and not (tmp_path / "logs").exists()
