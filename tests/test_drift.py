"""The default solve (fixed rk4 steps in training, adaptive dopri5 in eval mode) and its safety
net: a training grid that drifts from the adaptive solution is refined, with a warning."""

import warnings

import pytest
import torch

from pyro_ffjord import FFJORD, ConditionalFFJORD
from pyro_ffjord.config import DEFAULT_STEPS
from pyro_ffjord.drift import DriftWarning


@pytest.mark.parametrize("dim, trace", [(2, "exact"), (8, "hutchinson")])
def test_default_trains_on_a_fixed_grid_and_evaluates_adaptively(dim, trace):
    flow = FFJORD(dim, hidden_dims=[8])
    assert (flow.config.solver, flow.config.trace, flow.config.eval_method) == ("rk4", trace, "dopri5")
    x = torch.randn(5, dim)
    flow(x).sum().backward()
    assert flow.nfe_forward == 4 * DEFAULT_STEPS
    flow.eval()
    with torch.no_grad():
        flow(x)
    assert flow.nfe_forward != 4 * DEFAULT_STEPS  # adaptive: honest likelihoods


def test_a_chosen_adaptive_solver_is_used_in_both_modes():
    flow = FFJORD(2, hidden_dims=[8], solver="bosh3")
    assert flow.config.eval_method == "bosh3"
    assert FFJORD(2, hidden_dims=[8], solver="rk4", eval_solver="rk4").config.eval_method == "rk4"


def coarse_flow(scale=10.0, **options):
    # Large weights make the field vary fast: one rk4 step is far from the exact solution
    # (log-det drift about 0.2 nats at scale 10, 0.01 at scale 5).
    torch.manual_seed(0)
    flow = FFJORD(2, hidden_dims=[16], **{"steps": 1, "drift_check": 1, **options})
    with torch.no_grad():
        for p in flow.net.parameters():
            p.mul_(scale)
    return flow


def test_a_drifting_grid_is_refined_with_a_warning():
    flow = coarse_flow()
    x = torch.randn(64, 2)
    solves = flow.stats.solves
    with pytest.warns(DriftWarning, match=r"1-step 'rk4' training solve drifted .*continues with 2 steps"):
        flow(x).sum().backward()
    assert flow.config.steps == 2 and flow.stats.drift.logdet > flow.config.drift_tol
    assert flow.stats.solves == solves + 1  # the check is not one of the flow's solves
    flow(x)
    assert flow.nfe_forward == 4 * 2
    # The refined grid belongs to the trained flow: it travels with the state_dict.
    fresh = FFJORD(2, hidden_dims=[16])
    fresh.load_state_dict(flow.state_dict())
    assert fresh.config.fixed_steps(0.5) == 2


def test_grid_keeps_refining_until_the_drift_is_small():
    flow = coarse_flow(scale=20.0)
    x = torch.randn(64, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DriftWarning)
        for _ in range(8):
            flow(x).sum().backward()
    assert flow.config.steps > 2
    assert max(flow.stats.drift) <= flow.config.drift_tol


@pytest.mark.parametrize("how", ["drift_check=0", "eval", "no_grad", "adaptive"])
def test_no_check_where_none_is_asked_or_needed(how):
    flow = coarse_flow(**({"drift_check": 0} if how == "drift_check=0" else {}))
    if how == "adaptive":
        flow = FFJORD(2, hidden_dims=[16], solver="dopri5", drift_check=1)
    if how == "eval":
        flow.eval()
    x = torch.randn(64, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DriftWarning)
        with torch.no_grad() if how == "no_grad" else torch.enable_grad():
            flow(x)
    assert flow.stats.drift is None


def test_smooth_flow_does_not_drift():
    flow = FFJORD(2, hidden_dims=[16], drift_check=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DriftWarning)
        flow(torch.randn(64, 2)).sum().backward()
    assert max(flow.stats.drift) < 1e-3 and flow.config.steps is None


def test_conditional_flow_is_checked_too():
    torch.manual_seed(0)
    flow = ConditionalFFJORD(2, 3, hidden_dims=[16], steps=1, drift_check=1)
    with torch.no_grad():
        for p in flow.net.parameters():
            p.mul_(10)
    with pytest.warns(DriftWarning):
        flow.condition(torch.randn(64, 3))(torch.randn(64, 2)).sum().backward()
    assert flow.config.steps == 2


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_drift_options_are_checked(bad):
    with pytest.raises(ValueError, match="drift_check must be an int >= 0"):
        FFJORD(2, drift_check=bad)
    with pytest.raises(ValueError, match="drift_tol must be a positive finite number"):
        FFJORD(2, drift_tol=0.0)
