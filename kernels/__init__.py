"""Triton kernels, each beside the plain PyTorch reference that the tests compare it with.

Import from the modules (kernels.flash_attention, kernels.rms_norm, kernels.linear_cross_entropy): the
package itself imports nothing, so code that only needs the pure-PyTorch linear_cross_entropy runs where
Triton is not installed.
"""
