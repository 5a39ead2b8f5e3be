"""ImageFFJORD, ConditionalImageFFJORD and the convolutional field, checked as FFJORD is
(tests/test_transform_checks.py): float64, exact trace and tight tolerances, so the log-det can be
compared with the autograd Jacobian of the flattened map. Tiny images and conv widths keep every
solve cheap; the conv weights are stretched (GAIN) so the maps are far from the identity, which
test_flows_are_not_the_identity guards.
"""

import io

import pytest
import torch
import torch.nn.functional as F
import pyro.distributions as dist

from pyro_ffjord import ConditionalImageFFJORD, ConvODENet, DriftWarning, ImageFFJORD, image_ffjord

pytestmark = pytest.mark.usefixtures("float64")

SHAPES = [(1, 4, 4), (2, 2, 2)]
OPTIONS = dict(hidden_channels=[4, 4], trace="exact", solver="dopri5", atol=1e-10, rtol=1e-10)
CONTEXT_DIM = 3
GAIN = 3.0


def stretch(module):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 4:  # conv kernels only, not the time gates or the context head
                p.mul_(GAIN)
    return module


def make(shape, **options):
    return stretch(ImageFFJORD(shape, **{**OPTIONS, **options}))


def numel(shape):
    return torch.Size(shape).numel()


def base(shape, batch=()):
    return dist.Normal(torch.zeros(tuple(batch) + tuple(shape)), 1.0).to_event(3)


def max_abs(a):
    return a.abs().max().item()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_flows_are_not_the_identity(shape):
    flow = make(shape)
    x = torch.randn((6,) + shape)
    y = flow(x)
    ladj = flow.log_abs_det_jacobian(x, y)
    assert max_abs(y - x) > 0.1
    assert max_abs(ladj) > 0.03
    assert (ladj.max() - ladj.min()).item() > 0.03


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_inverse_round_trip(shape):
    flow = make(shape)
    x = torch.randn((5,) + shape)
    y = flow._call(x)
    ladj_forward = flow.log_abs_det_jacobian(x, y)
    x2 = flow._inverse(y)  # a genuine reverse solve, not the Transform cache
    assert x2.shape == x.shape == y.shape
    assert max_abs(x2 - x) < 1e-7
    assert max_abs(flow.log_abs_det_jacobian(x2, y) - ladj_forward) < 1e-7


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_log_det_matches_autograd_jacobian(shape):
    flow = make(shape)
    d = numel(shape)
    x = torch.randn(shape)
    with torch.no_grad():
        y = flow._call(x.unsqueeze(0))
        ladj = flow.log_abs_det_jacobian(x.unsqueeze(0), y)
        x2 = flow._inverse(y)
        ladj_inverse = flow.log_abs_det_jacobian(x2, y)
    jac = torch.autograd.functional.jacobian(lambda v: flow._call(v.reshape(shape)).reshape(d), x.reshape(d))
    jac_inv = torch.autograd.functional.jacobian(lambda v: flow._inverse(v.reshape(shape)).reshape(d),
                                                 y.reshape(d))
    sign, logdet = torch.linalg.slogdet(jac)
    sign_inv, logdet_inv = torch.linalg.slogdet(jac_inv)
    assert ladj.shape == (1,)
    assert sign.item() == 1.0 and sign_inv.item() == 1.0
    assert abs(logdet.item() - ladj.item()) < 1e-6
    assert abs(-logdet_inv.item() - ladj_inverse.item()) < 1e-6
    assert abs(logdet.item()) > 0.01  # a check that an all-zero log-det would fail


