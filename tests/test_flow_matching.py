"""Flow matching (pyro_ffjord.flow_matching): the learned field, density and samples against closed
forms on Gaussian problems, the time convention, the OT coupling, the conditional case, errors."""

import math
import sys

import pyro.distributions as dist
import pytest
import torch

from pyro_ffjord import ConditionalFFJORD, FFJORD, ImageFFJORD, flow_matching_loss
from pyro_ffjord.datasets import toy

M, S, SIG = torch.tensor([2.0, -1.0]), 0.5, 1e-4


def train(flow, sample, steps, lr=5e-3, context=False, **kwargs):
    """Adam (cosine schedule) on the flow-matching loss; ``sample(g)`` returns x1 (and context)."""
    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        batch = sample(g)
        loss = flow_matching_loss(flow, *batch, generator=g, **kwargs) if context else \
            flow_matching_loss(flow, batch, generator=g, **kwargs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return flow


def gaussian_flow(T):
    torch.manual_seed(0)
    flow = FFJORD(2, hidden_dims=[32, 32], T=T)
    return flow, train(flow, lambda g: M + S * torch.randn(512, 2, generator=g), 2000, sigma_min=SIG)


def optimal_field(t, x, T):
    """E[u | x_t = x] for x0 ~ N(0, I), x1 ~ N(M, S^2 I) independent: (u, x_t) is jointly
    Gaussian per coordinate with E x_t = tau M, Var x_t = a^2 + tau^2 S^2 (a = 1 - (1 - SIG) tau),
    E u = M / T and Cov(u, x_t) = (tau S^2 - (1 - SIG) a) / T."""
    tau = t / T
    a = 1 - (1 - SIG) * tau
    var = a**2 + (tau * S) ** 2
    return M / T + (tau * S**2 - (1 - SIG) * a) / (T * var) * (x - tau * M)


def density(flow):
    base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
    return dist.TransformedDistribution(base, [flow])


def check_gaussian(flow, T, untrained_mae):
    g = torch.Generator().manual_seed(7)
    # (a) the field, at x_t's own distribution, for tau in [0.05, 0.9]; compared in units of the
    # normalized time s = t / T (T f), where the field's norm is about 2.4 whatever T is: 0.2 is
    # under 10% of it (an untrained net is off by about its whole norm).
    with torch.no_grad():
        for tau in torch.linspace(0.05, 0.9, 6).tolist():
            sd = math.hypot(1 - (1 - SIG) * tau, tau * S)
            x = tau * M + sd * torch.randn(200, 2, generator=g)
            err = (flow.net(torch.tensor(tau * T), x) - optimal_field(tau * T, x, T)).norm(dim=-1).mean() * T
            assert err < 0.2, (tau, float(err))
    # (b) exact log-density (eval mode: exact trace, dopri5) of held-out points. The field errors
    # above move the density by a few hundredths of a nat; 0.12 nats is a fraction of the
    # untrained flow's error (checked > 1 nat, so the test is not vacuous).
    flow.eval()
    y = M + S * torch.randn(400, 2, generator=g)
    true = dist.Normal(M, S).to_event(1).log_prob(y)
    with torch.no_grad():
        mae = (density(flow).log_prob(y) - true).abs().mean()
    assert untrained_mae > 1.0 and mae < 0.12, (float(untrained_mae), float(mae))
    # (c) samples: 2000 points give a standard error of about 0.011 on the mean, 0.008 on the std.
    with torch.no_grad():
        x = density(flow).sample((2000,))
    assert torch.allclose(x.mean(0), M, atol=0.05), x.mean(0)
    assert torch.allclose(x.std(0), torch.full((2,), S), atol=0.05), x.std(0)


def untrained_mae(T):
    torch.manual_seed(0)
    flow = FFJORD(2, hidden_dims=[32, 32], T=T).eval()
    y = M + S * torch.randn(400, 2)
    with torch.no_grad():
        return (density(flow).log_prob(y) - dist.Normal(M, S).to_event(1).log_prob(y)).abs().mean()


def test_gaussian_to_gaussian_field_density_samples():
    flow, _ = gaussian_flow(1.0)
    check_gaussian(flow, 1.0, untrained_mae(1.0))


def test_time_convention_other_T():
    # T = 2: velocities halve and times double; a wrong time scaling would map N(0, I) elsewhere.
    flow, _ = gaussian_flow(2.0)
    check_gaussian(flow, 2.0, untrained_mae(2.0))


def test_learned_T_is_left_alone():
    torch.manual_seed(0)
    flow = FFJORD(2, hidden_dims=[8], T=0.7, train_T=True)
    flow_matching_loss(flow, torch.randn(16, 2)).backward()
    assert flow.log_T.grad is None
    assert all(p.grad is not None for p in flow.net.parameters())


def test_maximum_likelihood_fine_tuning_after_flow_matching():
    torch.manual_seed(0)
    flow = FFJORD(2, hidden_dims=[32, 32], T=1.0)
    train(flow, lambda g: M + S * torch.randn(256, 2, generator=g), 300, sigma_min=SIG)
    y = M + S * 1.3 * torch.randn(256, 2)  # a wider data set: the likelihood has something to fit
    d = density(flow)
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = -d.log_prob(y).mean()
        opt.zero_grad()
        loss.backward()
        assert all(bool(torch.isfinite(p.grad).all()) for p in flow.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.02, losses


def straightness(flow, n=256, steps=16):
    """Mean over rk4 steps and base points of ||T f(t, z(t)) - (z(T) - z(0))||^2, relative to
    ||z(T) - z(0)||^2: 0 for straight trajectories at constant speed."""
    g = torch.Generator().manual_seed(5)
    T = float(flow.end_time)
    z = z0 = torch.randn(n, 2, generator=g)
    h, velocities = T / steps, []
    with torch.no_grad():
        for k in range(steps):
            t = torch.tensor(k * h)
            k1 = flow.net(t, z)
            k2 = flow.net(t + h / 2, z + h / 2 * k1)
            k3 = flow.net(t + h / 2, z + h / 2 * k2)
            k4 = flow.net(t + h, z + h * k3)
            velocities.append(k1)
            z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    disp = z - z0
    return float(torch.stack([(v * T - disp).pow(2).sum(-1) for v in velocities]).mean() / disp.pow(2).sum(-1).mean())


def test_ot_coupling_straightens_paths():
    pytest.importorskip("scipy")
    result = {}
    for coupling in ("independent", "ot"):
        torch.manual_seed(0)
        flow = FFJORD(2, hidden_dims=[64, 64], T=1.0)
        step = iter(range(10**6))
        train(flow, lambda g: toy.sample("8gaussians", 128, seed=next(step)), 400, lr=3e-3, coupling=coupling)
        result[coupling] = straightness(flow)
    # Measured 0.19 (independent) against 0.006 (OT); a factor 4 leaves a wide margin.
    assert result["independent"] > 0.1 and result["ot"] < 0.25 * result["independent"], result


def test_conditional_learns_context_dependent_gaussian():
    torch.manual_seed(0)
    flow = ConditionalFFJORD(1, context_dim=1, hidden_dims=[32, 32], T=1.0)

    def sample(g):
        c = 4 * torch.rand(512, 1, generator=g) - 2
        return c + 0.5 * torch.randn(512, 1, generator=g), c

    train(flow, sample, 1500, context=True, sigma_min=SIG)
    flow.eval()
    base = dist.Normal(torch.zeros(1), 1.0).to_event(1)
    g = torch.Generator().manual_seed(3)
    maes = []
    for c in (-1.5, 0.0, 1.5):
        ctx = torch.full((300, 1), c)
        y = c + 0.5 * torch.randn(300, 1, generator=g)
        with torch.no_grad():
            lp = dist.ConditionalTransformedDistribution(base, [flow]).condition(ctx).log_prob(y)
        maes.append(float((lp - dist.Normal(c, 0.5).log_prob(y).squeeze(-1)).abs().mean()))
    # The three conditionals are 3 standard deviations apart, so a context-blind flow is off by
    # nats; 0.12 nats each needs the context to be used.
    assert max(maes) < 0.12, maes


def test_base_argument_and_method():
    torch.manual_seed(0)
    flow = FFJORD(2, hidden_dims=[8])
    x1 = torch.randn(10, 2)
    base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
    a = flow.flow_matching_loss(x1, base=base)
    assert a.shape == () and torch.isfinite(a)
    # a base far from N(0, I) gives another loss (the samples do come from it)
    far = dist.Normal(torch.full((2,), 100.0), 1.0).to_event(1)
    assert flow_matching_loss(flow, x1, base=far) > 100 * a
    # generator: reproducible
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert flow_matching_loss(flow, x1, generator=g1) == flow_matching_loss(flow, x1, generator=g2)


def test_image_flow():
    torch.manual_seed(0)
    flow = ImageFFJORD((1, 2, 2), hidden_channels=[4])
    loss = flow_matching_loss(flow, torch.randn(6, 1, 2, 2))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in flow.net.field_parameters())
    with pytest.raises(ValueError, match=r"\(\.\.\., C, H, W\)"):
        flow_matching_loss(flow, torch.randn(6, 4))


def test_errors(monkeypatch):
    flow = FFJORD(2, hidden_dims=[8])
    cflow = ConditionalFFJORD(2, context_dim=3, hidden_dims=[8])
    x = torch.randn(5, 2)
    with pytest.raises(ValueError, match="input_dim=2"):
        flow_matching_loss(flow, torch.randn(5, 3))
    with pytest.raises(ValueError, match="at least one"):
        flow_matching_loss(flow, torch.randn(0, 2))
    with pytest.raises(ValueError, match="NaN"):
        flow_matching_loss(flow, torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="float64"):
        flow_matching_loss(flow, x.double())
    with pytest.raises(TypeError, match="context"):
        flow_matching_loss(cflow, x)
    with pytest.raises(ValueError, match="context_dim=3"):
        flow_matching_loss(cflow, x, torch.randn(5, 2))
    with pytest.raises(ValueError, match="broadcast"):
        flow_matching_loss(cflow, x, torch.randn(4, 3))
    with pytest.raises(ValueError, match="unconditional"):
        flow_matching_loss(flow, x, torch.randn(5, 3))
    with pytest.raises(ValueError, match="coupling='sinkhorn'"):
        flow_matching_loss(flow, x, coupling="sinkhorn")
    with pytest.raises(ValueError, match="sigma_min"):
        flow_matching_loss(flow, x, sigma_min=1.0)
    with pytest.raises(TypeError, match="FFJORD"):
        flow_matching_loss(torch.nn.Linear(2, 2), x)
    with pytest.raises(ValueError, match="event shape"):
        flow_matching_loss(flow, x, base=dist.Normal(torch.zeros(3), 1.0).to_event(1))
    with pytest.raises(TypeError, match="Distribution"):
        flow_matching_loss(flow, x, base="normal")
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # import fails
    with pytest.raises(ImportError, match="needs scipy"):
        flow_matching_loss(flow, x, coupling="ot")
    # the conditional loss broadcasts a shared context and keeps it attached under OT
    monkeypatch.undo()
    assert torch.isfinite(flow_matching_loss(cflow, x, torch.randn(3), coupling="ot"))
