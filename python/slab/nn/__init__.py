"""slab.nn: modules built on the slab kernels."""

from .prepbn import ChannelAffine, PRepBN, RepBN, convert_sync
from .cats import CATSMLP, TokenSparseBlock

__all__ = ["RepBN", "PRepBN", "ChannelAffine", "convert_sync", "CATSMLP", "TokenSparseBlock"]
