"""A self-contained HTML report: one file, pictures embedded as base64 data URIs (JPEG by default, PNG on request),
inline CSS and a tiny inline script, no external resources. Framework-free (imports no torch / tensorflow / jax);
encoding arrays needs Pillow and ``matplotlib`` (extra ``viz``), imported only when a picture is an array.

``write("report.html", "Title", grids=[Grid(...)], tables=[Table(...)], sections=[fragment])`` is the one call.
"""
from __future__ import annotations

import base64
import html
import os
import pathlib
import platform
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Grid", "Table", "environment", "render", "write"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"
PICTURE_FORMATS = ("jpeg", "png")
_FRAMEWORKS = ("torch", "tensorflow", "keras", "jax", "flax", "onnx", "onnx2torch")


@dataclass
class Grid:
    """Pictures in rows and columns (e.g. one row per image, one column per method).

    ``pictures``: ``{(row_index, column_index): picture}``, a picture an ``(H, W, 3)`` float array in ``[0, 1]``
    (uint8 in ``[0, 255]`` is scaled; values are clipped) or PNG bytes; a missing cell shows "—".
    """

    title: str
    rows: list[str]
    columns: list[str]
    pictures: dict = field(default_factory=dict)
    note: str = ""

    def __post_init__(self):
        _check_grid(self, "grid")


@dataclass
class Table:
    """A table of ``str`` / ``int`` / ``float`` / ``None`` cells (floats to 4 significant digits, ``None`` as "—");
    ``highlight(row) -> bool`` marks rows (e.g. failures)."""

    title: str
    header: list[str]
    rows: list[list]
    note: str = ""
    highlight: Callable | None = None

    def __post_init__(self):
        _check_table(self, "table")


# ================================================================================================= checks
def _check_text(value, name: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a str, got {type(value).__name__} {value!r:.80}")


def _check_labels(labels, name: str) -> None:
    if isinstance(labels, str) or not isinstance(labels, (list, tuple)):
        raise TypeError(f"{name}: expected a list of str, got {type(labels).__name__}")
    if not labels:
        raise ValueError(f"{name}: expected at least one label, got an empty list")
    for i, label in enumerate(labels):
        _check_text(label, f"{name}[{i}]")


def _is_index(i) -> bool:
    return isinstance(i, (int, np.integer)) and not isinstance(i, (bool, np.bool_))


def _check_grid(grid: Grid, name: str) -> None:
    _check_text(grid.title, f"{name}.title")
    _check_text(grid.note, f"{name}.note")
    _check_labels(grid.rows, f"{name}.rows")
    _check_labels(grid.columns, f"{name}.columns")
    if not isinstance(grid.pictures, Mapping):
        raise TypeError(f"{name}.pictures: expected a dict {{(row_index, column_index): picture}}, got "
                        f"{type(grid.pictures).__name__}")
    n_rows, n_cols = len(grid.rows), len(grid.columns)
    for key, picture in grid.pictures.items():
        if not (isinstance(key, tuple) and len(key) == 2 and all(_is_index(i) for i in key)):
            raise TypeError(f"{name}.pictures: expected keys (row_index, column_index) of two ints, got {key!r}")
        r, c = key
        if not (0 <= r < n_rows and 0 <= c < n_cols):
            raise ValueError(f"{name}.pictures: key {key!r} is out of range: expected row_index in [0, {n_rows}) "
                             f"and column_index in [0, {n_cols}) ({n_rows} rows x {n_cols} columns)")
        _check_picture(picture, f"{name}.pictures[{key!r}]")


def _check_picture(picture, name: str) -> None:
    if isinstance(picture, (bytes, bytearray, memoryview)):
        if not ((bytes(picture[:8]) == _PNG_SIGNATURE and len(picture) >= 24)
                or bytes(picture[:3]) == _JPEG_SIGNATURE):
            raise ValueError(f"{name}: expected PNG or JPEG bytes (starting with their signature), got "
                             f"{len(picture)} bytes starting {bytes(picture[:8])!r}")
        return
    try:
        shape = np.shape(picture)
        dtype = np.asarray(picture).dtype
    except (TypeError, ValueError) as err:  # ragged lists, arbitrary objects
        raise TypeError(f"{name}: expected an (H, W, 3) array in [0, 1] or PNG bytes, got "
                        f"{type(picture).__name__} ({err})") from None
    if len(shape) != 3 or shape[2] != 3 or shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"{name}: expected an (H, W, 3) array in [0, 1] or PNG bytes, got shape {tuple(shape)}")
    if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer) or dtype == np.bool_):
        raise TypeError(f"{name}: expected a float array in [0, 1] (or uint8), got dtype {dtype}")