@pytest.mark.parametrize("batch", [(), (3,), (3, 2)], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_shapes(shape, batch):
    flow = make(shape, solver="rk4", steps=2)
    full = torch.Size(batch + shape)
    assert flow.event_dim == 3
    assert flow.forward_shape(full) == flow.inverse_shape(full) == full
    d = dist.TransformedDistribution(base(shape, batch), [flow])
    assert d.batch_shape == batch and d.event_shape == shape
    y = d.rsample()
    assert y.shape == full and torch.isfinite(y).all()
    assert d.log_prob(y).shape == batch
    assert d.log_prob(y.clone()).shape == batch  # a reverse solve
    x = torch.randn(full)
    y = flow(x)
    assert y.shape == x.shape
    assert flow.log_abs_det_jacobian(x, y).shape == batch
    assert flow.inv(y.clone()).shape == full
    # An unbatched base with a sample shape: Pyro's usual image model.
    d = dist.TransformedDistribution(dist.Normal(0.0, 1.0).expand(shape).to_event(3), [flow])
    assert d.rsample((3, 2)).shape == (3, 2) + shape
    assert d.log_prob(torch.randn((3, 2) + shape)).shape == (3, 2)


def test_wrong_shapes_name_the_expected_image():
    flow = make((1, 4, 4))
    for bad in [(3, 1, 4, 5), (3, 2, 4, 4), (16,), (3, 16), (4, 4)]:
        with pytest.raises(ValueError, match=r"expects \(\.\.\., C, H, W\) = \(\.\.\., 1, 4, 4\)"):
            flow(torch.randn(bad))
        with pytest.raises(ValueError, match=r"\(\.\.\., 1, 4, 4\)"):
            flow.inv(torch.randn(bad))
    with pytest.raises(ValueError, match=r"\(\.\.\., 1, 4, 4\)"):
        dist.TransformedDistribution(base((2, 4, 4)), [flow])  # checked when the model is built
    with pytest.raises(TypeError, match="tensor"):
        flow([[0.0] * 4] * 4)
    with pytest.raises(ValueError, match="float32"):
        flow(torch.randn(2, 1, 4, 4, dtype=torch.float32))
    with pytest.raises(ValueError, match="finite"):
        flow(torch.full((2, 1, 4, 4), float("nan")))
    with pytest.raises(ValueError, match="shape must be an image shape"):
        ImageFFJORD((16,))
    with pytest.raises(TypeError, match="hidden_channels"):
        ImageFFJORD((1, 4, 4), hidden_dims=[4])
    with pytest.raises(ValueError, match="lowrank"):
        ConditionalImageFFJORD((1, 4, 4), CONTEXT_DIM, conditioning="lowrank")
    with pytest.raises(ValueError, match="odd"):
        ImageFFJORD((1, 4, 4), kernel_size=2)
    with pytest.raises(ValueError, match="as many -2 as 2"):
        ImageFFJORD((1, 4, 4), hidden_channels=[4], strides=[2, 1])
    with pytest.raises(ValueError, match="even"):
        ImageFFJORD((1, 5, 5), hidden_channels=[4], strides=[2, -2])


def test_defaults_for_images():
    flow = image_ffjord((1, 4, 4), hidden_channels=[4])
    assert flow.config.trace == "hutchinson" and flow.config.eval_trace == "exact"
    assert flow.net.architecture["time_embedding"] == "concat"
    assert flow.net.architecture["activation"] == "softplus"
    assert flow.input_dim == 16 and flow.shape == (1, 4, 4)
    assert ImageFFJORD((1, 2, 2), hidden_channels=[4], preset="fast").config.trace == "exact"  # preset wins
    assert [m.conv.out_channels for m in ImageFFJORD((3, 4, 4)).net.layers] == [64, 64, 64, 3]


def test_hutchinson_training_gradients_and_unbiased_log_det():
    flow = stretch(ImageFFJORD((1, 4, 4), hidden_channels=[4, 4], solver="rk4", steps=2))
    assert flow.config.trace == "hutchinson" and flow.training
    d = dist.TransformedDistribution(base((1, 4, 4)), [flow])
    data = torch.randn(8, 1, 4, 4, requires_grad=True)
    loss = -d.log_prob(data).mean()
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in flow.net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name
    assert data.grad is not None and torch.isfinite(data.grad).all() and data.grad.abs().max() > 0
    # The estimate is unbiased: over many probe vectors it averages to the exact log-det of
    # the same fixed-grid solve.
    x = torch.randn(1, 1, 4, 4)
    with torch.no_grad():
        estimates = flow.log_abs_det_jacobian(x.expand(4000, 1, 4, 4), flow(x.expand(4000, 1, 4, 4)))
        flow.config.trace = "exact"
        exact = flow.log_abs_det_jacobian(x, flow(x))
    assert estimates.std() > 1e-3  # really random
    assert abs(estimates.mean().item() - exact.item()) < 5 * estimates.std().item() / 4000**0.5
    assert abs(exact.item()) > 0.05


def test_log_prob_gradient_matches_finite_differences(check_log_prob_gradient):
    """Directional derivative of log_prob in parameter space: autograd through the conv field and
    the solve against central differences."""
    flow = make((1, 2, 2), hidden_channels=[3])
    d = dist.TransformedDistribution(base((1, 2, 2)), [flow])
    check_log_prob_gradient(d, flow.parameters(), torch.randn(4, 1, 2, 2))


def test_eval_trace_choice():
    shape, x = (1, 4, 4), torch.randn(3, 1, 4, 4)
    exact_flow = make(shape).eval()
    hutchinson_flow = make(shape, eval_trace="hutchinson")
    hutchinson_flow.load_state_dict(exact_flow.state_dict())
    hutchinson_flow.eval()
    with torch.no_grad():
        exact = exact_flow.log_abs_det_jacobian(x, exact_flow(x))
        assert max_abs(exact - exact_flow.log_abs_det_jacobian(x, exact_flow(x))) < 1e-9  # deterministic
        a = hutchinson_flow.log_abs_det_jacobian(x, hutchinson_flow(x))
        b = hutchinson_flow.log_abs_det_jacobian(x, hutchinson_flow(x))
    assert max_abs(a - b) > 1e-4  # a fresh probe each solve
    assert max_abs(a - exact) > 1e-4


def test_state_dict_round_trip():
    flow = make((1, 4, 4))
    buffer = io.BytesIO()
    torch.save(flow.state_dict(), buffer)
    buffer.seek(0)
    other = ImageFFJORD((1, 4, 4), **OPTIONS)
    x = torch.randn(3, 1, 4, 4)
    assert max_abs(other(x) - flow(x)) > 1e-3
    other.load_state_dict(torch.load(buffer))
    assert max_abs(other(x) - flow(x)) < 1e-12
    # The same kernels would fit another image size or activation: the architecture record refuses.
    with pytest.raises(ValueError, match="shape"):
        ImageFFJORD((1, 2, 8), **OPTIONS).load_state_dict(flow.state_dict())
    with pytest.raises(ValueError, match="activation"):
        ImageFFJORD((1, 4, 4), activation="tanh", **OPTIONS).load_state_dict(flow.state_dict())


def test_with_cache_keeps_the_image_event():
    flow = make((2, 2, 2))
    uncached = flow.with_cache(0)
    assert uncached.event_dim == 3 and uncached.shape == (2, 2, 2)
    x = torch.randn(3, 2, 2, 2)
    assert torch.equal(uncached(x), flow(x))
    with pytest.raises(ValueError, match=r"\(\.\.\., 2, 2, 2\)"):
        uncached(torch.randn(3, 8))


def test_adjoint_gradients_match_backprop():
    grads = []
    for adjoint in (False, True):
        torch.manual_seed(1)
        flow = make((1, 2, 2), adjoint=adjoint)
        x = torch.randn(3, 1, 2, 2)
        y = flow(x)
        (y.pow(2).sum() + flow.log_abs_det_jacobian(x, y).sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in flow.parameters() if p.grad is not None]))
    assert grads[0].shape == grads[1].shape and grads[0].abs().max() > 1e-3
    assert max_abs(grads[0] - grads[1]) < 1e-6


