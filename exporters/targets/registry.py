"""The target registry: one map from name to :class:`~exporters.targets.target.Target` over the target
modules. ``hydraopt targets`` lists what it holds; ``hydraopt targets setup NAME`` runs a target's
set-up steps. The project's ``.venv`` is never changed; a target whose Python packages would
conflict with it gets its own environment under its cache folder.
"""

from __future__ import annotations

from exporters.targets import arm64, ethos_u, qnn_htp
from exporters.targets.target import Target
from hydraopt_mobile.errors import UserError

TARGETS: dict[str, Target] = {t.name: t for t in (arm64.TARGET, qnn_htp.TARGET, ethos_u.TARGET)}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise UserError(f"target {name!r}: unknown; available: {', '.join(TARGETS)}")
    return TARGETS[name]
