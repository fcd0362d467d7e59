"""The activation table itself: f' and f'' are the derivatives of f (checked by autograd in float64), its
columns say what the formulas do, and the C++ side is the same table."""
import pytest
import torch
from torch import nn

import fusedlayers
from fusedlayers.activations import ACTIVATIONS, REFERENCE, check_activation, name_of_module

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
    assert torch.equal(act.make_module()(z), act.f(z))


def test_cpp_table_is_the_python_table():
    """The C++ side of the table (FL_ACTIVATIONS in csrc/activations.h, through the extension) has the Python
    side's rows in its order, with the same constant-derivative and piecewise-linear columns."""
    names, constant, piecewise_linear = torch.ops.fusedlayers.activation_table()
    assert tuple(names) == ACTIVATIONS == fusedlayers.ACTIVATIONS
    assert [REFERENCE[n].constant_derivative for n in names] == list(constant)
    assert [REFERENCE[n].piecewise_linear for n in names] == list(piecewise_linear)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_columns_match_the_formulas(name):
    """constant_derivative: f'' is zero everywhere; piecewise_linear: f'' is zero away from the kinks."""
    act = REFERENCE[name]
    z = _points()
    if act.constant_derivative:
        assert torch.equal(act.df(z), torch.full_like(z, act.df(z)[0].item()))
    assert torch.equal(act.d2f(z), torch.zeros_like(z)) == act.piecewise_linear
    assert name_of_module(act.make_module()) == name


def test_name_of_module_refuses_other_parameters():
    for module in (nn.LeakyReLU(0.2), nn.Softplus(beta=2.0), nn.ELU(alpha=0.5), nn.Hardtanh()):
        with pytest.raises(ValueError, match="has no fused equivalent"):
            name_of_module(module)


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match="unknown activation 'swish'.*gelu_tanh"):
        check_activation("swish")
