"""How many ODE solves (and function evaluations) each use of a flow costs, and which trace
and solver it uses in training and in eval mode."""

import pytest
import torch
import pyro.distributions as dist
from pyro.distributions.conditional import ConditionalTransformedDistribution

from pyro_ffjord import ConditionalFFJORD, FFJORD

OPTIONS = dict(hidden_dims=[8, 8], zero_init=False)


def base(dim=2):
    return dist.Normal(torch.zeros(dim), 1.0).to_event(1)


def test_rsample_then_log_prob_costs_one_solve():
    flow = FFJORD(2, **OPTIONS)
    d = dist.TransformedDistribution(base(), [flow])
    y = d.rsample((5,))
    assert flow.stats.solves == 1
    nfe = flow.stats.nfe_forward_total
    assert nfe == flow.nfe_forward > 0
    lp = d.log_prob(y)
    assert lp.shape == (5,)
    assert flow.stats.solves == 1
    assert flow.stats.nfe_forward_total == nfe  # scoring the own sample: 0 evaluations
    # The cached log-det is the one the sample was drawn with: it is differentiable.
    lp.sum().backward()
    assert all(p.grad is not None for p in flow.net.field_parameters())


def test_log_prob_of_another_value_costs_one_reverse_solve(float64):
    flow = FFJORD(2, trace="exact", atol=1e-10, rtol=1e-10, **OPTIONS)
    d = dist.TransformedDistribution(base(), [flow])
    y = d.rsample((5,))
    cached = d.log_prob(y)
    assert flow.stats.solves == 1
    other = y.detach().clone()  # equal values, another tensor: the cache is keyed on identity
    lp = d.log_prob(other)
    assert flow.stats.solves == 2
    # The reverse solve integrated the log-det too: it matches the sample's cached one.
    assert torch.allclose(lp, cached, atol=1e-8)
    # A tensor the caller passes in is solved afresh each time (it may be a fixed batch
    # scored again after an optimizer step); only the end a solve produced is reused.
    d.log_prob(other)
    assert flow.stats.solves == 3
    d.log_prob(torch.randn(7, 2))
    assert flow.stats.solves == 4


def test_log_prob_matches_inverse_and_log_det(float64):
    flow = FFJORD(2, trace="exact", atol=1e-10, rtol=1e-10, **OPTIONS)
    d = dist.TransformedDistribution(base(), [flow])
    y = torch.randn(6, 2)
    lp = d.log_prob(y)
    x = flow._inverse(y.clone())  # bypasses the cache: a fresh reverse solve
    expected = base().log_prob(x) - flow.log_abs_det_jacobian(x, flow._call(x))
    assert torch.allclose(lp, expected, atol=1e-8)
    # The inverse really inverts.
    assert torch.allclose(flow._call(x), y, atol=1e-8)


def test_conditional_rsample_then_log_prob_costs_one_solve():
    flow = ConditionalFFJORD(2, 3, **OPTIONS)
    d = ConditionalTransformedDistribution(base(), [flow]).condition(torch.randn(4, 3))
    y = d.rsample()
    assert y.shape == (4, 2)
    assert flow.stats.solves == 1
    nfe = flow.stats.nfe_forward_total
    d.log_prob(y)
    assert flow.stats.solves == 1 and flow.stats.nfe_forward_total == nfe
    d.log_prob(y.detach().clone())
    assert flow.stats.solves == 2


def test_two_flows_one_solve_each():
    flows = [FFJORD(2, **OPTIONS), FFJORD(2, **OPTIONS)]
    d = dist.TransformedDistribution(base(), flows)
    y = d.rsample((3,))
    d.log_prob(y)
    assert [f.stats.solves for f in flows] == [1, 1]
    d.log_prob(y.detach().clone())
    assert [f.stats.solves for f in flows] == [2, 2]


def test_log_abs_det_jacobian_of_uncached_tensors_solves_again():
    flow = FFJORD(2, **OPTIONS)
    x = torch.randn(3, 2)
    y = flow(x)
    assert flow.stats.solves == 1
    flow.log_abs_det_jacobian(x, y)
    assert flow.stats.solves == 1
    flow.log_abs_det_jacobian(x.clone(), y)
    assert flow.stats.solves == 2
    flow.log_abs_det_jacobian(x, y.clone())
    assert flow.stats.solves == 3
    # The inverse of the cached output is served from the cache; a copy is not.
    assert flow.inv(y) is x
    assert flow.stats.solves == 3
    flow.inv(y.clone())
    assert flow.stats.solves == 4


def test_clear_cache_drops_the_log_det():
    flow = FFJORD(2, **OPTIONS)
    x = torch.randn(3, 2)
    y = flow(x)
    flow.clear_cache()
    flow.log_abs_det_jacobian(x, y)
    assert flow.stats.solves == 2


