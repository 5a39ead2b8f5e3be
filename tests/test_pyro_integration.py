"""FFJORD in Pyro's machinery: saving and loading, copying, autoguides with vectorized
particles, a conditional flow in an amortized guide, and the float32 default."""

import copy
import io
from functools import partial

import pytest
import torch
import pyro
import pyro.distributions as dist
from pyro.distributions.conditional import ConditionalTransformedDistribution
from pyro.distributions.transforms import iterated
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormalizingFlow

from pyro_ffjord import AutoFFJORD, ConditionalFFJORD, FFJORD, ffjord

OPTIONS = dict(hidden_dims=[8, 8], zero_init=False)
CONDITIONINGS = ["concat", "lowrank", "bias"]


def make(kind, **options):
    options = {**OPTIONS, **options}
    if kind == "ffjord":
        return FFJORD(2, **options)
    return ConditionalFFJORD(2, 3, conditioning=kind, rank=2, **options)


def outputs(flow, x, context=None, seed=None):
    """y and the log-det of a fresh solve (seeded, for Hutchinson in training mode)."""
    if seed is not None:
        torch.manual_seed(seed)
    t = flow if context is None else flow.condition(context)
    x = x.clone()
    with torch.no_grad():
        y = t(x)
        return y, t.log_abs_det_jacobian(x, y)


def assert_same_outputs(a, b, kind):
    x = torch.randn(5, 2)
    context = None if kind == "ffjord" else torch.randn(5, 3)
    for train in (True, False):
        a.train(train)
        b.train(train)
        ya, la = outputs(a, x, context, seed=3)
        yb, lb = outputs(b, x, context, seed=3)
        assert torch.equal(ya, yb) and torch.equal(la, lb)


# -- saving, loading, copying ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ffjord"] + CONDITIONINGS)
@pytest.mark.parametrize("train_T", [False, True])
def test_state_dict_round_trip(kind, train_T):
    options = dict(T=0.7, train_T=train_T, trace="hutchinson")
    flow = make(kind, **options)
    fresh = make(kind, **dict(options, T=0.5))  # another init and another T
    x = torch.randn(5, 2)
    context = None if kind == "ffjord" else torch.randn(5, 3)
    assert not torch.equal(outputs(flow, x, context, seed=1)[0], outputs(fresh, x, context, seed=1)[0])
    assert "log_T" in flow.state_dict()
    fresh.load_state_dict(flow.state_dict())
    assert fresh.end_time.item() == pytest.approx(0.7)
    assert_same_outputs(flow, fresh, kind)


@pytest.mark.parametrize("kind", ["ffjord", "lowrank"])
def test_torch_save_load_weights_only(kind, tmp_path):
    flow = make(kind, T=0.6, train_T=True)
    x = torch.randn(3, 2)
    context = None if kind == "ffjord" else torch.randn(3, 3)
    outputs(flow, x, context)  # a solve before saving: the state dict holds no solve state
    path = tmp_path / "flow.pt"
    torch.save(flow.state_dict(), path)
    state = torch.load(path, weights_only=True)
    # Tensors, and the architecture record (plain values) that refuses a mismatched field.
    assert all(isinstance(v, torch.Tensor) or k.endswith("_extra_state") for k, v in state.items())
    fresh = make(kind, train_T=True)
    fresh.load_state_dict(state)
    assert fresh.end_time.item() == pytest.approx(0.6)
    assert_same_outputs(flow, fresh, kind)
    # In memory too.
    buffer = io.BytesIO()
    torch.save(flow.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert_same_outputs(flow, fresh, kind)


@pytest.mark.parametrize(
    "kind, options, backward",
    [
        ("ffjord", {}, False),
        ("ffjord", {}, True),
        ("ffjord", dict(adjoint=True), True),
        ("ffjord", dict(trace="hutchinson"), False),
        ("ffjord", dict(train_T=True), False),
        ("ffjord", dict(kinetic=0.1, jacobian=0.1), False),
        ("concat", {}, False),
        ("lowrank", {}, False),
    ],
    ids=["plain", "after-backward", "adjoint-after-backward", "hutchinson", "train_T", "regularized",
         "conditional-concat", "conditional-lowrank"],
)
def test_deepcopy_after_a_solve(kind, options, backward):
    flow = make(kind, **options)
    x = torch.randn(4, 2)
    context = None if kind == "ffjord" else torch.randn(4, 3)
    t = flow if context is None else flow.condition(context)
    y = t(x)
    if backward:
        y.sum().backward()
    clone = copy.deepcopy(flow)
    assert clone is not flow
    assert all(p is not q for p, q in zip(clone.parameters(), flow.parameters()))
    flow.train(False)
    assert_same_outputs(flow, clone, kind)
    # The copy is independent: changing it leaves the original alone.
    with torch.no_grad():
        next(clone.parameters()).add_(1.0)
    assert not torch.equal(next(clone.parameters()), next(flow.parameters()))


# -- SVI ------------------------------------------------------------------------------------


def global_model(data):
    loc = pyro.sample("loc", dist.Normal(0.0, 3.0).expand([2]).to_event(1))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(loc, scale.unsqueeze(-1)).to_event(1), obs=data)


