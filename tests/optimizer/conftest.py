"""Trained models as the registry would hold them, for the optimizer's tests:
the breast-cancer MLP and the digits small CNN, trained here on the CPU by the
trainer's own library, with the registry version its worker would register."""

from __future__ import annotations

import pytest

from tests.support.trained import Trained, breast_cancer_mlp, digits_cnn


@pytest.fixture(scope="session")
def mlp() -> Trained:
    """The breast-cancer MLP (about 97% test accuracy)."""
    return breast_cancer_mlp()


@pytest.fixture(scope="session")
def cnn() -> Trained:
    """The digits small CNN (about 97% test accuracy)."""
    return digits_cnn()