def _check_table(table: Table, name: str) -> None:
    _check_text(table.title, f"{name}.title")
    _check_text(table.note, f"{name}.note")
    _check_labels(table.header, f"{name}.header")
    if table.highlight is not None and not callable(table.highlight):
        raise TypeError(f"{name}.highlight: expected a callable f(row) -> bool or None, got "
                        f"{type(table.highlight).__name__}")
    if isinstance(table.rows, (str, bytes)) or not isinstance(table.rows, (list, tuple)):
        raise TypeError(f"{name}.rows: expected a list of rows (lists of cells), got {type(table.rows).__name__}")
    n = len(table.header)
    for i, row in enumerate(table.rows):
        if isinstance(row, (str, bytes)) or not isinstance(row, (list, tuple)):
            raise TypeError(f"{name}.rows[{i}]: expected a list of {n} cells, got {type(row).__name__}")
        if len(row) != n:
            raise ValueError(f"{name}.rows[{i}]: expected {n} cells (one per header column), got {len(row)}")
        for j, cell in enumerate(row):
            _format_cell(cell, f"{name}.rows[{i}][{j}]")


def _format_cell(cell, name: str = "cell") -> tuple[str, bool]:
    """``(text, numeric)`` for one table cell."""
    if cell is None:
        return "—", False
    if isinstance(cell, str):
        return cell, False
    if isinstance(cell, (bool, np.bool_)):
        return ("yes" if cell else "no"), False
    if isinstance(cell, (int, np.integer)):
        return str(int(cell)), True
    if isinstance(cell, (float, np.floating)):
        return f"{float(cell):.4g}", True
    raise TypeError(f"{name}: expected a str, int, float or None, got {type(cell).__name__} {cell!r:.80}")


