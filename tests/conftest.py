"""Test set-up (the environment the suite needs, set before any framework is imported) and shared fixtures: the
real pretrained model and real photos, loaded once per session."""
import os
import sys
from pathlib import Path

# Before TensorFlow is first imported (test modules import it at collection, after this file). The suite must
# pass from the README's plain `python -m pytest`, on any CPU:
# - TF_ENABLE_ONEDNN_OPTS=0: TensorFlow's oneDNN kernels (its default on x86) reorder float32 sums, which moves
#   Keras maps at deep layers by up to 2e-3 from the PyTorch and Flax ports on AVX-512/AMX CPUs. The suite checks
#   the ports against each other at 1e-3 with reproducible kernels; test_cross_framework runs a subprocess with
#   oneDNN on (what users get) against the tolerance measured for it. An explicit setting is respected.
# - TF_CPP_MIN_LOG_LEVEL=3 silences TensorFlow's start-up lines; MPLBACKEND=Agg: no display is needed.
for _name, _value in {"TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "3", "MPLBACKEND": "Agg"}.items():
    os.environ.setdefault(_name, _value)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

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


@pytest.fixture(scope="session")
def demo_result(tmp_path_factory):
    """``camcore demo`` run once in-process on the three backends with two methods: ``demo.run``'s result, and its
    output folder as ``result["out"]``."""
    from camcore import demo

    out = tmp_path_factory.mktemp("demo")
    lines = []
    result = demo.run(out, backends=("torch", "keras", "jax"), methods=["gradcam", "guided-gradcam"],
                      log=lines.append)
    return {**result, "out": out, "printed": "\n".join(lines)}
