"""Pyro's generic transform checks, rewritten for FFJORD and ConditionalFFJORD.

Everything runs in float64 with the exact trace and tight solver tolerances, so the log-det is
deterministic and accurate enough to be compared with finite differences and with the autograd
Jacobian. ``zero_init=False`` keeps the flows away from the identity (where every check would
pass trivially); :func:`test_flows_are_not_the_identity` guards that assumption.
"""

import pytest
import torch
import pyro.distributions as dist
from pyro.distributions.conditional import (
    ConditionalComposeTransformModule,
    ConditionalTransformedDistribution,
)
from pyro.distributions.torch_transform import ComposeTransformModule

from pyro_ffjord import ConditionalFFJORD, ConditionedFFJORD, FFJORD

pytestmark = pytest.mark.usefixtures("float64")

CONTEXT_DIM = 3
DIMS = [2, 5]
KINDS = ["ffjord", "concat", "lowrank", "bias"]
CONDITIONINGS = ["concat", "lowrank", "bias"]
OPTIONS = dict(hidden_dims=[8, 8], zero_init=False, trace="exact", solver="dopri5", atol=1e-10, rtol=1e-10)
# PyTorch's default init gives log-dets of order 1e-2; stretching the weight matrices of the
# field (not the low-rank/bias context head, whose U V^T would grow by GAIN**2 and make the
# dynamics stiff) by this gain makes them of order 0.1-1, so that a wrong log-det cannot hide
# below the tolerances.
GAIN = 3.0


def stretch(module):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight") and p.dim() == 2 and not name.startswith("net.head"):
                p.mul_(GAIN)
    return module


def make_ffjord(dim):
    return stretch(FFJORD(dim, **OPTIONS))


def make_conditional(dim, conditioning):
    rank = 2 if conditioning == "lowrank" else 1
    return stretch(
        ConditionalFFJORD(dim, CONTEXT_DIM, conditioning=conditioning, rank=rank, **OPTIONS)
    )


def make(dim, kind):
    """``(transform, module)``: the bijection under test and the module owning its parameters.

    Conditional flows are conditioned on a context of shape (1, 3), which must broadcast
    against any input batch shape."""
    if kind == "ffjord":
        flow = make_ffjord(dim)
        return flow, flow
    cond = make_conditional(dim, kind)
    return cond.condition(torch.rand(1, CONTEXT_DIM)), cond


def standard_normal(shape):
    return dist.Normal(torch.zeros(shape), 1.0).to_event(1)


def max_abs(a):
    return a.abs().max().item()


# -- sanity: the checks below are not about the identity map -----------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dim", DIMS)
def test_flows_are_not_the_identity(dim, kind):
    t, _ = make(dim, kind)
    x = torch.randn(10, dim)
    y = t._call(x)
    ladj = t.log_abs_det_jacobian(x, y)
    assert max_abs(y - x) > 0.1
    assert max_abs(ladj) > 0.03
    # The log-det varies with x (a volume-preserving or affine map would make some checks weak).
    assert (ladj.max() - ladj.min()).item() > 0.03


# -- 1. inverse ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dim", DIMS)
def test_inverse(dim, kind):
    t, _ = make(dim, kind)
    x = torch.randn(10, dim)
    y = t._call(x)
    ladj_forward = t.log_abs_det_jacobian(x, y)  # integrated in the forward solve
    x2 = t._inverse(y)  # bypasses the Transform cache: a genuine reverse solve
    assert x2.shape == x.shape
    assert max_abs(x - x2) < 1e-6
    ladj_inverse = t.log_abs_det_jacobian(x2, y)  # integrated in the reverse solve
    ladj_recomputed = t.log_abs_det_jacobian(x, y)  # cache now holds x2: a fresh forward solve
    assert ladj_forward.shape == ladj_inverse.shape == (10,)
    assert max_abs(ladj_forward - ladj_inverse) < 1e-6
    assert max_abs(ladj_recomputed - ladj_inverse) < 1e-6
    assert max_abs(ladj_recomputed - ladj_forward) < 1e-9


