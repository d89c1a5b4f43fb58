"""Eval throughput and retrieval memory: clipkit's eval pipeline vs CLIP_benchmark's, on the same model and data.

1. Embedding throughput (images/s): an image folder of synthetic JPEGs through clipkit's eval path (source ->
   loader -> open_clip preprocess -> encode_image) and through CLIP_benchmark's usual path (torchvision
   ImageFolder + the same preprocess + DataLoader), same model, batch and workers, back to back.
2. Retrieval metrics at scale (random unit embeddings, D=512): wall time and peak resident memory of
   clipkit's chunked ``retrieval_metrics`` at 10k images x 50k captions and 100k x 100k, and of
   CLIP_benchmark's full-matrix metric code where it fits (10k x 50k).

    python benchmarks/eval_throughput.py [--images 512 --models clipkit-tiny ViT-B-32 --workers 1 --device cpu]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from results_io import write_results  # benchmarks/ is on sys.path when run as a script


def make_folder(root: Path, num_images: int, num_classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    for i in range(num_images):
        d = root / f"class_{i % num_classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        arr = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
        img = Image.fromarray(arr).resize((320, 256), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        (d / f"{i:05d}.jpg").write_bytes(buf.getvalue())


def _encode(model, images: torch.Tensor) -> None:
    """encode_image on the model's device (bf16 autocast on CUDA, as both eval paths run there)."""
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        model.encode_image(images.to(device, non_blocking=True))
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def clipkit_rate(model, transform, folder: Path, batch: int, workers: int) -> float:
    from clipkit.eval import data as eval_data

    loader = eval_data.loader(eval_data.image_folder(folder), transform, 0, 1, batch, workers)
    n, t0 = 0, time.perf_counter()
    for b in loader:
        _encode(model, b["image"])
        n += len(b["index"])
    return n / (time.perf_counter() - t0)


@torch.no_grad()
def clip_benchmark_rate(model, transform, folder: Path, batch: int, workers: int) -> float:
    from torchvision.datasets import ImageFolder

    loader = torch.utils.data.DataLoader(ImageFolder(str(folder), transform=transform), batch, num_workers=workers)
    n, t0 = 0, time.perf_counter()
    for images, _ in loader:  # what clip_benchmark's run_classification does per batch
        _encode(model, images)
        n += images.shape[0]
    return n / (time.perf_counter() - t0)


CPU = torch.device("cpu")


def retrieval_case(n_img: int, n_txt: int, dim: int = 512, with_reference: bool = False) -> dict:
    from clipkit.eval.retrieval import retrieval_metrics
    from clipkit.metrics import peak_memory_gb, reset_peak_memory, resident_memory_gb

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(n_img, dim, generator=g), dim=-1)
    owner = torch.arange(n_txt) * n_img // n_txt  # grouped, ~n_txt/n_img captions per image
    txt = torch.nn.functional.normalize(img[owner] + 2.0 * torch.randn(n_txt, dim, generator=g), dim=-1)
    base = resident_memory_gb()
    reset_peak_memory(CPU)
    t0 = time.perf_counter()
    ours = retrieval_metrics(img, txt, owner)
    row = {
        "images": n_img,
        "captions": n_txt,
        "clipkit_s": time.perf_counter() - t0,
        "clipkit_peak_extra_gb": peak_memory_gb(CPU) - base,
        "full_matrix_gb": n_img * n_txt * 4 / 1024**3,
        "clipkit_R@1_i2t": ours["image_to_text_R@1"],
    }
    if with_reference:
        from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

        reset_peak_memory(CPU)
        base = resident_memory_gb()
        t0 = time.perf_counter()
        scores = txt @ img.T
        positive = torch.zeros_like(scores, dtype=torch.bool)
        positive[torch.arange(n_txt), owner] = True
        ref = (batchify(recall_at_k, scores.T, positive.T, 64, "cpu", k=1) > 0).float().mean().item()
        row.update(
            {
                "clip_benchmark_s": time.perf_counter() - t0,
                "clip_benchmark_peak_extra_gb": peak_memory_gb(CPU) - base,
                "clip_benchmark_R@1_i2t": ref,
            }
        )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--models", nargs="+", default=["clipkit-tiny", "ViT-B-32"])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--skip-retrieval", action="store_true")
    parser.add_argument("--device", default="cpu", help="where the model embeds (cuda: bf16 autocast)")
    parser.add_argument("--out", default="benchmarks/out/eval_throughput.json")
    args = parser.parse_args()
    torch.manual_seed(0)

    from clipkit import model as model_lib
    from clipkit.eval.embedding import eval_transform
    from clipkit.model_config import ModelConfig

    results = {"args": vars(args), "throughput": [], "retrieval": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "folder"
        make_folder(folder, args.images)
        print("| model | clipkit img/s | CLIP_benchmark img/s | ratio |\n|---|---:|---:|---:|")
        for name in args.models:
            model = model_lib.build(ModelConfig(name=name), args.device).model.eval()
            transform = eval_transform(model)
            clipkit_rate(model, transform, folder, args.batch, args.workers)  # warm-up (page cache, threads)
            ours = clipkit_rate(model, transform, folder, args.batch, args.workers)
            ref = clip_benchmark_rate(model, transform, folder, args.batch, args.workers)
            results["throughput"].append({"model": name, "clipkit": ours, "clip_benchmark": ref})
            print(f"| {name} | {ours:.0f} | {ref:.0f} | {ours / ref:.2f} |", flush=True)

    if not args.skip_retrieval:
        print(
            "\n| images x captions | clipkit s | clipkit peak extra GB | full matrix GB "
            "| CLIP_benchmark s | CLIP_benchmark peak extra GB |\n|---|---:|---:|---:|---:|---:|"
        )
        for n_img, n_txt, ref in ((10_000, 50_000, True), (100_000, 100_000, False)):
            r = retrieval_case(n_img, n_txt, with_reference=ref)
            results["retrieval"].append(r)
            cb = (
                f"{r['clip_benchmark_s']:.1f} | {r['clip_benchmark_peak_extra_gb']:.2f}"
                if ref
                else "not run (needs the full matrix) | -"
            )
            print(
                f"| {n_img // 1000}k x {n_txt // 1000}k | {r['clipkit_s']:.1f} | {r['clipkit_peak_extra_gb']:.2f} "
                f"| {r['full_matrix_gb']:.1f} | {cb} |",
                flush=True,
            )
            if ref:
                assert abs(r["clipkit_R@1_i2t"] - r["clip_benchmark_R@1_i2t"]) < 1e-6, r
    write_results(args.out, results)


if __name__ == "__main__":
    main()
