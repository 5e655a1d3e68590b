"""Pure tensor math per number format (fp8, fp4 / NVFP4, mxfp4, int), packing and the native
kernels; no modules, no files."""
