"""Distillation's config (``distill.*``): which teacher, how much, of what kind, at which precision."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from clipkit.errors import PATH, Choice, ConfigError, require


class DistillKind(Choice):
    logits = "logits"  # the teacher's image-text softmax over the global batch (open_clip's DistillClipLoss)
    features = "features"  # the teacher's embeddings, per sample (cosine distance; same embedding width)


class TeacherPrecision(Choice):
    auto = "auto"  # bf16 on GPU, fp32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"


@dataclass
class DistillConfig:
    # The teacher to distil from: a clipkit run or checkpoint dir, an exported open_clip folder, or an open_clip
    # model name (with distill.pretrained); null = no distillation.
    teacher: Optional[str] = field(default=None, metadata=PATH)
    # Local weights file for a teacher given by model name (clipkit never downloads).
    pretrained: Optional[str] = field(default=None, metadata=PATH)
    # The loss is the contrastive loss + weight x the distillation term.
    weight: float = 1.0
    # logits: pull the student's image-text softmax toward the teacher's over the global batch; features: pull
    # each embedding toward the teacher's (cosine distance; the widths must match).
    kind: DistillKind = DistillKind.logits
    # The teacher's compute precision (its weights are cast: no fp32 copy is kept in bf16).
    precision: TeacherPrecision = TeacherPrecision.auto

    def validate(self, prefix: str = "distill") -> None:
        if self.teacher is None:
            for key in ("pretrained",):
                if getattr(self, key) is not None:
                    raise ConfigError(f"{prefix}.{key}", getattr(self, key), f"needs {prefix}.teacher")
            return
        require(f"{prefix}.weight", self.weight, self.weight > 0, "must be > 0")
        path = Path(self.teacher).expanduser()
        if path.exists():
            ok = (
                (path / "open_clip_config.json").is_file()
                or (path / "manifest.json").is_file()
                or (path / "checkpoints").is_dir()
            )
            require(
                f"{prefix}.teacher",
                self.teacher,
                ok,
                "not a clipkit run or checkpoint dir, nor an exported open_clip folder",
            )
            require(f"{prefix}.pretrained", self.pretrained, self.pretrained is None, "only for a model-name teacher")
        elif "/" in self.teacher or self.teacher.startswith("."):
            raise ConfigError(
                f"{prefix}.teacher",
                self.teacher,
                "path not found (a run or checkpoint dir, or an exported open_clip folder; experiment=distill_demo "
                "needs `clipkit train experiment=teacher_demo` first)",
            )
        else:
            require(
                f"{prefix}.pretrained",
                self.pretrained,
                self.pretrained is not None,
                f"a teacher given by model name ({self.teacher}) needs its local weights file",
            )
            require(
                f"{prefix}.pretrained",
                self.pretrained,
                Path(self.pretrained).expanduser().is_file(),
                "file not found",
            )
