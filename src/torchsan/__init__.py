"""torchsan: Self-Attention Networks (Zhao, Jia, Koltun, CVPR 2020) for PyTorch.

``torchsan.ops`` (functional operators), ``torchsan.layers`` (modules), ``torchsan.models``
(SAN10/15/19 and ResNet baselines, registered with timm on import), ``torchsan.profile``
(parameters and multiply-adds with the authors' counting rules), ``torchsan.allocator`` (glibc
malloc settings that keep freed memory for reuse, used by ``torchsan train``).
"""

from . import allocator, layers, models, ops

__version__ = "0.1.0"
__all__ = ["allocator", "layers", "models", "ops", "__version__"]
