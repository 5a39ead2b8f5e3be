"""Trace estimators: the divergence helpers on known Jacobians, Hutchinson's unbiasedness
through a whole solve, and one probe vector per solve (reused by the adjoint pass)."""

import importlib

import pytest
import torch

from pyro_ffjord import FFJORD
from pyro_ffjord.divergence import exact_divergence, hutchinson_divergence, sample_noise

FFJORD_MODULE = importlib.import_module("pyro_ffjord.ffjord")  # the package exports a function of that name

pytestmark = pytest.mark.usefixtures("float64")

NOISES = ["rademacher", "gaussian"]


def linear_field(dim, batch):
    """f(z) = z A^T, whose Jacobian is A everywhere, for a batch of points."""
    A = torch.randn(dim, dim)
    z = torch.randn(batch, dim, requires_grad=True)
    return A, z, z @ A.T


# -- divergence helpers ---------------------------------------------------------------------


def test_exact_divergence_of_linear_map():
    A, z, f = linear_field(4, 6)
    div, frob = exact_divergence(f, z, create_graph=False, frobenius=True)
    assert div.shape == frob.shape == (6,)
    assert torch.allclose(div, torch.trace(A).expand(6), atol=1e-12)
    assert torch.allclose(frob, (A.pow(2).sum() / 4).expand(6), atol=1e-12)
    # Without the Frobenius flag, no Frobenius term.
    assert exact_divergence(z @ A.T, z, create_graph=False)[1] is None


def test_exact_divergence_matches_autograd_jacobian():
    W, b = torch.randn(3, 3), torch.randn(3)
    z = torch.randn(5, 3, requires_grad=True)
    f = torch.tanh(z @ W.T + b) * z.sin()
    div, frob = exact_divergence(f, z, create_graph=True, frobenius=True)
    for i in range(5):
        J = torch.autograd.functional.jacobian(lambda v: torch.tanh(v @ W.T + b) * v.sin(), z[i].detach())
        assert torch.allclose(div[i], torch.trace(J), atol=1e-12)
        assert torch.allclose(frob[i], J.pow(2).sum() / 3, atol=1e-12)
    # create_graph=True: the divergence is differentiable further (needed by direct backprop).
    (g,) = torch.autograd.grad(div.sum(), z)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("batch", [(5,), (2, 3), (600,)])  # 600 x 4 > BATCHED_TRACE_MAX_ELEMENTS
def test_exact_divergence_ways_agree(monkeypatch, batch, create_graph):
    """The batched (vmap) pass and the per-coordinate loop give the same trace, Frobenius term
    and gradients through them, whichever the size picks by default."""
    divergence = importlib.import_module("pyro_ffjord.divergence")
    W, b = torch.randn(4, 4), torch.randn(4)
    out = []
    for batched_max in (10**9, 0):  # always the vmap pass, then always the loop
        monkeypatch.setattr(divergence, "BATCHED_TRACE_MAX_ELEMENTS", batched_max)
        z = torch.randn(*batch, 4, generator=torch.Generator().manual_seed(0)).requires_grad_()
        f = torch.tanh(z @ W.T + b) * z.sin()
        div, frob = exact_divergence(f, z, create_graph=create_graph, frobenius=True)
        grad = torch.autograd.grad((div + frob).sum(), z)[0] if create_graph else None
        out.append((div, frob, grad))
    (d1, f1, g1), (d2, f2, g2) = out
    assert d1.shape == f1.shape == batch
    torch.testing.assert_close(d1, d2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f1, f2, rtol=1e-12, atol=1e-12)
    if create_graph:
        torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)


def test_hutchinson_divergence_of_linear_map_per_probe():
    A, z, f = linear_field(3, 7)
    eps = sample_noise(z, "gaussian")
    div, frob = hutchinson_divergence(f, z, eps, create_graph=False, frobenius=True)
    # For a linear map the estimate is exactly eps^T A eps and ||eps^T A||^2 / D.
    assert torch.allclose(div, torch.einsum("bi,ij,bj->b", eps, A, eps), atol=1e-12)
    assert torch.allclose(frob, (eps @ A).pow(2).sum(-1) / 3, atol=1e-12)
    assert hutchinson_divergence(z @ A.T, z, eps, create_graph=False)[1] is None


@pytest.mark.parametrize("noise", NOISES)
def test_hutchinson_divergence_is_unbiased_for_trace_and_frobenius(noise):
    n, dim = 20000, 3
    A, z, f = linear_field(dim, n)
    div, frob = hutchinson_divergence(f, z, sample_noise(z, noise), create_graph=False, frobenius=True)
    for estimate, exact in ((div, torch.trace(A)), (frob, A.pow(2).sum() / dim)):
        se = estimate.std() / n**0.5
        assert estimate.std() > 0
        assert (estimate.mean() - exact).abs() < 4 * se


@pytest.mark.parametrize("noise", NOISES)
def test_sample_noise_moments(noise):
    like = torch.empty(50000, 3)
    eps = sample_noise(like, noise)
    assert eps.shape == like.shape and eps.dtype == like.dtype
    if noise == "rademacher":
        assert set(eps.unique().tolist()) == {-1.0, 1.0}
    else:
        assert eps.unique().numel() > 1000
    assert torch.allclose(eps.mean(0), torch.zeros(3), atol=0.03)
    assert torch.allclose(eps.T @ eps / len(eps), torch.eye(3), atol=0.03)


