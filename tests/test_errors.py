"""Every misuse and every failed solve raises a ValueError (SolverError for the solve) that
says what went wrong and how to fix it, instead of a hang, a NaN or a cryptic torch error."""

import pytest
import torch

from pyro_ffjord import ConditionalFFJORD, FFJORD, SolverError, conditional_ffjord, ffjord
from pyro_ffjord.config import ADAPTIVE_SOLVERS

OPTIONS = dict(hidden_dims=[8, 8], zero_init=False, solver="dopri5")  # failures of adaptive solves


def flow(**options):
    return FFJORD(2, **{**OPTIONS, **options})


def conditional(**options):
    return ConditionalFFJORD(2, 3, **{**OPTIONS, **options})


def test_solver_error_is_a_value_error():
    assert issubclass(SolverError, ValueError)


# -- inputs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 3), (3,), (2, 1)])
def test_wrong_last_dimension(shape):
    f = flow()
    x = torch.randn(shape)
    with pytest.raises(ValueError, match="input_dim=2.*last dimension must be 2"):
        f(x)
    with pytest.raises(ValueError, match="last dimension must be 2"):
        f.inv(x)
    with pytest.raises(ValueError, match="last dimension must be 2"):
        f.log_abs_det_jacobian(x, x)
    assert f.stats.solves == 0


def test_scalar_input():
    with pytest.raises(ValueError, match="last dimension must be 2"):
        flow()(torch.tensor(1.0))


def test_wrong_last_dimension_conditional():
    with pytest.raises(ValueError, match="last dimension must be 2"):
        conditional().condition(torch.randn(4, 3))(torch.randn(4, 5))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input(bad):
    f = flow()
    x = torch.randn(4, 2)
    x[2, 1] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        f(x)
    with pytest.raises(ValueError, match="y contains NaN or infinite"):
        f.inv(x)
    with pytest.raises(ValueError, match="NaN or infinite"):
        conditional().condition(torch.randn(4, 3))(x)


def test_non_tensor_input():
    with pytest.raises(TypeError, match="x must be a tensor"):
        flow()._call([[0.0, 1.0]])


def test_dtype_mismatch_says_how_to_fix():
    f = flow()  # float32 parameters
    x = torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"torch.float64.*torch.float32.*flow.to\(torch.float64\)"):
        f(x)
    with pytest.raises(ValueError, match=r"flow.to\(torch.float64\)"):
        f.inv(x)
    # The suggested fix works.
    f.to(torch.float64)
    assert f(x).dtype == torch.float64


