"""maskrcnn-fast: a lean, batched, sync-free Mask R-CNN on Triton kernels."""
__version__ = "0.1.0"
