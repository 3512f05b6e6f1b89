"""Triton kernels of npg, installed as the package ``npg.kernels``.

Each module here holds the Triton kernels of one op; the op's public function, its autograd.Function
and its PyTorch reference live in ``npg/``. Triton is imported only when a kernel module is imported.
On a machine without a GPU the kernels run under ``TRITON_INTERPRET=1`` (set it before importing).
"""
