import os

# Without a GPU, the triton backend's kernels run on CPU tensors through Triton's interpreter (test_ops_triton.py).
# It must be set before anything imports triton: triton reads it once.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

# make test runs two pytest workers (pytest-xdist) on the machine's cores, each with torch's threads: OpenMP's
# threads must sleep while they wait, not spin, or each worker's threads take the cores from the other's. OpenMP
# reads it when torch loads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

# A run-to-run determinism test of GPU kernels: Triton's interpreter runs a grid's programs one after another, in
# order, so without a GPU such a test could not fail.
REORDERS_PROGRAMS = pytest.mark.skipif(not torch.cuda.is_available(),
                                       reason="the interpreter runs programs in order: only a GPU can reorder them")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# A tiny SAN for pipeline tests: every stage kind of SAN10 pairwise, a few thousand parameters.
TINY_SAN = dict(small_input=True, layers=[1, 1, 1, 1, 1], widths=[16, 16, 32, 32, 32], stem_width=8,
                share_planes=4, kernels=[3, 3, 3, 3, 3])


def make_image_folder(root, classes=3, train_per_class=12, val_per_class=4, size=20, seed=0):
    """An ImageNet-layout folder of PNGs whose class is visible: a bright bar at a class-dependent row, plus noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = rng.integers(0, 120, size=(size, size, 3), dtype=np.uint8)
                row = (c + 1) * size // (classes + 1)
                img[row - 2: row + 2, :, :] = 240
                Image.fromarray(img).save(folder / f"img_{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data") / "tiny")
