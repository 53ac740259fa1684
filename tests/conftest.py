import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def random_ternary(rng, m, k):
    return rng.integers(-1, 2, size=(m, k)).astype(np.int8)
