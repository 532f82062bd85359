"""Victim networks: every one is a feature extractor followed by one linear layer.

The attacks read the gradient of that last linear layer (the ``classifier``),
so each network exposes it, and the embedding that feeds it, under one
interface: :class:`VictimNetwork`. Networks are built by name from plain
hyperparameters (``build_network``), so a checkpoint's hyperparameters alone
rebuild its victim model.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.models.vgg import cfgs as vgg_cfgs
from torchvision.models.vgg import make_layers as make_vgg_layers

from user_errors import UserError

Shape = tuple[int, int, int]

DEFAULT_OPTIONS = {
    "n_hidden": 1,
    "n_dim": 300,
    "batchnorm": False,
    "silu": False,
    "leaky_relu": False,
    "dropout": False,
}


class VictimNetwork(nn.Module):
    """``features`` maps x to the embedding (B, d); ``classifier`` maps it to the logits."""

    def __init__(self, features: nn.Module, classifier: nn.Linear):
        super().__init__()
        if not isinstance(classifier, nn.Linear) or classifier.bias is None:
            raise ValueError("the classifier of a victim network must be an nn.Linear with bias")
        self.features = features
        self.classifier = classifier
        self.embedding_dim = classifier.in_features

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


# --- dnn ---------------------------------------------------------------------------------


def _build_dnn(num_classes: int, input_shape: Shape, *, n_hidden: int, n_dim: int) -> VictimNetwork:
    # As in the paper's code: an input layer to n_dim, then n_hidden more n_dim -> n_dim layers,
    # then the classifier. n_hidden = 1 is FCN-3 (three linear layers), n_hidden = 0 FCN-2.
    width = input_shape[0] * input_shape[1] * input_shape[2]
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(width, n_dim), nn.ReLU()]
    for _ in range(n_hidden):
        layers += [nn.Linear(n_dim, n_dim), nn.ReLU()]
    return VictimNetwork(nn.Sequential(*layers), nn.Linear(n_dim, num_classes))


def _init_convolutions(module: nn.Module) -> None:
    """He init (fan-out) for convs and unit BN, as torchvision's ResNet and the paper's nets use.

    PyTorch's default conv init is much smaller; the victim's initial logits,
    and so how much an untrained model leaks, depend on it.
    """
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


# --- lenet5 ------------------------------------------------------------------------------


def _build_lenet5(
    num_classes: int, input_shape: Shape, *, batchnorm: bool, silu: bool, leaky_relu: bool
) -> VictimNetwork:
    def activation() -> nn.Module:
        if silu:
            return nn.SiLU()
        if leaky_relu:
            return nn.LeakyReLU(0.01)
        return nn.ReLU()

    def norm(channels: int) -> nn.Module:
        return nn.BatchNorm2d(channels) if batchnorm else nn.Identity()

    # Padding a 28x28 image to 32x32 gives both sizes the same 16x5x5 map before the linear layers.
    padding = 2 if input_shape[1] == 28 else 0
    features = nn.Sequential(
        nn.Conv2d(input_shape[0], 6, kernel_size=5, padding=padding),
        norm(6),
        activation(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, kernel_size=5),
        norm(16),
        activation(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120),
        activation(),
        nn.Linear(120, 84),
        activation(),
    )
    _init_convolutions(features)
    return VictimNetwork(features, nn.Linear(84, num_classes))


# --- vgg ---------------------------------------------------------------------------------


def _build_vgg(num_classes: int, input_shape: Shape, *, cfg: str, dropout: bool) -> VictimNetwork:
    if input_shape[1:] == (32, 32):
        # CIFAR-sized input leaves a 1x1 map: the 512 channels are the whole feature.
        pool, flat_dim = nn.Identity(), 512
    else:
        # torchvision's pooling, so a 224x224 net has torchvision's layer sizes.
        pool, flat_dim = nn.AdaptiveAvgPool2d((7, 7)), 512 * 7 * 7
    head: list[nn.Module] = []
    for in_dim in (flat_dim, 4096):
        head += [nn.Linear(in_dim, 4096), nn.ReLU()]
        if dropout:
            head.append(nn.Dropout(0.5))
    features = nn.Sequential(
        make_vgg_layers(vgg_cfgs[cfg], batch_norm=True), pool, nn.Flatten(), *head
    )
    _init_convolutions(features)
    return VictimNetwork(features, nn.Linear(4096, num_classes))


# --- resnet ------------------------------------------------------------------------------


def _build_resnet(
    num_classes: int,
    input_shape: Shape,
    *,
    block: type[BasicBlock | Bottleneck],
    layers: list[int],
) -> VictimNetwork:
    resnet = ResNet(block, layers)
    if input_shape[1] <= 64:
        # The ImageNet stem (7x7 stride 2 + max-pool) would shrink a 32x32 image to 8x8 at once.
        resnet.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        # The same init torchvision gives every other conv of the ResNet.
        nn.init.kaiming_normal_(resnet.conv1.weight, mode="fan_out", nonlinearity="relu")
        resnet.maxpool = nn.Identity()
    # The fc layer becomes the classifier, outside the feature extractor.
    resnet.fc = nn.Identity()
    return VictimNetwork(resnet, nn.Linear(512 * block.expansion, num_classes))


# --- registry ----------------------------------------------------------------------------


def _fits_mnist(shape: Shape) -> bool:
    return shape == (1, 28, 28)


def _fits_lenet5(shape: Shape) -> bool:
    return shape[1:] in ((28, 28), (32, 32))


def _fits_rgb_multiple_of_32(shape: Shape) -> bool:
    channels, height, width = shape
    return channels == 3 and height == width and height > 0 and height % 32 == 0


@dataclass(frozen=True)
class NetworkBuilder:
    """Builds one named network; knows which options it uses and which inputs it fits."""

    build: Callable[..., VictimNetwork]
    options: tuple[str, ...]
    fits: Callable[[Shape], bool]
    needs: str  # the inputs it fits, as said in the error message

    def __call__(self, num_classes: int, input_shape: Shape, **options) -> VictimNetwork:
        return self.build(num_classes, input_shape, **options)


_RGB_NEEDS = "3xSxS (S a multiple of 32)"


def _vgg(cfg: str) -> NetworkBuilder:
    return NetworkBuilder(
        partial(_build_vgg, cfg=cfg), ("dropout",), _fits_rgb_multiple_of_32, _RGB_NEEDS
    )


def _resnet(block: type[BasicBlock | Bottleneck], layers: list[int]) -> NetworkBuilder:
    return NetworkBuilder(
        partial(_build_resnet, block=block, layers=layers), (), _fits_rgb_multiple_of_32, _RGB_NEEDS
    )


NETWORKS: dict[str, NetworkBuilder] = {
    "dnn": NetworkBuilder(_build_dnn, ("n_hidden", "n_dim"), _fits_mnist, "1x28x28"),
    "lenet5": NetworkBuilder(
        _build_lenet5,
        ("batchnorm", "silu", "leaky_relu"),
        _fits_lenet5,
        "Cx28x28 or Cx32x32",
    ),
    "vgg11": _vgg("A"),
    "vgg13": _vgg("B"),
    "vgg16": _vgg("D"),
    "vgg19": _vgg("E"),
    "resnet18": _resnet(BasicBlock, [2, 2, 2, 2]),
    "resnet34": _resnet(BasicBlock, [3, 4, 6, 3]),
    "resnet50": _resnet(Bottleneck, [3, 4, 6, 3]),
    "resnet101": _resnet(Bottleneck, [3, 4, 23, 3]),
    "resnet152": _resnet(Bottleneck, [3, 8, 36, 3]),
}


def _format_shape(shape) -> str:
    return "x".join(str(size) for size in shape)


def check_network_fits(name: str, input_shape, **options) -> None:
    """Raise ``UserError`` unless ``build_network`` would accept these arguments; builds nothing."""
    if name not in NETWORKS:
        raise UserError(f"unknown model {name!r}; valid models: {', '.join(NETWORKS)}")
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        raise TypeError(f"unknown network options: {', '.join(unknown)}")
    builder = NETWORKS[name]
    for option, value in options.items():
        if option not in builder.options and value != DEFAULT_OPTIONS[option]:
            owners = ", ".join(other for other, b in NETWORKS.items() if option in b.options)
            raise UserError(f"option --{option} applies to {owners} only")
    if options.get("silu") and options.get("leaky_relu"):
        raise UserError("options --silu and --leaky_relu exclude each other")
    if options.get("n_hidden", DEFAULT_OPTIONS["n_hidden"]) < 0:
        raise UserError(f"option --n_hidden must be >= 0, got {options['n_hidden']}")
    if options.get("n_dim", DEFAULT_OPTIONS["n_dim"]) < 1:
        raise UserError(f"option --n_dim must be >= 1, got {options['n_dim']}")
    shape = tuple(input_shape)
    if len(shape) != 3 or not builder.fits(shape):
        raise UserError(
            f"model {name!r} needs {builder.needs} input, dataset gives {_format_shape(shape)}"
        )


def build_network(
    name: str,
    num_classes: int,
    input_shape,
    *,
    n_hidden: int = 1,
    n_dim: int = 300,
    batchnorm: bool = False,
    silu: bool = False,
    leaky_relu: bool = False,
    dropout: bool = False,
) -> VictimNetwork:
    """Build the named network for ``num_classes`` classes and ``input_shape`` = (C, H, W)."""
    options = {
        "n_hidden": n_hidden,
        "n_dim": n_dim,
        "batchnorm": batchnorm,
        "silu": silu,
        "leaky_relu": leaky_relu,
        "dropout": dropout,
    }
    check_network_fits(name, input_shape, **options)
    builder = NETWORKS[name]
    own_options = {option: options[option] for option in builder.options}
    return builder(num_classes, tuple(input_shape), **own_options)
