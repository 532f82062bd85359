"""The victim networks: one interface, the classifier last, options that act, one-line errors."""

import functools

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from lightning_modules import NETWORKS, VictimNetwork, build_network, check_network_fits
from user_errors import UserError

NUM_CLASSES = 7
MNIST, CIFAR, IMAGENET = (1, 28, 28), (3, 32, 32), (3, 224, 224)
VGGS = ["vgg11", "vgg13", "vgg16", "vgg19"]
RESNETS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
LENET5_OPTIONS = [{}, {"batchnorm": True}, {"silu": True}, {"leaky_relu": True}]

# (name, input shape, options) for every network and every input it supports.
CASES = (
    [("dnn", MNIST, {"n_hidden": n}) for n in (0, 1, 2)]
    + [("lenet5", shape, opts) for shape in (MNIST, CIFAR) for opts in LENET5_OPTIONS]
    + [(name, CIFAR, {}) for name in VGGS]
    + [("vgg11", CIFAR, {"dropout": True})]
    + [(name, CIFAR, {}) for name in RESNETS[:3]]
)
# Deeper variants of a family differ only in stage sizes; the ImageNet input size only in the
# stem and pooling, checked on the paper's ImageNet models and the smallest of each family.
SLOW_CASES = [(name, CIFAR, {}) for name in RESNETS[3:]] + [
    (name, IMAGENET, {}) for name in ("vgg11", "vgg16", "resnet18", "resnet50")
]


def case_id(name, shape, options):
    suffix = "".join(f"-{key}={value}" for key, value in options.items())
    return f"{name}-{'x'.join(map(str, shape))}{suffix}"


ALL_CASES = [pytest.param(*case, id=case_id(*case)) for case in CASES] + [
    pytest.param(*case, id=case_id(*case), marks=pytest.mark.slow) for case in SLOW_CASES
]


@functools.lru_cache(maxsize=4)  # bounded: a 224x224 VGG alone holds 0.5 GB of weights
def cached_network(name, shape, option_items):
    torch.manual_seed(0)
    return build_network(name, NUM_CLASSES, shape, **dict(option_items)).eval()


def network(name, shape, **options):
    """Shared by the tests, which only read it in eval mode."""
    return cached_network(name, shape, tuple(sorted(options.items())))


def images(shape, batch_size=2):
    return torch.randn(batch_size, *shape, generator=torch.Generator().manual_seed(1))


def modules_of_type(net, module_type):
    return [module for module in net.modules() if type(module) is module_type]


@pytest.mark.parametrize(("name", "shape", "options"), ALL_CASES)
def test_interface_and_classifier_last(name, shape, options):
    net = network(name, shape, **options)
    x = images(shape)
    assert isinstance(net, VictimNetwork)
    assert isinstance(net.classifier, nn.Linear) and net.classifier.bias is not None
    assert net.embedding_dim == net.classifier.in_features
    assert net.classifier.out_features == NUM_CLASSES

    # Record the order in which modules finish, and what the classifier receives.
    finished, classifier_inputs = [], []
    hooks = [
        module.register_forward_hook(lambda m, args, out: finished.append(m))
        for module in net.modules()
        if module is not net
    ]
    hooks.append(
        net.classifier.register_forward_hook(lambda m, args, out: classifier_inputs.append(args[0]))
    )
    try:
        with torch.no_grad():
            logits = net(x)
    finally:
        for hook in hooks:
            hook.remove()

    with torch.no_grad():
        embedding = net.embed(x)
        assert torch.equal(logits, net.classifier(embedding))
    assert logits.shape == (2, NUM_CLASSES)
    assert embedding.shape == (2, net.embedding_dim)
    assert finished[-1] is net.classifier
    assert finished.count(net.classifier) == 1
    assert torch.equal(classifier_inputs[0], embedding)
    assert [m for m in net.modules() if isinstance(m, nn.Linear)][-1] is net.classifier


def test_registry_lists_every_network():
    assert list(NETWORKS) == ["dnn", "lenet5", *VGGS, *RESNETS]


@pytest.mark.parametrize(
    ("name", "shape", "options"),
    [pytest.param(*case, id=case_id(*case)) for case in CASES + SLOW_CASES],
)
def test_check_network_fits_accepts_what_builds(name, shape, options):
    assert check_network_fits(name, shape, **options) is None


