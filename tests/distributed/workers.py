"""Worker bodies for multi-process tests (importable by spawned processes)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

# A small open_clip config: fast in float64, still the real CLIP model and its towers.
MICRO_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
B = 3  # per-rank micro-batch (odd on purpose)


def _register(name: str, cfg: dict) -> None:
    """open_clip knows model ``name`` (it reads the JSON when it is added; the file is not left behind)."""
    import open_clip

    with tempfile.TemporaryDirectory(prefix="clipkit-test-") as folder:
        path = Path(folder) / f"{name}.json"
        path.write_text(json.dumps(cfg))
        open_clip.add_model_config(path)


def micro_clip(patch_dropout: float = 0.0, siglip: bool = False, seed: int = 0):
    import open_clip

    cfg = json.loads(json.dumps(MICRO_CLIP))
    cfg["vision_cfg"]["patch_dropout"] = patch_dropout
    name = f"micro-clip-pd{int(patch_dropout * 100)}"
    _register(name, cfg)
    torch.manual_seed(seed)
    kwargs = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0} if siglip else {}
    from clipkit.model import quiet_root_logger

    with quiet_root_logger():
        model = open_clip.create_model(name, output_dict=True, **kwargs).double()
    with torch.no_grad():  # move away from the init values so every gradient is non-trivial
        model.logit_scale.fill_(2.9 if not siglip else 2.0)
        if siglip:
            model.logit_bias.fill_(-2.0)
    return model.train()


def global_batch(n: int, seed: int = 123):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64)
    text = torch.randint(1, 49000, (n, 8), generator=g)
    text[:, -1] = 0
    return images, text


def reference_loss(out: dict, loss_name: str) -> torch.Tensor:
    """The plain loss on the whole batch in one process (written independently of clipkit.loss)."""
    img, txt, scale = out["image_features"], out["text_features"], out["logit_scale"]
    logits = scale * img @ txt.T
    if loss_name == "siglip":
        labels = 2 * torch.eye(len(img), dtype=logits.dtype, device=logits.device) - 1
        return -F.logsigmoid(labels * (logits + out["logit_bias"])).sum() / len(img)
    target = torch.arange(len(img), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


CASES = [
    # (name, loss, impl, chunk, K, patch_dropout)
    ("infonce-gathered", "infonce", "gathered", "auto", 1, 0.0),
    ("infonce-tiled", "infonce", "tiled", "2", 1, 0.0),
    ("siglip", "siglip", "gathered", "2", 1, 0.0),
    ("infonce-gathered-cache2", "infonce", "gathered", "auto", 2, 0.0),
    ("infonce-tiled-cache4", "infonce", "tiled", "5", 4, 0.0),
    ("siglip-cache2", "siglip", "gathered", "auto", 2, 0.0),
    ("siglip-cache4", "siglip", "gathered", "3", 4, 0.0),
    ("infonce-cache2-patchdropout", "infonce", "gathered", "auto", 2, 0.5),
]


# Distillation (distill.kind, loss impl, chunk, K): the teacher is another micro CLIP (seed 7), in eval mode.
DISTILL_CASES = [
    ("distill-logits-gathered", "logits", "gathered", "auto", 1),
    ("distill-logits-tiled", "logits", "tiled", "2", 1),
    ("distill-logits-tiled-cache2", "logits", "tiled", "5", 2),
    ("distill-logits-gathered-cache4", "logits", "gathered", "auto", 4),
    ("distill-features-cache2", "features", "gathered", "auto", 2),
]
DISTILL_WEIGHT = 0.7


def micro_teacher():
    """A teacher as ``clipkit.step`` calls it: (images, text) -> outputs without autograd."""
    model = micro_clip(seed=7).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.3)  # (its own temperature)

    def teacher(images, text, *_):
        with torch.no_grad():
            out = model(images, text)
        return {k: out[k] for k in ("image_features", "text_features", "logit_scale")}

    return teacher


def reference_distill(out: dict, teacher_out: dict, kind: str) -> torch.Tensor:
    """The distillation term on the whole batch in one process (written independently of clipkit.loss)."""
    img, txt = out["image_features"], out["text_features"]
    t_img, t_txt = teacher_out["image_features"], teacher_out["text_features"]
    if kind == "features":
        return ((1 - (img * t_img).sum(1) / img.norm(dim=1) / t_img.norm(dim=1)).mean()
                + (1 - (txt * t_txt).sum(1) / txt.norm(dim=1) / t_txt.norm(dim=1)).mean()) / 2  # fmt: skip
    student = out["logit_scale"] * img @ txt.T
    teacher = teacher_out["logit_scale"] * t_img @ t_txt.T
    i2t = -(teacher.softmax(dim=1) * student.log_softmax(dim=1)).sum(dim=1).mean()
    t2i = -(teacher.T.softmax(dim=1) * student.T.log_softmax(dim=1)).sum(dim=1).mean()
    return (i2t + t2i) / 2


def distill_exactness(rank: int, world: int, dev: torch.device) -> dict:
    """Contrastive + distillation through ``forward_backward`` with a teacher vs one process on the whole batch."""
    from clipkit.loss import build_loss
    from clipkit.loss.distill import DistillLoss
    from clipkit.step import Terms, forward_backward

    results = {}
    for name, kind, impl, chunk, K in DISTILL_CASES:
        images, text = (t.to(dev) for t in global_batch(world * K * B, seed=321))
        rows = slice(rank * K * B, (rank + 1) * K * B)
        mine = list(zip(images[rows].split(B), text[rows].split(B), strict=True))
        engine = _engine(micro_clip(), world, dev)
        loss_fn = DistillLoss(build_loss("infonce", impl, chunk), DISTILL_WEIGHT, kind, impl, chunk)
        loss, _ = forward_backward(engine, loss_fn, mine, Terms(teacher=micro_teacher()))
        total = loss.clone()
        if world > 1:
            dist.all_reduce(total)
        grads = {n: p.grad.clone() for n, p in engine.model.named_parameters()}

        ref_model = micro_clip().to(dev)
        ref_out = ref_model(images, text)
        teacher_out = micro_teacher()(images, text)
        ref_loss = reference_loss(ref_out, "infonce") + DISTILL_WEIGHT * reference_distill(ref_out, teacher_out, kind)
        ref_loss.backward()
        results[name] = _compare(total / world, grads, ref_loss, ref_model)
    return results


# CoCa (name, contrastive loss, impl, chunk, K, contrastive weight, caption weight): captions of random lengths,
# so that the ranks hold different numbers of caption tokens.
COCA_CASES = [
    ("coca-gathered", "infonce", "gathered", "auto", 1, 1.0, 2.0),
    ("coca-tiled-cache2", "infonce", "tiled", "5", 2, 0.5, 1.5),
    ("coca-siglip-cache4", "siglip", "gathered", "3", 4, 1.0, 2.0),
]
MICRO_COCA = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8,
                   "attentional_pool": True, "attn_pooler_queries": 5, "attn_pooler_heads": 2, "output_tokens": True},
    "text_cfg": {"context_length": 8, "vocab_size": 500, "width": 16, "heads": 2, "layers": 1, "embed_cls": True,
                 "output_tokens": True},
    "multimodal_cfg": {"context_length": 8, "vocab_size": 500, "width": 16, "heads": 2, "layers": 1},
    "custom_text": True,
}  # fmt: skip


def micro_coca(siglip: bool = False):
    import open_clip

    from clipkit.model import init_uninitialized, quiet_root_logger

    _register("micro-coca", MICRO_COCA)
    torch.manual_seed(0)
    kwargs = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0} if siglip else {}
    with quiet_root_logger():
        model = open_clip.create_model("micro-coca", output_dict=True, **kwargs)
    init_uninitialized(model)  # (open_clip leaves the vocabulary projection uninitialised)
    model = model.double()
    with torch.no_grad():
        model.logit_scale.fill_(2.9 if not siglip else 2.0)
    return model.train()


def caption_batch(n: int, per_rank: int, seed: int = 99):
    """Images and token ids of random lengths, then padding 0, as a CoCa tokenizer gives them; each rank's rows
    (``per_rank`` of them) run longer than the rank before's, so the ranks hold different numbers of tokens."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64)
    text = torch.randint(1, 500, (n, 8), generator=g)
    lengths = (torch.randint(2, 4, (n,), generator=g) + 2 * (torch.arange(n) // per_rank)).clamp(max=8)
    text[torch.arange(8)[None, :] >= lengths[:, None]] = 0
    return images, text


def coca_exactness(rank: int, world: int, dev: torch.device) -> dict:
    """Contrastive + captioning through ``forward_backward`` vs one process on the whole batch; also how far
    open_clip's per-rank caption mean is from the global batch's."""
    from clipkit.loss import build_loss
    from clipkit.loss.caption import CaptionLoss
    from clipkit.step import Terms, forward_backward

    results = {}
    for name, loss_name, impl, chunk, K, c_weight, cap_weight in COCA_CASES:
        siglip = loss_name == "siglip"
        images, text = (t.to(dev) for t in caption_batch(world * K * B, K * B))
        rows = slice(rank * K * B, (rank + 1) * K * B)
        mine = list(zip(images[rows].split(B), text[rows].split(B), strict=True))
        engine = _engine(micro_coca(siglip), world, dev)
        caption = CaptionLoss(cap_weight, pad_id=0)
        loss, _ = forward_backward(engine, build_loss(loss_name, impl, chunk, c_weight), mine, Terms(caption=caption))
        total = loss.clone()
        if world > 1:
            dist.all_reduce(total)
        grads = {n: p.grad.clone() for n, p in engine.model.named_parameters()}

        ref_model = micro_coca(siglip).to(dev)
        ref_out = ref_model(images, text)
        if siglip:
            ref_out["logit_bias"] = ref_model.logit_bias
        ref_caption = F.cross_entropy(ref_out["logits"].permute(0, 2, 1), ref_out["labels"], ignore_index=0)
        ref_loss = c_weight * reference_loss(ref_out, loss_name) + cap_weight * ref_caption
        ref_loss.backward()
        results[name] = _compare(total / world, grads, ref_loss, ref_model)

        # open_clip's CoCaLoss takes the mean over each rank's own tokens, then DDP averages the ranks' gradients:
        # its gradient with respect to this rank's logits, against the global batch mean's (clipkit's).
        with torch.no_grad():
            logits = ref_model(images[rows], text[rows])["logits"]
        grads = []
        for reduction, divisor in (("mean", world), ("sum", (text[:, 1:] != 0).sum())):
            leaf = logits.clone().requires_grad_()
            ce = F.cross_entropy(leaf.permute(0, 2, 1), text[rows, 1:], ignore_index=0, reduction=reduction)
            (ce / divisor).backward()
            grads.append(leaf.grad)
        err = torch.stack([(grads[0] - grads[1]).abs().max() / grads[1].abs().max()])
        if world > 1:
            dist.all_reduce(err, op=dist.ReduceOp.MAX)
        results[name]["open_clip_caption_grad_rel_err"] = err.item()
    return results


# ITM (name, contrastive loss, K, canonical ids): BLIP's hard-negative matching term beside the contrastive loss.
# "shuffled": each row's id (its place in the canonical global batch) is a fixed permutation of its position, as
# the loader's rows come in another order on another layout; the reference is one process on the rows in id order.
ITM_CASES = [
    ("itm-infonce", "infonce", 1, False),
    ("itm-infonce-cache2-shuffled", "infonce", 2, True),
    ("itm-siglip-cache4", "siglip", 4, False),
    ("itm-coca-shuffled", "coca", 1, True),
]
ITM_WEIGHT, ITM_SEED, ITM_STEP = 0.8, 5, 17


def micro_itm(kind: str):
    from clipkit import itm

    model = micro_coca() if kind == "coca" else micro_clip(siglip=kind == "siglip")
    torch.manual_seed(11)
    itm.attach(model, 16, 8)
    return model.double()


def reference_itm(out: dict, head, seed: int, step: int) -> torch.Tensor:
    """The ITM term on the whole batch in one process, rows in id order (written independently of clipkit.loss):
    each row's negative by a scan of the cumulative softmax over the other columns."""
    from clipkit.loss.itm import draws  # (the seeded uniforms are the spec, not the implementation)

    img, txt, scale = out["image_features"], out["text_features"], out["logit_scale"].detach()
    n = len(img)
    u = draws(seed, step, n)
    picks = []
    for which, (rows, cols) in enumerate(((img, txt), (txt, img))):
        chosen = []
        for i in range(n):
            others = [j for j in range(n) if j != i]
            p = torch.softmax(torch.stack([scale * rows[i].detach() @ cols[j].detach() for j in others]), dim=0)
            target, acc = u[which, i].item() * p.sum().item(), 0.0
            pick = others[-1]
            for j, pj in zip(others, p.tolist(), strict=True):
                acc += pj
                if acc > target:
                    pick = j
                    break
            chosen.append(pick)
        picks.append(chosen)
    images = torch.cat([img, img, img[picks[1]]])
    texts = torch.cat([txt, txt[picks[0]], txt])
    w1, b1, w2, b2 = head.fc1.weight, head.fc1.bias, head.fc2.weight, head.fc2.bias
    d = images.shape[1]
    hidden = F.gelu(torch.cat([d**0.5 * images, d**0.5 * texts, d * images * texts], dim=1) @ w1.T + b1)
    logits = (hidden @ w2.T + b2)[:, 0]
    labels = torch.cat([torch.ones(n), torch.zeros(2 * n)]).to(logits)
    return F.binary_cross_entropy_with_logits(logits, labels)


def itm_exactness(rank: int, world: int, dev: torch.device) -> dict:
    """Contrastive + ITM through ``forward_backward`` vs one process on the whole batch in id order."""
    from clipkit.loss import build_loss
    from clipkit.loss.caption import CaptionLoss
    from clipkit.loss.itm import ITMLoss
    from clipkit.step import Terms, forward_backward

    results = {}
    for name, kind, K, shuffled in ITM_CASES:
        n = world * K * B
        batch = caption_batch(n, K * B) if kind == "coca" else global_batch(n, seed=77)
        images, text = (t.to(dev) for t in batch)
        ids = torch.randperm(n, generator=torch.Generator().manual_seed(3)) if shuffled else torch.arange(n)
        rows = slice(rank * K * B, (rank + 1) * K * B)
        mine = list(zip(images[rows].split(B), text[rows].split(B), strict=True))
        engine = _engine(micro_itm(kind), world, dev)
        loss_name = "siglip" if kind == "siglip" else "infonce"
        term = ITMLoss(ITM_WEIGHT, ITM_SEED).at(ITM_STEP, ids[rows] if shuffled else None, n, dev)
        caption = CaptionLoss(2.0, pad_id=0) if kind == "coca" else None
        loss, _ = forward_backward(engine, build_loss(loss_name, "gathered"), mine, Terms(caption=caption, itm=term))
        total = loss.clone()
        if world > 1:
            dist.all_reduce(total)
        grads = {n: p.grad.clone() for n, p in engine.model.named_parameters()}

        ref_model = micro_itm(kind).to(dev)
        order = ids.argsort()  # the rows in id order: the canonical global batch
        ref_out = ref_model(images[order], text[order])
        if kind == "siglip":
            ref_out["logit_bias"] = ref_model.logit_bias
        ref_loss = reference_loss(ref_out, loss_name)
        ref_loss = ref_loss + ITM_WEIGHT * reference_itm(ref_out, ref_model.itm_head, ITM_SEED, ITM_STEP)
        if kind == "coca":
            ref_loss = ref_loss + 2.0 * F.cross_entropy(
                ref_out["logits"].permute(0, 2, 1), ref_out["labels"], ignore_index=0
            )
        ref_loss.backward()
        results[name] = _compare(total / world, grads, ref_loss, ref_model)
    return results


def _compare(loss: torch.Tensor, grads: dict, ref_loss: torch.Tensor, ref_model) -> dict:
    """A case's result: its loss and gradients against the single-process reference's."""
    errs = {n: _rel_err(grads[n], p.grad) for n, p in ref_model.named_parameters() if p.grad is not None}
    return {
        "loss": loss.item(),
        "ref_loss": ref_loss.item(),
        "max_grad_rel_err": max(errs.values()),
        "worst_param": max(errs, key=errs.get),
        "logit_scale_rel_err": errs["logit_scale"],
        "logit_bias_rel_err": errs.get("logit_bias"),
        "missing_grads": [n for n, p in ref_model.named_parameters() if p.grad is None or grads.get(n) is None],
    }


def _engine(model, world: int, device: torch.device = torch.device("cpu")):
    from clipkit.config import RootConfig
    from clipkit.distributed import DistEnv
    from clipkit.engine import build_engine

    cfg = RootConfig()
    cfg.train.precision = "fp32"
    rank = dist.get_rank() if world > 1 else 0
    return build_engine(model.to(device), cfg, DistEnv(rank=rank, world_size=world, local_rank=rank, device=device))


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def loss_exactness(rank: int, world: int, port: int, out_path: str, device: str = "cpu") -> None:
    """Every case at this world size: clipkit's distributed step vs the single-process reference (on ``device``:
    gloo on CPU, NCCL on CUDA, one GPU per rank)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dev = torch.device(device, rank) if device == "cuda" else torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from clipkit.loss import build_loss
    from clipkit.step import forward_backward

    results = {}
    for name, loss_name, impl, chunk, K, pdrop in CASES:
        siglip = loss_name == "siglip"
        images, text = (t.to(dev) for t in global_batch(world * K * B))
        rows = slice(rank * K * B, (rank + 1) * K * B)
        mine = list(zip(images[rows].split(B), text[rows].split(B), strict=True))
        engine = _engine(micro_clip(pdrop, siglip), world, dev)
        torch.manual_seed(1000 + rank)  # patch-dropout randomness differs per rank, as in training
        start_rng = torch.get_rng_state()
        loss, _ = forward_backward(engine, build_loss(loss_name, impl, chunk), mine)
        total = loss.clone()
        if world > 1:
            dist.all_reduce(total)
        grads = {n: p.grad.clone() for n, p in engine.model.named_parameters()}

        # Reference: one process, the whole global batch. With patch dropout, the model's randomness must be
        # the same as each rank's no-grad pass saw, so the reference replays every rank's micro-batches in
        # turn from that rank's RNG seed and takes the plain loss on the concatenated outputs.
        ref_model = micro_clip(pdrop, siglip).to(dev)
        if pdrop:
            outs = []
            for r in range(world):
                torch.manual_seed(1000 + r)
                rr = slice(r * K * B, (r + 1) * K * B)
                outs += [ref_model(i, t) for i, t in zip(images[rr].split(B), text[rr].split(B), strict=True)]
            ref_out = {k: torch.cat([o[k] for o in outs]) for k in ("image_features", "text_features")}
            ref_out["logit_scale"] = outs[-1]["logit_scale"]
        else:
            ref_out = ref_model(images, text)
        ref_out.setdefault("logit_bias", ref_model.logit_bias.exp().log() if siglip else None)
        if siglip:
            ref_out["logit_bias"] = ref_model.logit_bias
        ref_loss = reference_loss(ref_out, loss_name)
        ref_loss.backward()
        torch.set_rng_state(start_rng)
        results[name] = _compare(total / world, grads, ref_loss, ref_model)
    results.update(distill_exactness(rank, world, dev))
    results.update(coca_exactness(rank, world, dev))
    results.update(itm_exactness(rank, world, dev))
    if world > 1:
        results.update(open_clip_parity(rank, world, dev))
        dist.barrier()
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))
    if world > 1:
        dist.destroy_process_group()


def open_clip_parity(rank: int, world: int, device: torch.device = torch.device("cpu")) -> dict:
    """clipkit's losses vs open_clip's exact modes on the same embeddings: values and embedding gradients."""
    import warnings

    from open_clip.loss import ClipLoss, DistillClipLoss, SigLipLoss

    from clipkit.loss import InfoNCELoss, SigLIPLoss
    from clipkit.loss.distill import DistillLoss

    out = {}
    g = torch.Generator().manual_seed(7 + rank)
    img = F.normalize(torch.randn(5, 16, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(5, 16, generator=g, dtype=torch.float64), dim=-1)
    img, txt = img.to(device), txt.to(device)
    scale, bias = (torch.tensor(v, dtype=torch.float64, device=device) for v in (12.0, -3.0))
    pairs = [
        (
            "open_clip ClipLoss(local_loss, gather_with_grad)",
            InfoNCELoss("tiled", "3"),
            ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world),
        ),
        ("open_clip SigLipLoss", SigLIPLoss("2"), SigLipLoss(rank=rank, world_size=world)),
    ]
    for name, ours, theirs in pairs:
        vals, grads = [], []
        for fn in (ours, theirs):
            i, t, s = img.clone().requires_grad_(), txt.clone().requires_grad_(), scale.clone().requires_grad_()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loss = fn(i, t, s, bias) if isinstance(fn, (SigLIPLoss, SigLipLoss)) else fn(i, t, s)
            loss.backward()
            vals.append(loss.item())
            grads.append(torch.cat([i.grad.flatten(), t.grad.flatten(), s.grad.flatten()]))
        out[name] = {"loss": vals[0], "ref_loss": vals[1], "max_grad_rel_err": _rel_err(grads[0], grads[1])}

    # Distillation: open_clip's DistillClipLoss (its two terms summed) on the same student and teacher embeddings.
    t_img = F.normalize(torch.randn(5, 16, generator=g, dtype=torch.float64), dim=-1).to(device)
    t_txt = F.normalize(torch.randn(5, 16, generator=g, dtype=torch.float64), dim=-1).to(device)
    t_scale = torch.tensor(20.0, dtype=torch.float64, device=device)
    theirs = DistillClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    for impl, chunk in (("gathered", "auto"), ("tiled", "2")):
        vals, grads = [], []
        ours = DistillLoss(InfoNCELoss(impl, chunk), 1.0, "logits", impl, chunk)
        for fn in (ours, theirs):
            i, t, s = img.clone().requires_grad_(), txt.clone().requires_grad_(), scale.clone().requires_grad_()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if fn is ours:
                    loss = fn(
                        i, t, s, teacher={"image_features": t_img, "text_features": t_txt, "logit_scale": t_scale}
                    )
                else:
                    loss = sum(fn(i, t, s, t_img, t_txt, t_scale))
            loss.backward()
            vals.append(loss.item())
            grads.append(torch.cat([i.grad.flatten(), t.grad.flatten(), s.grad.flatten()]))
        out[f"open_clip DistillClipLoss ({impl})"] = {
            "loss": vals[0], "ref_loss": vals[1], "max_grad_rel_err": _rel_err(grads[0], grads[1])
        }  # fmt: skip
    return out


def loader_epoch_keys(rank: int, world: int, port: int, out_path: str, shard_spec: str, workers: int) -> None:
    """Each rank streams with its own TrainLoader (real DataLoader workers) until every stream finished epoch 0;
    rank 0 gathers the keys of epoch 0 and the number of steps every rank ran."""
    import open_clip

    from clipkit.data.loader import SampleDecoder, TrainLoader, resolve_shards

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    shards, weights = resolve_shards(shard_spec)
    loader = TrainLoader(
        shards,
        weights,
        SampleDecoder(("jpg",), "json:captions", 32, (0.9, 1.0), 0),
        open_clip.get_tokenizer("ViT-B-32"),
        mode="epoch",
        seed=5,
        rank=rank,
        world_size=world,
        num_workers=workers,
        batch_size=24,  # (3 workers: each reads its stream's 8 samples per step)
        window=64,
    )
    keys, steps = [], 0
    while True:  # all ranks step together (as training does) until every rank's streams are past epoch 0
        batch = next(loader)
        steps += 1
        keys += [k for k, e in zip(batch["keys"], batch["epochs"], strict=True) if e == 0]
        done = torch.tensor(int(all(e >= 1 for e, _ in loader.positions.values())))
        dist.all_reduce(done, op=dist.ReduceOp.MIN)
        if done.item():
            break
    gathered = [None] * world
    dist.all_gather_object(gathered, {"keys": keys, "steps": steps})
    if rank == 0:
        Path(out_path).write_text(json.dumps(gathered))
    dist.destroy_process_group()


READS = ("item", "tolist", "__bool__", "__float__", "__int__")
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "reduce_scatter_tensor",
    "broadcast",
    "barrier",
    "all_gather_object",
    "broadcast_object_list",
)


def count_host_syncs(rank: int, world: int, port: int, out_path: str, cache_dir: str, overrides: list[str]) -> None:
    """Runs ``clipkit.train.train`` for real on ``world`` gloo ranks while counting, between consecutive step
    boundaries, the host reads of tensors made from clipkit's code (``item``/``tolist``/``bool``/``float``/
    ``int``) and every ``torch.distributed`` collective. Rank 0 writes the per-step counts."""
    import collections
    import sys

    from clipkit import faults
    from clipkit.cli import compose

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    os.environ.update(CLIPKIT_CACHE=cache_dir, OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    counts: collections.Counter = collections.Counter()
    clipkit_dir = str(Path(__file__).resolve().parents[2] / "clipkit")

    def counting_read(name, original):
        def wrapper(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(clipkit_dir):
                counts["reads"] += 1
                counts[f"read:{Path(sys._getframe(1).f_code.co_filename).name}:{sys._getframe(1).f_lineno}"] += 1
            return original(self, *args, **kwargs)

        return wrapper

    def counting_collective(name, original):
        def wrapper(*args, **kwargs):
            counts["collectives"] += 1
            counts[f"collective:{name}"] += 1
            return original(*args, **kwargs)

        return wrapper

    for name in READS:
        setattr(torch.Tensor, name, counting_read(name, getattr(torch.Tensor, name)))
    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, counting_collective(name, getattr(dist, name)))

    per_step = []
    original_at = faults.at

    def at(point: str, step: int) -> None:  # the loop calls faults.at("step", N) after the update of step N
        if point == "step":
            per_step.append({"step": step, **counts})
            counts.clear()
        original_at(point, step)

    faults.at = at
    cfg, _ = compose(overrides)
    from clipkit.train import train

    run_dir = Path(out_path).parent / f"run{world}"
    run_dir.mkdir(exist_ok=True)
    train(cfg, run_dir)
    if rank == 0:
        Path(out_path).write_text(json.dumps(per_step))


def zero_precision_and_offload(rank: int, world: int, port: int, out_path: str) -> None:
    """For the local engine and ZeRO-1/2/3 (and ZeRO with optimizer / parameter offload): the autocast state and
    a block's output dtype inside the model's forward under ``train.precision=bf16``, and the parameters after two
    fp32 steps. ``torch.is_autocast_enabled()`` without a device reports CUDA's state, which a CPU run never sets;
    here it reports the CPU's, as it reports CUDA's on a GPU: DeepSpeed's forward then meets the same outer
    autocast it meets there."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.set_num_threads(1)
    real = torch.is_autocast_enabled
    torch.is_autocast_enabled = lambda device_type=None: real("cpu" if device_type is None else device_type)
    from clipkit.config import RootConfig
    from clipkit.distributed import DistEnv
    from clipkit.engine import build_engine

    images, text = global_batch(4)
    images, text = images.float(), text
    result: dict = {"precision": {}, "params": {}}
    result["init"] = {n: p.detach().float().flatten().tolist() for n, p in micro_clip().float().named_parameters()}
    variants = {
        "ddp": {},
        "zero1": {},
        "zero2": {},
        "zero3": {},
        "zero1+offload": {"offload_optimizer": True},
        "zero2+offload": {"offload_optimizer": True},
        "zero3+offload": {"offload_optimizer": True, "offload_params": True},
    }
    for name, offload in variants.items():
        for precision in ("bf16", "fp32"):
            cfg = RootConfig()
            cfg.train.precision, cfg.parallel.engine = precision, name.split("+")[0]
            cfg.optim.lr, cfg.optim.warmup_steps = 1e-3, 0
            for key, value in offload.items():
                setattr(cfg.parallel, key, value)
            model = micro_clip().float()
            seen = {}

            def hook(module, args, out, seen=seen):
                seen.update(autocast=real("cpu"), dtype=str(torch.get_autocast_dtype("cpu")), out=str(out.dtype))

            model.visual.transformer.resblocks[0].register_forward_hook(hook)
            engine = build_engine(model, cfg, DistEnv())
            if precision == "bf16":
                engine.forward(images, text)
                result["precision"][name] = seen
                continue
            for _ in range(2):
                out = engine.forward(images, text)
                loss = (out["image_features"] @ out["text_features"].T).logsumexp(1).mean() * out["logit_scale"]
                engine.backward([loss])
                engine.step()
            with engine.full_params():
                result["params"][name] = {n: p.detach().float().flatten().tolist() for n, p in model.named_parameters()}
    Path(out_path).write_text(json.dumps(result))


def compiled_vs_eager(rank: int, world: int, port: int, out_path: str) -> None:
    """``train.compile=model`` against eager, for the single-process (DDP's) engine and FSDP: 5 steps of a micro
    CLIP with 1 block per tower (3 under FSDP), in fp32; the losses and final parameters of each, and the graphs
    dynamo made (whole-model compile: one; FSDP's per-block compile: one per tower, the blocks of a tower sharing
    it); then ``compiled_steps``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from torch._dynamo.utils import counters

    from clipkit.config import RootConfig
    from clipkit.distributed import DistEnv
    from clipkit.engine import build_engine

    result = {}
    for engine_name in ("ddp", "fsdp"):
        # One block per tower for the whole-model compile (inductor, empty cache, 2 cores: 24 s; 38 s with 3);
        # FSDP compiles block by block, so its 3 blocks cost one block's compile (12 s) and show the sharing.
        MICRO_CLIP["vision_cfg"]["layers"] = MICRO_CLIP["text_cfg"]["layers"] = 3 if engine_name == "fsdp" else 1
        for compiled in (False, True):
            cfg = RootConfig()
            cfg.train.precision, cfg.parallel.engine = "fp32", engine_name
            cfg.train.compile = "model" if compiled else "false"
            cfg.optim.lr, cfg.optim.warmup_steps = 1e-3, 0
            counters.clear()
            engine = build_engine(micro_clip().float(), cfg, DistEnv())
            losses = []
            for step in range(5):
                images, text = global_batch(6, seed=step)
                out = engine.forward(images.float(), text)
                logits = out["image_features"] @ out["text_features"].T * out["logit_scale"]
                loss = (logits.logsumexp(1) - logits.diagonal()).mean()
                engine.backward([loss])
                engine.step()
                losses.append(loss.item())
            params = {
                n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().flatten().tolist()
                for n, p in engine.model.named_parameters()
            }
            result[f"{engine_name}-{'compiled' if compiled else 'eager'}"] = {
                "losses": losses,
                "params": params,
                "graphs": counters["stats"]["unique_graphs"],
                "graph_breaks": sum(counters["graph_break"].values()),
            }
            if engine_name == "fsdp":
                dist.destroy_process_group()
    result.update(compiled_steps())
    Path(out_path).write_text(json.dumps(result))


def compiled_steps() -> dict:
    """``train.compile=step`` against eager ``train_step``: 10 steps of the micro CLIP with clipkit's InfoNCE loss,
    gradient clipping and a warmup (the learning rate changes every step), in fp32; step 7's batch holds a NaN, so
    its update must be skipped on the device. One block per tower: inductor took 61 s for it with an empty cache,
    110 s with 3 blocks. Per step: loss, norm, applied; at the end the
    parameters, the optimizer's step counts, and the graphs and graph breaks dynamo made."""
    from torch._dynamo.utils import counters

    from clipkit.config import RootConfig
    from clipkit.distributed import DistEnv
    from clipkit.engine import build_engine
    from clipkit.loss import build_loss
    from clipkit.step import CompiledStep, train_step

    MICRO_CLIP["vision_cfg"]["layers"] = MICRO_CLIP["text_cfg"]["layers"] = 1
    result = {}
    for mode in ("false", "step"):
        cfg = RootConfig()
        cfg.train.precision, cfg.train.compile, cfg.train.steps = "fp32", mode, 10
        cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.grad_clip_norm = 1e-3, 4, 1.0
        counters.clear()
        engine = build_engine(micro_clip().float(), cfg, DistEnv())
        step = CompiledStep(engine) if mode == "step" else train_step
        loss_fn, steps = build_loss("infonce"), []
        for i in range(10):
            images, text = global_batch(6, seed=i)
            images = images.float()
            if i == 6:
                images[0, 0, 0, 0] = float("nan")
            before = [p.detach().clone() for p in engine.model.parameters()]
            r = step(engine, loss_fn, [(images, text)])
            unchanged = all(torch.equal(a, p) for a, p in zip(before, engine.model.parameters(), strict=True))
            steps.append({"loss": r.loss.item(), "norm": r.grad_norm.item(), "applied": bool(r.applied),
                          "unchanged": unchanged, "lr": engine.lr})  # fmt: skip
        result[f"step-{mode}"] = {
            "steps": steps,
            "params": {n: p.detach().flatten().tolist() for n, p in engine.model.named_parameters()},
            "adam_steps": sorted({float(s["step"]) for s in engine.optimizer.state.values()}),
            "graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "break_reasons": list(counters["graph_break"]),
        }
    return result
