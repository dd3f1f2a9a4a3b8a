"""SAN and ResNet baseline models, registered with timm on import.

>>> import timm, torchsan
>>> model = timm.create_model("san10_pairwise", num_classes=10)
"""

from . import resnet, san
from ._arguments import check_model_kwargs
from ._helpers import load_checkpoint
from .resnet import ResNet
from .san import SAN

MODEL_NAMES = (
    "san10_pairwise", "san10_patchwise", "san15_pairwise", "san15_patchwise",
    "san19_pairwise", "san19_patchwise", "san_resnet26", "san_resnet38", "san_resnet50",
)

__all__ = ["MODEL_NAMES", "SAN", "ResNet", "check_model_kwargs", "load_checkpoint", "resnet", "san"]
