"""Reading YAML files users hand to clipkit (``eval.suite``, class-name and template lists): plain data only.

``yaml.safe_load`` builds no objects but expands aliases: a few nested anchors (a "billion laughs" file) make a
structure that every later walk (OmegaConf's merge, a printout) expands into billions of nodes, and the run
hangs, eating memory. These files need neither anchors nor aliases: an alias is refused with its position, and
the file's size is bounded.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from clipkit.errors import UserError

MAX_BYTES = 4 << 20  # a suite or a class-name list is kilobytes; 4 MiB leaves room for ImageNet-21k names


class YamlFileError(UserError, ValueError):
    pass


class _NoAliasLoader(yaml.SafeLoader):
    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise YamlFileError(f"line {mark.line + 1}: YAML aliases (*name) are not allowed in this file")
        return super().compose_node(parent, index)


def load(path: str | Path) -> object:
    """The file's data (lists, dicts, strings, numbers), or ``YamlFileError`` naming the file and the problem."""
    path = Path(path).expanduser()
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise YamlFileError(f"{path}: {size} bytes, more than the {MAX_BYTES} a YAML list or suite may have")
    try:
        return yaml.load(path.read_text(), Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader subclass)
    except YamlFileError as err:
        raise YamlFileError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise YamlFileError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