def test_rnode_penalty_and_drift_check():
    flow = make((1, 2, 2), kinetic=0.1, jacobian=0.1)
    flow(torch.randn(3, 1, 2, 2))
    penalty = flow.regularization
    assert penalty is not None and penalty.item() > 0
    penalty.backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in flow.parameters())
    # A one-step grid checked against the adaptive solve on every solve: it drifts and is refined.
    flow = make((1, 2, 2), solver="rk4", steps=1, drift_check=1, drift_tol=1e-9)
    with pytest.warns(DriftWarning):
        flow(torch.randn(3, 1, 2, 2))
    assert flow.config.steps == 2


# -- the convolutional field --------------------------------------------------------------------


def manual_field(net, t, z, context=None):
    """ConvODENet.forward from its parameters and the documented formulas."""
    h = z.reshape(-1, *net.shape)
    biases = [None] * len(net.layers)
    if net.conditioning == "concat":
        biases[0] = context @ net.context_proj.weight.T
    elif net.conditioning == "bias":
        biases = list((context @ net.head.weight.T + net.head.bias).split(net._bias_sizes, -1))
    for i, layer in enumerate(net.layers):
        conv = layer.conv
        if net.architecture["time_embedding"] == "concat":
            tt = torch.full((h.shape[0], 1) + h.shape[2:], float(t))
            out = F.conv2d(torch.cat([tt, h], 1), conv.weight, conv.bias, padding=conv.padding)
        else:
            out = F.conv2d(h, conv.weight, conv.bias, padding=conv.padding)
        if biases[i] is not None:
            out = out + biases[i][:, :, None, None]
        if net.architecture["time_embedding"] == "concatsquash":
            gate = torch.sigmoid(layer.gate_weight * t + layer.gate_bias)
            out = out * gate[:, None, None] + (layer.shift_weight * t)[:, None, None]
        h = F.softplus(out) if i < len(net.layers) - 1 else out
    return h.reshape(z.shape)


