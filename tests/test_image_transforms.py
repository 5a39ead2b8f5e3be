"""Squeeze, FactorOut, LogitTransform, the multiscale stack, dequantization and bits/dim.

Log-dets are compared with the autograd Jacobian in float64 (exact trace, tight tolerances);
bits/dim with closed forms. The flows are tiny and their conv kernels stretched so that no map
is close to the identity.
"""

import copy
import math

import pytest
import torch
import pyro.distributions as dist
from torch.distributions import AffineTransform

from pyro_ffjord import (FactorOut, ImageFFJORD, LogitTransform, MultiscaleFFJORD, Squeeze, bits_per_dim,
                         dequantize, multiscale_ffjord)
from pyro_ffjord.multiscale import default_scales

pytestmark = pytest.mark.usefixtures("float64")

EXACT = dict(trace="exact", solver="dopri5", atol=1e-10, rtol=1e-10)


def stretch(module, gain=3.0):
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 4:
                p.mul_(gain)
    return module


def max_abs(a):
    return a.abs().max().item()


def slogdet_of(fn, x):
    """(sign, log|det|) of the Jacobian of ``fn`` (an image map) at one image ``x``."""
    d = x.numel()
    jac = torch.autograd.functional.jacobian(lambda v: fn(v.reshape(x.shape)).reshape(d), x.reshape(d))
    return torch.linalg.slogdet(jac)


# -- Squeeze --------------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [2, 3])
def test_squeeze_layout_and_round_trip(factor):
    c, h, w = 2, 2 * factor, 3 * factor
    sq = Squeeze(factor)
    x = torch.randn(5, 3, c, h, w)
    y = sq(x)
    assert y.shape == sq.forward_shape(x.shape) == (5, 3, c * factor**2, 2, 3)
    assert sq.inverse_shape(y.shape) == x.shape
    # Channel k f^2 + i f + j holds pixel (i, j) of each f x f block of channel k.
    for k in range(c):
        for i in range(factor):
            for j in range(factor):
                assert torch.equal(y[..., k * factor**2 + i * factor + j, :, :], x[..., k, i::factor, j::factor])
    assert torch.equal(sq.inv(y.clone()), x)
    assert torch.equal(sq.log_abs_det_jacobian(x, y), torch.zeros(5, 3))
    assert sq.event_dim == 3 and sq.inv.event_dim == 3


def test_squeeze_jacobian_is_a_permutation():
    x = torch.randn(2, 4, 4)
    sign, logdet = slogdet_of(Squeeze(2), x)
    assert abs(sign.item()) == 1.0 and abs(logdet.item()) < 1e-12


def test_squeeze_errors():
    with pytest.raises(ValueError, match=r"divisible by 2, got \(C, H, W\) = \(1, 5, 4\)"):
        Squeeze(2)(torch.randn(3, 1, 5, 4))
    with pytest.raises(ValueError, match="divisible by 2"):
        Squeeze(2).forward_shape((1, 4, 3))
    with pytest.raises(ValueError, match="C divisible by 4"):
        Squeeze(2).inv(torch.randn(3, 2, 2))
    with pytest.raises(ValueError, match="images"):
        Squeeze(2)(torch.randn(4, 4))
    with pytest.raises(ValueError, match="factor"):
        Squeeze(0)


# -- LogitTransform -------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [1e-6, 0.05])
def test_logit_values_round_trip_and_log_det(alpha):
    t = LogitTransform(alpha)
    x = torch.tensor([0.0, 1e-3, 0.3, 0.5, 0.9, 1.0])
    y = t(x)
    s = alpha + (1 - 2 * alpha) * x
    assert torch.allclose(y, torch.log(s / (1 - s)), rtol=1e-12)
    assert torch.allclose(t.inv(y.clone()), x, atol=1e-9)
    slope = torch.autograd.functional.jacobian(t, x).diagonal()  # elementwise: the diagonal
    assert torch.allclose(t.log_abs_det_jacobian(x, y), slope.log(), rtol=1e-9, atol=1e-9)
    assert t.event_dim == 0 and t.sign == 1


