"""Loading victim checkpoints without running any code that a file brings along.

``torch.load(weights_only=True)`` only rebuilds tensors and plain containers; the
network is then rebuilt from the plain hyperparameters and the weights copied
in. Every way a file can be wrong becomes one :class:`CheckpointError` line that
names the file.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from user_errors import CheckpointError, UserError

STAGE_PATTERN = re.compile(r"_(?P<unit>Epoch|Iter)(?P<n>\d+)\.ckpt$")
# torch words it "Unsupported global: GLOBAL x.y" or "unsupported GLOBAL x.y whose module x is blocked".
UNSAFE_GLOBAL = re.compile(r"unsupported (?:global: )?GLOBAL (\S+?)\.?(?:\s|$)", re.IGNORECASE)
WEIGHTS_ONLY_REASON = re.compile(r"WeightsUnpickler error:\s*(\S[^\n]*)")
#: the hyperparameters that decide the network's architecture (and the data it fits)
NETWORK_KEYS = (
    "model",
    "num_classes",
    "input_shape",
    "n_hidden",
    "n_dim",
    "batchnorm",
    "dropout",
    "silu",
    "leaky_relu",
)


def read_checkpoint(path, map_location="cpu") -> dict:
    """The checkpoint dictionary of ``path``, loaded weights-only; CheckpointError otherwise."""
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        with warnings.catch_warnings():
            # A file that torch did not write draws pickle-protocol warnings; the error below says it all.
            warnings.simplefilter("ignore", UserWarning)
            checkpoint = torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = UNSAFE_GLOBAL.search(str(err))
        if unsafe:
            raise CheckpointError(
                f"checkpoint {path} refused: loading it would run code it brings along (unsupported global {unsafe[1]})"
            ) from None
        refused = WEIGHTS_ONLY_REASON.search(str(err))
        reason = f"weights-only unpickler: {refused[1]}" if refused else _first_line(err)
        raise CheckpointError(
            f"checkpoint {path} is not a torch checkpoint or is truncated ({reason})"
        ) from None
    # What torch.load raises on a file that is not a (complete) checkpoint varies with the damage.
    except (
        zipfile.BadZipFile,
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
        KeyError,
        IndexError,
        TypeError,
    ) as err:
        raise CheckpointError(
            f"checkpoint {path} is not a torch checkpoint or is truncated ({_first_line(err)})"
        ) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"checkpoint {path} holds no state_dict: not a Lightning checkpoint")
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, dict) or "model" not in hparams:
        raise CheckpointError(
            f"checkpoint {path} has no hyper_parameters to rebuild its network from "
            "(was it saved by train.py?)"
        )
    return checkpoint


def classifier_from_checkpoint(checkpoint: dict, path="checkpoint"):
    """The :class:`VictimClassifier` of a dictionary returned by :func:`read_checkpoint`."""
    from lightning_modules.classifier import VictimClassifier

    hparams = dict(checkpoint["hyper_parameters"])
    try:
        classifier = VictimClassifier(**hparams)
    except UserError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from None
    except TypeError as err:
        raise CheckpointError(
            f"checkpoint {path} has hyper_parameters this code does not know ({err})"
        ) from None
    try:
        classifier.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(
            f"checkpoint {path}: its weights do not fit a {hparams['model']} with its own "
            f"hyper_parameters ({_state_dict_mismatch(err)})"
        ) from None
    return classifier.eval()


def load_victim(path, map_location="cpu"):
    """``(VictimClassifier, hparams)`` of a checkpoint written by ``train.py``, loaded safely."""
    checkpoint = read_checkpoint(path, map_location)
    return classifier_from_checkpoint(checkpoint, path), dict(checkpoint["hyper_parameters"])


def checkpoint_stage(path, checkpoint: dict | None = None) -> tuple[str, int]:
    """``("epoch" | "iteration", N)``: from the file name ``..._Epoch<N>.ckpt`` / ``..._Iter<N>.ckpt``,
    else from the checkpoint's own ``global_step`` (an iteration)."""
    match = STAGE_PATTERN.search(Path(path).name)
    if match:
        return ("epoch" if match["unit"] == "Epoch" else "iteration", int(match["n"]))
    if checkpoint is None:
        checkpoint = read_checkpoint(path)
    return "iteration", int(checkpoint.get("global_step", 0))


def stage_checkpoint_name(model: str, dataset: str, unit: str, n: int) -> str:
    """``<model>_<dataset>_Epoch<N>.ckpt`` or ``..._Iter<N>.ckpt`` (unit "epoch" / "iteration")."""
    suffix = {"epoch": "Epoch", "iteration": "Iter"}[unit]
    return f"{model}_{dataset}_{suffix}{n}.ckpt"


def interrupted_checkpoint_name(model: str, dataset: str) -> str:
    """Where an interrupted training run leaves the state ``train.py --resume`` continues from."""
    return f"{model}_{dataset}_interrupted.ckpt"


def _first_line(err: BaseException, limit: int = 160) -> str:
    """The error's first sentence (whole sentences, never cut mid-word), with its type."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else ""
    if len(first) > limit:
        end = first.find(". ")
        first = first[: end + 1] if 0 < end < limit else first[:limit].rsplit(" ", 1)[0] + " ..."
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _state_dict_mismatch(err: RuntimeError) -> str:
    lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
    return (lines[0] if lines else _first_line(err))[:200]


def atomic_checkpoint_io():
    """Lightning's checkpoint writer, but each file is written under a temporary name in its
    folder and renamed: a full disk or a kill mid-write leaves the old file or none, never a
    truncated checkpoint (or an empty ``_interrupted.ckpt``) that a sweep or ``--resume``
    would then meet."""
    from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            try:
                super().save_checkpoint(checkpoint, temporary, storage_options)
                os.replace(temporary, path)
            except BaseException:
                temporary.unlink(missing_ok=True)
                raise

    return AtomicCheckpointIO()
