"""torchsan: Self-Attention Networks (Zhao, Jia, Koltun, CVPR 2020) for PyTorch.

``torchsan.ops`` (functional operators), ``torchsan.layers`` (modules), ``torchsan.models``
(SAN10/15/19 and ResNet baselines, registered with timm on import), ``torchsan.profile``
(parameters and multiply-adds with the authors' counting rules), ``torchsan.allocator`` (glibc
malloc settings that keep freed memory for reuse, used by ``torchsan train``), ``torchsan.InferenceSession``
(a model's eval forward recorded once per input size and replayed without its Python, for deployment).
"""

from . import allocator, layers, models, ops
from .session import InferenceSession

__version__ = "0.1.0"
__all__ = ["InferenceSession", "allocator", "layers", "models", "ops", "__version__"]