def test_logit_domain():
    alpha = 0.05
    t = LogitTransform(alpha)
    edge = alpha / (1 - 2 * alpha)
    assert t.domain.check(torch.tensor([0.0, 0.5, 1.0, -0.9 * edge, 1 + 0.9 * edge])).all()
    assert not t.domain.check(torch.tensor([-1.1 * edge, 1 + 1.1 * edge])).any()
    # The inverse maps all of R into the domain, reaching just past [0, 1].
    back = t.inv(torch.tensor([-40.0, 40.0]))
    assert t.domain.check(back).all() and back[0] < 0 and back[1] > 1
    assert LogitTransform(0.0).domain.check(torch.tensor([0.0, 1.0])).all()
    for bad in (-0.1, 0.5, "0.1", True):
        with pytest.raises(ValueError, match="alpha"):
            LogitTransform(bad)


def test_logit_model_density_integrates_to_one():
    """The density of sigmoid-space samples of N(0.3, 1.5) under LogitTransform(a).inv: exactly 1
    over the domain, a little less over [0, 1] (mass alpha-close to the ends lies outside)."""
    alpha = 0.05
    t = LogitTransform(alpha)
    d = dist.TransformedDistribution(dist.Normal(torch.tensor(0.3), 1.5), [t.inv])
    low, high = t.domain.lower_bound, t.domain.upper_bound
    grid = torch.linspace(low, high, 400_001)[1:-1]
    density = d.log_prob(grid).exp()
    total = torch.trapezoid(density, grid).item()
    inside = torch.trapezoid(density[(grid >= 0) & (grid <= 1)], grid[(grid >= 0) & (grid <= 1)]).item()
    assert abs(total - 1) < 1e-4
    assert 0.9 < inside < total - 1e-3


# -- FactorOut ------------------------------------------------------------------------------------


def test_factor_out_with_an_elementwise_inner():
    t = FactorOut(AffineTransform(1.0, 3.0), channels=1)
    x = torch.randn(2, 3, 2, 2)
    y = t(x)
    assert torch.equal(y[:, :1], 1 + 3 * x[:, :1]) and torch.equal(y[:, 1:], x[:, 1:])
    assert torch.allclose(t.log_abs_det_jacobian(x, y), torch.full((2,), 4 * math.log(3.0)))
    assert torch.allclose(t.inv(y.clone()), x)
    default = FactorOut(AffineTransform(0.0, 2.0))  # the first half: 2 of 4 channels
    assert torch.equal(default(torch.ones(4, 1, 1)).flatten(), torch.tensor([2.0, 2.0, 1.0, 1.0]))


def test_factor_out_with_an_image_ffjord():
    inner = stretch(ImageFFJORD((1, 2, 2), hidden_channels=[4], **EXACT))
    t = FactorOut(inner)
    assert set(t.parameters()) == set(inner.parameters()) and len(list(t.parameters())) > 0
    x = torch.randn(3, 2, 2, 2)
    y = t(x)
    assert torch.equal(y[:, 1:], x[:, 1:]) and max_abs(y[:, :1] - x[:, :1]) > 0.05
    solves = inner.stats.solves
    ladj = t.log_abs_det_jacobian(x, y)
    assert inner.stats.solves == solves  # the pass's own halves: no second solve
    assert max_abs(t.log_abs_det_jacobian(x.clone(), y) - ladj) < 1e-9  # a copy is solved again...
    assert inner.stats.solves == solves + 1  # ... and agrees
    assert max_abs(t.inv(y.clone()) - x) < 1e-7
    sign, logdet = slogdet_of(t, x[0])
    assert sign.item() == 1.0 and abs(logdet.item() - ladj[0].item()) < 1e-6 and abs(logdet.item()) > 0.01


