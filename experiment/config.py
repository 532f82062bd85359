"""The typed configuration of ``attack.py``: built once by its parser, read everywhere below it.

One field per option, named like the flag (``--num_tries`` -> ``num_tries``), in the
parser's order so that ``results.json``'s ``config`` keeps its key order. Frozen: a
trained victim's options or a stage's checkpoint make a new one (``dataclasses.replace``),
never change the one the user asked for.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class AttackConfig:
    #: the ``--config`` YAML file its values came from, if any
    config: str | None = None

    # run
    exp_name: str = "Experiment1"
    log_dir: str = "logs"
    seed: int = 1234
    num_tries: int = 50
    results: str | None = None
    accelerator: str = "auto"
    devices: int = 1
    strategy: str = "auto"
    num_nodes: int = 1
    peer_timeout: float = 300.0
    quiet: bool = False

    # data and batch composition
    dataset: str = "SYNTH_MNIST"
    data_root: str = "data"
    imagenet_dir: str | None = None
    split: str = "train"
    train_partition: str | None = None
    val_fraction: float = 0.1
    num_images: int = 24
    max_size: int | None = None
    distribution: str = "random"
    num_target_cls: int = 10
    num_uniform_cls: int = 8

    # victim network
    model: str = "dnn"
    n_hidden: int = 1
    n_dim: int = 300
    dropout: bool = False
    batchnorm: bool = False
    silu: bool = False
    leaky_relu: bool = False

    # trained victim
    trained_model: bool = False
    checkpoint: str | None = None
    checkpoints: str | None = None
    epochs: int = 100
    iter_train: bool = False
    iters: int = 1000
    model_path: str = "checkpoints"

    # attack
    attacks: list[str] = field(default_factory=lambda: ["iLRG"])
    compare: bool = True
    simplified: bool = False
    estimate: bool = False
    alpha: float = 1.0
    norm_guard: float = 3.0

    # auxiliary data
    aux_split: str = "auto"
    aux_per_class: int = 10
    llbg_confidence: float | None = None

    # federated averaging
    local_epochs: int = 0
    local_batch_size: int | None = None
    local_lr: float = 0.01
    local_optimizer: str = "sgd"

    # defense
    defense: bool = False
    defense_method: str | None = None
    noise_std: float = 1e-3
    clip_bound: float = 4.0
    sparse_ratio: float = 10.0
    prune_ratio: float = 10.0
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    target_delta: float = 1e-5
    max_grad_norm: float = 1.0

    # error analysis
    analysis: bool = False
    ratio: float = 0.0

    # image reconstruction
    rec_img: bool = False
    optim: str = "ig"
    restarts: int = 1
    cost_fn: str = "sim"
    rec_optimizer: str = "adam"
    rec_lr: float | None = None
    signed: bool = False
    boxed: bool = False
    init: str = "randn"
    tv: float = 1e-6
    l2: float = 1e-6
    max_iterations: int = 8000
    loss_thresh: float = 1e-4
    fix_labels: bool = False
    soft_labels: str = "batch"
    gt_labels: bool = False
    save_image: bool = False

    def as_dict(self) -> dict:
        """The options by name, as ``results.json`` records them."""
        return dataclasses.asdict(self)