# -- 2. shapes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_shape", [(3,), (3, 4), (3, 4, 5)], ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dim", DIMS)
def test_shapes(dim, kind, batch_shape):
    t, _ = make(dim, kind)
    base_shape = torch.Size(batch_shape + (dim,))
    assert t.forward_shape(base_shape) == base_shape
    assert t.inverse_shape(base_shape) == base_shape
    d = dist.TransformedDistribution(standard_normal(base_shape), [t])
    assert d.batch_shape == batch_shape
    assert d.event_shape == (dim,)
    sample = d.sample()
    assert sample.shape == base_shape
    assert torch.isfinite(sample).all()
    y = d.rsample()
    assert y.shape == base_shape
    assert d.log_prob(y).shape == batch_shape
    # forward_shape / inverse_shape agree with what the maps return.
    x = torch.randn(base_shape)
    y = t(x)
    assert y.shape == t.forward_shape(x.shape)
    assert t.inv(y.clone()).shape == t.inverse_shape(y.shape) == x.shape
    assert t.log_abs_det_jacobian(x, y).shape == batch_shape


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_context_batch_broadcasts_against_input(conditioning):
    cond = make_conditional(2, conditioning)
    t = cond.condition(torch.rand(4, 1, CONTEXT_DIM))
    x = torch.randn(3, 2)
    y = t(x)
    assert t.forward_shape(x.shape) == y.shape == (4, 3, 2)
    assert t.inverse_shape(y.shape) == (4, 3, 2)
    assert t.log_abs_det_jacobian(x, y).shape == (4, 3)
    # Each context row gives its own map: row i equals the flow conditioned on context i alone.
    context = torch.rand(4, 1, CONTEXT_DIM)
    y = cond.condition(context)._call(x)
    y1 = cond.condition(context[1])._call(x)
    assert max_abs(y[1] - y1) < 1e-8
    assert max_abs(y[0] - y[1]) > 1e-4
    with pytest.raises(ValueError, match="broadcast"):
        cond.condition(torch.rand(4, CONTEXT_DIM))._call(torch.randn(3, 2))


# -- 3. jacobian by finite differences ----------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dim", DIMS)
def test_jacobian_finite_differences(dim, kind):
    t, _ = make(dim, kind)
    eps = 1e-4
    x = torch.randn(1, dim)
    with torch.no_grad():
        ladj = t.log_abs_det_jacobian(x, t._call(x))
        # All 2D perturbed points in one solve: one step sequence, a smooth difference quotient.
        shifts = eps * torch.eye(dim)
        y = t._call(torch.cat([x + shifts, x - shifts]))
    jac = ((y[:dim] - y[dim:]) / (2 * eps)).T  # jac[i, j] = d y_i / d x_j
    sign, logabsdet = torch.linalg.slogdet(jac)
    assert ladj.shape == (1,)
    assert sign.item() == 1.0
    assert abs(logabsdet.item() - ladj.item()) < 1e-4


# -- 4. log-det against the autograd Jacobian ---------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dim", DIMS)
def test_log_det_matches_autograd_jacobian(dim, kind):
    t, _ = make(dim, kind)
    x = torch.randn(1, dim)

    def forward(v):
        return t._call(v.reshape(1, dim)).reshape(dim)

    def inverse(v):
        return t._inverse(v.reshape(1, dim)).reshape(dim)

    with torch.no_grad():
        y = t._call(x)
        ladj_forward = t.log_abs_det_jacobian(x, y)
        x2 = t._inverse(y)
        ladj_inverse = t.log_abs_det_jacobian(x2, y)
        # The inverse transform reports the negated log-det of the same (cached) solve.
        assert torch.equal(t.inv.log_abs_det_jacobian(y, x2), -ladj_inverse)

    sign_f, logdet_f = torch.linalg.slogdet(torch.autograd.functional.jacobian(forward, x.reshape(dim)))
    sign_i, logdet_i = torch.linalg.slogdet(torch.autograd.functional.jacobian(inverse, y.reshape(dim)))
    assert sign_f.item() == 1.0 and sign_i.item() == 1.0  # t.sign == +1
    assert t.sign == 1
    assert abs(logdet_f.item() - ladj_forward.item()) < 1e-6
    assert abs(logdet_f.item() - ladj_inverse.item()) < 1e-6
    assert abs(-logdet_i.item() - ladj_inverse.item()) < 1e-6