def test_factor_out_errors():
    with pytest.raises(ValueError, match="keep the shape"):
        FactorOut(Squeeze(2), channels=1)(torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match="0 < 3 < C"):
        FactorOut(AffineTransform(0.0, 2.0), channels=3)(torch.randn(3, 2, 2))
    with pytest.raises(ValueError, match="0 < 0 < C"):
        FactorOut(AffineTransform(0.0, 2.0))(torch.randn(1, 2, 2))
    with pytest.raises(TypeError, match="Transform"):
        FactorOut(lambda x: x)


# -- the multiscale stack -------------------------------------------------------------------------


def test_multiscale_log_prob_is_the_change_of_variables():
    shape = (1, 4, 4)
    flow = stretch(multiscale_ffjord(shape, scales=2, blocks_per_scale=1, hidden_channels=[4], **EXACT))
    assert flow.latent_shape == (4, 2, 2) and len(flow.flows) == 3
    d = dist.TransformedDistribution(flow.base_distribution(), [flow])
    x = torch.randn((2,) + shape)
    log_prob = d.log_prob(x)
    assert [f.stats.solves for f in flow.flows] == [1, 1, 1]  # one reverse solve per CNF

    def to_latent(v):
        return flow._inverse_values(v)[0]  # a fresh reverse pass, differentiable

    for i in range(2):
        z = to_latent(x[i]).detach()
        assert z.shape == (4, 2, 2)
        sign, logdet = slogdet_of(to_latent, x[i])
        by_hand = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum() + logdet
        assert abs(by_hand.item() - log_prob[i].item()) < 1e-6
        assert abs(logdet.item()) > 0.05
    # Sampling then scoring the sample costs no further solve.
    y = d.rsample((3,))
    solves = [f.stats.solves for f in flow.flows]
    assert d.log_prob(y).shape == (3,)
    assert [f.stats.solves for f in flow.flows] == solves


def test_multiscale_structure_three_scales():
    flow = MultiscaleFFJORD((1, 8, 8), scales=3, blocks_per_scale=1, hidden_channels=[2])
    assert flow.latent_shape == (4, 4, 4)
    outer, block, unsqueeze, top = flow.parts
    assert isinstance(outer, FactorOut) and outer.channels == 2
    assert (block.shape, top.shape) == ((4, 4, 4), (1, 8, 8)) and unsqueeze == Squeeze(2).inv
    squeeze, inner, block2, unsqueeze2, mid = outer.inner.parts
    assert squeeze == Squeeze(2) and (block2.shape, mid.shape) == ((8, 2, 2), (2, 4, 4))
    assert inner.channels == 4 and [f.shape for f in inner.inner.parts] == [(4, 2, 2)]
    assert sorted(tuple(f.shape) for f in flow.flows) == [(1, 8, 8), (2, 4, 4), (4, 2, 2), (4, 4, 4), (8, 2, 2)]
    assert set(flow.parameters()) == {p for f in flow.flows for p in f.parameters()}
    # Hutchinson training: one loss, finite gradients for every CNF.
    d = dist.TransformedDistribution(flow.base_distribution(), [flow])
    loss = -d.log_prob(torch.randn(4, 1, 8, 8)).mean()
    loss.backward()
    for f in flow.flows:
        grads = [p.grad for p in f.net.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().max() > 0 for g in grads)
    x = torch.randn(2, 1, 8, 8)
    assert max_abs(flow(flow.inv(x).clone()) - x) < 1e-3  # rk4 both ways: close, not exact


