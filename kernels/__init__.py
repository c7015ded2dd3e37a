"""qtulu's custom kernels (imported as ``qtulu.kernels``).

Each kernel module holds the ``@triton.jit`` kernel, its launcher, the autograd Function and a
plain-torch reference ("one kernel, four places"). Backend choice goes through
:func:`qtulu.backend.resolve_backend`.
"""
