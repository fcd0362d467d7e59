"""The flat layout of a module's layers: every weight{l} and bias{l} in one Parameter, `flat_params` (layer after
layer, the weight row-major, then the bias: csrc/ops/mlp.h's layout), and what nn.Module must keep doing with
it: weight{l} / bias{l} as views, the per-layer state_dict keys and nn.Module's loading rules for them (FSDP2's
sharded DTensors included), unflatten() back to per-layer Parameters, and clear errors for what needs those."""
import warnings

import torch
from torch import Tensor, nn

from .ops.mlp import flat_numel, flat_piece, flat_slices

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a build of torch without distributed
    DTensor = distribute_tensor = None


class FlatLayers(nn.Module):
    """The flat layout's half of a module (FusedMLP's): call _init_flat() in __init__; the module names its layers'
    tensors weight0, bias0, weight1, ... as nn.Linear layers in a Sequential would be."""

    _flat_slices = None  # name -> (offset, shape) in flat_params, or None for an absent bias; None: not flat

    def _init_flat(self, sizes: list[int], bias: bool, factory: dict) -> None:
        self.flat_params = nn.Parameter(torch.empty(flat_numel(sizes, bias), **factory))
        found = flat_slices(sizes, bias)
        names = [n for l in range(len(sizes) - 1) for n in (f"weight{l}", f"bias{l}")]
        self._flat_slices = {n: found.get(n) for n in names}

    @property
    def flat(self) -> bool:
        """Whether the parameters live in the one Parameter flat_params."""
        return self._flat_slices is not None

    def _layer_names(self) -> list[str]:
        """The per-layer tensors in flat_params, in its order."""
        return [n for n, where in self._flat_slices.items() if where is not None]

    def _flat_view(self, name: str) -> Tensor | None:
        where = self._flat_slices[name]
        if where is None:
            return None
        flat = self.flat_params
        view = flat_piece(flat, *where)
        if flat.grad is not None:
            view.grad = flat_piece(flat.grad, *where)
        return view

    def _write_layers(self, values: dict[str, Tensor]) -> None:
        """Copies per-layer tensors into flat_params, into its local shards when FSDP2 has sharded it (a DTensor,
        whose views would be gathered copies)."""
        flat = self.flat_params
        sharded = DTensor is not None and isinstance(flat, DTensor)
        with torch.no_grad():
            full = flat.full_tensor() if sharded else flat
            for name, value in values.items():
                flat_piece(full, *self._flat_slices[name]).copy_(value)
            if sharded:
                flat.copy_(distribute_tensor(full, flat.device_mesh, flat.placements))

    def _same_memory(self, name: str, value) -> bool:
        """Whether value is the view net.<name> gives, as it gave it (what `net.weight0 -= d` assigns back): a
        plain tensor over the same elements, same dtype, same layout."""
        where, flat = self._flat_slices[name], self._parameters.get("flat_params")
        if not (type(value) is Tensor and where is not None and flat is not None and flat.stride(0) == 1):
            return False
        view = flat_piece(flat.detach(), *where)
        return (value.dtype == flat.dtype and value.shape == view.shape and value.stride() == view.stride()
                and not value.is_neg() and not value.is_conj()
                and value.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
                and value.storage_offset() == view.storage_offset())

    def _refuse(self, name: str, what: str, value=None) -> bool:
        """Raises for what would replace or remove a layer's tensor of the flat layout; True when an assignment
        is of that very view (a no-op)."""
        slices = self.__dict__.get("_flat_slices")
        if slices is None or not (name in slices or name.partition("_")[0] in slices):
            return False
        if what == "assign" and name in slices and self._same_memory(name, value):
            return True
        raise AttributeError(
            f"{type(self).__name__} (flat=True) keeps weight{{l}} and bias{{l}} in one Parameter, flat_params: "
            f"cannot {what} {name!r}. Write values through the view (`with torch.no_grad(): "
            f"net.{name.partition('_')[0]}.copy_(value)`), or call net.unflatten() first for per-layer Parameters "
            f"(pruning, parametrizations, replacing a Parameter)")

    def __getattr__(self, name: str):
        slices = self.__dict__.get("_flat_slices")
        if slices is not None and name in slices:
            return self._flat_view(name)
        return super().__getattr__(name)

    def __setattr__(self, name: str, value) -> None:
        if not self._refuse(name, "assign", value):
            super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        self._refuse(name, "delete")
        super().__delattr__(name)

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        self._refuse(name, "register the Parameter")
        super().register_parameter(name, param)

    def unflatten(self):
        """Makes weight{l} / bias{l} per-layer Parameters again (sharing flat_params' memory, their .grad views
        of its gradient), in place; returns self. flat_params is gone: build optimizers after this call."""
        if not self.flat:
            return self
        if "flat_params" not in self._parameters:
            raise RuntimeError("unflatten(): flat_params has a parametrization; remove it first")
        flat = self._parameters.pop("flat_params")
        slices, self._flat_slices = self._flat_slices, None
        for name, where in slices.items():
            if where is None:
                self.register_parameter(name, None)
                continue
            param = nn.Parameter(flat_piece(flat.detach(), *where), flat.requires_grad)
            if flat.grad is not None:
                param.grad = flat_piece(flat.grad, *where)
            self.register_parameter(name, param)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.flat and prefix + "flat_params" in destination:  # the per-layer keys, as views of flat_params
            flat = destination.pop(prefix + "flat_params")
            for name in self._layer_names():
                destination[prefix + name] = flat_piece(flat, *self._flat_slices[name])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        if not self.flat or "flat_params" not in self._parameters:
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                 unexpected_keys, error_msgs)
        # The pre-hooks first (they may rename keys), then the per-layer keys into one flat_params entry, then
        # nn.Module's own loading for it and the rest (buffers, extra state, unexpected keys, assign, meta).
        hooks = self._load_state_dict_pre_hooks
        for hook in hooks.values():
            hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        names, values = self._layer_names(), {}
        if prefix + "flat_params" in state_dict:  # not a key of this module's state_dict (as flat=False's)
            # except the very Parameter: torch.distributed.checkpoint's full-state load adds each parameter under
            # its own name next to the checkpoint's keys
            if state_dict.pop(prefix + "flat_params") is not self._parameters["flat_params"]:
                unexpected_keys.append(prefix + "flat_params")
        for name in names:
            key, shape = prefix + name, torch.Size(self._flat_slices[name][1])
            if key not in state_dict:
                missing_keys.append(key)  # as nn.Module: strict=False reports them too
                continue
            value = state_dict.pop(key)
            if not torch.overrides.is_tensor_like(value):
                error_msgs.append(f'While copying the parameter named "{key}", expected torch.Tensor or Tensor-like '
                                  f"object from checkpoint but received {type(value)}")
            elif value.shape != shape:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {value.shape} from "
                                  f"checkpoint, the shape in current model is {shape}.")
            else:
                values[name] = value
        if len(values) == len(names):
            state_dict[prefix + "flat_params"] = _joined([values[n] for n in names])
        elif values and self.flat_params.is_meta:  # some missing: a meta flat_params cannot hold the rest
            if local_metadata.get("assign_to_params_buffers", False):
                raise RuntimeError(
                    f"load_state_dict(assign=True): {type(self).__name__} (flat=True) on the meta device holds its "
                    f"layers in one Parameter, which cannot be partly loaded; missing: "
                    f"{[k for k in missing_keys if k.startswith(prefix)]}. Load every layer, or unflatten() first")
            warnings.warn(f"for {prefix}flat_params: copying from a non-meta parameter in the checkpoint to a meta "
                          "parameter in the current model, which is a no-op. (Did you mean to pass `assign=True` to "
                          "assign items in the state dictionary to their corresponding key in the module instead of "
                          "copying them in place?)", stacklevel=2)
        else:  # some missing or wrong: the rest goes in place, flat_params is not replaced
            self._write_layers(values)
        self._load_state_dict_pre_hooks = type(hooks)()
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
        finally:
            self._load_state_dict_pre_hooks = hooks
        missing_keys[:] = [k for k in missing_keys if k != prefix + "flat_params"]

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        if "_has_bias" not in self.__dict__ and self.__dict__.get("_flat_slices") is None:  # pickled before it
            self._has_bias = self._parameters.get("bias0") is not None


def _joined(tensors: list[Tensor]) -> Tensor:
    """The tensors in one 1-D tensor: the storage they already share when they lie in it one after the other (a
    checkpoint of the flat layout, mmap-loaded too: assign=True then takes it without a copy), else a copy."""
    first = tensors[0]
    offset, adjacent = first.storage_offset(), True
    for t in tensors:
        adjacent = adjacent and type(t) is Tensor and t.is_contiguous() and t.dtype == first.dtype \
            and not t.is_neg() and not t.is_conj() \
            and t.device == first.device and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr() \
            and t.storage_offset() == offset
        offset += t.numel()
    if adjacent:
        return first.detach().as_strided((offset - first.storage_offset(),), (1,), first.storage_offset())
    return torch.cat([t.detach().reshape(-1) for t in tensors])
