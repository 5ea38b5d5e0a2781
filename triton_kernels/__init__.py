"""Triton kernels of dcgmm_fast, installed as ``dcgmm_fast.triton_kernels`` (never as a top-level
``triton_kernels``: that name belongs to OpenAI's package). Pure functions of tensors: no nn.Module, no
autograd, no torch.library. Importing this package does not import triton; the kernel modules do.
"""
