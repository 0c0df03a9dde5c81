"""camcore.report: the HTML page's content and checks (unit tests), and the page as a real browser renders it
(headless Chromium, installed from Debian's archive by the fixture where the machine allows): every picture
decodes, the page never scrolls sideways at 1280 px or at a phone's 390 px, screenshots kept in test-artifacts/."""
import base64
import html
import io
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from camcore import report
from camcore.consistency import Consistency, MapAgreement, OutputAgreement

REPO = Path(__file__).parents[1]
ARTIFACTS = REPO / "test-artifacts"
DATA_URI = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="([^"]*)"')


class _Page(HTMLParser):
    """The parts of a page the tests read: ``<body>``'s attributes, header-cell texts, ``<img>`` attributes."""

    def __init__(self, text: str):
        super().__init__()
        self.body, self.th, self.imgs, self._in_th = {}, [], [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "body":
            self.body = dict(attrs)
        elif tag == "th":
            self._in_th = []
        elif tag == "img":
            self.imgs.append(dict(attrs))

    def handle_data(self, data):
        if self._in_th is not None:
            self._in_th.append(data)

    def handle_endtag(self, tag):
        if tag == "th" and self._in_th is not None:
            self.th.append("".join(self._in_th).strip())
            self._in_th = None


def _picture(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth ``(h, w, 3)`` picture in ``[0, 1]``: colour ramps and a bright blob."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    cy, cx = np.random.default_rng(seed).uniform(0.2, 0.8, 2)
    blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 0.02)
    return np.clip(np.stack([0.6 * x + 0.4 * blob, 0.6 * y, 0.3 + 0.7 * blob], axis=-1), 0, 1).astype(np.float32)


def _decode(b64: str) -> np.ndarray:
    from matplotlib import image as mpimg

    return mpimg.imread(io.BytesIO(base64.b64decode(b64)), format="png")


# ================================================================================================= unit
def test_text_is_escaped_and_page_is_self_contained():
    page = report.render("<script>alert(1)</script> & co", summary="a < b",
                         grids=[report.Grid("g <b>", ["r<1>"], ["c&1"], {(0, 0): _picture(8, 8, 0)}, note="n <i>")],
                         tables=[report.Table("t <u>", ["h<x>"], [["<td>"]], note="<p>")],
                         sections=['<section><h2>Trusted <em>fragment</em></h2></section>'], environment={"k<": "v>"})
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in page
    for raw in ("g <b>", "r<1>", "c&1", "n <i>", "t <u>", "h<x>", "k<", "v>"):
        assert f">{raw}<" not in page and html.escape(raw, quote=False) in page
    assert "<td>&lt;td&gt;</td>" in page and "<p>&lt;p&gt;</p>" in page
    assert "<h2>Trusted <em>fragment</em></h2>" in page  # sections go in as they are
    assert '<a href="#section-1">Trusted fragment</a>' in page  # ... and their heading names them in the contents
    assert page.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in page
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    assert not re.search(r'(src|href)="(https?:)?//', page) and "@import" not in page and "url(" not in page


def test_every_picture_embedded_and_decodes_to_its_size():
    pictures = {(0, 0): _picture(30, 40, 1), (0, 2): _picture(50, 20, 2), (1, 1): (_picture(16, 16, 3) * 255)
                .astype(np.uint8)}
    from camcore.viz import png_bytes

    pictures[(1, 2)] = png_bytes(_picture(12, 24, 4))  # PNG bytes go in unchanged
    grid = report.Grid("maps", ["cat", "dog"], ["image", "gradcam", "scorecam"], pictures)
    page = report.render("t", grids=[grid], environment={}, picture_format="png")
    found = DATA_URI.findall(page)
    assert len(found) == len(pictures) == page.count("<img ")
    sizes = {alt: _decode(b64).shape[:2] for b64, alt in found}  # png_bytes writes RGBA
    assert sizes == {"cat — image": (30, 40), "cat — scorecam": (50, 20), "dog — gradcam": (16, 16),
                     "dog — scorecam": (12, 24)}
    assert np.abs(_decode(found[0][0])[..., :3] - pictures[(0, 0)]).max() <= 1 / 255 + 1e-6
    # the two missing cells (cat — gradcam, dog — image) show a dash
    assert page.count('<td class="empty">—</td>') == 2


def test_table_cells_are_formatted_and_highlighted():
    table = report.Table("metrics", ["method", "drop", "n", "ok"],
                         [["gradcam", 0.123456, 10, None], ["eigencam", 12345.678, 3, "NO"], ["x", 1e-7, 0, True]],
                         highlight=lambda row: row[3] == "NO")
    page = report.render("t", tables=[table], environment={})
    assert '<td class="num">0.1235</td>' in page and '<td class="num">1.235e+04</td>' in page
    assert '<td class="num">1e-07</td>' in page and '<td class="empty">—</td>' in page and "<td>yes</td>" in page
    assert page.count('<tr class="flag">') == 1 and '<tr class="flag"><td>eigencam</td>' in page
    assert '<a href="#table-1">metrics</a>' in page and 'id="table-1"' in page


@pytest.mark.parametrize("make, error, message", [
    (lambda: report.Grid("g", ["a", "b"], ["c"], {(2, 0): np.zeros((4, 4, 3))}), ValueError,
     r"pictures: key \(2, 0\) is out of range: expected row_index in \[0, 2\) and column_index in \[0, 1\)"),
    (lambda: report.Grid("g", ["a"], ["c"], {(0, -1): np.zeros((4, 4, 3))}), ValueError, "out of range"),
    (lambda: report.Grid("g", ["a"], ["c"], {0: np.zeros((4, 4, 3))}), TypeError,
     r"pictures: expected keys \(row_index, column_index\) of two ints, got 0"),
    (lambda: report.Grid("g", ["a"], ["c"], {(0, 0): np.zeros((4, 4))}), ValueError,
     r"pictures\[\(0, 0\)\]: expected an \(H, W, 3\) array in \[0, 1\] or PNG bytes, got shape \(4, 4\)"),
    (lambda: report.Grid("g", ["a"], ["c"], {(0, 0): np.zeros((4, 4, 4))}), ValueError, r"got shape \(4, 4, 4\)"),
    (lambda: report.Grid("g", ["a"], ["c"], {(0, 0): b"GIF89a........................"}), ValueError,
     "expected PNG or JPEG bytes"),
    (lambda: report.Grid("g", "abc", ["c"]), TypeError, "rows: expected a list of str, got str"),
    (lambda: report.Grid("g", [], ["c"]), ValueError, "rows: expected at least one label"),
    (lambda: report.Table("t", ["a", "b"], [["x", 1], ["y"]]), ValueError,
     r"rows\[1\]: expected 2 cells \(one per header column\), got 1"),
    (lambda: report.Table("t", ["a"], [[object()]]), TypeError, r"rows\[0\]\[0\]: expected a str, int, float or None"),
    (lambda: report.Table("t", ["a"], [], highlight="yes"), TypeError, "highlight: expected a callable"),
    (lambda: report.render("t", grids=[report.Table("t", ["a"], [])]), TypeError,
     r"grids\[0\]: expected a Grid, got Table"),
    (lambda: report.render("t", sections=["<p>a</p>", 3]), TypeError, r"sections\[1\]: expected a str, got int"),
    (lambda: report.render(3), TypeError, "title: expected a str, got int"),
    (lambda: report.render("t", environment=[("a", "b")]), TypeError, "environment: expected a dict"),
])
def test_argument_errors_name_the_argument(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_grid_changed_after_construction_is_checked_again():
    grid = report.Grid("g", ["a"], ["c"], {})
    grid.pictures[(0, 1)] = np.zeros((4, 4, 3))
    with pytest.raises(ValueError, match=r"grids\[0\]\.pictures: key \(0, 1\) is out of range"):
        report.render("t", grids=[grid], environment={})


def test_write_creates_folders(tmp_path):
    path = report.write(tmp_path / "a" / "b" / "report.html", "Über ✓", environment={"x": "1"})
    assert path == tmp_path / "a" / "b" / "report.html"
    assert "<h1>Über ✓</h1>" in path.read_text(encoding="utf-8")


def test_environment_names_numpy_and_imports_no_framework():
    env = report.environment()
    assert env["numpy"] == np.__version__ and env["camcore"] and env["python"] and env["device"]
    assert all(isinstance(v, str) for v in env.values())
    code = ("import sys, camcore.report as r; e = r.environment(); assert 'numpy' in e and e['device'] == 'cpu', e; "
            "print([m for m in ('torch','tensorflow','jax') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ================================================================================================= browser
@pytest.fixture(scope="session")
def chromium():
    """The ``chromium`` executable; installed from Debian's archive (``apt-get``) when absent and the process is
    root; the test is skipped where neither is possible."""
    found = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if found:
        return found
    apt = shutil.which("apt-get")
    if not (hasattr(os, "geteuid") and os.geteuid() == 0 and apt):
        pytest.skip("chromium is not installed, and it cannot be installed here (needs root and apt-get): "
                    "install Debian's `chromium` package to run the browser test")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in ([apt, "update"], [apt, "install", "-y", "--no-install-recommends", "chromium"]):
        try:
            done = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=1200)
        except subprocess.TimeoutExpired as err:
            pytest.fail(f"{' '.join(command)} timed out after {err.timeout} s")
        if done.returncode != 0:
            pytest.fail(f"{' '.join(command)} failed (exit {done.returncode}):\n{done.stderr}")
    found = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if not found:
        pytest.fail("apt-get installed chromium, but no `chromium` executable is on PATH or at /usr/bin/chromium")
    return found


@pytest.fixture(scope="module")
def report_page(tmp_path_factory):
    """A realistic report: 4 photos x (image + 5 methods) of 224 x 224 pictures, a metrics table with a failure
    marked, a real Consistency section, the environment."""
    from camcore.viz import overlay, png_bytes

    rows = ["chelsea: tabby cat (p=0.62)", "coffee: espresso (p=0.91)", "astronaut: suit (p=0.34)",
            "rocket: missile (p=0.48)"]
    columns = ["image", "gradcam", "gradcam++", "xgradcam", "layercam", "scorecam"]
    pictures = {}
    for r in range(len(rows)):
        image = _picture(224, 224, r)
        pictures[(r, 0)] = png_bytes(image) if r == 3 else image
        for c in range(1, len(columns)):
            cam = _picture(224, 224, 10 * r + c)[..., 2]
            pictures[(r, c)] = overlay(image, (cam - cam.min()) / (cam.max() - cam.min()))
    grid = report.Grid("PyTorch: EfficientNet-Lite0", rows, columns, pictures,
                       note="Each map laid over its photo; the class is the model's top class.")
    metrics = report.Table("Faithfulness (deletion AUC, lower is better)",
                           ["method", "deletion AUC", "insertion AUC", "time (ms)", "status"],
                           [["gradcam", 0.1234567, 0.7654321, 12, "ok"], ["gradcam++", 0.13, 0.75, 14, "ok"],
                            ["scorecam", 0.098765, 0.81, 2345.6789, "ok"], ["eigencam", None, None, 9, "FAILED"]],
                           highlight=lambda row: row[-1] != "ok", note="Over the four photos.")
    consistency = Consistency(
        reference="pytorch", models=("pytorch", "keras", "flax"), tolerance=1e-3,
        maps=(MapAgreement("gradcam", "blocks.6", "keras", "block7a", 3.1e-5, 2.2e-5, 0.9999991, True),
              MapAgreement("gradcam", "blocks.6", "flax", "blocks_6", 4.0e-3, 2.1e-3, 0.99812, False)),
        outputs=(OutputAgreement("keras", 1.2e-4, 8.0e-6, 1.0, True),
                 OutputAgreement("flax", 2.0e-4, 9.0e-6, 1.0, True)),
        layouts={"pytorch": "NCHW", "keras": "NHWC", "flax": "NHWC"}, targets=None)
    path = tmp_path_factory.mktemp("report") / "report.html"
    report.write(path, "camcore report: EfficientNet-Lite0 on four photos", grids=[grid], tables=[metrics],
                 sections=[consistency.to_html()], summary="Maps of five methods, their faithfulness, and how "
                 "the PyTorch, Keras and Flax ports agree.")
    return path


def _chromium(chromium, profile: Path, *args) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-dev-shm-usage", "--virtual-time-budget=5000", "--hide-scrollbars",
             "--allow-file-access-from-files", f"--user-data-dir={profile}"]
    done = subprocess.run([chromium, *flags, *args], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"chromium {' '.join(args)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}"
    return done


# Chromium's windows are at least 500 px wide (headless too), so a phone's width is a 390 px frame in a 500 px
# window; the frame's document is the report with a 390 px viewport (its media queries, its innerWidth), and
# once it has loaded (after the report's own load handler) its <body> data attributes are copied to the wrapper's,
# which --dump-dom prints (--allow-file-access-from-files lets one file:// page read another).
_FRAME = """<!DOCTYPE html><html><head><meta charset="utf-8"><style>body{{margin:0}}
iframe{{display:block;border:0;width:{width}px;height:{height}px}}</style></head><body>
<iframe id="page" src="{src}"></iframe><script>window.addEventListener("load", function () {{
  var d = document.getElementById("page").contentDocument.body.dataset;
  for (var k in d) {{ document.body.dataset[k] = d[k]; }}
  document.body.dataset.framed = "yes";
}});</script></body></html>"""
_MIN_WINDOW = 500


def _open(page: Path, tmp_path: Path, width: int, height: int) -> tuple[str, str]:
    """``(url, --window-size flag)`` showing ``page`` in a viewport of ``width`` x ``height`` CSS pixels."""
    if width >= _MIN_WINDOW:
        return page.as_uri(), f"--window-size={width},{height}"
    frame = tmp_path / "frame.html"
    frame.write_text(_FRAME.format(width=width, height=height, src=page.as_uri()), encoding="utf-8")
    return frame.as_uri(), f"--window-size={_MIN_WINDOW},{height}"


@pytest.mark.parametrize("width, height", [(1280, 900), (390, 844)])
def test_browser_loads_every_picture_without_sideways_scroll(chromium, report_page, tmp_path, width, height):
    url, size = _open(report_page, tmp_path, width, height)
    page = _Page(_chromium(chromium, tmp_path / "profile", size, "--dump-dom", url).stdout)
    assert page.body.get("data-loaded") == "yes", f"the report's load handler did not run: <body {page.body}>"
    assert page.body.get("data-viewport-width") == str(width)
    assert page.body.get("data-images-loaded") == "24/24"
    assert page.body.get("data-page-overflow") == "no", f"the page scrolls sideways at {width} px"
    if width >= _MIN_WINDOW:  # the framed page's own DOM is not in the wrapper's dump
        assert len(page.imgs) == 24 and all(i["src"].startswith(("data:image/jpeg;base64,", "data:image/png;base64,"))
                                       for i in page.imgs)
        for header in ("image", "scorecam", "deletion AUC", "insertion AUC", "status", "correlation",
                       "top-1 agreement", "name", "value"):
            assert header in page.th, f"header cell {header!r} missing"


@pytest.mark.parametrize("width, height", [(1280, 2000), (390, 1600)])
def test_browser_screenshots(chromium, report_page, tmp_path, width, height):
    from matplotlib import image as mpimg

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / f"report-{width}.png"
    shot.unlink(missing_ok=True)
    url, size = _open(report_page, tmp_path, width, height)
    _chromium(chromium, tmp_path / "profile", size, f"--screenshot={shot}", url)
    assert shot.is_file()
    window = mpimg.imread(shot)
    pixels = window[:height, :width, :3]
    if pixels.shape != window.shape:  # keep the phone frame's part of the window
        mpimg.imsave(shot, pixels)
    assert pixels.shape[:2] == (height, width)
    assert shot.stat().st_size > 20_000 and pixels.std() > 0.05  # not a blank page


def test_jpeg_pictures_are_smaller_and_close_to_the_picture(photos):
    """The default ``picture_format="jpeg"``: arrays embedded as JPEG (quality 90), JPEG bytes taken as they are."""
    import io

    from PIL import Image

    from camcore.viz import jpeg_bytes

    photo = photos[0][:64, :48]  # a real photo (chelsea), 64 x 48
    grid = report.Grid("g", ["r"], ["a", "b"], {(0, 0): photo, (0, 1): jpeg_bytes(photo, quality=50)})
    jpeg, png = (report.render("t", grids=[grid], environment={}, picture_format=f) for f in ("jpeg", "png"))
    uris = re.findall(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', jpeg)
    assert len(uris) == 2 and png.count("data:image/jpeg") == 1 and len(jpeg) < len(png)
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(uris[0]))), np.float64) / 255
    assert decoded.shape == (64, 48, 3) and np.abs(decoded - photo).mean() < 0.01
    assert 'width="48" height="64"' in jpeg
    with pytest.raises(ValueError, match=r"picture_format: expected one of \('jpeg', 'png'\), got 'gif'"):
        report.render("t", picture_format="gif")


