"""overlapping_strips: a view forward, its own summed gradient backward."""

import pytest
import torch

from surgeon.attention.kernels.strips import overlapping_strips


@pytest.mark.parametrize("start,count,step,length", [(0, 5, 4, 12), (3, 4, 4, 10), (2, 6, 3, 3), (1, 3, 5, 2)])
def test_strips_are_the_slices_and_their_gradient_sums_the_overlaps(start, count, step, length):
    x = torch.randn(2, 30, 3, dtype=torch.float64, requires_grad=True)
    strips = overlapping_strips(x, start, count, step, length)
    expected = torch.stack([x[:, start + i * step : start + i * step + length] for i in range(count)])
    assert torch.equal(strips, expected)
    assert strips.data_ptr() == x[:, start:].data_ptr()  # a view, no copy
    weight = torch.randn(strips.shape, dtype=torch.float64)
    (got,) = torch.autograd.grad((strips * weight).sum(), x)
    (want,) = torch.autograd.grad((expected * weight).sum(), x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.autograd.gradcheck(lambda t: overlapping_strips(t, start, count, step, length), (x,))


def test_strips_of_a_strided_view():
    # the model hands over (H, n, D) views of a (n, H·D) projection output
    base = torch.randn(20, 4 * 3, dtype=torch.float64, requires_grad=True)
    x = base.view(20, 4, 3).transpose(0, 1)  # (H=4, n=20, D=3), row stride 12
    strips = overlapping_strips(x, 2, 3, 4, 8)
    expected = torch.stack([x[:, 2 + 4 * i : 10 + 4 * i] for i in range(3)])
    assert torch.equal(strips, expected)
    weight = torch.randn(strips.shape, dtype=torch.float64)
    (got,) = torch.autograd.grad((strips * weight).sum(), base)
    (want,) = torch.autograd.grad((expected * weight).sum(), base)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_strips_out_of_range_are_refused():
    x = torch.randn(2, 10, 3)
    with pytest.raises(ValueError, match="exceed the 10 rows"):
        overlapping_strips(x, 4, 2, 4, 4)
    with pytest.raises(ValueError, match="exceed"):
        overlapping_strips(x, -1, 2, 2, 2)