def test_dtype_mismatch_conditional():
    c = conditional()
    with pytest.raises(ValueError, match=r"context is torch.float64.*torch.float32.*flow.to\(torch.float64\)"):
        c.condition(torch.randn(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"flow.to\(torch.float64\)"):
        c.condition(torch.randn(3, 3))(torch.randn(3, 2, dtype=torch.float64))


# -- context --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 2), (4, 4), ()])
def test_context_of_wrong_size(shape):
    with pytest.raises(ValueError, match=r"context has shape .*context_dim=3"):
        conditional().condition(torch.randn(shape))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_context(bad):
    context = torch.randn(4, 3)
    context[1, 0] = bad
    with pytest.raises(ValueError, match="context contains NaN or infinite"):
        conditional().condition(context)


def test_context_not_a_tensor():
    with pytest.raises(TypeError, match="context must be a tensor"):
        conditional().condition([0.0, 1.0, 2.0])


@pytest.mark.parametrize("context_batch, x_batch", [((4,), (5,)), ((2, 4), (3, 4)), ((4,), (4, 3))])
def test_context_batch_not_broadcastable(context_batch, x_batch):
    t = conditional().condition(torch.randn(*context_batch, 3))
    x = torch.randn(*x_batch, 2)
    with pytest.raises(ValueError, match="does not broadcast against the context"):
        t(x)
    with pytest.raises(ValueError, match="does not broadcast"):
        t.inv(x)


def test_context_batch_that_broadcasts_is_fine():
    t = conditional().condition(torch.randn(1, 3))
    assert t(torch.randn(3, 4, 2)).shape == (3, 4, 2)
    t = conditional().condition(torch.randn(4, 3))
    assert t(torch.randn(2)).shape == (4, 2)


# -- options --------------------------------------------------------------------------------


@pytest.mark.parametrize("factory", [lambda **kw: FFJORD(2, **kw), lambda **kw: ConditionalFFJORD(2, 3, **kw)])
def test_unknown_option_name(factory):
    with pytest.raises(TypeError, match=r"unknown FFJORD option.*\['tolerance'\]"):
        factory(tolerance=1e-3)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(trace="approximate"), "trace='approximate' is not supported.*hutchinson"),
        (dict(eval_trace="none"), "eval_trace='none' is not supported"),
        (dict(noise="uniform"), "noise='uniform' is not supported.*rademacher"),
        (dict(solver="runge"), "solver='runge' is not a supported torchdiffeq method.*dopri5.*rk4"),
        (dict(eval_solver="runge"), "eval_solver='runge' is not a supported torchdiffeq method"),
        (dict(solver="scipy_solver"), "scipy_solver cannot backpropagate"),
        (dict(atol=-1e-5), "atol must be a positive finite number"),
        (dict(atol=float("inf")), "atol must be a positive finite number, got inf"),
        (dict(rtol=float("nan")), "rtol must be a positive finite number"),
        (dict(rtol=0.0), "rtol must be a positive finite number"),
        (dict(solver="rk4", step_size=-0.1), "step_size must be a positive finite number"),
        (dict(solver="dopri5", step_size=0.1), "step_size applies to fixed-grid solvers, but solver='dopri5'"),
        (dict(steps=4, solver="bosh3", eval_solver="dopri5"), "steps applies to fixed-grid solvers"),
        (dict(solver="rk4", step_size=1e-7), "needs at least 20000000 function evaluations.*max_nfe=20000"),
        (dict(solver="euler", steps=50, max_nfe=49), "needs at least 50 function evaluations"),
        (dict(solver="rk4", steps=0), "steps must be a positive int"),
        (dict(solver="rk4", steps=2.5), "steps must be a positive int"),
        (dict(solver="rk4", steps=True), "steps must be a positive int"),
        (dict(solver="rk4", steps=4, step_size=0.1), "steps or step_size, not both"),
        (dict(T=-1.0), "T \\(the end time\\) must be a positive finite number"),
        (dict(T=float("inf")), "must be a positive finite number"),
        (dict(kinetic=-0.1), "kinetic is a regularization weight and must be finite and >= 0"),
        (dict(kinetic=float("inf")), "kinetic is a regularization weight and must be finite"),
        (dict(jacobian=-0.1), "jacobian is a regularization weight"),
        (dict(error_norm="max"), "error_norm='max' is not supported"),
        (dict(max_nfe=0), "max_nfe .* must be a positive int"),
        (dict(max_nfe="100"), "max_nfe .* must be a positive int, got '100'"),
        (dict(max_nfe=float("inf")), "max_nfe .* must be a positive int, got inf"),
        (dict(max_nfe=True), "max_nfe .* must be a positive int"),
        (dict(max_memory_gb=0), "max_memory_gb must be a positive finite number"),
        (dict(adjoint="yes"), "adjoint must be True or False"),
        (dict(hidden_dims=64), "hidden_dims must be a list of positive ints"),
        (dict(hidden_dims="64"), "hidden_dims must be a list of positive ints"),
        (dict(hidden_dims=[0]), "hidden_dims must be a list of positive ints"),
        (dict(hidden_dims=[-4]), "hidden_dims must be a list of positive ints"),
        (dict(hidden_dims=[8.0]), "hidden_dims must be a list of positive ints"),
        (dict(activation=3), "activation must be a name"),
        (dict(preset="slow"), "preset='slow' unknown.*fast"),
        (dict(activation="gelu2"), "activation='gelu2' unknown"),
        (dict(time_embedding="sin"), "time_embedding='sin'"),
    ],
)
def test_bad_option_values(options, match):
    options = {"hidden_dims": [8], **options}
    with pytest.raises(ValueError, match=match):
        FFJORD(2, **options)


