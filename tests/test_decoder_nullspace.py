"""benchmarks/decoder_nullspace.py: the nullspace projection removes what a linear probe reads, and only that."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")

from benchmarks.decoder_nullspace import nullspace  # noqa: E402


def test_nullspace_removes_the_linear_direction_of_each_attribute():
    rng = np.random.default_rng(0)
    n, dim = 2000, 6
    labels = rng.integers(0, 2, size=(n, 2)).astype(np.float64)
    features = rng.normal(size=(n, dim))
    features[:, 0] += 3.0 * labels[:, 0]  # attribute 0 along axis 0
    features[:, 1] -= 3.0 * labels[:, 1]  # attribute 1 along axis 1
    projection, accuracies = nullspace(features, labels, rounds=1)
    assert accuracies[0][0] > 0.9 and accuracies[0][1] > 0.9  # read before removal
    projected = features @ projection
    from sklearn.linear_model import LogisticRegression

    for a in range(2):  # a fresh probe is near chance afterwards
        assert LogisticRegression(max_iter=2000).fit(projected, labels[:, a]).score(projected, labels[:, a]) < 0.6
    # Only two directions went: the other axes pass almost unchanged, and the projection is rank dim - 2.
    assert np.linalg.matrix_rank(projection, tol=1e-8) == dim - 2
    assert np.abs(projection[2:, 2:] - np.eye(dim - 2)).max() < 0.1


def test_nullspace_skips_an_attribute_with_one_class():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(200, 4))
    labels = np.zeros((200, 2))
    labels[:, 1] = rng.integers(0, 2, size=200)
    projection, accuracies = nullspace(features, labels, rounds=2)
    assert accuracies[0][0] is None and accuracies[1][0] is None
    assert np.linalg.matrix_rank(projection, tol=1e-8) == 2  # two rounds of attribute 1 only
