"""The Python API for one's own model (integrations.audit) and the README's example of it."""

import ast
import copy
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

from attacks import build_attack
from attacks.gradients import batch_gradients, share
from attacks.local_update import LocalTraining, client_update, train_locally
from integrations.audit import LeakageAudit, loaded, shared_from_batch, shared_from_update
from tests.conftest import REPO
from user_errors import UserError


def own_model() -> nn.Module:
    """A user's MLP: no project network class, the classifier is simply the last Linear."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.Sigmoid(), nn.Linear(64, 10))


def batch(size=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(size, 1, 28, 28, generator=generator), torch.randint(
        0, 10, (size,), generator=generator
    )


def test_batch_side_equals_the_gradient_attack_py_shares():
    model = own_model()
    images, labels = batch()
    shared = shared_from_batch(model, images, labels)
    expected = share(model, batch_gradients(model, [(images, labels)], 12), 12)
    assert torch.equal(shared.weight_grad, expected.weight_grad)
    assert torch.equal(shared.bias_grad, expected.bias_grad)
    assert shared.num_images == 12 and shared.num_classes == 10


def test_update_side_equals_the_fedavg_client_of_attack_py():
    """The server's view of a returned float64 model is bit for bit the gradient attack.py's
    FedAvg client shares (client_update), so every attack gives the same counts."""
    model = own_model()
    images, labels = batch(16)
    training = LocalTraining(epochs=2, batch_size=8, lr=0.05)
    grads, steps = client_update(model, images, labels, training, torch.Generator().manual_seed(5))
    # What the client returns: its float64 weights after the same steps.
    local = copy.deepcopy(model).double()
    train_locally(local, images.double(), labels, training, torch.Generator().manual_seed(5))
    returned = dict(local.state_dict())
    shared = shared_from_update(model, returned, training, 16)
    assert steps == 4 and shared.local_update.steps == 4
    for name, grad in grads.items():
        assert torch.equal(shared.parameter_grads[name], grad), name
    audit = LeakageAudit(["iLRG", "decompose"])
    reference = share(model, grads, 16)
    for name in ("iLRG", "decompose"):
        mine = audit(shared).counts(name)
        theirs = build_attack(name)(reference).counts.tolist()
        assert mine == theirs


def test_scores_need_the_labels_and_match_the_metrics():
    model = own_model()
    images, labels = batch()
    audit = LeakageAudit(["iLRG", "zeros"])
    shared = shared_from_batch(model, images, labels)
    unscored = audit(shared)
    assert unscored.scores is None and "true_counts" not in unscored.record()
    scored = audit(shared, true_labels=labels)
    # An untrained MLP at K = 12: iLRG restores every count; predicting nothing recalls nothing.
    assert scored.scores["iLRG"] == {
        "LeAcc": 1.0,
        "LnAcc": 1.0,
        "LnAcc+": 1.0,
        "IRec": 1.0,
        "Exact": 1.0,
    }
    assert scored.scores["zeros"]["IRec"] == 0.0 and scored.scores["zeros"]["Exact"] == 0.0
    assert scored.record()["true_counts"] == torch.bincount(labels, minlength=10).tolist()
    assert scored.counts("iLRG") == scored.record()["true_counts"]


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda s: s.pop("3.bias"),
            "the returned weights lack 1 of the model's parameters (first: '3.bias')",
        ),
        (
            lambda s: s.__setitem__("3.weight", torch.zeros(10, 63)),
            "the returned '3.weight' has shape (10, 63), the sent one (10, 64)",
        ),
        (
            lambda s: s["1.bias"].__setitem__(0, float("nan")),
            "the returned '1.bias' holds non-finite values",
        ),
    ],
)
def test_a_malformed_update_is_one_clear_error(change, message):
    model = own_model()
    returned = {name: value.clone() for name, value in model.state_dict().items()}
    change(returned)
    with pytest.raises(UserError) as err:
        shared_from_update(model, returned, LocalTraining(1, None, 0.01), 8)
    assert str(err.value) == message


def test_bad_truth_and_models_are_refused():
    model = own_model()
    images, labels = batch()
    shared = shared_from_batch(model, images, labels)
    audit = LeakageAudit(["iLRG"])
    with pytest.raises(UserError, match="the true counts sum to 11, the batch holds 12"):
        audit(shared, true_counts=torch.bincount(labels[:11], minlength=10))
    with pytest.raises(
        UserError, match=r"true labels must be a vector of class indices in \[0, 10\)"
    ):
        audit(shared, true_labels=labels + 10)
    no_bias = nn.Sequential(nn.Flatten(), nn.Linear(784, 10, bias=False))
    with pytest.raises(UserError, match="has no bias; iLRG needs it"):
        shared_from_batch(no_bias, images, labels)
    with pytest.raises(UserError, match="the weights do not fit Sequential"):
        loaded(model, {"0.weight": torch.zeros(1)})
    with pytest.raises(UserError, match="unknown attack 'iLGR'"):
        LeakageAudit(["iLGR"])


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    found = re.search(r"<!-- api-example -->\n```python\n(.*?)```", text, re.S)
    assert found, "the README's API example (after <!-- api-example -->) is missing"
    return found.group(1)


def test_the_readme_api_example_runs_as_written(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(readme_example())
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, second = proc.stdout.strip().splitlines()
    counts, exact = first.rsplit("] ", 1)
    assert sum(int(c) for c in counts.strip("[").split(",")) == 16
    assert exact == "1.0"
    irec = ast.literal_eval(second)
    assert set(irec) == {"iLRG", "decompose", "zeros"}
    assert irec["zeros"] == 0.0 and irec["iLRG"] >= 0.75 and irec["decompose"] >= 0.75
