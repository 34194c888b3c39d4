"""matplotlib behind one door: an import that fails with a one-line message naming the extra, figures
made without pyplot (no global state, no display needed), and PNG bytes or RGB arrays out."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dtml_deploy.errors import DtmlError
from dtml_deploy.io.atomic import atomic_path

EXTRA = "pip install 'dtml[viz]'"


def require_matplotlib(what: str) -> None:
    """Raise a one-line `DtmlError` naming the extra when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError:
        raise DtmlError(f"{what} needs matplotlib: {EXTRA}") from None


def verbatim(text: object) -> str:
    """`text` as matplotlib must be given it to draw it as written: a pair of `$` would start mathtext
    (`a$_$b.nii.gz` fails to render, `p$q$r` turns italic), so every `$` is escaped; matplotlib removes the
    escape when it draws plain text, so `_`, `^`, `\\`, `{}` and a `\\$` already in a name come out as
    written too. Every text a user or a file name controls goes through here."""
    return str(text).replace("$", r"\$")


@contextlib.contextmanager
def quiet_glyphs() -> Iterator[None]:
    """Inside the block, ignore matplotlib's warning for a character its font lacks (a case or run name in
    another script): it comes once per glyph with a source line, while the picture just shows a box and the
    name is written in full in the file names and reports. Other warnings pass."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font", category=UserWarning)
        yield


def tight_layout(fig: Any, **kwargs: Any) -> None:
    """`fig.tight_layout` (which measures text, so it may meet a missing glyph: `quiet_glyphs`)."""
    with quiet_glyphs():
        fig.tight_layout(**kwargs)


def new_figure(width_in: float, height_in: float, dpi: float = 100) -> Any:
    """A matplotlib Figure on an Agg canvas (no pyplot, so nothing global and no display)."""
    require_matplotlib("drawing")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Any) -> bytes:
    """The figure as PNG bytes at its own dpi, marked as dtml's (io/reports.py recognises an earlier picture
    by it before replacing the file)."""
    from dtml_deploy.version import __version__

    buf = io.BytesIO()
    with quiet_glyphs():
        fig.canvas.print_png(buf, metadata={"Software": f"dtml {__version__}"})
    return buf.getvalue()


def figure_rgb(fig: Any) -> np.ndarray:
    """The rendered figure as a uint8 (H, W, 3) array: what the PNG holds."""
    with quiet_glyphs():
        fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save_png(fig: Any, path: Path) -> Path:
    """Write the figure as PNG, atomically."""
    data = figure_png(fig)
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def png_to_rgb(data: bytes) -> np.ndarray:
    """Decode PNG bytes to a uint8 (H, W, 3) array (used to check what was written)."""
    require_matplotlib("reading a PNG")
    from matplotlib.image import imread

    arr = imread(io.BytesIO(data), format="png")
    if arr.dtype != np.uint8:
        arr = np.round(arr * 255).astype(np.uint8)
    return arr[..., :3]