def test_sample_noise_unknown_kind():
    with pytest.raises(ValueError, match="unknown noise"):
        sample_noise(torch.zeros(2, 2), "uniform")


# -- Hutchinson through a solve -------------------------------------------------------------


def make_flow(**options):
    options = dict(hidden_dims=[8, 8], zero_init=False, trace="hutchinson", **options)
    return FFJORD(3, **options)


@pytest.mark.parametrize("noise", NOISES)
def test_hutchinson_logdet_is_unbiased(noise):
    # rk4 on a fixed grid: the trajectory does not depend on the probe, and the quadrature is
    # linear in the integrand, so E[Hutchinson log-det] is exactly the exact-trace log-det on
    # the same grid and the only discrepancy is the sampling error.
    flow = make_flow(noise=noise, solver="rk4", step_size=0.25, T=1.0, eval_solver="rk4")
    x = torch.randn(4, 3)
    n = 4000
    xs = x.expand(n, 4, 3)  # every copy gets its own probe vector in one solve
    flow.train()
    with torch.no_grad():
        ys = flow(xs)
        hutch = flow.log_abs_det_jacobian(xs, ys)
    flow.eval()  # eval_trace="exact", same solver and grid (eval_solver)
    with torch.no_grad():
        y = flow(x)
        exact = flow.log_abs_det_jacobian(x, y)
    assert hutch.shape == (n, 4)
    assert torch.allclose(ys, y.expand_as(ys), atol=1e-12)
    se = hutch.std(0) / n**0.5
    assert (se > 0).all()  # the estimate is random, so this test can fail
    assert (exact.abs() > 10 * se).all()  # the log-det is large enough to be tested
    assert ((hutch.mean(0) - exact).abs() < 4 * se).all()


def test_hutchinson_and_exact_differ_per_sample():
    # Guard: the training-mode log-det is really the Hutchinson estimate, not the exact one.
    flow = make_flow(solver="rk4", step_size=0.25)
    x = torch.randn(100, 3)
    with torch.no_grad():
        hutch = flow.log_abs_det_jacobian(x, flow(x))
        flow.eval()
        x = x.clone()  # a new tensor: the transform's cache is keyed on identity
        exact = flow.log_abs_det_jacobian(x, flow(x))
    assert (hutch - exact).abs().max() > 1e-4


class NoiseRecorder:
    def __init__(self, monkeypatch):
        self.calls = []
        original = FFJORD_MODULE.sample_noise

        def wrapped(like, kind):
            eps = original(like, kind)
            self.calls.append(eps)
            return eps

        monkeypatch.setattr(FFJORD_MODULE, "sample_noise", wrapped)


def test_one_noise_draw_per_solve(monkeypatch):
    recorder = NoiseRecorder(monkeypatch)
    flow = make_flow()
    for i in range(3):
        x = torch.randn(5, 3)
        y = flow(x)
        flow.log_abs_det_jacobian(x, y)  # cached: no new solve, no new noise
        assert len(recorder.calls) == i + 1
        assert flow.stats.solves == i + 1
    assert flow.nfe_forward > 1  # many evaluations, one probe
    assert recorder.calls[-1].shape == x.shape
    assert flow.stats.last.noise is recorder.calls[-1]
    # The exact trace draws no noise.
    flow.eval()
    flow(torch.randn(5, 3))
    assert len(recorder.calls) == 3


def hutchinson_grads(flow, x, seed):
    flow.zero_grad()
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    y = flow(x)
    loss = flow.log_abs_det_jacobian(x, y).sum() + y.pow(2).sum()
    loss.backward()
    return [p.grad.clone() for p in flow.parameters()] + [x.grad.clone()]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_adjoint_backward_reuses_the_solves_noise(monkeypatch):
    recorder = NoiseRecorder(monkeypatch)
    flow = make_flow(atol=1e-10, rtol=1e-10)
    x = torch.randn(6, 3)
    direct = hutchinson_grads(flow, x, seed=1)
    flow.config.adjoint = True
    adjoint = hutchinson_grads(flow, x, seed=1)
    assert flow.nfe_backward > 0  # the adjoint pass ran
    assert len(recorder.calls) == 2  # and drew no noise of its own
    assert torch.equal(recorder.calls[0], recorder.calls[1])
    assert max(rel_err(a, d) for a, d in zip(adjoint, direct)) < 1e-5
    # Other noise gives other gradients, so redrawn noise in the backward pass would show.
    other = hutchinson_grads(flow, x, seed=2)
    assert max(rel_err(o, d) for o, d in zip(other, direct)) > 1e-2


def test_adjoint_backward_uses_its_own_solves_noise_after_other_solves():
    # Another solve between forward and backward must not change the first solve's probe.
    flow = make_flow(atol=1e-10, rtol=1e-10)
    x = torch.randn(6, 3)
    direct = hutchinson_grads(flow, x, seed=1)
    flow.config.adjoint = True
    flow.zero_grad()
    xg = x.clone().requires_grad_()
    torch.manual_seed(1)
    y = flow(xg)
    loss = flow.log_abs_det_jacobian(xg, y).sum() + y.pow(2).sum()
    flow(torch.randn(6, 3))  # an unrelated solve with fresh noise
    loss.backward()
    adjoint = [p.grad.clone() for p in flow.parameters()] + [xg.grad.clone()]
    assert max(rel_err(a, d) for a, d in zip(adjoint, direct)) < 1e-5
