"""Continual-learning metrics: pure functions of the accuracy matrix.

R[k][i] is the accuracy on task i (0-based, N tasks) after training tasks 1..k; row 0 is the model
before any training, so R has N + 1 rows.

    AP          = 1/N     sum_i R[N][i]                              final average accuracy
    AvgAcc      = 1/N     sum_{k=1..N} ( 1/k sum_{i<k} R[k][i] )      average accuracy over time (seen tasks)
    BWT         = 1/(N-1) sum_{i<N-1} ( R[N][i] - R[i+1][i] )         backward transfer (< 0: forgetting)
    FWT         = 1/(N-1) sum_{i>=1}  ( R[i][i] - R[0][i] )           forward transfer (before task i is trained)
    Forgetting  = 1/(N-1) sum_{i<N-1} ( max_{k=i+1..N-1} R[k][i] - R[N][i] )

BWT, FWT and forgetting need N >= 2; with one task they are None. After task k (0 < k < N) no metric
reads a task beyond k + 1, so those cells may be None (`eval_tasks: seen_and_next` does not score them).
"""

from __future__ import annotations

from collections.abc import Sequence

Matrix = Sequence[Sequence[float]]


def _check(R: Matrix) -> int:
    n = len(R[0]) if R else 0
    if n == 0 or len(R) != n + 1 or any(len(row) != n for row in R):
        raise ValueError(f"accuracy matrix must be (N+1) x N with N >= 1, got {len(R)} rows of {[len(r) for r in R]}")
    return n


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def average_accuracy(R: Matrix) -> float:
    n = _check(R)
    return _mean(R[n])


def average_accuracy_over_time(R: Matrix) -> float:
    n = _check(R)
    return _mean([_mean(R[k][:k]) for k in range(1, n + 1)])


def backward_transfer(R: Matrix) -> float | None:
    n = _check(R)
    if n < 2:
        return None
    return _mean([R[n][i] - R[i + 1][i] for i in range(n - 1)])


def forward_transfer(R: Matrix) -> float | None:
    n = _check(R)
    if n < 2:
        return None
    return _mean([R[i][i] - R[0][i] for i in range(1, n)])


def forgetting(R: Matrix) -> float | None:
    n = _check(R)
    if n < 2:
        return None
    return _mean([max(R[k][i] for k in range(i + 1, n)) - R[n][i] for i in range(n - 1)])


def all_metrics(R: Matrix) -> dict[str, float | None]:
    return {
        "AP": average_accuracy(R),
        "AvgAcc": average_accuracy_over_time(R),
        "BWT": backward_transfer(R),
        "FWT": forward_transfer(R),
        "forgetting": forgetting(R),
    }
