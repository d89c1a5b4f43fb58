"""Distillation from a teacher model (``distill.*``, configured in ``distill_config.py``): the teacher itself.

The teacher is any CLIP-style model clipkit can load: a clipkit run or checkpoint dir, an exported open_clip
folder, or an open_clip model name with local weights (``distill.pretrained``). It runs without autograd, in eval
mode, replicated on every rank, in bf16 on GPU (``distill.precision``), and sees the same samples as the student:
the same augmented crop, resized to its own image size and normalised with its own mean and std when those
differ, and the caption through its own tokenizer when that differs (the loader then tokenises twice). The loss
is ``clipkit.loss.distill.DistillLoss``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from clipkit import checkpoint as ckpt
from clipkit import model as model_lib
from clipkit.distill_config import DistillConfig
from clipkit.evaluate import load_trained
from clipkit.model import Built
from clipkit.model_config import ModelConfig

PROBES = ["a photo of a red circle", "x " * 100]  # captions whose tokens tell two tokenizers apart (the long one:
# the context length)


def load_teacher(cfg: DistillConfig, device: torch.device | str = "cpu") -> Built:
    """The teacher's model, tokenizer and preprocessing (its EMA weights are not used: the raw ones)."""
    path = Path(cfg.teacher).expanduser()
    if (path / "open_clip_config.json").is_file():
        return model_lib.from_open_clip_folder(path, device)
    if path.exists():
        return load_trained(ckpt.resolve(path), device)[0]
    return model_lib.build(ModelConfig(name=cfg.teacher, pretrained=cfg.pretrained), device)


def _same_tokens(a, b) -> bool:
    try:
        return all(torch.equal(a([p]), b([p])) for p in PROBES)
    except Exception:  # (different shapes: another context length)
        return False


class Teacher:
    """The teacher's forward on the student's batch: ``teacher(images, text, teacher_text)`` -> its normalised
    ``image_features``, ``text_features`` and ``logit_scale`` (fp32, no autograd)."""

    def __init__(self, cfg: DistillConfig, student: Built, device: torch.device):
        built = load_teacher(cfg, device)
        self.built, self.device = built, device
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        self.model = built.model.to(device=device, dtype=self.dtype).eval().requires_grad_(False)
        self.resize = built.image_size != student.image_size
        same_norm = tuple(built.mean) == tuple(student.mean) and tuple(built.std) == tuple(student.std)
        self.renormalize = self.resize or not same_norm
        self.own_tokens = not _same_tokens(built.tokenizer, student.tokenizer)
        self.tokenizer = built.tokenizer if self.own_tokens else None  # (the loader's second tokenizer)
        shape = (1, 3, 1, 1)
        self.student_mean = torch.tensor(student.mean, device=device).reshape(shape)
        self.student_std = torch.tensor(student.std, device=device).reshape(shape)
        self.mean = torch.tensor(built.mean, device=device).reshape(shape)
        self.std = torch.tensor(built.std, device=device).reshape(shape)

    def describe(self) -> str:
        n = sum(p.numel() for p in self.model.parameters()) / 1e6
        how = [f"its own image size {self.built.image_size}" if self.resize else "",
               "its own mean/std" if self.renormalize and not self.resize else "",
               "its own tokenizer" if self.own_tokens else ""]  # fmt: skip
        how = ", ".join(h for h in how if h) or "the student's inputs"
        return f"teacher {self.built.name}: {n:.2f}M params, {str(self.dtype).removeprefix('torch.')}, {how}"

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's pixels from the student's normalised crop: the same crop at the teacher's size (bicubic,
        antialiased), normalised with the teacher's mean and std."""
        x = images.float()
        if not self.renormalize:
            return x
        x = x * self.student_std + self.student_mean
        if self.resize:
            size = (self.built.image_size, self.built.image_size)
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        return (x - self.mean) / self.std

    def __call__(self, images: torch.Tensor, text: torch.Tensor, teacher_text: torch.Tensor | None = None) -> dict:
        with torch.no_grad():
            tokens = teacher_text if self.own_tokens else text
            out = self.model(self.images(images).to(self.dtype), tokens.to(self.device))
        return {
            "image_features": out["image_features"].float(),
            "text_features": out["text_features"].float(),
            "logit_scale": out["logit_scale"].float().reshape(()),
        }
