"""Methods, one module each. Importing this package registers every method with the registry."""

from lvlm_steer.hooks.ablation import AblateHeads
from lvlm_steer.hooks.act import ACT
from lvlm_steer.hooks.carve import CARVE
from lvlm_steer.hooks.fastv import FastV
from lvlm_steer.hooks.pai import PAI
from lvlm_steer.hooks.scaling import ScaleHeads
from lvlm_steer.hooks.var import VAR
from lvlm_steer.hooks.vhr import VHR
from lvlm_steer.hooks.vtc_cls import VTCCLS

__all__ = ["ACT", "CARVE", "FastV", "PAI", "VAR", "VHR", "VTCCLS", "AblateHeads", "ScaleHeads"]
