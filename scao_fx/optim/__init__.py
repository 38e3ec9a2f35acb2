"""The ``torch.optim`` facade: the adapter for any chain, and the SCAO drop-in."""

from .adapter import TransformOptimizer, dcp_state_dict
from .scao import COMPAT_KEYWORDS, INERT_KEYWORDS, SCAO

__all__ = ["TransformOptimizer", "SCAO", "COMPAT_KEYWORDS", "INERT_KEYWORDS", "dcp_state_dict"]