def test_multiscale_with_logit_is_a_density_on_the_unit_cube():
    alpha = 1e-6
    flow = stretch(MultiscaleFFJORD((1, 4, 4), scales=2, blocks_per_scale=1, hidden_channels=[4],
                                    logit_alpha=alpha, **EXACT))
    logit = LogitTransform(alpha)
    assert flow.parts[-1] == logit.inv and flow.latent_shape == (4, 2, 2)
    d = dist.TransformedDistribution(flow.base_distribution(), [flow])
    x = dequantize(torch.randint(0, 256, (3, 1, 4, 4)))
    log_prob = d.log_prob(x)
    # By hand: the model in logit space (the other parts, as a plain list) plus the logit's log-det.
    y = logit(x)
    in_logit_space = dist.TransformedDistribution(flow.base_distribution(), flow.parts[:-1]).log_prob(y)
    by_hand = in_logit_space + logit.log_abs_det_jacobian(x, y).sum((-3, -2, -1))
    assert max_abs(log_prob - by_hand) < 1e-6
    assert (logit.log_abs_det_jacobian(x, y).sum((-3, -2, -1)) > 16 * math.log(4)).all()  # not negligible
    bpd = bits_per_dim(log_prob, 16)
    assert torch.allclose(bpd, -(log_prob - 16 * math.log(256)) / (16 * math.log(2)))


def test_multiscale_state_dict_and_copies():
    flow = stretch(MultiscaleFFJORD((1, 4, 4), scales=2, blocks_per_scale=1, hidden_channels=[4]))
    x = torch.randn(2, 1, 4, 4)
    dist.TransformedDistribution(flow.base_distribution(), [flow]).log_prob(x)  # holds a graph now
    copied = copy.deepcopy(flow)  # the remembered pass is not copied
    loaded = MultiscaleFFJORD((1, 4, 4), scales=2, blocks_per_scale=1, hidden_channels=[4])
    loaded.load_state_dict(flow.state_dict())
    scores = []
    for f in (flow, copied, loaded):
        f.eval()
        with torch.no_grad():
            scores.append(dist.TransformedDistribution(f.base_distribution(), [f]).log_prob(x))
    assert max_abs(scores[1] - scores[0]) < 1e-12 and max_abs(scores[2] - scores[0]) < 1e-12
    fresh = MultiscaleFFJORD((1, 4, 4), scales=2, blocks_per_scale=1, hidden_channels=[4]).eval()
    with torch.no_grad():
        assert max_abs(dist.TransformedDistribution(fresh.base_distribution(), [fresh]).log_prob(x) - scores[0]) > 1e-3


def test_multiscale_errors_and_default_scales():
    assert [default_scales(s) for s in [(1, 28, 28), (3, 32, 32), (1, 4, 4), (1, 44, 44), (1, 3, 3)]] == [3, 4, 1, 3, 1]
    with pytest.raises(ValueError, match="divisible by 4"):
        MultiscaleFFJORD((1, 6, 6), scales=3, hidden_channels=[2])
    with pytest.raises(ValueError, match="scales"):
        MultiscaleFFJORD((1, 4, 4), scales=0)
    with pytest.raises(TypeError, match="unknown FFJORD option"):
        MultiscaleFFJORD((1, 4, 4), scales=2, hidden_channels=[2], bogus=1)


# -- dequantization and bits/dim ------------------------------------------------------------------


def test_dequantize_stays_in_the_pixel_cell():
    pixels = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    x = dequantize(pixels, generator=torch.Generator().manual_seed(1))
    assert x.dtype == torch.float64 and x.shape == pixels.shape
    assert (x >= 0).all() and (x < 1).all()
    assert torch.equal((x * 256).floor(), pixels.double())
    again = dequantize(pixels, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, again) and not torch.equal(x, dequantize(pixels))


def test_dequantize_mean_is_the_cell_centre():
    pixels = torch.tensor([0, 17, 128, 255]).repeat(50_000, 1)
    x = dequantize(pixels)
    centre = (torch.tensor([0, 17, 128, 255]) + 0.5) / 256
    # The mean of U[0, 1) / 256 over 50 000 draws has standard deviation 2.3e-6.
    assert max_abs(x.mean(0) - centre) < 1.2e-5
    assert max_abs(x.std(0) - 1 / (256 * 12**0.5)) < 1e-5


