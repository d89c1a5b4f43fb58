"""Embedded demo data: a small synthetic image-text world, generated offline and deterministically.

Each image shows one to three shapes with several visual factors (shape, colour, size, position, count,
background); each sample carries several natural-language captions, drawn from many templates, that
mention a random subset of those factors. A model has to align words with visual content to solve it:
no caption is a class id, and the held-out zero-shot split uses prompts it never saw in training.

Splits (all written as webdataset tar shards with the same writer users get):
  train      image + several captions (``json`` list) + the first caption as ``txt``
  zeroshot   image + ``cls`` (index into ``classnames.txt``), prompts in ``templates.txt``
  retrieval  image + several captions, for image<->text recall
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing as mp
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

# What to generate is part of the data config (data.demo.*); every field changes the cache key.
from clipkit.data.config import DemoDataConfig as DemoSpec
from clipkit.data.writer import write_shard, write_sizes_file

# Bumped whenever the generator's output changes, so stale caches are never reused.
DEMO_VERSION = 2

SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond"]
SHAPE_PLURALS = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}  # (v1 wrote "crosss")
SHAPE_SYNONYMS = {
    "circle": ["circle", "disc", "round dot"],
    "square": ["square", "box"],
    "triangle": ["triangle"],
    "star": ["star", "five-pointed star"],
    "cross": ["cross", "plus sign"],
    "diamond": ["diamond", "rhombus"],
}
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
}
BACKGROUNDS = {"dark": (25, 25, 30), "light": (225, 225, 215), "grey": (120, 120, 125)}
SIZES = {"small": 0.26, "large": 0.46}
POSITIONS = {
    "on the left": (0.28, 0.5),
    "on the right": (0.72, 0.5),
    "at the top": (0.5, 0.28),
    "at the bottom": (0.5, 0.72),
    "in the middle": (0.5, 0.5),
}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}

CAPTION_TEMPLATES_ONE = [
    "a {size} {color} {shape} {position}",
    "a {color} {shape} {position} on a {bg} background",
    "a photo of a {color} {shape}",
    "there is a {size} {color} {shape} {position}",
    "{color} {shape}, {size}, {position}",
    "a picture of a {shape} coloured {color}",
    "a {size} {shape} {position}",
    "an image with a single {color} {shape}",
    "a {color} {shape} drawn on a {bg} background",
    "one {color} {shape}",
    "a {shape}, {color}, {position}",
    "the {shape} is {color} and {size}",
    "a {color} shape {position}",
    "a {size} {color} {shape}",
]
CAPTION_TEMPLATES_MANY = [
    "{count} {color} {shapes}",
    "{count} small {color} {shapes} on a {bg} background",
    "a photo of {count} {color} {shapes}",
    "there are {count} {shapes}, all {color}",
    "an image with {count} {color} {shapes}",
    "several {color} {shapes}",
    "{count} {shapes}",
    "a group of {color} {shapes} on a {bg} background",
    "{color} {shapes}, {count} of them",
]
# Prompts for the held-out zero-shot split; none of them is a training caption template.
ZEROSHOT_TEMPLATES = [
    "a rendering of a {c}.",
    "a simple drawing of a {c}.",
    "an illustration showing a {c}.",
    "a {c} in an image.",
    "a cartoon {c}.",
]


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    bg: str
    size: str
    position: str
    count: int

    @property
    def classname(self) -> str:
        return f"{self.color} {self.shape}"


def zeroshot_classnames() -> list[str]:
    return [f"{c} {s}" for c in COLORS for s in SHAPES]


def sample_scene(rng: random.Random) -> Scene:
    count = rng.choices([1, 2, 3], weights=[0.6, 0.25, 0.15])[0]
    color = rng.choice(list(COLORS))
    bg = rng.choice([b for b in BACKGROUNDS if not (b == "light" and color == "yellow")])
    return Scene(
        shape=rng.choice(SHAPES),
        color=color,
        bg=bg,
        size=rng.choice(list(SIZES)) if count == 1 else "small",
        position=rng.choice(list(POSITIONS)) if count == 1 else "scattered",
        count=count,
    )


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def polar(k: int, radius: list[float], offset: float = 0.0) -> list[tuple[float, float]]:
        pts = []
        for i in range(k):
            a = angle + offset + 2 * math.pi * i / k
            rad = radius[i % len(radius)]
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts

    if shape == "square":
        return polar(4, [r * 1.1], math.pi / 4)
    if shape == "triangle":
        return polar(3, [r * 1.15], -math.pi / 2)
    if shape == "diamond":
        return polar(4, [r * 1.15, r * 0.7])
    if shape == "star":
        return polar(10, [r * 1.2, r * 0.5], -math.pi / 2)
    if shape == "cross":
        w = r * 0.38
        base = [
            (-w, -r),
            (w, -r),
            (w, -w),
            (r, -w),
            (r, w),
            (w, w),
            (w, r),
            (-w, r),
            (-w, w),
            (-r, w),
            (-r, -w),
            (-w, -w),
        ]
        ca, sa = math.cos(angle), math.sin(angle)
        return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in base]
    raise ValueError(shape)


def render(scene: Scene, rng: random.Random, size: int) -> Image.Image:
    """Draws ``scene`` at 4x resolution and downsamples (anti-aliasing), with colour and placement jitter."""
    ss = 4 * size
    jitter = lambda rgb, a: tuple(max(0, min(255, c + rng.randint(-a, a))) for c in rgb)  # noqa: E731
    img = Image.new("RGB", (ss, ss), jitter(BACKGROUNDS[scene.bg], 12))
    draw = ImageDraw.Draw(img)
    radius = SIZES[scene.size] * ss / 2 * rng.uniform(0.9, 1.1)
    if scene.count == 1:
        px, py = POSITIONS[scene.position]
        centers = [(px + rng.uniform(-0.05, 0.05), py + rng.uniform(-0.05, 0.05))]
    else:  # non-overlapping slots on a 3x3 grid
        slots = rng.sample([(x, y) for x in (0.2, 0.5, 0.8) for y in (0.2, 0.5, 0.8)], scene.count)
        centers = [(x + rng.uniform(-0.04, 0.04), y + rng.uniform(-0.04, 0.04)) for x, y in slots]
    for cx, cy in centers:
        fill = jitter(COLORS[scene.color], 18)
        cx, cy = cx * ss, cy * ss
        angle = rng.uniform(-0.2, 0.2)
        if scene.shape == "circle":
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
        else:
            draw.polygon(_shape_points(scene.shape, cx, cy, radius, angle), fill=fill)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def captions(scene: Scene, rng: random.Random, num: int) -> list[str]:
    """``num`` distinct captions for a scene; each mentions a random subset of its factors."""
    out: list[str] = []
    templates = CAPTION_TEMPLATES_ONE if scene.count == 1 else CAPTION_TEMPLATES_MANY
    for _ in range(num * 4):
        text = rng.choice(templates).format(
            shape=rng.choice(SHAPE_SYNONYMS[scene.shape]),
            shapes=SHAPE_PLURALS[scene.shape],
            color=scene.color,
            size=scene.size,
            position=scene.position,
            bg=scene.bg,
            count=COUNT_WORDS[scene.count],
        )
        if text not in out:
            out.append(text)
        if len(out) == num:
            break
    return out


def make_sample(split: str, index: int, seed: int, image_size: int, num_captions: int) -> dict:
    """One sample of a split, a pure function of (split, index, seed): workers can generate in any order."""
    rng = random.Random(f"{seed}/{split}/{index}")
    scene = sample_scene(rng)
    buf = io.BytesIO()
    render(scene, rng, image_size).save(buf, format="JPEG", quality=92)
    caps = captions(scene, rng, num_captions)
    sample = {"__key__": f"{split}{index:07d}", "jpg": buf.getvalue(), "txt": caps[0]}
    meta = {"caption": caps[0], "captions": caps, "classname": scene.classname, **scene.__dict__}
    sample["json"] = json.dumps(meta, sort_keys=True)
    if split == "zeroshot":
        sample["cls"] = str(zeroshot_classnames().index(scene.classname))
    return sample


def cache_name(spec: DemoSpec) -> str:
    """Cache folder name: every field of the spec and the generator version."""
    return (
        f"demo-v{DEMO_VERSION}-s{spec.seed}-px{spec.image_size}-n{spec.num_train}-{spec.num_zeroshot}"
        f"-{spec.num_retrieval}-sh{spec.shard_size}-c{spec.num_captions}"
    )


def _write_split(args: tuple) -> tuple[str, int, int]:

    out_dir, split, shard_idx, start, stop, spec = args
    samples = (make_sample(split, i, spec.seed, spec.image_size, spec.num_captions) for i in range(start, stop))
    path = Path(out_dir) / split / f"{shard_idx:05d}.tar"
    n = write_shard(path, samples)
    return split, shard_idx, n


def generate(spec: DemoSpec, out_dir: Path, num_procs: int = 1) -> Path:
    """Writes all splits under ``out_dir`` (tar shards + ``sizes.json`` per split, class names, templates)."""

    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for split, n in [("train", spec.num_train), ("zeroshot", spec.num_zeroshot), ("retrieval", spec.num_retrieval)]:
        for shard_idx, start in enumerate(range(0, n, spec.shard_size)):
            jobs.append((str(out_dir), split, shard_idx, start, min(n, start + spec.shard_size), spec))
    if num_procs > 1:
        with mp.get_context("spawn").Pool(num_procs) as pool:
            results = pool.map(_write_split, jobs)
    else:
        results = [_write_split(j) for j in jobs]
    for split in ("train", "zeroshot", "retrieval"):
        write_sizes_file(out_dir / split, {f"{i:05d}.tar": n for s, i, n in results if s == split})
    (out_dir / "zeroshot" / "classnames.txt").write_text("\n".join(zeroshot_classnames()) + "\n")
    (out_dir / "zeroshot" / "templates.txt").write_text("\n".join(ZEROSHOT_TEMPLATES) + "\n")
    return out_dir
