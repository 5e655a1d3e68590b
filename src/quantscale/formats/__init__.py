"""Pure tensor math per number format (fp8, fp4 / NVFP4, mxfp4, int) and packing, plus the
native C++ kernels (built once into the cache); no modules, no checkpoint files."""
