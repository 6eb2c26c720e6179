"""maskrcnn-fast: a lean, batched, sync-free Mask R-CNN on Triton kernels."""
__version__ = "0.1.0"

from maskrcnn_fast.config import MaskRCNNConfig  # noqa: E402
from maskrcnn_fast.model import MaskRCNN, maskrcnn_resnet18_fpn, maskrcnn_resnet50_fpn  # noqa: E402
from maskrcnn_fast.convert import from_torchvision  # noqa: E402
from maskrcnn_fast.syncs import count_syncs  # noqa: E402

__all__ = ["MaskRCNN", "MaskRCNNConfig", "maskrcnn_resnet50_fpn", "maskrcnn_resnet18_fpn", "from_torchvision",
           "count_syncs", "__version__"]
