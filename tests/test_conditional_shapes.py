"""The shape semantics of ConditionalFFJORD, pinned (see docs/pyro_generic_checks.md).

A flow conditioned on a context of batch shape ``C`` is a batch of bijections indexed by ``C``:
an input of batch shape ``B`` gives an output of batch shape ``broadcast(B, C)``, and
``forward_shape``/``inverse_shape`` report exactly that (torch's meaning: the shape of the output
for an input of that shape, as for ``AffineTransform`` with a batched ``loc``). In particular a
context of batch shape ``(1,)`` maps an input of shape ``(D,)`` to ``(1, D)``, where Pyro's generic
helper ``TransformTests._test_shape`` expects ``(D,)``.

Every test below has cases that fail if ``forward_shape``/``inverse_shape`` returned their
argument unchanged (what Pyro's conditional transforms do): checked by monkeypatching, 48 of the
81 cases fail then.
"""

import pytest
import torch

import pyro
import pyro.distributions as dist
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

from pyro_ffjord import ConditionalFFJORD

D = 3
CONTEXT_DIM = 2
N = 4
CONDITIONINGS = ["concat", "lowrank", "bias"]
# Shapes only: a small field and two fixed rk4 steps keep every solve cheap and deterministic.
OPTIONS = dict(hidden_dims=[8], trace="exact", solver="rk4", steps=2)
CONTEXT_BATCHES = [(), (1,), (N,), (2, 1)]
INPUT_BATCHES = [(), (1,), (N,), (2, N), (5, 1, N)]
BASE_BATCHES = [(), (1,), (N,)]


def make(conditioning):
    rank = 2 if conditioning == "lowrank" else 1
    return ConditionalFFJORD(D, CONTEXT_DIM, conditioning=conditioning, rank=rank, **OPTIONS)


def standard_normal(batch_shape=()):
    return dist.Normal(torch.zeros(batch_shape + (D,)), 1.0).to_event(1)


def broadcast(*shapes):
    return torch.broadcast_shapes(*shapes)


# -- forward_shape / inverse_shape are the shapes the maps return --------------------------------


@pytest.mark.parametrize("context_batch", CONTEXT_BATCHES, ids=str)
@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_shape_functions_match_outputs(conditioning, context_batch):
    t = make(conditioning).condition(torch.randn(context_batch + (CONTEXT_DIM,)))
    for input_batch in INPUT_BATCHES:
        expected = broadcast(input_batch, context_batch) + (D,)
        x = torch.randn(input_batch + (D,))
        y = t(x)
        assert y.shape == expected
        assert t.forward_shape(x.shape) == expected
        assert t.log_abs_det_jacobian(x, y).shape == expected[:-1]
        # The inverse map of a fresh value (a reverse solve) broadcasts the same way.
        value = torch.randn(input_batch + (D,))
        x_back = t.inv(value)
        assert x_back.shape == expected
        assert t.inverse_shape(value.shape) == expected
        assert t.inv.forward_shape(value.shape) == expected
        # ... and a value of the output's shape keeps its shape.
        assert t.inverse_shape(y.shape) == y.shape == t.inv(y.clone()).shape


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_singleton_context_adds_a_batch_dim_to_a_bare_event(conditioning):
    """The case Pyro's generic helper asks about, pinned on purpose: with a context of shape
    (1, context_dim) an input of shape (D,) comes out with shape (1, D), and the shape functions
    say so."""
    t = make(conditioning).condition(torch.randn(1, CONTEXT_DIM))
    x = torch.randn(D)
    assert t(x).shape == (1, D)
    assert t.forward_shape(torch.Size((D,))) == (1, D)
    assert t.inv(torch.randn(D)).shape == (1, D)
    assert t.inverse_shape(torch.Size((D,))) == (1, D)
    # With input batch dims the singleton context broadcasts away.
    assert t.forward_shape(torch.Size((3, D))) == (3, D) == t(torch.randn(3, D)).shape


# -- the distribution contract -----------------------------------------------------------------


@pytest.mark.parametrize("base_batch", BASE_BATCHES, ids=str)
@pytest.mark.parametrize("context_batch", CONTEXT_BATCHES, ids=str)
@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_distribution_contract(conditioning, context_batch, base_batch):
    cond = make(conditioning)
    context = torch.randn(context_batch + (CONTEXT_DIM,))
    d = dist.ConditionalTransformedDistribution(standard_normal(base_batch), [cond]).condition(context)
    batch = broadcast(base_batch, context_batch)
    assert d.batch_shape == batch
    assert d.event_shape == (D,)
    # One independent base draw per batch element: TransformedDistribution expands the base to
    # inverse_shape(forward_shape(base shape)).
    assert d.base_dist.batch_shape == batch
    for sample_shape in [torch.Size(), torch.Size((3,))]:
        y = d.rsample(sample_shape)
        assert y.shape == sample_shape + batch + (D,)
        assert d.sample(sample_shape).shape == y.shape
        assert d.log_prob(y).shape == sample_shape + batch  # cached: the sampling solve
        value = torch.randn(sample_shape + batch + (D,))
        log_prob = d.log_prob(value)  # a reverse solve
        assert log_prob.shape == sample_shape + batch
        assert torch.isfinite(log_prob).all()


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_batch_elements_are_independent(conditioning):
    """N copies of one context: a batch of N independent draws of the same distribution, not one
    draw pushed through N copies of the map."""
    cond = make(conditioning)
    context = torch.randn(1, CONTEXT_DIM).expand(N, CONTEXT_DIM)
    d = dist.ConditionalTransformedDistribution(standard_normal(), [cond]).condition(context)
    y = d.sample()
    assert y.shape == (N, D)
    for i in range(N):
        for j in range(i):
            assert (y[i] - y[j]).abs().max() > 1e-3
    # Each row has the density of the flow conditioned on that context alone.
    single = dist.ConditionalTransformedDistribution(standard_normal(), [cond]).condition(context[0])
    assert torch.allclose(d.log_prob(y.clone()), single.log_prob(y.clone()), atol=1e-5, rtol=0)


