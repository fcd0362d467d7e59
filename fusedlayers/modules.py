"""nn.Module forms of the fused layers: drop-in replacements for the torch.nn modules they fuse."""
import types

import torch
from torch import Tensor, nn
from torch.nn import _reduction

from . import functional as FL
from .backends import check_backend
from .activations import REFERENCE, check_activation, name_of_module
from .flat_params import FlatLayers


def weight_and_bias(layer: nn.Module) -> tuple[Tensor, Tensor | None]:
    """A Linear-like layer's weight and bias, read without nn.Module.__getattr__ (for a tiny layer the per-call
    Python work is a visible part of the time), unless a parametrization or pruning has moved them."""
    params = layer._parameters
    try:
        return params["weight"], params["bias"]
    except KeyError:
        return layer.weight, layer.bias


def _linear_init(weight: nn.Parameter, bias: nn.Parameter | None) -> None:
    """nn.Linear's initialization, drawing the same random numbers in the same order."""
    nn.Linear.reset_parameters(types.SimpleNamespace(weight=weight, bias=bias))


class FusedDense(nn.Module):
    """nn.Linear followed by an activation, as one op: y = activation(x @ weight.T + bias).

    Parameters, shapes, initialization and state_dict keys are nn.Linear's, so checkpoints load either way.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "relu",
                 device=None, dtype=None, backend: str = "auto", save: str = "preact") -> None:
        super().__init__()
        self.activation = check_activation(activation)
        FL.saves_preact(save)
        self.backend = check_backend(backend)
        self.save = save
        self.in_features = in_features
        self.out_features = out_features
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _linear_init(self.weight, self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation: str = "relu", backend: str = "auto",
                    save: str = "preact") -> "FusedDense":
        """A FusedDense computing activation(linear(x)), sharing linear's Parameters."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear() expected an nn.Linear, got {type(linear).__name__}")
        fused = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, activation=activation,
                    device="meta", backend=backend, save=save)
        fused.weight = linear.weight
        fused.bias = linear.bias
        return fused

    # fuse() sets this to the FoldedActivation that stands where the activation module was: while either has
    # hooks, this layer computes only its linear part, as the nn.Linear it replaced did (see convert.py).
    _folded = None
    _transposed = False  # weight is (in_features, out_features): convert.FusedConv1D, in GPT-2's Conv1D's place

    def forward(self, input: Tensor) -> Tensor:
        weight, bias = weight_and_bias(self)
        if self._transposed:
            weight = weight.t()
        folded, activation = self._folded, self.activation
        if folded is not None:
            # the pair's decision for this call, which the FoldedActivation follows even if a hook changes meanwhile
            apart = folded._apart = folded.runs_apart()
            if apart:
                activation = "identity"
        return FL.dense_op(input, weight, bias, activation, FL.saves_preact(self.save),
                           FL.backend_for(self.backend, input))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"activation={self.activation!r}")


