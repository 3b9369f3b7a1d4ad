"""Triton kernels and their PyTorch references, one file per op.

Importing this package imports no kernel file: each op module (and Triton) loads when first used, so that a
process can still choose the Triton interpreter (`TRITON_INTERPRET=1`) before Triton is imported.
"""
