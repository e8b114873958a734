"""Margins: values, true derivative, straight-through option, clamping, monotone past pi."""

import math

import pytest
import torch

from facescale.heads import ArcFace, CombinedMargin, CosFace, monotone_cos
from facescale.heads.reference import reference_target_logit

MARGINS = [
    ArcFace(64, 0.5),
    CosFace(64, 0.4),
    CombinedMargin(32, 0.9, 0.4, 0.15),
    CombinedMargin(16, 1.3, 0.2, 0.0),
]


@pytest.mark.parametrize("margin", MARGINS, ids=repr)
def test_value_is_the_formula(margin):
    # theta in (0, pi) with m1*theta + m2 below pi: the plain formula applies.
    thetas = [t for t in torch.linspace(0.05, 3.1, 40).tolist() if margin.m1 * t + margin.m2 < 3.1]
    cosine = torch.tensor([math.cos(t) for t in thetas], dtype=torch.float64)
    expected = [margin.s * (math.cos(margin.m1 * t + margin.m2) - margin.m3) for t in thetas]
    torch.testing.assert_close(margin(cosine), torch.tensor(expected, dtype=torch.float64))


def test_named_margins_are_combined_margin_special_cases():
    cosine = torch.rand(100, dtype=torch.float64) * 2 - 1
    torch.testing.assert_close(ArcFace(30, 0.3)(cosine), CombinedMargin(30, 1, 0.3, 0)(cosine))
    torch.testing.assert_close(CosFace(30, 0.3)(cosine), CombinedMargin(30, 1, 0, 0.3)(cosine))
    torch.testing.assert_close(CosFace(30, 0.3)(cosine), 30 * (cosine - 0.3))


@pytest.mark.parametrize("margin", MARGINS, ids=repr)
def test_gradient_is_the_true_derivative(margin):
    """d/dc s*cos(m1*acos(c) + m2) = s*m1*sin(m1*theta + m2)/sin(theta), and gradcheck."""
    cosine = (torch.rand(64, dtype=torch.float64) * 1.6 - 0.8).requires_grad_()
    (grad,) = torch.autograd.grad(margin(cosine).sum(), cosine)
    theta = torch.acos(cosine.detach())
    psi = margin.m1 * theta + margin.m2
    expected = margin.s * margin.m1 * torch.sin(psi).abs() / torch.sin(theta)
    torch.testing.assert_close(grad, expected)
    assert torch.autograd.gradcheck(margin, (cosine,))


def test_straight_through_keeps_value_and_passes_the_plain_gradient():
    exact, straight = ArcFace(64, 0.5), ArcFace(64, 0.5, straight_through=True)
    cosine = (torch.rand(32, dtype=torch.float64) * 2 - 1).requires_grad_()
    torch.testing.assert_close(straight(cosine), exact(cosine))
    (grad,) = torch.autograd.grad(straight(cosine).sum(), cosine)
    torch.testing.assert_close(grad, torch.full_like(grad, 64.0))
    (exact_grad,) = torch.autograd.grad(exact(cosine).sum(), cosine)
    assert (exact_grad - grad).abs().max() > 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cosine_is_clamped_so_theta_and_gradient_stay_finite(dtype):
    cosine = torch.tensor([-1.0 - 1e-3, -1.0, 1.0, 1.0 + 1e-3], dtype=dtype, requires_grad=True)
    for margin in MARGINS:
        logit = margin(cosine)
        (grad,) = torch.autograd.grad(logit.sum(), cosine)
        assert torch.isfinite(logit).all() and torch.isfinite(grad).all(), margin


@pytest.mark.parametrize("margin", [ArcFace(64, 0.5), CombinedMargin(10, 1.2, 0.6, 0.1)], ids=repr)
def test_target_logit_keeps_decreasing_when_the_angle_passes_pi(margin):
    theta = torch.linspace(1e-3, math.pi - 1e-3, 20001, dtype=torch.float64)
    logit = margin(torch.cos(theta))
    past_pi = margin.m1 * theta + margin.m2 > math.pi
    assert past_pi.any() and (~past_pi).any()
    steps = logit[1:] - logit[:-1]
    assert (steps < 0).all(), "not strictly decreasing"
    assert steps.abs().max() < margin.s * margin.m1 * 2e-3, "not continuous"
    torch.testing.assert_close(logit, reference_target_logit(torch.cos(theta), margin))


def test_monotone_cos_continues_cosine():
    psi = torch.linspace(-3 * math.pi, 4 * math.pi, 7001, dtype=torch.float64)
    value = monotone_cos(psi)
    inside = (psi >= 0) & (psi <= math.pi)
    torch.testing.assert_close(value[inside], torch.cos(psi[inside]))
    assert (value[1:] < value[:-1]).all()
    (slope,) = torch.autograd.grad(monotone_cos(psi.requires_grad_()).sum(), psi)
    torch.testing.assert_close(slope, -torch.sin(psi.detach()).abs())


@pytest.mark.parametrize(
    "args", [(0, 1, 0.5, 0), (64, 0, 0.5, 0), (64, 1, float("nan"), 0), (-1, 1, 0, 0.4)]
)
def test_invalid_margin_is_a_clear_error(args):
    with pytest.raises(ValueError, match="s and m1 must be finite numbers > 0"):
        CombinedMargin(*args)
