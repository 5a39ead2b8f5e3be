"""Hostile inputs and states: far-out points, stiff fields, empty plates, corrupted parameters,
half precision, mismatched state_dicts and stale caches each get the right behaviour or their
own clear error (never a silent NaN, an exhausted machine or a result of other parameters)."""

import pytest
import pyro.distributions as dist
import torch

from pyro_ffjord import FFJORD, ConditionalFFJORD, SolverError, regularization
from pyro_ffjord import ode
from pyro_ffjord.config import ADAPTIVE_SOLVERS


def density(flow):
    return dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [flow])


# -- far-out points: finite gradients --------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{}, dict(trace="hutchinson"), dict(adjoint=True), dict(error_norm="sample"), dict(preset="fast"),
     dict(hidden_dims=[8, 8])],
)
@pytest.mark.parametrize("scale", [1e4, 1e15])
def test_far_out_points_give_finite_gradients(options, scale):
    # The field saturates there (f1 == f0): a gradient through the step-size control was
    # 0 * inf = NaN in every parameter, and one Adam step poisoned them all.
    torch.manual_seed(0)
    flow = FFJORD(2, **options)
    loss = -density(flow).log_prob(torch.full((4, 2), scale)).mean()
    loss.backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in flow.parameters())
    torch.optim.Adam(flow.parameters(), lr=1e-3).step()
    assert all(bool(torch.isfinite(p).all()) for p in flow.parameters())
    assert bool(torch.isfinite(density(flow).log_prob(torch.randn(5, 2))).all())


# -- memory and step budgets -----------------------------------------------------------------


def stiff_flow(**options):
    torch.manual_seed(0)
    flow = FFJORD(2, **{"solver": "dopri5", **options})  # adaptive: a stiff field takes many steps
    with torch.no_grad():
        for p in flow.parameters():
            p.mul_(20)
    return flow


def test_training_solve_stops_at_its_memory_budget():
    flow = stiff_flow(max_memory_gb=0.05)
    with pytest.raises(SolverError, match=r"graph of this training solve would hold more than 0.05 GiB.*adjoint=True"):
        density(flow).log_prob(torch.randn(256, 2) * 0.01)
    held = flow.nfe_forward * flow.stats.last.graph_bytes_per_eval
    assert 0.05 * 2**30 < held < 0.05 * 2**30 + 2 * flow.stats.last.graph_bytes_per_eval


def test_default_memory_budget_is_half_the_free_memory(monkeypatch):
    monkeypatch.setattr(ode, "_MEMORY_CHECK_FROM", 0)
    monkeypatch.setattr(ode, "free_memory", lambda device: 20 * 2**20)  # 20 MiB free
    flow = stiff_flow()
    with pytest.raises(SolverError, match="max_memory_gb=None: half the free memory"):
        density(flow).log_prob(torch.randn(256, 2) * 0.01)
    # Without a graph (evaluation, or the adjoint's forward solve) nothing is held: no limit.
    with torch.no_grad():
        density(flow).log_prob(torch.randn(256, 2) * 0.01)
    density(stiff_flow(adjoint=True)).log_prob(torch.randn(256, 2) * 0.01)


def test_fixed_grid_beyond_the_budget_is_refused_before_solving_even_after_loading_T():
    flow = FFJORD(2, hidden_dims=[8], solver="rk4", step_size=0.01, max_nfe=250)  # 50 steps at T=0.5
    flow(torch.randn(3, 2))
    saved = FFJORD(2, hidden_dims=[8], solver="rk4", step_size=0.01, T=2.0, max_nfe=1000)
    flow.load_state_dict(saved.state_dict())
    solves = flow.stats.solves
    with pytest.raises(ValueError, match="200 steps over .*needs at least 800 function evaluations.*max_nfe=250"):
        flow(torch.randn(3, 2))
    assert flow.stats.solves == solves  # refused before any evaluation


# -- each failure its own diagnosis ----------------------------------------------------------


