"""Self-supervised objectives, one file each, registered by name (no import side effects beyond this
dict)."""

from __future__ import annotations

from emfm.errors import UserError
from emfm.objectives import combo, dense, dino, dino_dense, mae, mim_unet, moco, simclr
from emfm.objectives.base import ObjectiveDef

OBJECTIVES: dict[str, ObjectiveDef] = {
    "mae": mae.DEFINITION,
    "simclr": simclr.DEFINITION,
    "moco": moco.DEFINITION,
    "dino": dino.DEFINITION,
    "dense": dense.DEFINITION,
    "dino_dense": dino_dense.DEFINITION,
    "mim_unet": mim_unet.DEFINITION,
    "mae_simclr": combo.make("simclr"),
    "mae_dino": combo.make("dino"),
}


def get(name: str) -> ObjectiveDef:
    if name not in OBJECTIVES:
        raise UserError(
            f"objective.name={name!r}: known objectives are {', '.join(sorted(OBJECTIVES))}"
        )
    return OBJECTIVES[name]