@pytest.mark.parametrize("conditioning", [None, "concat", "bias"])
@pytest.mark.parametrize("time_embedding", ["concat", "concatsquash"])
def test_conv_field_matches_formula(time_embedding, conditioning):
    kwargs = dict(context_dim=CONTEXT_DIM, conditioning=conditioning) if conditioning else {}
    net = ConvODENet((2, 3, 4), [5, 3], time_embedding=time_embedding, **kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    z, t = torch.randn(6, 24), torch.tensor(0.37)
    context = torch.randn(6, CONTEXT_DIM) if conditioning else None
    expected = manual_field(net, t, z, context)
    assert torch.allclose(net(t, z, net.condition(context)), expected, atol=1e-12)
    assert not torch.allclose(net(t + 0.1, z, net.condition(context)), expected)  # time matters
    if conditioning:
        assert not torch.allclose(net(t, z, net.condition(context + 1)), expected)
    # Batch dims are folded and restored: (2, 3, D) gives the same numbers as (6, D).
    cond = net.condition(None if context is None else context.reshape(2, 3, CONTEXT_DIM))
    assert torch.allclose(net(t, z.reshape(2, 3, 24), cond).reshape(6, 24), expected, atol=1e-12)


def test_zero_init_is_the_identity():
    flow = ImageFFJORD((1, 4, 4), hidden_channels=[4], zero_init=True, trace="exact")
    x = torch.randn(3, 1, 4, 4)
    y = flow(x)
    assert torch.equal(y, x) and max_abs(flow.log_abs_det_jacobian(x, y)) == 0
    cond = ConditionalImageFFJORD((1, 4, 4), CONTEXT_DIM, hidden_channels=[4], conditioning="bias", zero_init=True)
    assert torch.equal(cond.condition(torch.randn(3, CONTEXT_DIM))(x), x)


def test_strided_field_log_det():
    shape = (1, 4, 4)
    flow = make(shape, hidden_channels=[4, 4], strides=[2, -2, 1])
    assert [type(m.conv).__name__ for m in flow.net.layers] == ["Conv2d", "ConvTranspose2d", "Conv2d"]
    x = torch.randn(shape)
    with torch.no_grad():
        ladj = flow.log_abs_det_jacobian(x, flow(x))
    jac = torch.autograd.functional.jacobian(lambda v: flow._call(v.reshape(shape)).reshape(16), x.reshape(16))
    assert abs(torch.linalg.slogdet(jac)[1].item() - ladj.item()) < 1e-6
    assert abs(ladj.item()) > 0.01


# -- conditional --------------------------------------------------------------------------------


@pytest.mark.parametrize("conditioning", ["concat", "bias"])
def test_conditional_image_ffjord(conditioning):
    shape = (1, 2, 2)
    cond = stretch(ConditionalImageFFJORD(shape, CONTEXT_DIM, conditioning=conditioning, **OPTIONS))
    context = torch.randn(4, 1, CONTEXT_DIM, requires_grad=True)
    t = cond.condition(context)
    assert t.event_dim == 3
    x = torch.randn(3, *shape)
    y = t(x)
    assert y.shape == t.forward_shape(x.shape) == (4, 3) + shape
    assert t.log_abs_det_jacobian(x, y).shape == (4, 3)
    assert max_abs(y[0] - y[1]) > 1e-3  # the context changes the map
    assert max_abs(cond.condition(context[1].detach())(x) - y[1]) < 1e-8
    assert max_abs(t.inv(y.clone()) - x) < 1e-7
    # Log-det against autograd for one context.
    t1 = cond.condition(context[2, 0].detach())
    with torch.no_grad():
        ladj = t1.log_abs_det_jacobian(x[:1], t1(x[:1]))
    jac = torch.autograd.functional.jacobian(lambda v: t1._call(v.reshape(shape)).reshape(4), x[0].reshape(4))
    assert abs(torch.linalg.slogdet(jac)[1].item() - ladj.item()) < 1e-6
    # Gradients reach the context and the context head.
    d = dist.ConditionalTransformedDistribution(base(shape), [cond]).condition(context)
    d.log_prob(torch.randn(4, 3, *shape)).sum().backward()
    head = cond.net.context_proj if conditioning == "concat" else cond.net.head
    assert context.grad is not None and context.grad.abs().max() > 0
    assert head.weight.grad is not None and head.weight.grad.abs().max() > 0
    with pytest.raises(TypeError, match="condition it"):
        cond(x)
