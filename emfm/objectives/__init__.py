"""Self-supervised objectives, one file each, registered by name (no import side effects beyond this dict)."""
from __future__ import annotations

from emfm.objectives import mae
from emfm.objectives.base import ObjectiveDef

OBJECTIVES: dict[str, ObjectiveDef] = {
    "mae": mae.DEFINITION,
}


def get(name: str) -> ObjectiveDef:
    if name not in OBJECTIVES:
        raise ValueError(f"objective.name={name!r}: known objectives are {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]