def run_svi(model, guide, data, steps, elbo=None):
    elbo = elbo or Trace_ELBO(num_particles=10, vectorize_particles=True)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), elbo)
    return [svi.step(data) for _ in range(steps)]


def test_auto_normalizing_flow_with_iterated_ffjord():
    data = torch.randn(20, 2) + torch.tensor([1.0, -2.0])
    guide = AutoNormalizingFlow(global_model, partial(iterated, 2, ffjord))
    losses = run_svi(global_model, guide, data, steps=4)
    assert all(torch.isfinite(torch.tensor(losses)))
    flows = [m for m in guide.modules() if isinstance(m, FFJORD)]
    assert len(flows) == 2
    assert all(f.stats.solves > 0 for f in flows)
    # The guide's parameters are the flows' and they were trained.
    names = set(pyro.get_param_store().keys())
    assert any("net.layers" in n for n in names)
    # A sample from the trained guide has the model's latent shapes.
    with torch.no_grad():
        sample = guide(data)
    assert sample["loc"].shape == (2,) and sample["scale"].shape == ()
    assert torch.isfinite(guide.get_posterior().log_prob(torch.zeros(3)))


def correlated_model():
    pyro.sample("x", dist.MultivariateNormal(TARGET_LOC, TARGET_COV))


TARGET_LOC = torch.tensor([1.0, -2.0])
TARGET_COV = torch.tensor([[1.0, 0.8], [0.8, 1.0]])


def test_auto_ffjord_learns_a_correlated_posterior():
    # The target is normalized, so -ELBO = KL(q || p) >= 0; AutoFFJORD starts at N(0, I)
    # pushed through a random flow (KL about 4) and must learn the mean and the correlation.
    guide = AutoFFJORD(correlated_model, hidden_dims=[16, 16], preset="fast", kinetic=0.01)
    elbo = Trace_ELBO(num_particles=16, vectorize_particles=True)
    svi = SVI(correlated_model, guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
    kl_start = sum(svi.evaluate_loss() for _ in range(10)) / 10
    for _ in range(300):
        svi.step()
    assert guide.regularization.item() > 0  # the penalty of the latest solve is there
    guide.eval()
    with torch.no_grad():
        kl_end = sum(svi.evaluate_loss() for _ in range(10)) / 10
        x = guide.get_posterior().sample((4000,))
    assert kl_start > 1.0 and kl_end < 0.1
    torch.testing.assert_close(x.mean(0), TARGET_LOC, atol=0.15, rtol=0)
    assert torch.corrcoef(x.T)[0, 1].item() > 0.6  # 0.8 in the target, about 0 at the start


def local_model(data):
    with pyro.plate("data", len(data)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        pyro.sample("obs", dist.Normal(z, 0.5).to_event(1), obs=data)


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
@pytest.mark.parametrize("vectorize", [False, True])
def test_conditional_ffjord_in_amortized_guide(conditioning, vectorize):
    flow = ConditionalFFJORD(2, 2, conditioning=conditioning, **OPTIONS)
    base = dist.Normal(torch.zeros(2), 1.0).to_event(1)

    def guide(data):
        pyro.module("flow", flow)
        with pyro.plate("data", len(data)):
            pyro.sample("z", ConditionalTransformedDistribution(base, [flow]).condition(data))

    data = torch.randn(12, 2)
    before = [p.detach().clone() for p in flow.parameters()]
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True) if vectorize else Trace_ELBO()
    svi = SVI(local_model, guide, pyro.optim.Adam({"lr": 0.01}), elbo)
    losses = [svi.step(data)]
    first = flow.stats.solves  # the first step may also trace the guide to guess plate nesting
    losses += [svi.step(data) for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(losses)))
    # pyro.module put the flow's parameters in the param store and SVI changed them.
    assert any(n.startswith("flow$$$") for n in pyro.get_param_store().keys())
    changed = [not torch.equal(b, p) for b, p in zip(before, flow.parameters())]
    assert sum(changed) >= len(changed) - 1  # all but possibly an unused one
    # One solve per step, vectorized particles included: the guide scores its own sample
    # from the cache.
    assert flow.stats.solves == first + 2


def test_float32_default():
    assert torch.get_default_dtype() == torch.float32
    flow = FFJORD(2, **OPTIONS)
    assert all(p.dtype == torch.float32 for p in flow.parameters())
    assert flow.log_T.dtype == torch.float32
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [flow])
    y = d.rsample((6,))
    lp = d.log_prob(y)
    assert y.dtype == lp.dtype == torch.float32
    assert torch.isfinite(lp).all()
    (-lp.mean()).backward()
    assert all(p.grad.dtype == torch.float32 for p in flow.net.field_parameters())
    # A float32 inverse round trip at float32 accuracy.
    x = torch.randn(6, 2)
    assert torch.allclose(flow._inverse(flow._call(x)), x, atol=1e-4)
