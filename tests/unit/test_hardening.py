"""Issue 32's cases that are a function's behaviour rather than a process's: 16-bit images, labels with ``$``,
the one line a full disk gets, the YAML loader's refusal of aliases."""

from __future__ import annotations

import errno
import io

import numpy as np
import pytest
from PIL import Image

from clipkit.data.transforms import open_image, to_rgb


def test_16_bit_greys_are_scaled_not_clipped():
    """A 16-bit grey PNG used to become 39% white pixels (PIL clips at 255); it is scaled to 8 bits instead."""
    ramp = (np.arange(256 * 64).reshape(64, 256) % 65536).astype(np.uint16) * 4
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    decoded = np.asarray(open_image(buf.getvalue(), 32))
    assert decoded.shape == (64, 256, 3)
    want = np.rint(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(decoded[..., 0], want) and (decoded == 255).mean() < 0.01
    assert to_rgb(Image.new("RGB", (4, 4), (1, 2, 3))).getpixel((0, 0)) == (1, 2, 3)  # (8-bit untouched)


def test_class_names_with_dollar_signs_draw_as_typed(tmp_path):
    """A class name like ``$x^{2$`` is TeX-like math text to matplotlib: the report's plots failed on it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clipkit.figures import plain

    names = ["$x^{2$", "a $5 bill"]
    f, ax = plt.subplots()
    ax.set_yticks([0, 1], names)
    with pytest.raises(ValueError):  # what the report hit before
        f.savefig(tmp_path / "raw.png")
    ax.set_yticks([0, 1], [plain(n) for n in names])
    f.savefig(tmp_path / "labels.png")
    plt.close(f)
    assert [t.get_text() for t in ax.get_yticklabels()] == [r"\$x^{2\$", r"a \$5 bill"]


def test_a_full_disk_says_so_in_one_line():
    from clipkit.cli import _user_error

    err = OSError(errno.ENOSPC, "No space left on device", "/runs/x/checkpoints/.tmp_step_8/model.safetensors")
    message = _user_error(err)
    assert message.startswith("no space left on the device writing /runs/x/checkpoints/.tmp_step_8")
    assert "the last one is intact" in message
    assert _user_error(KeyError("a bug")) is None  # (a bug keeps its traceback)


def test_yaml_aliases_are_refused_and_plain_lists_read(tmp_path):
    from clipkit import yaml_files

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("a: &a [x, x]\nb: [*a, *a]\n")
    with pytest.raises(yaml_files.YamlFileError, match="line 2: YAML aliases"):
        yaml_files.load(bomb)
    ok = tmp_path / "ok.yaml"
    ok.write_text("- red circle\n- blue square\n")
    assert yaml_files.load(ok) == ["red circle", "blue square"]
