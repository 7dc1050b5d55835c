"""`splitnet.finite.all_finite`: the per-step NaN / Inf test, exact for every float dtype."""

import pytest
import torch

from splitnet.finite import all_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_bad_value_anywhere_in_any_tensor_is_found(dtype, bad):
    tensors = [torch.randn(4, 3, dtype=dtype), torch.randn(64, 8, 8).to(dtype), torch.zeros(1, dtype=dtype)]
    assert all_finite(tensors)
    for t in tensors:
        for index in (0, t.numel() // 2, t.numel() - 1):
            t.view(-1)[index] = bad
            assert not all_finite(tensors)
            t.view(-1)[index] = 0.0
    assert all_finite(tensors)


def test_the_largest_finite_values_mixed_dtypes_integers_and_empty_tensors_pass():
    big = torch.finfo(torch.float32).max
    assert all_finite([torch.full((1000,), big), torch.full((3,), -big), torch.tensor([1e300], dtype=torch.float64),
                       torch.tensor([65504.0], dtype=torch.float16), torch.arange(5), torch.tensor([True]),
                       torch.empty(0), torch.tensor(2.5)])
    assert all_finite([])
    assert not all_finite([torch.arange(5), torch.tensor([1e300], dtype=torch.float64), torch.tensor(float("nan"))])
