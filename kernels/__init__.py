"""Triton kernels for Mask R-CNN, registered as ``torch.library`` custom ops (namespace ``maskrcnn_fast``).

Every op follows the backend rule of :mod:`kernels._backend`: CUDA -> compiled Triton,
CPU with ``TRITON_INTERPRET=1`` -> Triton's interpreter, CPU otherwise -> vectorized PyTorch.
"""
from kernels._backend import BoxesShapeError, InputError, InputTypeError, interpreting, use_backend

if interpreting():
    from kernels._compat import patch_interpreter

    patch_interpreter()  # triton < 3.7's interpreter cannot use loaded values as loop bounds

__all__ = ["use_backend", "InputError", "InputTypeError", "BoxesShapeError"]

# Ops register themselves on import; each block is guarded only by the module's existence
# while the package is being built up op by op.
from kernels.roi_align import roi_align, multiscale_roi_align  # noqa: E402
from kernels.roi_pool import roi_pool  # noqa: E402

from kernels.modules import RoIAlign, RoIPool  # noqa: E402

__all__ += ["roi_align", "roi_pool", "multiscale_roi_align", "RoIAlign", "RoIPool"]
from kernels.nms import batched_nms, nms, nms_padded  # noqa: E402
__all__ += ["nms", "batched_nms", "nms_padded"]
from kernels.mask_loss import class_mask_logits, mask_predictor_loss, sigmoid_bce_mask_loss  # noqa: E402
from kernels.mask_targets import mask_targets_from_gt, project_masks_on_boxes  # noqa: E402
__all__ += ["sigmoid_bce_mask_loss", "mask_predictor_loss", "class_mask_logits", "project_masks_on_boxes",
            "mask_targets_from_gt"]
