"""The held-out measures of classification and regression equal scikit-learn's and SciPy's."""

import random

import pytest
from scipy import stats
from sklearn import metrics as sk

from bitfit.run import measures


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n_classes", [2, 3, 5])
def test_accuracy_f1_and_mcc_equal_scikit_learns_on_random_predictions(seed, n_classes):
    rng = random.Random(seed)
    expected = [rng.randrange(n_classes) for _ in range(60)]
    predicted = [e if rng.random() < 0.6 else rng.randrange(n_classes) for e in expected]
    measured = measures.classification(predicted, expected, n_classes)
    assert measured["accuracy"] == pytest.approx(sk.accuracy_score(expected, predicted))
    assert measured["mcc"] == pytest.approx(sk.matthews_corrcoef(expected, predicted))
    if n_classes == 2:
        assert measured["f1"] == pytest.approx(sk.f1_score(expected, predicted, zero_division=0.0))
    else:
        assert "f1" not in measured


@pytest.mark.parametrize("seed", range(5))
def test_pearson_and_spearman_equal_scipys_on_random_values_with_ties(seed):
    rng = random.Random(seed)
    expected = [float(rng.randint(1, 5)) for _ in range(50)]  # ties, as STS-B's scores have
    predicted = [e + rng.gauss(0, 1.5) for e in expected]
    measured = measures.regression(predicted, expected)
    assert measured["pearson"] == pytest.approx(stats.pearsonr(predicted, expected)[0])
    assert measured["spearman"] == pytest.approx(stats.spearmanr(predicted, expected)[0])


def test_an_undefined_measure_is_zero_not_nan():
    assert measures.classification([0, 0, 0], [1, 1, 0], 2) == {"accuracy": pytest.approx(1 / 3), "mcc": 0.0, "f1": 0.0}
    assert measures.regression([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == {"pearson": 0.0, "spearman": 0.0}