class FusedMLP(FlatLayers):
    """A whole network of dense layers as one op: sizes = [in, h1, ..., out].

    Layer l computes act_l(h @ weight{l}.T + bias{l}); the hidden layers use `activation` (one name, or a list
    with one per hidden layer), the last layer `output_activation`. The parameters are shaped and initialized
    as the nn.Linear layers of the equivalent nn.Sequential, and the state_dict keys are weight0, bias0,
    weight1, ... either way.

    flat=True (the default) keeps them all in one Parameter, `flat_params` (layer after layer, its weight
    row-major then its bias): the op takes it as one autograd input and gives it one gradient tensor, so that
    autograd, zero_grad() and the optimizer handle one tensor instead of two per layer, which is most of a tiny
    network's training step. `net.weight0` is then a new view of it at each access (its `.grad` a view of
    flat_params.grad); write through it under torch.no_grad(). Whatever needs per-layer Parameters
    (torch.nn.utils.prune, parametrizations, per-parameter optimizer options, hooks on one layer's weight,
    assigning a new Parameter) needs `net.unflatten()` first, or flat=False from the start; assigning or
    deleting weight{l} / bias{l} raises (see fusedlayers/flat_params.py).
    """

    def __init__(self, sizes: list[int], activation: str | list[str] = "relu", output_activation: str = "identity",
                 bias: bool = True, device=None, dtype=None, backend: str = "auto", save: str = "preact",
                 flat: bool = True) -> None:
        super().__init__()
        if len(sizes) < 2:
            raise ValueError(f"sizes must list at least the input and output widths, got {list(sizes)}")
        layers = len(sizes) - 1
        self.activations = FL.mlp_activations(layers, activation, output_activation)
        self.sizes, self.backend, self.save, self._has_bias = list(sizes), check_backend(backend), save, bias
        FL.saves_preact(save)
        self._weight_names = [f"weight{i}" for i in range(layers)]
        self._bias_names = [f"bias{i}" for i in range(layers)]
        factory = {"device": device, "dtype": dtype}
        if flat:
            self._init_flat(self.sizes, bias, factory)
        else:
            for i in range(layers):
                self.register_parameter(f"weight{i}", nn.Parameter(torch.empty(sizes[i + 1], sizes[i], **factory)))
                self.register_parameter(f"bias{i}",
                                        nn.Parameter(torch.empty(sizes[i + 1], **factory)) if bias else None)
        self.reset_parameters()

    @property
    def num_layers(self) -> int:
        return len(self.sizes) - 1

    def weights(self) -> list[Tensor]:
        if self._flat_slices is not None:
            return FL.flat_layers(self.flat_params, self.sizes, self._has_bias)[0]
        params = self._parameters  # direct: nn.Module.__getattr__ costs ~1 us a parameter, felt by tiny nets
        try:
            return [params[name] for name in self._weight_names]
        except KeyError:  # a parametrization or pruning has moved one
            return [getattr(self, name) for name in self._weight_names]

    def biases(self) -> list[Tensor] | None:
        if not self._has_bias:
            return None
        if self._flat_slices is not None:
            return FL.flat_layers(self.flat_params, self.sizes, True)[1]
        params = self._parameters
        try:
            return [params[name] for name in self._bias_names]
        except KeyError:
            return [getattr(self, name) for name in self._bias_names]

    def reset_parameters(self) -> None:
        if not self.flat:
            for i in range(self.num_layers):
                _linear_init(getattr(self, f"weight{i}"), getattr(self, f"bias{i}"))
            return
        flat, values = self.flat_params, {}
        for i in range(self.num_layers):  # nn.Linear's draws, in its order, then one write (FSDP2's shards too)
            w = torch.empty(self.sizes[i + 1], self.sizes[i], dtype=flat.dtype, device=flat.device)
            b = torch.empty(self.sizes[i + 1], dtype=flat.dtype, device=flat.device) if self._has_bias else None
            _linear_init(w, b)
            values.update({f"weight{i}": w} if b is None else {f"weight{i}": w, f"bias{i}": b})
        self._write_layers(values)

    def forward(self, input: Tensor) -> Tensor:
        # The op directly: the names were checked when the module was built, and for tiny networks the
        # per-call Python work is a visible part of the time.
        save, backend = FL.saves_preact(self.save), FL.backend_for(self.backend, input)
        if self._flat_slices is not None:
            params = self._parameters
            flat = params["flat_params"] if "flat_params" in params else self.flat_params
            return FL.mlp_flat_op(input, flat, self.sizes, self._has_bias, self.activations, save, backend)
        return FL.mlp_op(input, self.weights(), self.biases() or [], self.activations, save, backend)

    def grad_and_value(self, input: Tensor, grad_output: Tensor | None = None, *, target: Tensor | None = None,
                       input_grad: bool = False, accumulate_grad: bool = False
                       ) -> tuple[tuple[Tensor | None, Tensor], Tensor]:
        """The network's gradients and value in one native call that builds no autograd graph, for inner loops
        where a graph per call costs more than the network (a hand-written solver's VJPs, Gauss-Newton or
        Hamiltonian steps). Returns ((input's gradient or None, flat_params' gradient), value), the order of
        torch.func.grad_and_value:
        - with grad_output (the output's shape): value = self(input) and the gradients of <value, grad_output>
          (the vector-Jacobian product, as torch.autograd.grad(self(input), ..., grad_output));
        - with target: value = F.mse_loss(self(input), target) (the mean) and its gradients.
        The parameters' gradient is one tensor in flat_params' layout (fusedlayers.functional.flat_layers splits
        it per layer); accumulate_grad=True also adds it into flat_params.grad, as loss.backward() would. Prefer
        autograd (self(input) and backward) everywhere else: nothing here is differentiable again, and neither
        module hooks nor tensor hooks run (DDP's gradient synchronization included). Needs flat=True; raises under torch.autocast
        (it would not compute in the region's dtype)."""
        if not self.flat:
            raise RuntimeError("grad_and_value() needs the flat layout (FusedMLP(..., flat=True), the default)")
        flat = self.flat_params
        value, dx, dflat = FL.mlp_flat_grad_and_value(input, flat, grad_output, target, self.sizes, self._has_bias,
                                                      self.activations, input_grad,
                                                      FL.backend_for(self.backend, input))
        if accumulate_grad:
            if torch.is_inference_mode_enabled():
                raise RuntimeError("grad_and_value(accumulate_grad=True) under torch.inference_mode(): .grad would "
                                   "become an inference tensor, which a later update outside it cannot touch")
            if not (flat.is_leaf and flat.requires_grad):
                raise RuntimeError("grad_and_value(accumulate_grad=True): flat_params is not a leaf that requires "
                                   "grad (frozen, or computed by a parametrization): nothing to accumulate into")
            if flat.grad is None:
                flat.grad = dflat.clone()  # not the tensor returned: .grad is the parameter's own
            else:
                flat.grad.add_(dflat)
        return (dx, dflat), value

    def jet(self, x: Tensor, direction: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(u, du, d2u): the network's output and its first and second derivatives w.r.t. the input along
        direction, in one pass (fusedlayers.functional.mlp_jet); direction may be None for one input feature."""
        return FL.mlp_jet(x, self.weights(), self.biases(), self.activations[:-1], self.activations[-1], direction)

    @classmethod
    def from_sequential(cls, seq: nn.Sequential, backend: str = "auto", save: str = "preact",
                        flat: bool = True) -> "FusedMLP":
        """The FusedMLP computing seq. seq is Linear layers, each optionally followed by one activation module
        with torch's default parameters (see fusedlayers.ACTIVATIONS). With flat=True (the default) the result
        holds a copy of seq's parameters in its one flat Parameter; with flat=False it shares seq's Parameters."""
        linears, activations = [], []
        open_slot = False  # a Linear's activation not yet given (an nn.Identity keeps it open)
        for i, m in enumerate(seq):
            if isinstance(m, nn.Linear):
                linears.append(m)
                activations.append("identity")
                open_slot = True
            elif open_slot and isinstance(m, nn.Identity):
                continue
            elif open_slot:
                activations[-1] = name_of_module(m)
                open_slot = False
            else:
                raise ValueError(f"from_sequential(): module {i} ({m!r}) is not an nn.Linear, nor one activation "
                                 f"module right after one")
        if not linears:
            raise ValueError("from_sequential(): the Sequential has no nn.Linear")
        if len({lin.bias is None for lin in linears}) > 1:
            raise ValueError("from_sequential(): the Linear layers must all have a bias or all have none")
        for a, b in zip(linears, linears[1:]):
            if a.out_features != b.in_features:
                raise ValueError(f"from_sequential(): {a!r} is followed by {b!r}")
        params = [t for lin in linears for t in (lin.weight, lin.bias) if t is not None]
        if flat and len({(t.dtype, t.device, t.requires_grad) for t in params}) > 1:
            raise ValueError("from_sequential(): with flat=True the Linear layers' parameters must share one dtype, "
                             "device and requires_grad (they become one Parameter); pass flat=False to share them "
                             "as they are")
        fused = cls([linears[0].in_features] + [lin.out_features for lin in linears], activations[:-1],
                    activations[-1], bias=linears[0].bias is not None, device="meta", backend=backend, save=save,
                    flat=flat)
        if flat:
            joined = torch.cat([t.detach().reshape(-1) for t in params])
            fused.flat_params = nn.Parameter(joined, params[0].requires_grad)
        else:
            for i, lin in enumerate(linears):
                setattr(fused, f"weight{i}", lin.weight)
                setattr(fused, f"bias{i}", lin.bias)
        return fused

    def to_sequential(self) -> nn.Sequential:
        """The equivalent nn.Sequential of nn.Linear and activation modules, with copies of the parameters."""
        modules = []
        for i, act in enumerate(self.activations):
            w, b = getattr(self, f"weight{i}"), getattr(self, f"bias{i}")
            linear = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                linear.weight.copy_(w)
                if b is not None:
                    linear.bias.copy_(b)
            modules.append(linear)
            if act != "identity":
                modules.append(REFERENCE[act].make_module())
        return nn.Sequential(*modules)

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, activations={self.activations}, bias={self._has_bias}, flat={self.flat}"


class FusedCrossEntropyLoss(nn.Module):
    """nn.CrossEntropyLoss (class-index or class-probability targets) as one fused op, plus z_loss, softcap and
    inplace_backward for class indices (see fusedlayers.functional.cross_entropy). `weight` is a buffer, as in
    nn.CrossEntropyLoss."""

    def __init__(self, weight: Tensor | None = None, size_average=None, ignore_index: int = -100, reduce=None,
                 reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                 softcap: float | None = None, backend: str = "auto", inplace_backward: bool = False) -> None:
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = _reduction.legacy_get_string(size_average, reduce)
        self.reduction = FL.check_reduction(reduction)
        self.register_buffer("weight", weight)
        self.ignore_index, self.label_smoothing, self.z_loss, self.softcap = ignore_index, label_smoothing, z_loss, softcap
        self.backend = check_backend(backend)
        self.inplace_backward = inplace_backward

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return FL.cross_entropy(input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing,
                                self.z_loss, self.softcap, backend=self.backend, inplace_backward=self.inplace_backward)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}, "
                f"inplace_backward={self.inplace_backward}")


class FusedLinearCrossEntropyLoss(nn.Module):
    """The output layer and the loss of a classifier (a language model's head) as one op: the cross-entropy of
    hidden @ weight.T + bias against class-index targets, computed in chunks of rows so that the (N, V) logits
    never exist at once (see fusedlayers.functional.linear_cross_entropy).

    The module owns the linear layer: `weight` (num_classes, in_features) and optional `bias` are Parameters
    shaped, initialized and named as nn.Linear's (from_linear() shares an existing layer's). The class weights
    of nn.CrossEntropyLoss are the `class_weight` buffer. forward(hidden, target) returns the loss.
    """

    def __init__(self, in_features: int, num_classes: int, bias: bool = False, class_weight: Tensor | None = None,
                 ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 z_loss: float = 0.0, softcap: float | None = None, chunk_size: int | None = None, device=None,
                 dtype=None, backend: str = "auto") -> None:
        super().__init__()
        self.in_features, self.num_classes = in_features, num_classes
        self.reduction = FL.check_reduction(reduction)
        self.ignore_index, self.label_smoothing, self.z_loss, self.softcap = ignore_index, label_smoothing, z_loss, softcap
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.chunk_size = chunk_size
        self.backend = check_backend(backend)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((num_classes, in_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(num_classes, **factory))
        else:
            self.register_parameter("bias", None)
        self.register_buffer("class_weight", class_weight)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _linear_init(self.weight, self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "FusedLinearCrossEntropyLoss":
        """The loss of linear(hidden), sharing linear's Parameters; kwargs are the constructor's loss options."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear() expected an nn.Linear, got {type(linear).__name__}")
        fused = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta", **kwargs)
        fused.weight = linear.weight
        fused.bias = linear.bias
        return fused

    def forward(self, hidden: Tensor, target: Tensor) -> Tensor:
        return FL.linear_cross_entropy(hidden, self.weight, target, self.bias, self.class_weight, self.ignore_index,
                                       self.reduction, self.label_smoothing, self.z_loss, self.softcap,
                                       chunk_size=self.chunk_size, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, bias={self.bias is not None}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}")
