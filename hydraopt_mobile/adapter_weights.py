"""An effective adapter applied to a model exactly: each module's ``B @ A`` added into the base
weights for the duration of a ``with`` block, the saved originals restored after. The same function
as PEFT's unmerged forward with no LoRA layers in the graph, so any effective adapter (an original
one or a bank's) runs alike: the suite's evaluation and the fidelity measure (fidelity.py) use it."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from hydraopt_mobile.adapters import LoraFactors
from hydraopt_mobile.errors import UserError


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
