"""slab.nn: modules built on the slab kernels."""

from .prepbn import ChannelAffine, PRepBN, RepBN, convert_sync
from .cats import CATSMLP, TokenSparseBlock
from .sla import SimplifiedLinearAttention, SLACache
from .w4a8 import W4A8Linear

__all__ = [
    "RepBN",
    "PRepBN",
    "ChannelAffine",
    "convert_sync",
    "CATSMLP",
    "TokenSparseBlock",
    "W4A8Linear",
    "SimplifiedLinearAttention",
    "SLACache",
]