# -- expand ----------------------------------------------------------------------------------


@pytest.mark.parametrize("context_batch", [(1,), (N,)], ids=str)
@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_expand(conditioning, context_batch):
    cond = make(conditioning)
    context = torch.randn(context_batch + (CONTEXT_DIM,))
    d = dist.ConditionalTransformedDistribution(standard_normal(), [cond]).condition(context)
    assert d.batch_shape == context_batch
    e = d.expand(torch.Size((3, N)))
    assert e.batch_shape == (3, N) and e.event_shape == (D,)
    assert e.base_dist.batch_shape == (3, N)
    y = e.rsample()
    assert y.shape == (3, N, D)
    # Expanding adds copies, not a different density.
    value = torch.randn(3, N, D)
    assert e.log_prob(value).shape == (3, N)
    assert torch.allclose(e.log_prob(value), d.log_prob(value), atol=1e-5, rtol=0)
    # A batch shape the context's batch shape cannot broadcast to is refused.
    if context_batch == (N,):
        with pytest.raises((RuntimeError, ValueError)):
            d.expand(torch.Size((N + 1,)))


# -- inside Pyro's inference -------------------------------------------------------------------


def _model(data):
    with pyro.plate("data", len(data)):
        z = pyro.sample("z", dist.Normal(torch.zeros(D), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=data)


def _amortized_guide(cond, context):
    def guide(data):
        pyro.module("flow", cond)
        with pyro.plate("data", len(data)):
            pyro.sample("z", dist.ConditionalTransformedDistribution(standard_normal(), [cond]).condition(context))

    return guide


@pytest.mark.parametrize("vectorize", [False, True], ids=["plate", "plate+particles"])
@pytest.mark.parametrize("context_batch", [(1,), (N,), (N + 1,)], ids=str)
@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_svi_step_in_a_plate(conditioning, context_batch, vectorize):
    """An amortized guide inside a data plate: a context of the plate's size or a singleton one
    trains; one of another size is reported by the plate itself, naming the site (it sees the
    distribution's batch shape, which is the context's)."""
    cond = make(conditioning)
    context = torch.randn(context_batch + (CONTEXT_DIM,))
    data = torch.randn(N, D)
    guide = _amortized_guide(cond, context)
    particles = dict(num_particles=2, vectorize_particles=True) if vectorize else {}
    svi = SVI(_model, guide, Adam({"lr": 1e-2}), Trace_ELBO(max_plate_nesting=1, **particles))
    if context_batch == (N + 1,):
        with pytest.raises(ValueError, match=r"Shape mismatch inside plate\('data'\) at site z"):
            svi.step(data)
        return
    before = [p.detach().clone() for p in cond.parameters()]
    loss = svi.step(data)
    assert loss == loss and abs(loss) < float("inf")
    assert any(not torch.equal(p.detach(), b) for p, b in zip(cond.parameters(), before))
    site = poutine.trace(guide).get_trace(data).nodes["z"]
    assert site["fn"].batch_shape == (N,)
    assert site["value"].shape == (N, D)


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_context_batch_declared_as_event_dims(conditioning):
    """Without a plate, the context's batch dim can be declared dependent with .to_event(1), as
    for any distribution whose batch shape is the context's."""
    cond = make(conditioning)
    context = torch.randn(N, CONTEXT_DIM)
    data = torch.randn(N, D)

    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(N, D), 1.0).to_event(2))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(2), obs=data)

    def guide():
        pyro.module("flow", cond)
        d = dist.ConditionalTransformedDistribution(standard_normal(), [cond]).condition(context)
        pyro.sample("z", d.to_event(1))

    svi = SVI(model, guide, Adam({"lr": 1e-2}), Trace_ELBO(max_plate_nesting=0))
    loss = svi.step()
    assert loss == loss and abs(loss) < float("inf")
    site = poutine.trace(guide).get_trace().nodes["z"]
    assert site["fn"].batch_shape == () and site["fn"].event_shape == (N, D)
    assert site["value"].shape == (N, D)
