import pytest

from ilora.evaluation.metrics import (
    all_metrics,
    average_accuracy,
    average_accuracy_over_time,
    backward_transfer,
    forgetting,
    forward_transfer,
)

# rows: before training, after task 1, 2, 3; columns: tasks 1..3
R = [
    [0.3, 0.3, 0.2],
    [0.9, 0.4, 0.2],
    [0.7, 0.8, 0.3],
    [0.6, 0.7, 0.9],
]


def test_metrics_on_a_hand_computed_matrix():
    assert average_accuracy(R) == pytest.approx((0.6 + 0.7 + 0.9) / 3)
    assert average_accuracy_over_time(R) == pytest.approx((0.9 + (0.7 + 0.8) / 2 + (0.6 + 0.7 + 0.9) / 3) / 3)
    assert backward_transfer(R) == pytest.approx(((0.6 - 0.9) + (0.7 - 0.8)) / 2)
    assert forward_transfer(R) == pytest.approx(((0.4 - 0.3) + (0.3 - 0.2)) / 2)
    assert forgetting(R) == pytest.approx(((0.9 - 0.6) + (0.8 - 0.7)) / 2)


def test_forgetting_takes_the_best_earlier_accuracy_not_the_one_right_after_training():
    R2 = [[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.8, 0.5, 0.0], [0.4, 0.5, 0.9]]
    assert forgetting(R2) == pytest.approx(((0.8 - 0.4) + (0.5 - 0.5)) / 2)
    assert backward_transfer(R2) == pytest.approx(((0.4 - 0.5) + (0.5 - 0.5)) / 2)


def test_no_forgetting_gives_zero_bwt_and_forgetting():
    R3 = [[0.1, 0.1], [0.9, 0.1], [0.9, 0.8]]
    metrics = all_metrics(R3)
    assert metrics["BWT"] == 0.0 and metrics["forgetting"] == 0.0 and metrics["AP"] == pytest.approx(0.85)


def test_one_task_has_no_transfer_metrics():
    metrics = all_metrics([[0.2], [0.7]])
    assert metrics["AP"] == 0.7 and metrics["BWT"] is None and metrics["FWT"] is None and metrics["forgetting"] is None


def test_malformed_matrix_is_rejected():
    with pytest.raises(ValueError, match=r"\(N\+1\) x N"):
        average_accuracy([[0.1, 0.2], [0.3, 0.4]])


def test_no_metric_reads_a_task_beyond_the_next_one():
    """Cells after task k for tasks beyond k + 1 may be None (eval_tasks: seen_and_next)."""
    import random

    rng = random.Random(0)
    for n in (2, 3, 5):
        R = [[rng.random() for _ in range(n)] for _ in range(n + 1)]
        partial = [[None if 0 < k < n and i > k else v for i, v in enumerate(row)] for k, row in enumerate(R)]
        assert sum(v is None for row in partial for v in row) == (n - 1) * (n - 2) // 2
        assert all_metrics(partial) == all_metrics(R)
