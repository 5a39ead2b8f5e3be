"""RNODE regularization: the kinetic and Jacobian penalties of a solve against a brute-force
computation on the trajectory, their weights, and when they exist."""

import pytest
import torch
import pyro.distributions as dist
from torchdiffeq import odeint

from pyro_ffjord import ConditionalFFJORD, FFJORD, regularization

OPTIONS = dict(hidden_dims=[8, 8], zero_init=False)
TIGHT = dict(OPTIONS, trace="exact", solver="dopri5", atol=1e-10, rtol=1e-10)


def stretched_flow(**options):
    """PyTorch's default init gives a Jacobian penalty ~300 times smaller than the kinetic one;
    tripling the weight matrices makes both of the same order, so neither hides in a sum."""
    flow = FFJORD(2, **TIGHT, **options)
    with torch.no_grad():
        for name, p in flow.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                p.mul_(3.0)
    return flow


def brute_force_penalties(flow, x, num_times=2001):
    """Per-sample ∫_0^T ½ mean_d f² dt and ∫_0^T ‖∂f/∂z‖_F² / D dt, from the trajectory on a
    fine grid, autograd Jacobians (one gradient per output coordinate) and the trapezoid rule."""
    T = float(flow.end_time)
    times = torch.linspace(0, T, num_times)
    with torch.no_grad():
        path = odeint(lambda t, z: flow.net(t, z), x, times, method="dopri5", rtol=1e-11, atol=1e-11)
    z = path.detach().requires_grad_()  # (num_times, batch, D)
    f = flow.net(times[:, None, None], z)
    dim = z.shape[-1]
    frob = torch.zeros(z.shape[:-1])
    for i in range(dim):
        (row,) = torch.autograd.grad(f[..., i].sum(), z, retain_graph=True)
        frob = frob + row.pow(2).sum(-1)
    kinetic = torch.trapezoid(0.5 * f.detach().pow(2).mean(-1), times, dim=0)
    jacobian = torch.trapezoid(frob / dim, times, dim=0)
    return kinetic, jacobian, path[-1]


@pytest.mark.parametrize("kinetic, jacobian", [(0.3, 0.0), (0.0, 0.2), (0.3, 0.2)])
def test_regularization_matches_brute_force(float64, kinetic, jacobian):
    flow = stretched_flow(kinetic=kinetic, jacobian=jacobian)
    x = torch.randn(3, 2)
    y = flow(x)
    reg = flow.regularization
    assert isinstance(reg, torch.Tensor) and reg.dim() == 0
    kin, jac, end = brute_force_penalties(flow, x)
    assert torch.allclose(y, end, atol=1e-7)  # the brute force follows the same trajectory
    assert (kin > 0).all() and (jac > 0).all()
    expected = kinetic * kin.mean() + jacobian * jac.mean()
    assert jac.mean() > 0.5 * kin.mean() and kin.mean() > 0.2 * jac.mean()  # both matter
    assert reg.item() == pytest.approx(expected.item(), rel=1e-4)


def test_regularization_through_the_reverse_path(float64):
    flow = stretched_flow(kinetic=0.3, jacobian=0.2)
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [flow])
    y = torch.randn(4, 2)
    d.log_prob(y)  # a value that was not sampled: one reverse solve
    assert flow.stats.solves == 1
    reg = flow.regularization
    assert reg is not None and reg.item() > 0  # the same sign as in the forward direction
    x = flow._inverse(y.clone()).detach()
    kin, jac, end = brute_force_penalties(flow, x)
    assert torch.allclose(end, y, atol=1e-7)
    assert reg.item() == pytest.approx((0.3 * kin.mean() + 0.2 * jac.mean()).item(), rel=1e-4)
    # And the forward solve from that x gives the same penalty.
    flow(x)
    assert flow.regularization.item() == pytest.approx(reg.item(), rel=1e-6)