@pytest.mark.parametrize("solver", ["dopri5", "bosh3", "rk4", "euler"])
@pytest.mark.parametrize("error_norm", ["batch", "sample"])
@pytest.mark.parametrize("options", [dict(), dict(kinetic=0.1, jacobian=0.1), dict(adjoint=True)])
def test_empty_batch_is_an_empty_result(solver, error_norm, options):
    steps = {} if solver in ADAPTIVE_SOLVERS else {"steps": 2}
    flow = FFJORD(2, hidden_dims=[8], solver=solver, error_norm=error_norm, **steps, **options)
    empty = torch.zeros(0, 2)
    assert flow(empty).shape == (0, 2)
    x = flow.inv(empty)
    ladj = flow.log_abs_det_jacobian(x, empty)
    assert x.shape == (0, 2) and ladj.shape == (0,)
    # (torch's Independent.log_prob cannot sum an empty event; the transform's part works.)
    loss = ladj.sum() + regularization(flow)
    loss.backward()  # an empty plate's loss backpropagates like any other (zero gradients)
    assert all(p.grad is None or not p.grad.any() for p in flow.parameters())
    d = density(flow)
    assert d.rsample((0,)).shape == (0, 2) and d.rsample((3, 0)).shape == (3, 0, 2)
    assert flow.stats.solves == 0


def test_empty_batch_conditional():
    t = ConditionalFFJORD(2, 3, hidden_dims=[8]).condition(torch.randn(0, 3))
    assert t(torch.randn(0, 2)).shape == (0, 2)
    assert t.log_abs_det_jacobian(torch.randn(4, 0, 2), torch.randn(4, 0, 2)).shape == (4, 0)


def test_half_precision_is_refused_with_its_own_reason():
    flow = FFJORD(2, hidden_dims=[8], solver="dopri5").half()
    with pytest.raises(ValueError, match=r"'dopri5' cannot meet rtol=1e-05 in torch.float16.*float32"):
        flow(torch.zeros(3, 2).half())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("solver", ["dopri5", "rk4"])
def test_corrupted_parameters_are_named(bad, solver):
    flow = FFJORD(2, hidden_dims=[8], solver=solver, **({} if solver == "dopri5" else {"steps": 4}))
    with torch.no_grad():
        flow.net.layers[1].linear.bias[0] = bad
    with pytest.raises(SolverError, match=r"parameter 'layers.1.linear.bias' holds NaN or infinite values") as info:
        flow(torch.zeros(3, 2))
    assert "looser tolerances" not in str(info.value)


def test_corrupted_end_time_is_named():
    flow = FFJORD(2, hidden_dims=[8])
    with torch.no_grad():
        flow.log_T.fill_(float("nan"))
    with pytest.raises(SolverError, match="the end time T is nan"):
        flow(torch.zeros(3, 2))


