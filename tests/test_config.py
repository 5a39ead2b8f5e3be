"""Options and presets (pyro_ffjord.config): every caller keyword wins over a preset, ``steps``
is the number of fixed steps over [0, T] whatever T is, the reference preset builds the
reference code's configuration, and the error norms control what they say they control."""

import math

import pytest
import torch
from torchdiffeq import odeint

from pyro_ffjord import FFJORD, ConditionalFFJORD
from pyro_ffjord.config import (
    ADAPTIVE_SOLVERS,
    FIXED_GRID_SOLVERS,
    PRESETS,
    FFJORDConfig,
    apply_preset,
    default_hidden_dims,
)
from pyro_ffjord.nets import ConcatLinear, ConcatSquashLinear
from pyro_ffjord.ode import batch_rms, worst_sample_rms

# A value different from every preset's, for each option a preset may set.
OTHER = dict(
    hidden_dims=[16, 8], activation="softplus", time_embedding="concat", zero_init=True, trace="hutchinson",
    solver="bosh3", atol=1e-3, rtol=1e-4, adjoint=False, T=1.5, eval_solver="dopri8", steps=5,
)


def built_options(flow) -> dict:
    """Read each option back from the module that was built (not from what was asked)."""
    net, config = flow.net, flow.config
    layer = type(net.layers[0])
    return dict(
        hidden_dims=[lay.linear.out_features for lay in net.layers[:-1]],
        activation=type(net.activation).__name__,
        time_embedding={ConcatSquashLinear: "concatsquash", ConcatLinear: "concat"}[layer],
        zero_init=bool(net.layers[-1].linear.weight.abs().sum() == 0),
        **{k: getattr(config, k) for k in ("trace", "solver", "atol", "rtol", "adjoint", "eval_solver", "steps")},
        T=float(flow.end_time),
    )


ACTIVATION_CLASS = {"softplus": "Softplus", "tanh": "Tanh"}


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("key", sorted(OTHER))
def test_every_caller_keyword_wins_over_the_preset(preset, key):
    if key == "steps" and all(s in ADAPTIVE_SOLVERS for s in (PRESETS[preset]["solver"],)):
        # Fixed steps with a preset whose solvers are adaptive are refused, not ignored.
        with pytest.raises(ValueError, match="steps applies to fixed-grid solvers"):
            FFJORD(2, preset=preset, steps=OTHER["steps"])
        return
    flow = FFJORD(2, preset=preset, **{key: OTHER[key]})
    got = built_options(flow)[key]
    want = ACTIVATION_CLASS.get(OTHER[key], OTHER[key]) if key == "activation" else OTHER[key]
    assert got == pytest.approx(want) if isinstance(want, float) else got == want


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_sets_what_the_caller_leaves_out(preset):
    flow = FFJORD(2, preset=preset)
    got = built_options(flow)
    for key, value in PRESETS[preset].items():
        want = ACTIVATION_CLASS.get(value, value) if key == "activation" else value
        assert got[key] == want, key


def test_reference_preset_is_the_reference_code_configuration():
    # ../shared/reference/ffjord-facts.md: 64-64-64 concatsquash tanh field, T = 0.5, dopri5
    # at atol = rtol = 1e-5, adjoint gradients, the exact trace for the 2-D toys.
    flow = FFJORD(2, preset="reference")
    assert built_options(flow) == dict(
        hidden_dims=[64, 64, 64], activation="Tanh", time_embedding="concatsquash", zero_init=False,
        trace="exact", solver="dopri5", atol=1e-5, rtol=1e-5, adjoint=True, eval_solver=None, steps=None, T=0.5,
    )


def test_reference_preset_trains_through_the_adjoint(float64):
    # Its gradients come from the adjoint pass and equal those of backprop through the solver.
    torch.manual_seed(0)
    flow = FFJORD(2, preset="reference", hidden_dims=[8, 8], atol=1e-9, rtol=1e-9)
    direct = FFJORD(2, preset="reference", hidden_dims=[8, 8], atol=1e-9, rtol=1e-9, adjoint=False)
    direct.load_state_dict(flow.state_dict())
    x = torch.randn(6, 2)
    grads = []
    for f in (flow, direct):
        y = f(x)
        (y.pow(2).sum() + f.log_abs_det_jacobian(x, y).sum()).backward()
        grads.append([p.grad for p in f.parameters()])
    assert flow.nfe_backward > 0 and direct.nfe_backward == 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("T", [0.5, 2.0])
