"""Methods, one module each. Importing this package registers every method with the registry."""

from lvlm_steer.hooks.ablation import AblateHeads
from lvlm_steer.hooks.scaling import ScaleHeads

__all__ = ["AblateHeads", "ScaleHeads"]
