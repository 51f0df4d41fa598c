"""The bodies of ``slab-bench``: one module per kernel family, each registering its ops
(:class:`slab.bench.Entry`: a correctness check against :mod:`slab.reference` and a benchmark)
into :data:`slab.bench.REGISTRY`. Importing this package registers them all, in SPEC order."""

from . import prepbn, sla, cats, w4a8, optim, convbn  # noqa: F401