@pytest.mark.parametrize("input_dim", [0, -2, 2.0, True])
def test_bad_input_dim(input_dim):
    with pytest.raises(ValueError, match="input_dim must be a positive int"):
        FFJORD(input_dim, hidden_dims=[8])
    with pytest.raises(ValueError, match="input_dim must be a positive int"):
        ffjord(input_dim)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(context_dim=0), "context_dim must be a positive int"),
        (dict(conditioning="film"), "conditioning='film'"),
        (dict(conditioning="lowrank", rank=0), "rank must be a positive int"),
        (dict(conditioning="lowrank", rank=1.5), "rank must be a positive int"),
        (dict(context_dim=True), "context_dim must be a positive int"),
    ],
)
def test_bad_conditional_options(options, match):
    options = {"context_dim": 3, **options}
    with pytest.raises(ValueError, match=match):
        ConditionalFFJORD(2, hidden_dims=[8], **options)
    with pytest.raises(ValueError, match=match):
        conditional_ffjord(2, hidden_dims=[8], **options)


# -- failed solves --------------------------------------------------------------------------


def test_step_budget_exceeded():
    f = flow(max_nfe=5)
    with pytest.raises(SolverError, match="forward solve exceeded its step budget of max_nfe=5"):
        f(torch.randn(4, 2))
    assert f.nfe_forward == 6  # stopped at the first evaluation over the budget
    with pytest.raises(SolverError, match="max_nfe=5"):
        f.inv(torch.randn(4, 2))


def test_step_budget_exceeded_conditional():
    t = conditional(max_nfe=5).condition(torch.randn(4, 3))
    with pytest.raises(SolverError, match="max_nfe=5"):
        t(torch.randn(4, 2))


def test_step_budget_exceeded_in_adjoint_backward(float64):
    tight = dict(trace="exact", adjoint=True, atol=1e-8, rtol=1e-8)
    x = torch.randn(4, 2)

    def loss(f):
        y = f(x)
        return y.pow(2).sum() + f.log_abs_det_jacobian(x, y).sum()

    roomy = flow(**tight)
    loss(roomy).backward()
    budget = roomy.nfe_forward
    assert roomy.nfe_backward > budget  # the adjoint pass needs more evaluations
    f = flow(max_nfe=budget, **tight)
    f.load_state_dict(roomy.state_dict())
    value = loss(f)  # the forward solve fits in the budget
    assert f.nfe_forward == budget
    with pytest.raises(SolverError, match=f"adjoint \\(backward\\) solve exceeded .*max_nfe={budget}"):
        value.backward()
    assert f.nfe_backward == budget + 1


def cubic(t, z, cond=None):
    return 10 * z**3  # dz/dt = 10 z^3 blows up at t = 1 / (20 z0^2) = 0.0125 for z0 = 2


def exp_exp(t, z, cond=None):
    return torch.exp(torch.exp(3 * z))


def nan_field(t, z, cond=None):
    return z * float("nan")


@pytest.mark.parametrize("field", [cubic, exp_exp, nan_field])
@pytest.mark.parametrize("solver", ["dopri5", "rk4", "bosh3"])
def test_diverging_dynamics_raise_solver_error(monkeypatch, field, solver):
    f = flow(solver=solver, **({} if solver in ADAPTIVE_SOLVERS else {"step_size": 0.05}))
    monkeypatch.setattr(f.net, "forward", field)
    with pytest.raises(SolverError, match="underflow|not finite|max_nfe") as info:
        f(torch.full((3, 2), 2.0))
    assert "Try looser tolerances" in str(info.value)  # the advice comes with it
    assert f.nfe_forward <= f.config.max_nfe + 1


def test_underflow_names_the_solver(monkeypatch):
    f = flow()
    monkeypatch.setattr(f.net, "forward", cubic)
    with pytest.raises(SolverError, match="ODE solver 'dopri5' failed.*underflow in dt"):
        f(torch.full((3, 2), 2.0))


def test_huge_weights_stop_at_the_step_budget():
    # A real net, not a patched one: huge weights make the field enormous and stiff; the
    # solve stops at the budget with advice instead of grinding on.
    f = FFJORD(2, hidden_dims=[8], activation="softplus", zero_init=False, solver="dopri5", max_nfe=500)
    with torch.no_grad():
        for p in f.parameters():
            p.mul_(1e6)
    with pytest.raises(SolverError, match="max_nfe=500.*stiff or diverging"):
        f(torch.randn(4, 2) * 10)
    assert f.nfe_forward == 501