@pytest.mark.parametrize("adjoint", [False, True])
def test_regularization_is_differentiable(adjoint):
    flow = FFJORD(2, kinetic=0.1, jacobian=0.1, adjoint=adjoint, **OPTIONS)
    flow(torch.randn(5, 2))
    reg = flow.regularization
    assert reg.dim() == 0 and reg.requires_grad and reg.item() > 0
    reg.backward()
    grads = [p.grad for p in flow.net.field_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_regularization_gradients_adjoint_match_direct(float64):
    flow = FFJORD(2, kinetic=0.3, jacobian=0.2, **TIGHT)
    x = torch.randn(4, 2)
    grads = []
    for adjoint in (False, True):
        flow.config.adjoint = adjoint
        flow.zero_grad()
        flow(x.clone())
        flow.regularization.backward()
        grads.append([p.grad.clone() for p in flow.parameters()])
    for d, a in zip(*grads):
        assert ((a - d).norm() / d.norm()).item() < 1e-5


def test_regularization_minimized_reduces_it():
    flow = FFJORD(2, kinetic=1.0, jacobian=1.0, **OPTIONS)
    optim = torch.optim.Adam(flow.parameters(), lr=0.02)
    x = torch.randn(16, 2)
    values = []
    for _ in range(5):
        optim.zero_grad()
        flow(x.clone())
        values.append(flow.regularization.item())
        flow.regularization.backward()
        optim.step()
    assert values[-1] < 0.9 * values[0]


def test_zero_dynamics_give_zero_regularization():
    flow = FFJORD(2, hidden_dims=[8, 8], zero_init=True, kinetic=0.5, jacobian=0.5)
    x = torch.randn(5, 2)
    y = flow(x)
    assert torch.allclose(y, x, atol=1e-6)  # up to the dense output's rounding
    assert torch.equal(flow.log_abs_det_jacobian(x, y), torch.zeros(5))
    assert flow.regularization is not None and flow.regularization.item() == 0.0


def test_regularization_absent_when_not_asked_for():
    flow = FFJORD(2, kinetic=0.1, jacobian=0.1, **OPTIONS)
    flow.eval()
    flow(torch.randn(3, 2))
    assert flow.regularization is None
    flow.train()
    with torch.no_grad():
        flow(torch.randn(3, 2))
    assert flow.regularization is None
    flow(torch.randn(3, 2))
    assert flow.regularization is not None
    unweighted = FFJORD(2, **OPTIONS)
    unweighted(torch.randn(3, 2))
    assert unweighted.regularization is None
    assert regularization(unweighted).item() == 0.0


def test_eval_solve_clears_previous_regularization():
    flow = FFJORD(2, kinetic=0.1, **OPTIONS)
    flow(torch.randn(3, 2))
    assert flow.regularization is not None
    flow.eval()
    flow(torch.randn(3, 2))
    assert flow.regularization is None


def test_hutchinson_jacobian_penalty_is_unbiased(float64):
    # With Hutchinson's trace the Frobenius term is estimated with the solve's probe vectors.
    # rk4 on a fixed grid: the estimate's mean over probes is exactly the exact-trace value.
    options = dict(OPTIONS, jacobian=1.0, solver="rk4", step_size=0.05)
    flow = FFJORD(2, trace="hutchinson", **options)
    exact_flow = FFJORD(2, trace="exact", **options)
    exact_flow.load_state_dict(flow.state_dict())
    x = torch.randn(2).expand(200, 2)
    estimates = []
    for _ in range(30):
        flow(x.clone())
        estimates.append(flow.regularization.item())
    estimates = torch.tensor(estimates)
    exact_flow(x.clone())
    exact = exact_flow.regularization.item()
    se = estimates.std() / len(estimates) ** 0.5
    assert se > 0
    assert exact > 10 * se
    assert abs(estimates.mean() - exact) < 4 * se


def test_conditional_regularization():
    flow = ConditionalFFJORD(2, 3, kinetic=0.1, jacobian=0.1, **OPTIONS)
    t = flow.condition(torch.randn(4, 3))
    t(torch.randn(4, 2))
    assert flow.regularization is t.regularization
    assert flow.regularization.item() > 0
    # The package helper sums the penalties of every flow in a module.
    both = torch.nn.ModuleList([flow, FFJORD(2, kinetic=0.2, **OPTIONS)])
    both[1](torch.randn(4, 2))
    total = regularization(both)
    assert total.item() == pytest.approx(flow.regularization.item() + both[1].regularization.item())