def test_dequantize_float32_never_reaches_one():
    # In float32, (255 + u) / 256 rounds to 1 for about one u in 65 536.
    x = dequantize(torch.full((1_000_000,), 255), dtype=torch.float32)
    assert x.dtype == torch.float32 and (x < 1).all() and (x >= 255 / 256).all()


def test_dequantize_errors():
    with pytest.raises(ValueError, match="whole numbers"):
        dequantize(torch.rand(3))
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        dequantize(torch.tensor([0, 256]))
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        dequantize(torch.tensor([-1, 3]))
    assert torch.equal((dequantize(torch.tensor([15.0, 0.0]), levels=16) * 16).floor(), torch.tensor([15.0, 0.0]))


def test_bits_per_dim_of_the_uniform_density_is_the_pixel_depth():
    assert torch.equal(bits_per_dim(torch.zeros(5), num_dims=3 * 32 * 32), torch.full((5,), 8.0))
    assert torch.equal(bits_per_dim(torch.zeros(2), num_dims=10, levels=16), torch.full((2,), 4.0))
    with pytest.raises(ValueError, match="num_dims"):
        bits_per_dim(torch.zeros(1), num_dims=0)


def test_bits_per_dim_of_a_piecewise_constant_density_is_the_discrete_code_length():
    """For p(x) = 256^D P(k(x)) the dequantization bound is tight: bpd = -log2 P(k) / D."""
    D = 4
    P = torch.tensor([0.5, 1e-3, 0.25])
    log_px = D * math.log(256) + P.log()
    assert torch.allclose(bits_per_dim(log_px, D), -P.log2() / D, rtol=1e-12)


def test_bits_per_dim_of_a_factorised_gaussian_image_model():
    """Normal(mu, sigma) per pixel in logit space, mapped to [0, 1] by the inverse logit: bits/dim
    from the TransformedDistribution equals the closed form, and averaged over the dequantization
    noise it bounds the exact discrete code length from above, by little."""
    alpha = 0.01
    mu = torch.tensor([[[-1.0, 0.0], [0.5, 2.0]]])
    sigma = torch.tensor([[[0.5, 1.0], [1.5, 0.8]]])
    model = dist.TransformedDistribution(dist.Normal(mu, sigma).to_event(3), [LogitTransform(alpha).inv])
    pixels = torch.tensor([[[[40, 128], [200, 240]]]])
    x = dequantize(pixels.expand(20_000, 1, 2, 2))
    s = alpha + (1 - 2 * alpha) * x
    y = torch.log(s / (1 - s))
    log_px = (-0.5 * ((y - mu) / sigma) ** 2 - torch.log(sigma * math.sqrt(2 * math.pi))
              + math.log(1 - 2 * alpha) - torch.log(s * (1 - s))).sum((-3, -2, -1))
    bpd = bits_per_dim(model.log_prob(x), 4)
    assert torch.allclose(bpd, -(log_px - 4 * math.log(256)) / (4 * math.log(2)), rtol=1e-10)
    # The exact probability of each pixel's cell, from the Normal's CDF in logit space.
    def logit_of(v):
        s = alpha + (1 - 2 * alpha) * v
        return torch.log(s / (1 - s))
    normal = torch.distributions.Normal(mu, sigma)
    cell = normal.cdf(logit_of((pixels + 1) / 256)) - normal.cdf(logit_of(pixels / 256))
    discrete = -cell.log2().sum().item() / 4
    # The expectation over the dequantization noise u, by the midpoint rule (the model factorises,
    # so one u for all four pixels gives the same expectation).
    u = (torch.arange(4000) + 0.5) / 4000
    expected_bpd = bits_per_dim(model.log_prob((pixels + u[:, None, None, None]) / 256), 4).mean().item()
    assert discrete < expected_bpd < discrete + 1e-3  # Jensen's gap: 4.6e-5 bits/dim here
    assert abs(bpd.mean().item() - expected_bpd) < 5 * bpd.std().item() / 20_000**0.5
    assert 2 < discrete < 8  # a real model, not the uniform one
