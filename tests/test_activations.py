"""The reference table itself: f' and f'' are the derivatives of f, checked by autograd in float64."""
import pytest
import torch

import fusedlayers
from fusedlayers.activations import ACTIVATIONS, REFERENCE, check_activation

from conftest import assert_rel_close


def _points():
    # Random points plus values beyond softplus's threshold; none at the kinks of relu-like functions.
    z = torch.cat([torch.randn(200, dtype=torch.float64) * 3, torch.tensor([21.0, 25.0, -21.0], dtype=torch.float64)])
    return z[z.abs() > 1e-3]


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_derivatives_match_autograd(name):
    act = REFERENCE[name]
    z = _points().requires_grad_()
    (df,) = torch.autograd.grad(act.f(z).sum(), z, create_graph=True)
    assert_rel_close(act.df(z), df, 1e-12, "f'")
    df_z = act.df(z)  # a constant f' (identity) has no graph: its derivative is zero
    d2f = torch.autograd.grad(df_z.sum(), z)[0] if df_z.requires_grad else torch.zeros_like(z)
    assert_rel_close(act.d2f(z), d2f, 1e-12, "f''")


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_module_computes_f(name):
    act = REFERENCE[name]
    z = _points()
    assert torch.equal(act.module()(z), act.f(z))


def test_public_names():
    assert fusedlayers.ACTIVATIONS == ACTIVATIONS
    assert ACTIVATIONS == ("identity", "relu", "leaky_relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh",
                           "softplus", "selu", "elu", "cos", "sin")


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match="unknown activation 'swish'.*gelu_tanh"):
        check_activation("swish")