# ================================================================================================= environment
def _version(name: str) -> str:
    version = getattr(sys.modules[name], "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version

            version = dist_version(name)
        except (ImportError, ValueError):  # PackageNotFoundError is an ImportError
            version = "unknown"
    return str(version)


def environment() -> dict[str, str]:
    """``{name: value}``: Python, platform, CPU count, numpy, camcore, the versions of torch / tensorflow / keras /
    jax / flax / onnx / onnx2torch only where already imported (never imports a framework), and ``"device"``:
    torch's CUDA device names (torch imported, CUDA available) and ``jax.devices()`` (jax imported), else
    ``"cpu"``."""
    from . import __version__

    env = {"python": f"{platform.python_implementation()} {platform.python_version()}",
           "platform": platform.platform(), "cpus": str(os.cpu_count()), "numpy": np.__version__,
           "camcore": __version__}
    env.update({name: _version(name) for name in _FRAMEWORKS if name in sys.modules})
    devices = []
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        try:
            if torch.cuda.is_available():
                devices += [f"torch cuda:{i} {torch.cuda.get_device_name(i)}"
                            for i in range(torch.cuda.device_count())]
        except Exception as err:  # noqa: BLE001 - a broken driver must not break the report
            devices.append(f"torch cuda: unavailable ({type(err).__name__})")
    if "jax" in sys.modules:
        try:
            devices.append("jax " + ", ".join(str(d) for d in sys.modules["jax"].devices()))
        except Exception as err:  # noqa: BLE001 - as above
            devices.append(f"jax: unavailable ({type(err).__name__})")
    env["device"] = "; ".join(devices) or "cpu"
    return env


_environment = environment  # render()'s keyword argument of the same name hides it


# ================================================================================================= rendering
_CSS = """
:root{--cell:224px;--border:#d0d7de;--muted:#57606a;color-scheme:light}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;background:#f6f8fa;color:#1f2328;
 font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue","Noto Sans","DejaVu Sans",Arial,sans-serif}
header.top{background:#24292f;color:#fff;padding:20px 24px}
header.top h1{margin:0 auto;max-width:1400px;font-size:1.55rem;font-weight:600;overflow-wrap:anywhere}
header.top .summary{margin:6px auto 0;max-width:1400px;color:#d0d7de}
header.top .summary p{margin:.3em 0}
main{max-width:1400px;margin:0 auto;padding:16px 24px 32px}
main>section,nav.toc{background:#fff;border:1px solid var(--border);border-radius:8px;padding:16px 20px;
 margin:16px 0;min-width:0}
h2{font-size:1.15rem;font-weight:600;margin:0 0 .5em;overflow-wrap:anywhere}
p,li,caption{overflow-wrap:anywhere}
.note{color:var(--muted);margin:0 0 .8em}
.note p{margin:0 0 .4em}
nav.toc h2{font-size:1rem;margin-bottom:.3em}
nav.toc ol{margin:0;padding-left:1.4em;columns:2 18em;column-gap:2em}
nav.toc a{color:#0969da;text-decoration:none}
nav.toc a:hover{text-decoration:underline}
.scroll{overflow-x:auto;max-width:100%;-webkit-overflow-scrolling:touch}
table{border-collapse:collapse}
table.data{font-size:.9rem;min-width:min(100%,32em)}
table.data th,table.data td{border:1px solid var(--border);padding:5px 10px;text-align:left;vertical-align:top}
table.data thead th{background:#f6f8fa;font-weight:600;white-space:nowrap}
table.data td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.data td.empty{color:#8c959f;text-align:center}
table.data tbody tr:nth-child(even) td{background:#fbfcfd}
table.data tbody tr.flag td{background:#ffebe9;color:#82071e}
table.data tbody tr.flag td:first-child{box-shadow:inset 4px 0 #cf222e}
table.env td:first-child{font-weight:600;white-space:nowrap}
table.env td{overflow-wrap:anywhere}
table.grid{border-collapse:separate;border-spacing:0;font-size:.85rem}
table.grid th,table.grid td{border-right:1px solid #eaeef2;border-bottom:1px solid #eaeef2;padding:4px;
 text-align:center;vertical-align:middle}
table.grid thead th{background:#f6f8fa;font-weight:600;max-width:calc(var(--cell) + 8px);overflow-wrap:anywhere;
 border-top:1px solid #eaeef2}
table.grid th.row{position:sticky;left:0;z-index:1;background:#fff;text-align:left;font-weight:500;
 min-width:8em;max-width:13em;overflow-wrap:anywhere;border-left:1px solid #eaeef2;box-shadow:2px 0 3px -2px #8c959f}
table.grid thead th.corner{z-index:2;background:#f6f8fa}
table.grid img{display:block;margin:0 auto;width:auto;height:auto;max-width:var(--cell);max-height:var(--cell)}
table.grid td.empty{color:#8c959f;min-width:4em}
footer{max-width:1400px;margin:0 auto;padding:0 24px 24px;color:var(--muted);font-size:.8rem}
@media (max-width:600px){
 :root{--cell:120px}
 body{font-size:14px}
 header.top{padding:14px 12px}
 header.top h1{font-size:1.25rem}
 main{padding:8px 8px 24px}
 main>section,nav.toc{padding:12px;margin:10px 0}
 table.grid th.row{min-width:6em;max-width:7.5em;font-size:.75rem;overflow-wrap:break-word;padding:4px 6px}
 footer{padding:0 8px 16px}
}
"""

# Sets the attributes at once (the pictures may not be decoded yet) and again once the window has loaded.
_SCRIPT = """
(function(){
 function mark(){
  var imgs=document.images,loaded=0;
  for(var i=0;i<imgs.length;i++){if(imgs[i].complete&&imgs[i].naturalWidth>0){loaded++;}}
  var b=document.body;
  b.dataset.imagesLoaded=loaded+"/"+imgs.length;
  b.dataset.pageOverflow=(document.documentElement.scrollWidth>window.innerWidth)?"yes":"no";
  b.dataset.viewportWidth=String(window.innerWidth);
 }
 mark();
 window.addEventListener("load",function(){mark();document.body.dataset.loaded="yes";});
})();
"""


def _paragraphs(text: str, css: str) -> str:
    """``text`` escaped, blank lines separating paragraphs; empty text gives ``""``."""
    parts = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if not parts:
        return ""
    body = "".join(f"<p>{html.escape(p)}</p>" for p in parts)
    return f'<div class="{css}">{body}</div>'


def _encoded(picture, picture_format: str) -> tuple[bytes, str, int, int]:
    """``(data, mime type, width, height)`` of a checked picture; arrays encoded as ``picture_format``."""
    if isinstance(picture, (bytes, bytearray, memoryview)):
        data = bytes(picture)
        if data[:8] == _PNG_SIGNATURE:
            return data, "image/png", int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        import io

        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            return data, "image/jpeg", img.width, img.height
    from .viz import jpeg_bytes, png_bytes

    rgb = np.asarray(picture)
    if rgb.dtype == np.uint8:
        rgb = rgb / 255.0
    rgb = np.nan_to_num(rgb.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    encode = png_bytes if picture_format == "png" else jpeg_bytes
    return encode(rgb), f"image/{picture_format}", rgb.shape[1], rgb.shape[0]


def _grid_html(grid: Grid, anchor: str, picture_format: str) -> str:
    e = html.escape
    out = [f'<section id="{anchor}" class="grid-section"><h2>{e(grid.title)}</h2>', _paragraphs(grid.note, "note"),
           '<div class="scroll"><table class="grid"><thead><tr><th class="row corner" scope="col"></th>']
    out += [f'<th scope="col">{e(c)}</th>' for c in grid.columns]
    out.append("</tr></thead><tbody>")
    for r, row in enumerate(grid.rows):
        out.append(f'<tr><th class="row" scope="row">{e(row)}</th>')
        for c, column in enumerate(grid.columns):
            picture = grid.pictures.get((r, c))
            if picture is None:
                out.append('<td class="empty">—</td>')
                continue
            data, mime, width, height = _encoded(picture, picture_format)
            label = e(f"{row} — {column}", quote=True)
            uri = f"data:{mime};base64," + base64.b64encode(data).decode("ascii")
            out.append(f'<td><img src="{uri}" alt="{label}" title="{label}" width="{width}" height="{height}" '
                       f'decoding="sync"></td>')
        out.append("</tr>")
    out.append("</tbody></table></div></section>")
    return "".join(out)


def _table_html(table: Table, anchor: str, css: str = "data") -> str:
    e = html.escape
    out = [f'<section id="{anchor}" class="table-section"><h2>{e(table.title)}</h2>',
           _paragraphs(table.note, "note"), f'<div class="scroll"><table class="{css}"><thead><tr>']
    out += [f'<th scope="col">{e(h)}</th>' for h in table.header]
    out.append("</tr></thead><tbody>")
    for row in table.rows:
        flag = table.highlight is not None and bool(table.highlight(row))
        out.append('<tr class="flag">' if flag else "<tr>")
        for cell in row:
            text, numeric = _format_cell(cell)
            cls = "num" if numeric else "empty" if cell is None else ""
            out.append(f'<td class="{cls}">{e(text)}</td>' if cls else f"<td>{e(text)}</td>")
        out.append("</tr>")
    out.append("</tbody></table></div></section>")
    return "".join(out)


def _fragment_title(fragment: str, default: str) -> str:
    """The text of the fragment's first heading (for the contents), else ``default``."""
    match = re.search(r"<h[1-6][^>]*>(.*?)</h[1-6]>", fragment, flags=re.IGNORECASE | re.DOTALL)
    text = html.unescape(re.sub(r"<[^>]+>", "", match.group(1))).strip() if match else ""
    return text or default


def _sequence(value, name: str, kind) -> list:
    if isinstance(value, (str, bytes, kind)) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{name}: expected a list of {kind.__name__}, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, kind):
            raise TypeError(f"{name}[{i}]: expected a {kind.__name__}, got {type(item).__name__}")
    return list(value)


def render(title: str, *, summary: str = "", grids=(), tables=(), sections=(), environment=None,
           picture_format: str = "jpeg") -> str:
    """The whole HTML5 page as a string: a header (``title``, ``summary``), contents, then ``grids``, ``tables``,
    ``sections`` (trusted HTML fragments inserted as-is, e.g. ``Consistency.to_html()``) and ``environment``
    (``{name: value}`` shown as a table; ``None``: :func:`environment`; ``{}``: none). All other text is
    escaped. ``picture_format``: how array pictures are embedded, ``"jpeg"`` (quality 90, about a tenth of a
    PNG: a demo report of 200 pictures stays a few MB) or ``"png"`` (lossless)."""
    if picture_format not in PICTURE_FORMATS:
        raise ValueError(f"picture_format: expected one of {PICTURE_FORMATS}, got {picture_format!r}")
    _check_text(title, "title")
    _check_text(summary, "summary")
    grids = _sequence(grids, "grids", Grid)
    tables = _sequence(tables, "tables", Table)
    sections = _sequence(sections, "sections", str)
    for i, grid in enumerate(grids):
        _check_grid(grid, f"grids[{i}]")
    for i, table in enumerate(tables):
        _check_table(table, f"tables[{i}]")
    if environment is None:
        environment = _environment()
    if not isinstance(environment, Mapping):
        raise TypeError(f"environment: expected a dict {{name: value}} or None, got {type(environment).__name__}")

    e = html.escape
    contents, body = [], []
    for i, grid in enumerate(grids, 1):
        contents.append((f"grid-{i}", grid.title))
        body.append(_grid_html(grid, f"grid-{i}", picture_format))
    for i, table in enumerate(tables, 1):
        contents.append((f"table-{i}", table.title))
        body.append(_table_html(table, f"table-{i}"))
    for i, fragment in enumerate(sections, 1):
        contents.append((f"section-{i}", _fragment_title(fragment, f"Section {i}")))
        body.append(f'<section id="section-{i}" class="fragment"><div class="scroll">{fragment}</div></section>')
    if environment:
        env = Table("Environment", ["name", "value"], [[str(k), str(v)] for k, v in environment.items()])
        contents.append(("environment", env.title))
        body.append(_table_html(env, "environment", css="data env"))

    from . import __version__

    toc = ""
    if contents:
        items = "".join(f'<li><a href="#{a}">{e(t) or "(untitled)"}</a></li>' for a, t in contents)
        toc = f'<nav class="toc" aria-label="Contents"><h2>Contents</h2><ol>{items}</ol></nav>'
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">', f"<title>{e(title)}</title>",
        f"<style>{_CSS}</style>", "</head>", "<body>",
        f'<header class="top"><h1>{e(title)}</h1>{_paragraphs(summary, "summary")}</header>',
        f"<main>{toc}", *body, "</main>", f"<footer>Made with camcore {e(__version__)}.</footer>",
        f"<script>{_SCRIPT}</script>", "</body>", "</html>", ""])


def write(path, title: str, **kwargs) -> pathlib.Path:
    """:func:`render` ``(title, **kwargs)`` written to ``path`` (UTF-8, parent folders created); returns the path."""
    path = pathlib.Path(path)
    page = render(title, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