def test_classifier_gradient_has_the_attacked_shape():
    net = network("lenet5", CIFAR)
    loss = nn.functional.cross_entropy(net(images(CIFAR)), torch.tensor([0, 3]))
    weight_grad, bias_grad = torch.autograd.grad(loss, [net.classifier.weight, net.classifier.bias])
    assert weight_grad.shape == (NUM_CLASSES, net.embedding_dim)
    assert bias_grad.shape == (NUM_CLASSES,)


# --- options -----------------------------------------------------------------------------


@pytest.mark.parametrize("n_hidden", [0, 1, 2])
def test_dnn_hidden_layers(n_hidden):
    # An input layer plus n_hidden more: n_hidden = 1 is FCN-3, three linear layers in all.
    net = network("dnn", MNIST, n_hidden=n_hidden)
    hidden = modules_of_type(net.features, nn.Linear)
    assert len(hidden) == n_hidden + 1
    assert hidden[0].in_features == 784
    assert all(layer.out_features == 300 for layer in hidden)
    assert len(modules_of_type(net.features, nn.ReLU)) == n_hidden + 1
    assert net.embedding_dim == 300


def test_dnn_width():
    net = build_network("dnn", NUM_CLASSES, MNIST, n_hidden=2, n_dim=50)
    assert [layer.out_features for layer in modules_of_type(net.features, nn.Linear)] == [
        50,
        50,
        50,
    ]
    assert net.embedding_dim == 50


@pytest.mark.parametrize("shape", [MNIST, CIFAR])
def test_lenet5_default(shape):
    net = network("lenet5", shape)
    assert net.embedding_dim == 84
    assert [layer.out_channels for layer in modules_of_type(net, nn.Conv2d)] == [6, 16]
    assert [layer.in_features for layer in modules_of_type(net, nn.Linear)] == [400, 120, 84]
    assert len(modules_of_type(net, nn.ReLU)) == 4
    for other in (nn.SiLU, nn.LeakyReLU, nn.BatchNorm2d):
        assert not modules_of_type(net, other)


def test_lenet5_batchnorm():
    net = network("lenet5", MNIST, batchnorm=True)
    assert [bn.num_features for bn in modules_of_type(net, nn.BatchNorm2d)] == [6, 16]


def test_lenet5_silu():
    net = network("lenet5", MNIST, silu=True)
    assert len(modules_of_type(net, nn.SiLU)) == 4
    assert not modules_of_type(net, nn.ReLU)


def test_lenet5_leaky_relu():
    net = network("lenet5", MNIST, leaky_relu=True)
    leaky = modules_of_type(net, nn.LeakyReLU)
    assert len(leaky) == 4
    assert all(layer.negative_slope == 0.01 for layer in leaky)
    assert not modules_of_type(net, nn.ReLU)


@pytest.mark.parametrize(("name", "num_convs"), zip(VGGS, [8, 10, 13, 16]))
def test_vgg_stages(name, num_convs):
    net = network(name, CIFAR)
    convs = modules_of_type(net, nn.Conv2d)
    assert len(convs) == num_convs
    assert all(conv.kernel_size == (3, 3) for conv in convs)
    assert len(modules_of_type(net, nn.BatchNorm2d)) == num_convs
    assert len(modules_of_type(net, nn.MaxPool2d)) == 5
    assert [layer.in_features for layer in modules_of_type(net, nn.Linear)] == [512, 4096, 4096]
    assert net.embedding_dim == 4096
    assert not modules_of_type(net, nn.Dropout)


@pytest.mark.slow
def test_vgg_imagenet_pools_to_7x7():
    net = network("vgg11", IMAGENET)
    assert len(modules_of_type(net, nn.AdaptiveAvgPool2d)) == 1
    assert modules_of_type(net, nn.Linear)[0].in_features == 512 * 7 * 7


def test_vgg_dropout():
    net = network("vgg11", CIFAR, dropout=True)
    dropouts = modules_of_type(net, nn.Dropout)
    assert len(dropouts) == 2
    assert all(dropout.p == 0.5 for dropout in dropouts)


def test_vgg_dropout_acts_in_training():
    net = build_network("vgg11", NUM_CLASSES, CIFAR, dropout=True).train()
    x = images(CIFAR)
    with torch.no_grad():
        assert not torch.equal(net.embed(x), net.embed(x))