# -- 5. autodiff ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dim", DIMS)
def test_autodiff(dim, kind):
    t, module = make(dim, kind)
    params = list(module.parameters())
    assert params
    before = [p.detach().clone() for p in params]
    optim = torch.optim.Adam(params, lr=1e-2)
    d = dist.TransformedDistribution(standard_normal(dim), [t])
    losses = []
    for _ in range(3):
        optim.zero_grad()
        solves = module.stats.solves
        loss = -d.log_prob(torch.rand(1, dim)).sum()  # a value never sampled: cache miss
        assert module.stats.solves == solves + 1  # one reverse solve gives x and the log-det
        assert torch.isfinite(loss)
        loss.backward()
        for p in params:
            assert p.grad is not None and torch.isfinite(p.grad).all()
        assert any(p.grad.abs().max() > 0 for p in params)
        optim.step()
        losses.append(loss.item())
    for p, b in zip(params, before):
        assert torch.isfinite(p).all()
        assert not torch.equal(p.detach(), b), "a parameter did not change"


@pytest.mark.parametrize("kind", KINDS)
def test_log_prob_gradient_matches_finite_differences(kind, check_log_prob_gradient):
    """Directional derivative of log_prob in parameter space, autograd vs central differences."""
    dim = 2
    t, module = make(dim, kind)
    d = dist.TransformedDistribution(standard_normal(dim), [t])
    check_log_prob_gradient(d, module.parameters(), torch.randn(4, dim))


# -- 6. inverse of a conditional transform ------------------------------------------------------


@pytest.mark.parametrize("batch_shape", [(), (7,), (6, 7)], ids=str)
@pytest.mark.parametrize("conditioning", CONDITIONINGS)
@pytest.mark.parametrize("dim", DIMS)
def test_inverse_conditional(dim, conditioning, batch_shape):
    cond = make_conditional(dim, conditioning)
    assert cond.inv.inv is cond
    context = torch.rand(batch_shape + (CONTEXT_DIM,))
    n = torch.randn(batch_shape + (dim,))
    a = cond.inv.condition(context)(n)
    b = cond.condition(context).inv(n)
    assert a.shape == b.shape == n.shape
    assert max_abs(a - b) < 1e-10
    assert max_abs(a - n) > 1e-3  # not the identity
    # ... and it is the inverse: the forward map sends it back to n.
    assert max_abs(cond.condition(context)._call(a) - n) < 1e-6
    inv = cond.inv.condition(context)
    assert inv.log_abs_det_jacobian(n, a).shape == batch_shape


# -- 7. conditional compose ---------------------------------------------------------------------


@pytest.mark.parametrize("cache_size", [0, 1])
@pytest.mark.parametrize("conditioning", CONDITIONINGS)
@pytest.mark.parametrize("dim", DIMS)
def test_conditional_compose(dim, conditioning, cache_size):
    parts = [make_conditional(dim, conditioning), make_conditional(dim, conditioning)]
    compose = ConditionalComposeTransformModule(parts, cache_size=cache_size)
    context = torch.rand(4, CONTEXT_DIM)

    conditioned = compose.condition(context)
    assert isinstance(conditioned, ComposeTransformModule)
    assert conditioned._cache_size == cache_size
    assert all(isinstance(p, ConditionedFFJORD) for p in conditioned.parts)

    expected = {p for part in parts for p in part.parameters()}
    assert len(expected) == sum(len(list(part.parameters())) for part in parts)  # disjoint parts
    assert set(compose.parameters()) == expected

    base = standard_normal(dim)
    d = ConditionalTransformedDistribution(base, [compose]).condition(context)
    assert d.batch_shape == (4,) and d.event_shape == (dim,)
    y = d.rsample((3,))
    assert y.shape == (3, 4, dim)
    log_prob = d.log_prob(y)
    assert log_prob.shape == (3, 4)
    # Scoring a copy (no cache hit) solves backwards and must agree with the cached score.
    log_prob_solved = d.log_prob(y.clone())
    assert max_abs(log_prob - log_prob_solved) < 1e-6

    # Inverse round trip through fresh reverse solves.
    x = torch.randn(3, 4, dim)
    t = compose.condition(context)
    y = t(x)
    x2 = t.inv(y.clone())
    assert torch.allclose(x2, x, atol=1e-7, rtol=0)
    assert max_abs(y - x) > 1e-2


