"""The held-out measures of classification and regression, as GLUE reports them (pure functions).

    classify   accuracy; F1 of class 1 when there are two classes; Matthews correlation (MCC, CoLA's measure)
    regress    Pearson and Spearman correlation (STS-B's)

Each equals scikit-learn's or SciPy's on the same inputs (tests/test_measures.py checks them). A measure
that is undefined (a correlation of a constant, F1 with no positive prediction or label) is 0.0, as
scikit-learn's zero_division default gives, never NaN: a result file holds finite numbers only.
"""

import math


def accuracy(predicted: list[int], expected: list[int]) -> float:
    return sum(p == e for p, e in zip(predicted, expected)) / len(expected)


def f1(predicted: list[int], expected: list[int], positive: int = 1) -> float:
    """F1 of the class `positive`: the harmonic mean of its precision and recall."""
    true_positive = sum(p == e == positive for p, e in zip(predicted, expected))
    predicted_positive, actual_positive = predicted.count(positive), expected.count(positive)
    if true_positive == 0:
        return 0.0
    precision, recall = true_positive / predicted_positive, true_positive / actual_positive
    return 2 * precision * recall / (precision + recall)


def mcc(predicted: list[int], expected: list[int]) -> float:
    """Matthews correlation for any number of classes (Gorodkin's R_K, which is scikit-learn's):
    1 perfect, 0 no better than chance, -1 always wrong (two classes)."""
    classes = sorted(set(predicted) | set(expected))
    n = len(expected)
    correct = sum(p == e for p, e in zip(predicted, expected))
    p_count = [predicted.count(k) for k in classes]
    t_count = [expected.count(k) for k in classes]
    covariance = correct * n - sum(p * t for p, t in zip(p_count, t_count))
    spread = math.sqrt((n * n - sum(p * p for p in p_count)) * (n * n - sum(t * t for t in t_count)))
    return covariance / spread if spread else 0.0


def pearson(x: list[float], y: list[float]) -> float:
    mean_x, mean_y = sum(x) / len(x), sum(y) / len(y)
    dx, dy = [v - mean_x for v in x], [v - mean_y for v in y]
    spread = math.sqrt(sum(d * d for d in dx) * sum(d * d for d in dy))
    return sum(a * b for a, b in zip(dx, dy)) / spread if spread else 0.0


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties given their average rank (as SciPy's rankdata)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start : end + 1]:
            result[i] = (start + end) / 2 + 1
        start = end + 1
    return result


def spearman(x: list[float], y: list[float]) -> float:
    """Pearson's correlation of the ranks."""
    return pearson(ranks(x), ranks(y))


def classification(predicted: list[int], expected: list[int], n_classes: int) -> dict[str, float]:
    """accuracy, mcc, and f1 (of class 1) when there are two classes."""
    measures = {"accuracy": accuracy(predicted, expected), "mcc": mcc(predicted, expected)}
    if n_classes == 2:
        measures["f1"] = f1(predicted, expected)
    return measures


def regression(predicted: list[float], expected: list[float]) -> dict[str, float]:
    return {"pearson": pearson(predicted, expected), "spearman": spearman(predicted, expected)}
