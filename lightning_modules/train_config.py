"""The typed configuration of ``train.py``: built once by its parser, read everywhere below it.

One field per option, named like the flag, in the parser's order. Frozen, so a run's
configuration is the one the user asked for from start to end.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainConfig:
    #: the ``--config`` YAML file its values came from, if any
    config: str | None = None

    # run
    exp_name: str = "train"
    log_dir: str = "logs"
    seed: int = 1234
    dryrun: bool = False
    resume: str | None = None
    quiet: bool = False
    attack_every_n_steps: int = 0

    # devices
    accelerator: str = "auto"
    devices: int | str = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"

    # data
    dataset: str = "SYNTH_MNIST"
    data_root: str = "data"
    imagenet_dir: str | None = None
    train_partition: str | None = None
    val_fraction: float = 0.1
    augment: bool = False
    num_workers: int = 0

    # victim network
    model: str = "dnn"
    n_hidden: int = 1
    n_dim: int = 300
    dropout: bool = False
    batchnorm: bool = False
    silu: bool = False
    leaky_relu: bool = False

    # training
    epochs: int = 100
    iter_train: bool = False
    iters: int = 1000
    batch_size: int = 128
    lr: float = 0.1
    optimizer: str = "SGD"
    scheduler: str = "linear"
    weight_decay: float = 5e-4
    warmup: bool = False

    # DP-SGD
    dp_target_epsilon: float | None = None
    dp_noise_multiplier: float | None = None
    dp_max_grad_norm: float = 1.0
    dp_delta: float = 1e-5

    # checkpoints
    model_path: str = "checkpoints"
    mid_save: bool = False
    epoch_interval: int = 10
    iter_interval: int = 100
