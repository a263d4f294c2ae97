"""The kernels the fast path runs: attention, exp, GELU, LayerNorm, Linear, row bands, BLAS, the device switch."""
