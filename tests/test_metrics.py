import math

import pytest
import torch

from attacks.metrics import InstanceRecall, LabelExistenceAccuracy, LabelNumberAccuracy, metric_set

TRUE = torch.tensor([2, 0, 1, 0, 3])  # K = 6 over C = 5
RESTORED = torch.tensor([2, 1, 0, 0, 2])


def test_label_existence_accuracy():
    # presence: restored [T, T, F, F, T] vs true [T, F, T, F, T] -> 3 of 5 agree
    assert float(LabelExistenceAccuracy()(RESTORED, TRUE)) == pytest.approx(0.6)
    assert float(LabelExistenceAccuracy()(RESTORED > 0, TRUE)) == pytest.approx(0.6)


def test_label_number_accuracy_over_all_and_present_classes():
    # exact counts at classes 0 and 3 -> 2 of 5; among the present classes {0, 2, 4} only class 0
    assert float(LabelNumberAccuracy()(RESTORED, TRUE)) == pytest.approx(0.4)
    assert float(LabelNumberAccuracy(present_only=True)(RESTORED, TRUE)) == pytest.approx(1 / 3)


def test_instance_recall():
    # min(restored, true) = [2, 0, 0, 0, 2] -> 4 of 6
    assert float(InstanceRecall()(RESTORED, TRUE)) == pytest.approx(4 / 6)


def test_metrics_average_per_batch_and_reset():
    metric = LabelNumberAccuracy()
    metric.update(RESTORED, TRUE)  # 0.4
    metric.update(TRUE, TRUE)  # 1.0
    assert float(metric.compute()) == pytest.approx(0.7)
    metric.update(torch.stack([TRUE, RESTORED]), torch.stack([TRUE, TRUE]))
    assert float(metric.compute()) == pytest.approx((0.4 + 1 + 1 + 0.4) / 4)
    metric.reset()
    assert math.isnan(float(metric.compute()))


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        LabelExistenceAccuracy()(torch.zeros(3), torch.zeros(4))


def test_metric_set_by_method_kind():
    assert list(metric_set(restores_counts=False)) == ["LeAcc"]
    counting = metric_set(restores_counts=True, simplified=True)
    assert list(counting) == ["LeAcc", "LnAcc", "LnAcc+", "IRec", "Exact"]
    assert counting["LnAcc"].present_only
