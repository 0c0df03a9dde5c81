"""Regenerate the pictures of the method pages, docs/methods/img/<method>.jpg: the rows `camcore demo` writes
for the torch backend (the four photos, each map for its photo's class, quick settings), as JPEG.

Run: python docs/method_pictures.py  (about 20 s on a 2-core CPU; needs the extra ``example``)
"""
import pathlib
import tempfile

from PIL import Image

from camcore import demo

IMG = pathlib.Path(__file__).parent / "methods" / "img"

if __name__ == "__main__":
    IMG.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as out:
        demo.run(out, backends=("torch",), report=False)
        for method_png in sorted(pathlib.Path(out, "torch").glob("*.png")):
            if "_" in method_png.stem and method_png.stem.split("_")[0] in demo.PHOTOS:
                continue  # one photo's picture; the page shows the row of four
            Image.open(method_png).convert("RGB").save(IMG / f"{method_png.stem}.jpg", quality=85)
            print(IMG / f"{method_png.stem}.jpg")
