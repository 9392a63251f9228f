"""An effective adapter applied to a model exactly: each module's ``B @ A`` added into the base
weights for the duration of a ``with`` block, the saved originals restored after. The same function
as PEFT's unmerged forward with no LoRA layers in the graph, so any effective adapter (an original
one or a bank's) runs alike: the suite's evaluation and the fidelity measure (fidelity.py) use it."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from hydraopt_mobile.adapters import AdapterSet, LoraFactors
from hydraopt_mobile.errors import UserError


def check_fits(model, adapters: AdapterSet, what: str) -> None:
    """Every module of ``adapters`` is a Linear of its shape in ``model``; else a UserError naming the
    module (``what``: the step that needs it, for the message). Before minutes of work, not in them."""
    modules = dict(model.named_modules())
    for name, (d_out, d_in) in adapters.shapes.items():
        linear = modules.get(name)
        if linear is None:
            raise UserError(f"{what}: adapter module {name!r} is not in the base model (adapters of another model? give it with --model)")
        if not isinstance(linear, torch.nn.Linear) or (linear.out_features, linear.in_features) != (d_out, d_in):
            raise UserError(f"{what}: module {name!r} of the base model is not a Linear of the adapters' shape {(d_out, d_in)} (adapters of another model? give it with --model)")


@contextmanager
def applied(model, factors: dict[str, LoraFactors] | None):
    """Temporarily add each module's ``B @ A`` to the model's weights (``None``: the base model)."""
    if not factors:
        yield model
        return
    modules = dict(model.named_modules())
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, f in factors.items():
                if name not in modules:
                    raise UserError(f"adapter module {name!r} is not in the model (an adapter of another model?)")
                weight = modules[name].weight
                if tuple(weight.shape) != f.shape:
                    raise UserError(f"adapter module {name!r}: update {f.shape} vs weight {tuple(weight.shape)}")
                saved[name] = weight.detach().clone()
                weight.add_((f.B.to(torch.float32) @ f.A.to(torch.float32)).to(weight.dtype))
        yield model
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                modules[name].weight.copy_(original)
