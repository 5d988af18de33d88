import numpy as np
import torch

from patchnet.backbones.regions import region_mean, region_weights


def _supersampled_mean(fmap, box, n=400):
    """Mean of the piecewise-constant map over a box, by dense point sampling."""
    x1, y1, x2, y2 = box
    xs = np.linspace(x1, x2, n, endpoint=False) + (x2 - x1) / (2 * n)
    ys = np.linspace(y1, y2, n, endpoint=False) + (y2 - y1) / (2 * n)
    cells = fmap[0][:, np.floor(ys).astype(int)][:, :, np.floor(xs).astype(int)]
    return cells.mean(axis=(1, 2))


def test_region_mean_matches_the_integral_over_the_box():
    rng = np.random.default_rng(0)
    fmap = rng.random((1, 5, 6, 9)).astype(np.float32)
    boxes = np.array([[0, 0, 9, 6], [1, 2, 4, 5], [0.3, 1.7, 5.2, 5.9], [2.5, 0.5, 3.5, 1.5]], np.float32)
    got = region_mean(torch.from_numpy(fmap), torch.from_numpy(boxes)).numpy()
    for box, row in zip(boxes, got):
        np.testing.assert_allclose(row, _supersampled_mean(fmap, box), rtol=2e-2, atol=1e-3)
    # whole cells: the plain mean, as exact mode takes it
    np.testing.assert_allclose(got[0], fmap[0].mean(axis=(1, 2)), rtol=1e-5)
    np.testing.assert_allclose(got[1], fmap[0][:, 2:5, 1:4].mean(axis=(1, 2)), rtol=1e-5)


def test_region_weights_give_region_mean_as_a_matrix_product():
    """Also for boxes that leave the map, and with gradients to the map (train.unlock differentiates it)."""
    rng = np.random.default_rng(1)
    fmap = torch.from_numpy(rng.random((1, 7, 5, 8)).astype(np.float32)).requires_grad_()
    boxes = torch.tensor([[0, 0, 8, 5], [-1.5, 0.5, 3.2, 2.9], [6.1, 3.3, 9.4, 7.0], [2.5, 1.5, 2.6, 1.9]])
    ref = region_mean(fmap, boxes)
    got = region_weights(boxes, 5, 8) @ fmap[0].flatten(1).T
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)  # the table loses digits on the tiny box
    g = torch.rand_like(ref)
    (ref_grad,) = torch.autograd.grad((ref * g).sum(), fmap)
    (got_grad,) = torch.autograd.grad((got * g).sum(), fmap)
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-4, atol=1e-5)


def test_region_mean_by_row_sums_equals_cumsum():
    rng = np.random.default_rng(3)
    fmap = torch.from_numpy(rng.standard_normal((1, 7, 9, 11)).astype(np.float32))
    boxes = torch.tensor([[0, 0, 11, 9], [1.5, 2.25, 7.5, 8.0], [3, 3, 4, 4], [-1, -1, 20, 20]], dtype=torch.float32)
    torch.testing.assert_close(region_mean(fmap, boxes, row_sums=True), region_mean(fmap, boxes), rtol=1e-5, atol=1e-5)