def test_the_demos_report_renders_with_every_picture_and_table(chromium, demo_result, tmp_path):
    """The real thing: ``camcore demo``'s report (three backends, two methods, the pretrained model and photos)
    in Chromium: every picture decoded, the metrics, consistency and environment tables there; a screenshot
    kept as ``test-artifacts/demo-report-1280.png``."""
    from camcore import demo

    got = demo_result
    page = _Page(_chromium(chromium, tmp_path / "profile", "--window-size=1280,900", "--dump-dom",
                           got["report"].as_uri()).stdout)
    expected = 3 * len(demo.PHOTOS) * 3  # backends x photos x (photo with its box + 2 methods)
    assert page.body.get("data-images-loaded") == f"{expected}/{expected}"
    assert page.body.get("data-page-overflow") == "no"
    for header in ("photo, box", "gradcam", "guided-gradcam", "energy pointing game", "deletion AUC (lower: better)",
                   "torch s", "keras s", "jax s", "correlation", "top-1 agreement", "name", "value"):
        assert header in page.th, f"header cell {header!r} missing"
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "demo-report-1280.png"
    _chromium(chromium, tmp_path / "profile", "--window-size=1280,2400", f"--screenshot={shot}",
              got["report"].as_uri())
    assert shot.stat().st_size > 100_000
