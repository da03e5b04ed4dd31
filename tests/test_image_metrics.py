"""The Frechet distance of eval/images.py against known values.

frechet_distance fits a Gaussian (mean, unbiased covariance, as FID does) to each
feature set. The feature sets here are built to have EXACTLY a chosen sample mean and
covariance, so the distance between the fitted Gaussians has a closed form:
||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^1/2)."""

import math

import pytest
import torch

from diffusion_blocks.eval.images import frechet_distance


def features_with(mean, cov, n: int = 64, seed: int = 0) -> torch.Tensor:
    """n samples (float64) whose sample mean is `mean` and whose unbiased sample
    covariance is `cov`, exactly up to round-off."""
    mean = torch.as_tensor(mean, dtype=torch.float64)
    cov = torch.as_tensor(cov, dtype=torch.float64)
    x = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = x - x.mean(0)
    sample_cov = torch.cov(x.T).reshape(len(mean), len(mean))  # torch.cov of one row is 0-d
    whiten = torch.linalg.inv(torch.linalg.cholesky(sample_cov))
    x = x @ whiten.T                                  # sample covariance I
    return x @ torch.linalg.cholesky(cov).T + mean    # sample covariance A A^T = cov


def test_the_construction_has_the_chosen_moments():
    cov = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    x = features_with([1.0, -2.0], cov)
    torch.testing.assert_close(x.mean(0), torch.tensor([1.0, -2.0], dtype=torch.float64))
    torch.testing.assert_close(torch.cov(x.T), cov)


def test_one_dimension():
    # N(0, 1) vs N(3, 4): (0 - 3)^2 + (1 - 2)^2 = 10
    a, b = features_with([0.0], [[1.0]]), features_with([3.0], [[4.0]], seed=1)
    assert frechet_distance(a, b) == pytest.approx(10.0, rel=1e-9)


def test_diagonal_covariances():
    # ||mu_1 - mu_2||^2 = 1 + 0 + 4 = 5; sum (sqrt a - sqrt b)^2 = 1 + 1 + 4 = 6
    a = features_with([0.0, 1.0, 2.0], torch.diag(torch.tensor([1.0, 4.0, 9.0])))
    b = features_with([1.0, 1.0, 0.0], torch.diag(torch.tensor([4.0, 1.0, 1.0])), seed=1)
    assert frechet_distance(a, b) == pytest.approx(11.0, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(11.0, rel=1e-9)


def test_identity_against_a_correlated_covariance():
    # S_1 = I: Tr(I + S_2 - 2 S_2^1/2) = sum over eigenvalues l of S_2 of (1 - sqrt l)^2;
    # S_2 = [[2, 1], [1, 2]] has eigenvalues 3 and 1
    a = features_with([0.0, 0.0], torch.eye(2))
    b = features_with([0.0, 0.0], [[2.0, 1.0], [1.0, 2.0]], seed=1)
    assert frechet_distance(a, b) == pytest.approx((1 - math.sqrt(3)) ** 2, rel=1e-9)


def test_non_commuting_covariances_match_scipy_sqrtm():
    from scipy.linalg import sqrtm

    mu_1, mu_2 = [0.5, -1.0, 2.0], [0.0, 1.0, 1.5]
    s_1 = torch.tensor([[2.0, 0.5, 0.1], [0.5, 1.0, -0.3], [0.1, -0.3, 0.7]], dtype=torch.float64)
    s_2 = torch.tensor([[1.0, -0.4, 0.0], [-0.4, 3.0, 0.8], [0.0, 0.8, 1.2]], dtype=torch.float64)
    assert not torch.allclose(s_1 @ s_2, s_2 @ s_1)  # a case the diagonal test cannot cover
    cross = sqrtm((s_1 @ s_2).numpy()).real.trace()
    expected = sum((x - y) ** 2 for x, y in zip(mu_1, mu_2)) + float(s_1.trace() + s_2.trace()) - 2 * cross
    a, b = features_with(mu_1, s_1), features_with(mu_2, s_2, seed=1)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)


def test_same_gaussian_is_at_distance_zero():
    cov = [[1.5, 0.2], [0.2, 0.5]]
    a, b = features_with([1.0, 2.0], cov), features_with([1.0, 2.0], cov, n=200, seed=1)
    assert abs(frechet_distance(a, b)) < 1e-9
