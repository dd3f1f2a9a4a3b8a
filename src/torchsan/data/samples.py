"""A small batch of real photographs that ship with an installed package (no download).

Matplotlib installs two photographs in its ``sample_data`` folder: ``grace_hopper.jpg``
(Rear Admiral Grace Hopper, a US Navy public-domain portrait, 512x600) and
``Minduka_Present_Blue_Pack.png`` (a gift box, 1080x1080). We use them and their mirror images.
"""

from __future__ import annotations

import torch
from matplotlib import cbook
from PIL import Image
from torchvision.transforms import v2 as T

SAMPLE_FILES = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sample_batch(image_size: int = 224, flips: bool = True) -> tuple[torch.Tensor, list[str]]:
    """Real images as a normalised float batch.

    Returns:
        images: (N, 3, image_size, image_size), ImageNet-normalised; N = 4 with ``flips``
            (each photo and its mirror image), else 2.
        names: a name per image.
    """
    transform = T.Compose([
        T.ToImage(),
        T.Resize(image_size, antialias=True),
        T.CenterCrop(image_size),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    images, names = [], []
    for name in SAMPLE_FILES:
        with cbook.get_sample_data(name, asfileobj=True) as f, Image.open(f) as img:
            x = transform(img.convert("RGB"))
        images.append(x)
        names.append(name)
        if flips:
            images.append(torch.flip(x, dims=[2]))
            names.append(f"{name} (mirrored)")
    return torch.stack(images), names
