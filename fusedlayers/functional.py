"""Functional forms of the fused layers, in the style of torch.nn.functional."""
import torch
from torch import Tensor

from . import _func
from ._ops import resolve_backend
from .activations import check_activation

SAVE_POLICIES = ("preact", "recompute")

def saves_preact(save: str) -> bool:
    """The save policy as the ops take it (True: keep the pre-activations); ValueError if unknown."""
    if save not in SAVE_POLICIES:
        raise ValueError(f"unknown save policy {save!r}; expected one of: {', '.join(SAVE_POLICIES)}")
    return save == "preact"


def mlp_activations(layers: int, activation: str | list[str], output_activation: str) -> list[str]:
    """One checked activation name per layer: `activation` (one name, or one per hidden layer) for the
    hidden layers, `output_activation` for the last."""
    hidden = [activation] * (layers - 1) if isinstance(activation, str) else list(activation)
    if len(hidden) != layers - 1:
        raise ValueError(f"expected one activation per hidden layer ({layers - 1}), got {len(hidden)}")
    return [check_activation(a) for a in hidden] + [check_activation(output_activation)]


_dense = torch.ops.fusedlayers.dense.default
_mlp = torch.ops.fusedlayers.mlp.default


def dense(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str = "relu", backend: str = "auto",
          save: str = "preact") -> Tensor:
    """y = activation(x @ weight.T + bias) as one op with a hand-written backward, differentiable to any
    order (create_graph) and under torch.func (vmap, grad, jacrev, jvp, jacfwd, hessian) and forward-mode AD.

    x: (..., in_features), a single vector included; weight: (out_features, in_features); bias: (out_features,).
    activation: a name from fusedlayers.ACTIVATIONS. backend: "auto" (by device), "cpu", "cuda" or "triton".
    save: "preact" keeps z = x @ weight.T + bias for the backward; "recompute" keeps nothing extra and
    recomputes z in the backward (one more GEMM, less memory).
    """
    check_activation(activation)
    save_preact, backend = saves_preact(save), resolve_backend(backend, x.device)
    if torch.compiler.is_compiling():  # the op is the compiled path; Dynamo cannot trace a custom jvp
        return _dense(x, weight, bias, activation, save_preact, backend)
    return _func.dense(x, weight, bias, activation, save_preact, backend)


def mlp(x: Tensor, weights: list[Tensor], biases: list[Tensor] | None, activation: str | list[str],
        output_activation: str = "identity", backend: str = "auto", save: str = "preact") -> Tensor:
    """A whole network of dense layers as one op with one autograd node:
    h_{l+1} = act_l(h_l @ weights[l].T + biases[l]), h_0 = x, for l = 0..L-1.

    activation: one name for every hidden layer, or a list with one per hidden layer (L - 1 names);
    output_activation: the last layer's. biases: None or one per layer. backend, save: as in dense().
    """
    activations = mlp_activations(len(weights), activation, output_activation)
    return mlp_op(x, weights, [] if biases is None else biases, activations, saves_preact(save),
                  resolve_backend(backend, x.device))


def mlp_op(x: Tensor, weights: list[Tensor], biases: list[Tensor], activations: list[str], save: bool,
           backend: str) -> Tensor:
    """The mlp op with checked arguments: the op itself when compiling, else through torch.func's route."""
    if torch.compiler.is_compiling():  # the op is the compiled path; Dynamo cannot trace a custom jvp
        return _mlp(x, weights, biases, activations, save, backend)
    return _func.mlp(x, weights, biases, activations, save, backend)
