"""The trained-stage benchmark's victims: every network once at train.py's default seed, and
issue 21's networks again at further training seeds, each in its own folder."""

import pytest

from benchmarks.run import main
from benchmarks.trained import EXTRA_SEEDS, VICTIMS, victim_runs


def test_each_extra_seed_is_a_run_of_its_own_with_train_py_seed():
    runs = {folder: (victim, options) for folder, victim, options, *_ in victim_runs()}
    assert list(runs) == [
        "fcn3_mnist",
        "lenet5_cifar100",
        "vgg16_cifar100",
        "vgg16_cifar100_seed1",
        "resnet18_cifar100",
        "resnet18_cifar100_seed1",
    ]
    assert set(EXTRA_SEEDS) == {"vgg16_cifar100", "resnet18_cifar100"}
    base = {name: options for name, options, *_ in VICTIMS}
    for folder, (victim, options) in runs.items():
        if folder == victim:
            assert "--seed" not in options and options == base[victim]
        else:
            assert options == [*base[victim], "--seed", folder.rsplit("seed", 1)[1]]


def test_an_unknown_victim_is_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--only", "trained", "--victims", "vgg19_cifar100"])
    assert stop.value.code == 2
    assert "invalid choice: 'vgg19_cifar100'" in capsys.readouterr().err
