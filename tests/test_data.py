"""The bundled digits: read from the CSV scikit-learn ships (without importing scikit-learn),
they are exactly what `sklearn.datasets.load_digits` returns, and where that file is not
where scikit-learn keeps it they come from `load_digits` itself."""

import importlib.util
from types import SimpleNamespace

import numpy as np
import sklearn.datasets
from sklearn.datasets import load_digits

from splitnet import data


def _assert_same_as_load_digits(images: np.ndarray, labels: np.ndarray) -> None:
    bunch = load_digits()
    assert images.dtype == bunch.images.dtype and labels.dtype == bunch.target.dtype
    assert np.array_equal(images, bunch.images) and np.array_equal(labels, bunch.target)


def test_digits_read_from_scikit_learns_csv_equal_load_digits():
    _assert_same_as_load_digits(*data._digits_arrays())


def test_digits_fall_back_to_load_digits_where_the_csv_is_elsewhere(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: SimpleNamespace(
        submodule_search_locations=[str(tmp_path)]) if name == "sklearn" else real(name, *a))
    calls = []
    monkeypatch.setattr(sklearn.datasets, "load_digits", lambda: calls.append(1) or load_digits())
    _assert_same_as_load_digits(*data._digits_arrays())
    assert calls == [1]
