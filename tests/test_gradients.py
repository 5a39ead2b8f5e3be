"""Gradients: the adjoint method agrees with backpropagation through the solver for every
input of the solve (parameters, context, end time, initial state), and a learnable end time."""

import math

import pytest
import torch

from pyro_ffjord import ConditionalFFJORD, FFJORD

pytestmark = pytest.mark.usefixtures("float64")

KINDS = ["ffjord", "concat", "lowrank", "bias"]
LOSSES = ["y", "logdet", "both"]
TIGHT = dict(hidden_dims=[8, 8], zero_init=False, trace="exact", solver="dopri5", atol=1e-11, rtol=1e-11)


def make_flow(kind, **options):
    options = {**TIGHT, **options}
    if kind == "ffjord":
        return FFJORD(2, **options)
    return ConditionalFFJORD(2, 3, conditioning=kind, **options)


def loss_fn(y, logdet, which):
    weights = torch.linspace(0.5, 1.5, y.shape[0])
    y_term = (weights[:, None] * y.sin()).sum()
    logdet_term = (weights * logdet).sum()
    return {"y": y_term, "logdet": logdet_term, "both": y_term + 0.7 * logdet_term}[which]


def gradients(flow, x, context, which, adjoint):
    """Gradients of the loss w.r.t. every parameter, the input and the context."""
    flow.config.adjoint = adjoint
    flow.zero_grad()
    x = x.clone().requires_grad_()
    transform = flow
    if context is not None:
        context = context.clone().requires_grad_()
        transform = flow.condition(context)
    y = transform(x)
    loss_fn(y, transform.log_abs_det_jacobian(x, y), which).backward()
    grads = {name: p.grad.clone() for name, p in flow.named_parameters() if p.grad is not None}
    grads["x"] = x.grad.clone()
    if context is not None:
        grads["context"] = context.grad.clone()
    return grads, flow.nfe_backward


@pytest.mark.parametrize("which", LOSSES)
@pytest.mark.parametrize("kind", KINDS)
def test_adjoint_matches_direct(kind, which):
    flow = make_flow(kind, train_T=True)
    x = torch.randn(4, 2)
    context = None if kind == "ffjord" else torch.randn(4, 3)
    direct, nfe_direct = gradients(flow, x, context, which, adjoint=False)
    adjoint, nfe_adjoint = gradients(flow, x, context, which, adjoint=True)
    assert nfe_direct == 0 and nfe_adjoint > 0  # really two different methods
    # Every parameter gets a gradient from both (the context head included), and T too.
    expected = {name for name, _ in flow.named_parameters()} | {"x"}
    if context is not None:
        expected.add("context")
    assert set(direct) == set(adjoint) == expected
    assert "log_T" in direct
    for name, g in direct.items():
        assert g.abs().max() > 0, name
        err = ((adjoint[name] - g).norm() / g.norm()).item()
        assert err < 1e-5, (name, err)


def finite_difference_log_T(flow, x, which, eps=1e-5):
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            flow.log_T.add_(sign * eps)
            xc = x.clone()
            y = flow(xc)
            values.append(loss_fn(y, flow.log_abs_det_jacobian(xc, y), which))
            flow.log_T.sub_(sign * eps)
    return (values[0] - values[1]) / (2 * eps)


@pytest.mark.parametrize("which", ["y", "logdet"])
def test_end_time_gradient_matches_finite_differences(which):
    flow = make_flow("ffjord", train_T=True)
    x = torch.randn(4, 2)
    fd = finite_difference_log_T(flow, x, which)
    for adjoint in (False, True):
        grads, _ = gradients(flow, x, None, which, adjoint)
        assert abs(grads["log_T"] - fd) < 1e-6 * max(1.0, abs(fd)), (adjoint, grads["log_T"], fd)


@pytest.mark.parametrize("adjoint", [False, True])
def test_train_T_moves_end_time_under_adam(adjoint):
    flow = make_flow("ffjord", train_T=True, adjoint=adjoint, atol=1e-6, rtol=1e-6)
    assert any(p is flow.log_T for p in flow.parameters())
    start = flow.end_time.item()
    assert start == pytest.approx(0.5)
    optim = torch.optim.Adam(flow.parameters(), lr=0.05)
    x = torch.randn(16, 2)
    for _ in range(3):
        optim.zero_grad()
        xc = x.clone()
        y = flow(xc)
        # Maximizing the log-det of a flow with nonzero divergence pushes T one way or the other.
        loss = -flow.log_abs_det_jacobian(xc, y).mean() + y.pow(2).mean()
        loss.backward()
        assert flow.log_T.grad is not None and flow.log_T.grad.abs() > 1e-6
        optim.step()
    # Adam's steps are about lr each: log T moved, and with it the end time.
    assert abs(flow.log_T.item() - math.log(start)) > 0.05
    assert abs(flow.end_time.item() - start) > 0.02


def test_conditional_train_T_gradient():
    flow = make_flow("lowrank", train_T=True)
    context = torch.randn(3, 3)
    x = torch.randn(3, 2)
    t = flow.condition(context)
    y = t(x)
    t.log_abs_det_jacobian(x, y).sum().backward()
    assert flow.log_T.grad is not None and flow.log_T.grad.abs() > 0


@pytest.mark.parametrize("kind", ["ffjord", "concat"])
def test_log_T_is_a_buffer_without_train_T(kind):
    flow = make_flow(kind, T=0.7)
    assert not isinstance(flow.log_T, torch.nn.Parameter)
    assert all(p is not flow.log_T for p in flow.parameters())
    assert "log_T" not in dict(flow.named_parameters())
    assert "log_T" in dict(flow.named_buffers())
    assert "log_T" in flow.state_dict()
    assert flow.end_time.item() == pytest.approx(0.7)
    assert not flow.end_time.requires_grad
    # Gradients flow to the parameters, not to T, for both gradient methods.
    x = torch.randn(3, 2)
    context = None if kind == "ffjord" else torch.randn(3, 3)
    for adjoint in (False, True):
        grads, _ = gradients(flow, x, context, "both", adjoint)
        assert "log_T" not in grads
        assert flow.log_T.grad is None
    assert flow.end_time.item() == pytest.approx(0.7)


def test_train_T_registers_a_parameter():
    flow = make_flow("ffjord", train_T=True, T=0.3)
    assert isinstance(flow.log_T, torch.nn.Parameter)
    assert "log_T" in dict(flow.named_parameters())
    assert "log_T" not in dict(flow.named_buffers())
    assert flow.end_time.item() == pytest.approx(0.3)
    assert flow.end_time.requires_grad