def test_fast_preset_takes_three_rk4_steps_over_the_callers_T(T, float64):
    flow = FFJORD(2, preset="fast", hidden_dims=[8, 8], T=T)
    x = torch.randn(4, 2)
    y = flow(x)
    assert flow.nfe_forward == 12  # 3 rk4 steps of 4 evaluations, whatever T
    want = odeint(lambda t, z: flow.net(t, z), x, torch.tensor([0.0, T]), method="rk4",
                  options={"step_size": T / 3})[-1]
    torch.testing.assert_close(y, want)


@pytest.mark.parametrize("steps", [1, 2, 7])
def test_steps_is_the_number_of_fixed_steps(steps):
    flow = FFJORD(2, hidden_dims=[8], solver="euler", steps=steps, T=1.3)
    flow(torch.randn(3, 2))
    assert flow.nfe_forward == steps


def test_step_size_gives_whole_steps_landing_on_T():
    flow = FFJORD(2, hidden_dims=[8], solver="euler", step_size=0.3, T=1.0)
    flow(torch.randn(3, 2))
    assert flow.nfe_forward == math.ceil(1.0 / 0.3)


def test_callers_step_size_replaces_the_presets_steps():
    options = apply_preset("fast", {"step_size": 0.1})
    assert options["step_size"] == 0.1 and "steps" not in options
    assert FFJORD(2, preset="fast", step_size=0.1).config.fixed_steps(0.5) == 5


def test_conditional_flow_takes_presets_too():
    flow = ConditionalFFJORD(2, 3, preset="fast", T=2.0)
    assert flow.config.steps == 3 and flow.config.solver == "rk4" and float(flow.end_time) == 2.0


def test_solver_lists_are_torchdiffeqs_methods():
    for solver in ADAPTIVE_SOLVERS + FIXED_GRID_SOLVERS:
        odeint(lambda t, z: -z, torch.ones(1), torch.tensor([0.0, 1.0]), method=solver,
               options={} if solver in ADAPTIVE_SOLVERS else {"step_size": 0.5})
    assert not set(ADAPTIVE_SOLVERS) & set(FIXED_GRID_SOLVERS)
    FFJORDConfig(solver="heun3", steps=2)  # every listed method is accepted


def test_one_definition_of_the_default_hidden_sizes():
    for dim in (2, 16, 40):
        want = default_hidden_dims(dim)
        assert built_options(FFJORD(dim))["hidden_dims"] == want
        assert [lay.linear.out_features for lay in ConditionalFFJORD(dim, 3).net.layers[:-1]] == want
    assert default_hidden_dims(40) == [160, 160, 160]


def test_sample_error_norm_is_the_worst_samples_rms():
    # Three samples with per-sample RMS over (z, log-det) of 1, 3 and 2: the norm is 3.
    z = torch.tensor([[1.0, 1.0], [3.0, 3.0], [2.0, 2.0]])
    logdet = torch.tensor([1.0, 3.0, 2.0])
    assert worst_sample_rms((z, logdet)).item() == pytest.approx(3.0)
    # The batch norm is the larger of the RMS of z and of the log-det over the whole batch.
    assert batch_rms((z, logdet)).item() == pytest.approx(math.sqrt(14 / 3))


def test_sample_error_norm_controls_the_worst_sample(float64):
    # One fast-moving sample among many still ones: the batch RMS dilutes its error, the
    # per-sample norm does not, so it takes at least as many steps as that sample alone.
    torch.manual_seed(0)
    flow = FFJORD(2, hidden_dims=[16, 16], atol=1e-6, rtol=1e-6)
    alone = torch.randn(1, 2) * 3
    batch = torch.cat([alone, torch.zeros(63, 2)])
    nfe = {}
    for norm in ("batch", "sample"):
        flow.config.error_norm = norm
        flow(batch)
        nfe[norm] = flow.nfe_forward
    flow(alone)
    assert nfe["sample"] >= flow.nfe_forward
