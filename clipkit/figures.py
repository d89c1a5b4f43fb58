"""Pieces of the run report's page that the report and the evaluators' report sections share: a matplotlib
figure as an inline PNG, labels drawn as typed, thumbnails."""

from __future__ import annotations

import base64
import html
import io


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, never a window). Imported on first use: matplotlib
    costs ~0.5 s to import, paid only when a report or figure is written."""
    import matplotlib.pyplot as plt

    if plt.get_backend().lower() != "agg":
        plt.switch_backend("Agg")
    return plt


def subplots(**kwargs):
    """``pyplot.subplots(**kwargs)``: (figure, axes)."""
    return pyplot().subplots(**kwargs)


def png(fig, alt: str = "") -> str:
    """``fig`` as an ``<img>`` with the PNG inline (the figure is closed), ``alt`` its text."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def plain(label: str) -> str:
    """A label matplotlib draws as typed: ``$`` would start TeX-like math text (``$x$``, or an error)."""
    return str(label).replace("$", r"\$")
