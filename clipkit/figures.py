"""Pieces of the run report's page that the report and the evaluators' report sections share: a matplotlib
figure as an inline PNG, labels drawn as typed, thumbnails."""

from __future__ import annotations

import base64
import io


def png(fig) -> str:
    """``fig`` as an ``<img>`` with the PNG inline (the figure is closed)."""
    import matplotlib.pyplot as plt  # (matplotlib costs ~0.5 s to import: only when a report is written)

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def plain(label: str) -> str:
    """A label matplotlib draws as typed: ``$`` would start TeX-like math text (``$x$``, or an error)."""
    return str(label).replace("$", r"\$")