def test_nfe_counters_and_totals():
    flow = FFJORD(2, **OPTIONS)
    assert flow.nfe_forward == 0 and flow.nfe_backward == 0
    flow(torch.randn(3, 2))
    first = flow.nfe_forward
    assert first > 0
    flow(torch.randn(3, 2))
    assert flow.stats.nfe_forward_total == first + flow.nfe_forward
    flow.stats.reset()
    assert flow.stats.solves == 0 and flow.nfe_forward == 0 and flow.stats.nfe_forward_total == 0


@pytest.mark.parametrize("adjoint", [False, True])
def test_nfe_backward(adjoint):
    flow = FFJORD(2, adjoint=adjoint, **OPTIONS)
    x = torch.randn(3, 2)
    y = flow(x)
    loss = y.pow(2).sum() + flow.log_abs_det_jacobian(x, y).sum()
    assert flow.nfe_backward == 0
    loss.backward()
    assert flow.nfe_forward > 0
    if adjoint:
        assert flow.nfe_backward > 0
        assert flow.stats.nfe_backward_total == flow.nfe_backward
    else:
        assert flow.nfe_backward == 0 and flow.stats.nfe_backward_total == 0


def test_conditional_nfe_backward_with_adjoint():
    flow = ConditionalFFJORD(2, 3, adjoint=True, **OPTIONS)
    t = flow.condition(torch.randn(3, 3))
    t(torch.randn(3, 2)).sum().backward()
    assert flow.nfe_forward > 0 and flow.nfe_backward > 0
    assert t.nfe_forward == flow.nfe_forward and t.stats is flow.stats


def test_eval_mode_uses_the_exact_trace():
    flow = FFJORD(2, trace="hutchinson", **OPTIONS)
    x = torch.randn(5, 2)

    def log_det():
        xc = x.clone()  # a new tensor each time: no cache hits
        return flow.log_abs_det_jacobian(xc, flow(xc))

    train = [log_det() for _ in range(2)]
    assert not torch.allclose(train[0], train[1])  # Hutchinson: random
    flow.eval()
    evals = [log_det() for _ in range(2)]
    assert torch.equal(evals[0], evals[1])  # exact: deterministic
    assert flow.stats.solves == 4


def test_eval_trace_option_is_respected():
    flow = FFJORD(2, trace="exact", eval_trace="hutchinson", **OPTIONS)
    x = torch.randn(5, 2)
    a = flow.log_abs_det_jacobian(x, flow(x))
    xc = x.clone()
    assert torch.equal(a, flow.log_abs_det_jacobian(xc, flow(xc)))
    flow.eval()
    x1, x2 = x.clone(), x.clone()
    assert not torch.allclose(flow.log_abs_det_jacobian(x1, flow(x1)), flow.log_abs_det_jacobian(x2, flow(x2)))


def test_eval_solver_is_used_in_eval_mode():
    # dopri5 for training, four rk4 steps (four evaluations each) in eval mode; a step size
    # that does not divide T gives whole steps that land on T: ceil(0.5 / 0.15) = 4.
    flow = FFJORD(2, solver="dopri5", eval_solver="rk4", step_size=0.15, **OPTIONS)
    flow(torch.randn(3, 2))
    train_nfe = flow.nfe_forward
    assert train_nfe != 16
    flow.eval()
    flow(torch.randn(3, 2))
    assert flow.nfe_forward == 16
    flow.train()
    flow(torch.randn(3, 2))
    assert flow.nfe_forward == train_nfe


def test_fast_preset_solvers():
    # 'fast': three rk4 steps while training (12 evaluations), adaptive dopri5 in eval mode.
    flow = FFJORD(2, preset="fast", **OPTIONS)
    flow(torch.randn(3, 2))
    assert flow.nfe_forward == 12
    flow.eval()
    flow(torch.randn(3, 2))
    assert flow.nfe_forward != 12


def test_switching_mode_drops_the_cache():
    # Train and eval modes differ (trace, solver): the same tensor must be solved again.
    flow = FFJORD(2, hidden_dims=[8], trace="hutchinson")
    x = torch.randn(5, 2)
    y = flow(x)
    solves = flow.stats.solves
    flow.eval()
    y_eval = flow(x)
    assert flow.stats.solves == solves + 1
    assert y_eval is not y
    assert flow.inv(y_eval) is x  # the end this mode's solve produced is reused
    assert flow.stats.solves == solves + 1
    flow.train()
    assert flow.inv(y_eval) is not x  # not across modes
    assert flow.stats.solves == solves + 2
