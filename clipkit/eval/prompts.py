"""Class names and prompt templates: built-in sets and user files.

Built-in class names: ``imagenet1k`` (open_clip's ``IMAGENET_CLASSNAMES``), ``cifar10``, ``cifar100`` (the
datasets' own label names, underscores as spaces). Built-in templates: ``openai_imagenet`` (OpenAI's 80, as open_clip
ships them), ``simple_imagenet`` (open_clip's 7), ``cifar`` (OpenAI's 18 CIFAR prompts). Each class-name set has
a default template set. User files: ``.txt`` (one entry per line), ``.json`` or ``.yaml`` (a list), templates
with a ``{c}`` placeholder for the class name.
"""

from __future__ import annotations

import json
from pathlib import Path

from clipkit import yaml_files

CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100 = tuple(
    name.replace("_", " ")
    for name in (
        "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
        "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
        "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard "
        "lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear "
        "pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal "
        "shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank "
        "telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
    ).split()
)
CIFAR_TEMPLATES = tuple(
    f"{prefix} {{c}}."
    for prefix in (
        "a photo of a",
        "a blurry photo of a",
        "a black and white photo of a",
        "a low contrast photo of a",
        "a high contrast photo of a",
        "a bad photo of a",
        "a good photo of a",
        "a photo of a small",
        "a photo of a big",
        "a photo of the",
        "a blurry photo of the",
        "a black and white photo of the",
        "a low contrast photo of the",
        "a high contrast photo of the",
        "a bad photo of the",
        "a good photo of the",
        "a photo of the small",
        "a photo of the big",
    )
)


def _open_clip_templates(name: str) -> list[str]:
    from open_clip import zero_shot_metadata as meta

    return [fn("{c}") for fn in getattr(meta, name)]


def _imagenet_classnames() -> list[str]:
    from open_clip import zero_shot_metadata as meta

    return list(meta.IMAGENET_CLASSNAMES)


BUILTIN_CLASSNAMES = {
    "imagenet1k": (_imagenet_classnames, "openai_imagenet"),
    "cifar10": (lambda: list(CIFAR10), "cifar"),
    "cifar100": (lambda: list(CIFAR100), "cifar"),
}
BUILTIN_TEMPLATES = {
    "openai_imagenet": lambda: _open_clip_templates("OPENAI_IMAGENET_TEMPLATES"),
    "simple_imagenet": lambda: _open_clip_templates("SIMPLE_IMAGENET_TEMPLATES"),
    "cifar": lambda: list(CIFAR_TEMPLATES),
}
DEFAULT_TEMPLATES = ["a photo of a {c}."]


def read_list(path: str | Path) -> list[str]:
    """Entries of a ``.txt`` (non-empty lines), ``.json`` or ``.yaml`` / ``.yml`` (a list of strings) file."""
    path = Path(path).expanduser()
    text = path.read_text()
    if path.suffix == ".json":
        items = json.loads(text)
    elif path.suffix in (".yaml", ".yml"):
        items = yaml_files.load(path)
    else:
        return [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise ValueError(f"{path}: expected a list of strings")
    return [x.strip() for x in items if x.strip()]


def classnames(spec: str | None, default: list[str] | None = None) -> list[str]:
    """A built-in set's names, a file's entries, or ``default`` (e.g. an image folder's class folders)."""
    if spec in BUILTIN_CLASSNAMES:
        return BUILTIN_CLASSNAMES[spec][0]()
    if spec:
        names = read_list(spec)
        seen: dict[str, int] = {}
        for i, name in enumerate(names, 1):
            norm = " ".join(name.replace("_", " ").lower().split())
            if norm in seen:  # (two classes of one name: every label after them would be off, or ambiguous)
                raise ValueError(f"{spec}: class {name!r} is listed twice (entries {seen[norm]} and {i})")
            seen[norm] = i
        return names
    if default is None:
        raise ValueError("class names are needed: a built-in set (imagenet1k, cifar10, cifar100) or a file")
    return default


def templates(spec: str | None, classnames_spec: str | None = None) -> list[str]:
    """A built-in template set, a file's templates, the class-name set's default, or ``a photo of a {c}.``;
    every template must contain ``{c}``."""
    if spec in BUILTIN_TEMPLATES:
        out = BUILTIN_TEMPLATES[spec]()
    elif spec:
        out = read_list(spec)
    elif classnames_spec in BUILTIN_CLASSNAMES:
        out = BUILTIN_TEMPLATES[BUILTIN_CLASSNAMES[classnames_spec][1]]()
    else:
        out = list(DEFAULT_TEMPLATES)
    bad = [t for t in out if "{c}" not in t]
    if bad:
        raise ValueError(f"prompt template {bad[0]!r} has no {{c}} placeholder for the class name")
    if not out:
        raise ValueError(f"no prompt templates in {spec}")
    return out
