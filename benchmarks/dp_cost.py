"""What a DP-SGD client costs beside a plain one: the same batch, FedSGD and FedAvg.

FCN-3 on MNIST shapes and LeNet-5 on CIFAR-100 shapes, K = 32, untrained; the
plain client is ``attacks.gradients.batch_gradients`` (FedSGD) or
``attacks.local_update.client_update`` (FedAvg E = 5, B = 8, a float64 copy);
the DP-SGD client is ``attacks.dp_sgd`` through Opacus with clip norm 1 and
noise multiplier 1. Median of repeats, both timed in the same run.
"""

from __future__ import annotations

import statistics
from functools import partial

import torch

from benchmarks.common import Result, seconds

#: (label, network, input shape, classes)
VICTIMS = (("FCN-3", "dnn", (1, 28, 28), 10), ("LeNet-5", "lenet5", (3, 32, 32), 100))


def dp_client_cost(settings) -> list[Result]:
    try:
        import opacus  # noqa: F401
    except ImportError:
        return [
            Result(
                "dp_client",
                "DP-SGD client against the plain one",
                "",
                skipped="opacus not installed (pip install -e '.[dp]')",
                target="<= 3x",
            )
        ]
    from attacks.dp_sgd import Privacy, private_gradient, private_steps
    from attacks.gradients import batch_gradients
    from attacks.local_update import LocalTraining, client_update
    from lightning_modules.networks import build_network

    repeats = settings.pick(7, 2)
    privacy = Privacy(1.0, 1.0, 1e-5)
    training = LocalTraining(5, 8, 0.01)
    results = []
    for label, name, shape, classes in VICTIMS:
        torch.manual_seed(0)
        model = build_network(name, classes, shape).eval()
        images = torch.rand(32, *shape)
        labels = torch.randint(0, classes, (32,))
        cases = {
            "FedSGD": (
                partial(batch_gradients, model, [(images, labels)], 32),
                partial(private_gradient, model, images, labels, privacy, torch.Generator()),
            ),
            "FedAvg E = 5, B = 8": (
                partial(client_update, model, images, labels, training, torch.Generator()),
                partial(private_steps, model, images, labels, privacy, training, torch.Generator()),
            ),
        }
        for mode, (plain, private) in cases.items():
            plain(), private()  # warm-up: first calls load kernels and Opacus' modules
            plain_times = [seconds(plain) for _ in range(repeats)]
            private_times = [seconds(private) for _ in range(repeats)]
            ratio = statistics.median(private_times) / statistics.median(plain_times)
            results.append(
                Result.timed(
                    f"dp_client_{name}_{'fedsgd' if mode == 'FedSGD' else 'fedavg'}",
                    f"{label}, K = 32, {mode}: DP-SGD client (Opacus) against the plain one",
                    private_times,
                    value=ratio,
                    value_text=f"{ratio:.1f}x ({statistics.median(private_times) * 1e3:.1f} ms "
                    f"against {statistics.median(plain_times) * 1e3:.1f} ms)",
                    target="<= 3x",
                    passed=ratio <= 3,
                    details={"plain_seconds": plain_times},
                )
            )
    return results
