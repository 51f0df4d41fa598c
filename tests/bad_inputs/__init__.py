"""Invalid-input tests of every ``torch.ops.slab`` op (tests/test_bad_inputs.py).

``cases`` holds the table (one valid call and a list of invalid calls per op); ``worker`` runs
cases in a child process, so that a case that crashes the interpreter fails only itself.
"""
