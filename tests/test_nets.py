"""The vector field's layers and conditioning against hand computations."""

import pytest
import torch

from pyro_ffjord.nets import ConcatLinear, ConcatSquashLinear, ODENet


def manual_forward(net, t, z, context):
    """Recompute ODENet.forward from its parameters and the documented formulas."""
    flat = net.head(context) if net.conditioning in ("lowrank", "bias") else None
    h, offset, last = z, 0, len(net.layers) - 1
    for i, layer in enumerate(net.layers):
        out = layer.linear(h)
        extra = torch.zeros_like(out)
        if net.conditioning == "concat" and i == 0:
            extra = context @ net.context_proj.weight.T
        if flat is not None:
            n_out, n_in, r = out.shape[-1], h.shape[-1], net.rank
            extra = flat[..., offset : offset + n_out]
            offset += n_out
            if net.conditioning == "lowrank":
                u = flat[..., offset : offset + n_in * r].reshape(*context.shape[:-1], n_in, r)
                offset += n_in * r
                v = flat[..., offset : offset + n_out * r].reshape(*context.shape[:-1], n_out, r)
                offset += n_out * r
                extra = extra + torch.einsum("...i,...ir,...or->...o", h, u, v)
        out = out + extra
        if isinstance(layer, ConcatSquashLinear):
            out = out * torch.sigmoid(layer.gate_weight * t + layer.gate_bias) + layer.shift_weight * t
        else:
            out = out + layer.time_weight * t
        h = torch.tanh(out) if i < last else out
    return h


@pytest.mark.parametrize("time_embedding", ["concatsquash", "concat"])
@pytest.mark.parametrize("conditioning", ["concat", "lowrank", "bias"])
def test_conditioned_field_matches_formula(float64, conditioning, time_embedding):
    net = ODENet(3, [5, 4], context_dim=2, conditioning=conditioning, rank=2, time_embedding=time_embedding)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    z, c, t = torch.randn(6, 3), torch.randn(6, 2), torch.tensor(0.37)
    expected = manual_forward(net, t, z, c)
    assert torch.allclose(net(t, z, net.condition(c)), expected, atol=1e-12)
    # The conditioning really matters: another context gives another field.
    assert not torch.allclose(net(t, z, net.condition(c + 1)), expected)


def test_lowrank_term_uses_both_factors(float64):
    net = ODENet(2, [4], context_dim=3, conditioning="lowrank", rank=1)
    cond = net.condition(torch.randn(5, 3))
    z, t = torch.randn(5, 2), torch.tensor(0.1)
    base = net(t, z, cond)
    for i, c in enumerate(cond):
        zeroed = list(cond)
        zeroed[i] = c._replace(u=torch.zeros_like(c.u))
        assert not torch.allclose(net(t, z, zeroed), base)


@pytest.mark.parametrize("conditioning", [None, "concat", "lowrank", "bias"])
def test_zero_init_is_identity_field(conditioning):
    kw = {} if conditioning is None else dict(context_dim=3, conditioning=conditioning)
    net = ODENet(2, [8, 8], zero_init=True, **kw)
    cond = net.condition(torch.randn(4, 3)) if conditioning else None
    assert net(torch.tensor(0.3), torch.randn(4, 2), cond).abs().max() == 0
    # ... and it can still learn: the last layer gets gradients.
    net(torch.tensor(0.3), torch.randn(4, 2), cond).sum().backward()
    assert net.layers[-1].linear.weight.grad.abs().sum() > 0


def test_concat_layer_equals_linear_on_concatenation(float64):
    layer = ConcatLinear(3, 4)
    x, t = torch.randn(5, 3), torch.tensor(0.7)
    w = torch.cat([layer.time_weight[:, None], layer.linear.weight], 1)
    expected = torch.cat([t.expand(5, 1), x], 1) @ w.T + layer.linear.bias
    assert torch.allclose(layer(t, x), expected, atol=1e-12)


def test_bad_arguments():
    with pytest.raises(ValueError, match="time_embedding"):
        ODENet(2, [4], time_embedding="fourier")
    with pytest.raises(ValueError, match="conditioning"):
        ODENet(2, [4], context_dim=2, conditioning="film")
    with pytest.raises(ValueError, match="activation"):
        ODENet(2, [4], activation="gelu2")
