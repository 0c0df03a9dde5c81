"""Shared fixtures: the real pretrained model and real photos (loaded once per session)."""
import sys
from pathlib import Path

import numpy as np
import pytest

try:  # torchvision must load before tensorflow: the reverse order segfaults (torchvision 0.29, tensorflow 2.21)
    import torchvision  # noqa: F401
except ImportError:
    pass

sys.path.insert(0, str(Path(__file__).parent))  # helper modules (model_checks.py) import under any import mode


@pytest.fixture(scope="session")
def effnet():
    """The pretrained ImageNet EfficientNet-Lite0 (eval mode)."""
    from camcore.demo import load_model

    return load_model()


@pytest.fixture(scope="session")
def photos():
    """Real photos ``(224, 224, 3)`` in ``[0, 1]``: chelsea (cat), coffee, astronaut, rocket."""
    from camcore.demo import PHOTOS, load_photo

    return [load_photo(n) for n in PHOTOS]


@pytest.fixture(scope="session")
def photo_batch(photos):
    """The photos as one ImageNet-normalised ``(4, 3, 224, 224)`` float32 tensor."""
    from camcore.demo import to_tensor

    return to_tensor(photos)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