# -- caching ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", DIMS)
def test_with_cache_shares_parameters(dim):
    flow = make_ffjord(dim)
    assert flow.with_cache(1) is flow
    uncached = flow.with_cache(0)
    assert uncached is not flow
    assert uncached._cache_size == 0
    assert uncached.stats is flow.stats
    assert uncached.with_cache(0) is uncached

    x = torch.randn(6, dim)
    y = flow(x)
    y0 = uncached(x)
    assert torch.equal(y, y0)
    assert torch.equal(flow.log_abs_det_jacobian(x, y), uncached.log_abs_det_jacobian(x, y0))
    assert torch.equal(flow.inv(y.clone()), uncached.inv(y0))

    # No caching: calling twice on the same tensor solves twice.
    solves = flow.stats.solves
    uncached(x)
    uncached(x)
    assert flow.stats.solves == solves + 2

    # The parameters are shared: gradients reach the module's parameters...
    flow.zero_grad()
    uncached(x).pow(2).sum().backward()
    grads = [p.grad for p in flow.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().max() > 0 for g in grads)
    # ... and an update of the module is seen by the uncached transform.
    with torch.no_grad():
        for p in flow.parameters():
            p.mul_(1.1)
        y_new = uncached(x)
        assert max_abs(y_new - y) > 1e-4
        assert torch.equal(y_new, flow._call(x))


@pytest.mark.parametrize("kind", KINDS)
def test_clear_cache_drops_cached_log_det(kind):
    t, module = make(2, kind)
    x = torch.randn(5, 2)
    y = t(x)
    solves = module.stats.solves
    ladj = t.log_abs_det_jacobian(x, y)
    assert module.stats.solves == solves  # cached from the forward solve
    assert t.inv(y) is x  # the Transform cache, for the end the solve produced
    assert module.stats.solves == solves

    t.clear_cache()
    ladj2 = t.log_abs_det_jacobian(x, y)
    assert module.stats.solves == solves + 1  # the cached log-det is gone: solve again
    assert max_abs(ladj2 - ladj) < 1e-9
    t.clear_cache()
    x2 = t.inv(y)
    assert x2 is not x  # the Transform cache is gone too
    assert module.stats.solves == solves + 2
    assert max_abs(x2 - x) < 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_log_det_cache_requires_identical_tensors(kind):
    t, module = make(2, kind)
    x = torch.randn(5, 2)
    y = t._call(x)
    solves = module.stats.solves
    # An equal but distinct tensor does not reuse the cached log-det (identity, not equality)...
    ladj_copy = t.log_abs_det_jacobian(x.clone(), y)
    assert module.stats.solves == solves + 1
    assert max_abs(ladj_copy - t.log_abs_det_jacobian(x, y)) < 1e-9
    assert module.stats.solves == solves + 1
    # ... and a different x paired with the cached y gets its own log-det, not the cached one.
    other = x + 0.5
    ladj_other = t.log_abs_det_jacobian(other, y)
    assert module.stats.solves == solves + 2
    assert max_abs(ladj_other - t.log_abs_det_jacobian(other, t._call(other))) < 1e-9
    assert max_abs(ladj_other - t.log_abs_det_jacobian(x, t._call(x))) > 1e-6