@pytest.mark.parametrize(
    ("name", "block", "layers"),
    [
        ("resnet18", BasicBlock, [2, 2, 2, 2]),
        ("resnet34", BasicBlock, [3, 4, 6, 3]),
        ("resnet50", Bottleneck, [3, 4, 6, 3]),
        pytest.param("resnet101", Bottleneck, [3, 4, 23, 3], marks=pytest.mark.slow),
        pytest.param("resnet152", Bottleneck, [3, 8, 36, 3], marks=pytest.mark.slow),
    ],
)
def test_resnet_blocks_and_cifar_stem(name, block, layers):
    net = network(name, CIFAR)
    resnet = net.features
    stages = [resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4]
    assert [len(stage) for stage in stages] == layers
    assert all(type(b) is block for stage in stages for b in stage)
    assert net.embedding_dim == 512 * block.expansion
    assert isinstance(resnet.fc, nn.Identity)
    assert resnet.conv1.kernel_size == (3, 3) and resnet.conv1.stride == (1, 1)
    assert resnet.conv1.bias is None
    assert isinstance(resnet.maxpool, nn.Identity)


@pytest.mark.slow
def test_resnet_imagenet_stem():
    resnet = network("resnet50", IMAGENET).features
    assert resnet.conv1.kernel_size == (7, 7) and resnet.conv1.stride == (2, 2)
    assert isinstance(resnet.maxpool, nn.MaxPool2d)


# --- errors ------------------------------------------------------------------------------


def raises_user_error(message, name, shape, **options):
    """Both entry points give the same one-line message."""
    for call in (
        lambda: check_network_fits(name, shape, **options),
        lambda: build_network(name, NUM_CLASSES, shape, **options),
    ):
        with pytest.raises(UserError) as error:
            call()
        assert str(error.value) == message
        assert "\n" not in message


def test_unknown_model():
    raises_user_error(
        "unknown model 'xyz'; valid models: dnn, lenet5, vgg11, vgg13, vgg16, vgg19, "
        "resnet18, resnet34, resnet50, resnet101, resnet152",
        "xyz",
        CIFAR,
    )


@pytest.mark.parametrize(
    ("name", "shape", "message"),
    [
        ("dnn", CIFAR, "model 'dnn' needs 1x28x28 input, dataset gives 3x32x32"),
        (
            "lenet5",
            (3, 64, 64),
            "model 'lenet5' needs Cx28x28 or Cx32x32 input, dataset gives 3x64x64",
        ),
        (
            "vgg16",
            MNIST,
            "model 'vgg16' needs 3xSxS (S a multiple of 32) input, dataset gives 1x28x28",
        ),
        (
            "resnet18",
            (3, 32, 64),
            "model 'resnet18' needs 3xSxS (S a multiple of 32) input, dataset gives 3x32x64",
        ),
    ],
)
def test_input_shape_that_does_not_fit(name, shape, message):
    raises_user_error(message, name, shape)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("dnn", {"silu": True}, "option --silu applies to lenet5 only"),
        ("vgg16", {"batchnorm": True}, "option --batchnorm applies to lenet5 only"),
        ("resnet18", {"leaky_relu": True}, "option --leaky_relu applies to lenet5 only"),
        ("lenet5", {"n_hidden": 2}, "option --n_hidden applies to dnn only"),
        ("resnet50", {"n_dim": 100}, "option --n_dim applies to dnn only"),
        (
            "resnet18",
            {"dropout": True},
            "option --dropout applies to vgg11, vgg13, vgg16, vgg19 only",
        ),
        (
            "lenet5",
            {"silu": True, "leaky_relu": True},
            "options --silu and --leaky_relu exclude each other",
        ),
        ("dnn", {"n_hidden": -1}, "option --n_hidden must be >= 0, got -1"),
        ("dnn", {"n_dim": 0}, "option --n_dim must be >= 1, got 0"),
    ],
)
def test_misplaced_or_bad_option(name, options, message):
    shape = {"dnn": MNIST, "lenet5": MNIST}.get(name, CIFAR)
    raises_user_error(message, name, shape, **options)


def test_option_at_its_default_is_accepted_everywhere():
    # Entry points pass every option; only a changed value is a mistake.
    check_network_fits("resnet18", CIFAR, n_hidden=1, n_dim=300, silu=False, dropout=False)