def test_integer_input_gets_advice_that_works():
    flow = FFJORD(2, hidden_dims=[8])
    for x in (torch.zeros(3, 2, dtype=torch.int64), torch.zeros(3, 2, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"FFJORD maps real vectors; convert it, e.g. x.to\(torch.float32\)"):
            flow(x)


# -- the adjoint's backward solve ------------------------------------------------------------


def test_adjoint_backward_failure_is_a_solver_error(monkeypatch):
    flow = FFJORD(2, hidden_dims=[8], solver="dopri5", adjoint=True)
    forward = flow.net.forward
    backward_pass = {"on": False}

    def field(t, z, cond=None):  # well-behaved forward, impossible adjoint
        out = forward(t, z, cond)
        return out * float("nan") if backward_pass["on"] else out

    monkeypatch.setattr(flow.net, "forward", field)
    y = flow(torch.randn(4, 2))
    backward_pass["on"] = True
    with pytest.raises(SolverError, match=r"adjoint \(backward\) solve with 'dopri5' failed .*adjoint=False"):
        y.sum().backward()


# -- options and architecture -----------------------------------------------------------------


def test_activation_may_be_a_function_or_a_module_class():
    x = torch.randn(5, 2)
    flows = [FFJORD(2, hidden_dims=[8], activation=a) for a in ("tanh", torch.tanh, torch.nn.Tanh)]
    for f in flows[1:]:
        f.load_state_dict(flows[0].state_dict(), strict=False)  # weights only; architecture differs in name
        torch.testing.assert_close(f.net(torch.tensor(0.1), x), flows[0].net(torch.tensor(0.1), x))


def test_no_hidden_layer_is_a_field_linear_in_z():
    flow = FFJORD(2, hidden_dims=[])
    z = torch.randn(2)
    jac = torch.autograd.functional.jacobian(lambda v: flow.net(torch.tensor(0.2), v), z)
    jac2 = torch.autograd.functional.jacobian(lambda v: flow.net(torch.tensor(0.2), v), 3 * z)
    torch.testing.assert_close(jac, jac2)


def test_state_dict_carries_T_and_refuses_another_architecture():
    saved = FFJORD(2, hidden_dims=[8], T=2.0, solver="rk4", step_size=0.25)
    flow = FFJORD(2, hidden_dims=[8], T=0.5, solver="rk4", step_size=0.25)
    flow.load_state_dict(saved.state_dict())
    assert flow.config.T == pytest.approx(2.0) and float(flow.end_time) == pytest.approx(2.0)
    flow(torch.randn(3, 2))
    assert flow.nfe_forward == 8 * 4  # 8 rk4 steps of 0.25 over [0, 2]
    for other in (dict(activation="softplus"), dict(time_embedding="concat")):
        wrong = FFJORD(2, hidden_dims=[8], **other)
        if "time_embedding" in other:
            wrong.net.layers.load_state_dict(saved.net.layers.state_dict(), strict=False)
        with pytest.raises((ValueError, RuntimeError), match="another architecture|size mismatch|Missing|Unexpected"):
            wrong.load_state_dict(saved.state_dict())
    with pytest.raises(ValueError, match="activation='tanh' there, 'softplus' here"):
        FFJORD(2, hidden_dims=[8], activation="softplus").load_state_dict(saved.state_dict())


# -- no stale results ------------------------------------------------------------------------


def test_no_stale_result_after_load_state_dict_or_in_place_change():
    flow, other = FFJORD(2, hidden_dims=[8]), FFJORD(2, hidden_dims=[8])
    flow.eval()
    d, x = density(flow), torch.randn(5, 2)
    with torch.no_grad():
        before = d.log_prob(x)
        flow.load_state_dict(other.state_dict())
        after_load = d.log_prob(x)
        assert not torch.allclose(before, after_load)
        torch.testing.assert_close(after_load, density(other.eval()).log_prob(x))
        flow.net.layers[0].linear.weight.mul_(2)
        assert not torch.allclose(d.log_prob(x), after_load)


def test_rsample_then_log_prob_after_an_optimizer_step_is_solved_again():
    flow = FFJORD(2, hidden_dims=[8])
    d = density(flow)
    y = d.rsample((5,))
    solves = flow.stats.solves
    d.log_prob(y)
    assert flow.stats.solves == solves  # the sample's own solve is reused...
    (-d.log_prob(y).mean()).backward()
    torch.optim.SGD(flow.parameters(), lr=0.1).step()
    d.log_prob(y)
    assert flow.stats.solves == solves + 1  # ... until the parameters change


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_full_batch_loop_on_one_fixed_tensor(mode):
    flow = FFJORD(2, hidden_dims=[8])
    getattr(flow, mode)()
    d, x = density(flow), torch.randn(64, 2) + 2
    optimizer = torch.optim.Adam(flow.parameters(), lr=0.05)
    losses = []
    for _ in range(3):
        loss = -d.log_prob(x).mean()
        optimizer.zero_grad()
        loss.backward()  # failed on the second iteration: a cached result with a freed graph
        optimizer.step()
        losses.append(loss.item())
    assert losses[2] < losses[0]


def test_conditional_flow_without_context_says_what_to_do():
    flow = ConditionalFFJORD(2, 3, hidden_dims=[8])
    with pytest.raises(TypeError, match=r"condition it on a context first, flow.condition\(context\)"):
        flow(torch.randn(4, 2))


@pytest.mark.parametrize("num_flows", [0, 1.5, True, "2"])
def test_autoguide_refuses_a_bad_number_of_flows(num_flows):
    from pyro_ffjord import AutoFFJORD

    def model():
        pass

    with pytest.raises(ValueError, match="num_flows must be a positive int"):
        AutoFFJORD(model, num_flows=num_flows)


@pytest.mark.parametrize("conditioning", [None, "concat", "lowrank"])
def test_inference_mode_gives_what_no_grad_gives(conditioning):
    # The trace needs autograd; under torch.inference_mode() it failed ("does not require grad").
    if conditioning is None:
        t = FFJORD(2, hidden_dims=[8]).eval()
    else:
        t = ConditionalFFJORD(2, 3, hidden_dims=[8], conditioning=conditioning).eval().condition(torch.randn(4, 3))
    x = torch.randn(4, 2)
    with torch.no_grad():
        want = t.inv(x), t.log_abs_det_jacobian(torch.ones(4, 2), x)
    with torch.inference_mode():
        got = t.inv(x), t.log_abs_det_jacobian(torch.ones(4, 2), x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_context_changed_in_place_is_solved_again():
    flow = ConditionalFFJORD(2, 3, hidden_dims=[8]).eval()
    context = torch.randn(4, 3)
    t = flow.condition(context)
    y = t(torch.randn(4, 2))
    x = t.inv(y)
    with torch.no_grad():
        context.add_(1.0)
    assert t.inv(y) is not x
