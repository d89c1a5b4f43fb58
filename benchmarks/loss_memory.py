"""Peak memory and time of the contrastive loss (forward + backward) versus global batch size.

Compares clipkit's gathered InfoNCE, tiled InfoNCE and SigLIP with open_clip's ClipLoss and SigLipLoss, on
the same embeddings, one process per measurement (fresh allocator). It measures the loss alone: embeddings
of the global batch are inputs (requires_grad), as a rank sees them after the all-gather.

--world W simulates one rank of a W-rank job: the rank has B = N/W local rows and N gathered columns (clipkit
computes B x N; open_clip's default ClipLoss computes the full N x N on every rank, so it is measured as
one process with N rows). W=1 is a single process on the whole batch.

CPU memory is the process's peak RSS above the baseline (reset via /proc/self/clear_refs); GPU memory is
torch.cuda.max_memory_allocated above the inputs. Prints a table, writes JSON (and a PNG if matplotlib is
installed).

    python benchmarks/loss_memory.py --batches 2048 4096 8192 16384 --dim 512
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

IMPLS = ["clipkit-gathered", "clipkit-tiled", "clipkit-siglip", "open_clip-ClipLoss", "open_clip-SigLipLoss"]


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def measure(impl: str, n: int, dim: int, world: int, device: str, repeats: int) -> dict:
    """One measurement (run in its own process)."""
    import torch
    import torch.nn.functional as F

    import clipkit.loss.contrastive as L

    torch.manual_seed(0)
    rows = n // world if impl.startswith("clipkit") else n
    dev = torch.device(device)
    cols_img = F.normalize(torch.randn(n, dim, device=dev), dim=-1)
    cols_txt = F.normalize(torch.randn(n, dim, device=dev), dim=-1)
    img = cols_img[:rows].clone().requires_grad_()
    txt = cols_txt[:rows].clone().requires_grad_()
    scale = torch.tensor(math.log(1 / 0.07), device=dev).exp().requires_grad_()
    bias = torch.tensor(-10.0, device=dev, requires_grad=True)

    if impl.startswith("clipkit") and world > 1:
        # Simulated rank 0 of `world`: the gather returns the local rows followed by the other ranks' rows.
        L.rank_and_world = lambda: (0, world)
        others = {id(img): cols_img[rows:], id(txt): cols_txt[rows:]}
        L.all_gather_with_grad = lambda x: torch.cat([x, others[id(x)]])
    if impl == "clipkit-gathered":
        fn = lambda: L.InfoNCELoss("gathered")(img, txt, scale)  # noqa: E731
    elif impl == "clipkit-tiled":
        fn = lambda: L.InfoNCELoss("tiled", "auto")(img, txt, scale)  # noqa: E731
    elif impl == "clipkit-siglip":
        fn = lambda: L.SigLIPLoss("auto")(img, txt, scale, bias)  # noqa: E731
    else:
        from open_clip.loss import ClipLoss, SigLipLoss

        oc = ClipLoss() if impl == "open_clip-ClipLoss" else SigLipLoss()
        fn = (lambda: oc(img, txt, scale)) if impl == "open_clip-ClipLoss" else (lambda: oc(img, txt, scale, bias))

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    fn().backward()  # warm-up
    sync()
    times = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")
        base = _rss_kib("VmRSS") * 1024
    for _ in range(repeats):
        img.grad = txt.grad = scale.grad = bias.grad = None
        t0 = time.perf_counter()
        fn().backward()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else _rss_kib("VmHWM") * 1024
    return {
        "impl": impl,
        "global_batch": n,
        "local_rows": rows,
        "dim": dim,
        "world": world,
        "device": device,
        "peak_loss_mem_MiB": max(0, peak - base) / 2**20,
        "time_s": min(times),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    ap.add_argument("--max-mem-gib", type=float, default=18.0, help="skip points whose N x N logits would exceed this")
    ap.add_argument("--out", default="benchmarks/out/loss_memory.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # child process: a single measurement
        impl, n = args.one.rsplit(":", 1)
        print(json.dumps(measure(impl, int(n), args.dim, args.world, args.device, args.repeats)))
        return

    rows = []
    for n in args.batches:
        for impl in args.impls:
            if impl == "open_clip-SigLipLoss" and args.world > 1:
                # Its per-rank memory (W exchanged B x B blocks kept for backward) is not reproducible in one
                # process without its ring exchange; measure it at --world 1 or on real ranks.
                rows.append({"impl": impl, "global_batch": n, "skipped": "needs real ranks"})
                continue
            full_matrix = impl.startswith("open_clip") or impl == "clipkit-gathered"
            local = n // args.world if impl == "clipkit-gathered" else n
            if full_matrix and 4 * 4 * local * n / 2**30 > args.max_mem_gib:
                rows.append({"impl": impl, "global_batch": n, "skipped": "does not fit"})
                continue
            cmd = [
                sys.executable,
                __file__,
                "--one",
                f"{impl}:{n}",
                "--dim",
                str(args.dim),
                "--world",
                str(args.world),
                "--device",
                args.device,
                "--repeats",
                str(args.repeats),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append({"impl": impl, "global_batch": n, "skipped": proc.stderr.strip().splitlines()[-1][:80]})
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{impl:22s} N={n:7d}  mem {r['peak_loss_mem_MiB']:9.1f} MiB  time {r['time_s']:8.3f} s", flush=True)

    print(f"\nloss forward+backward, dim {args.dim}, world {args.world} (simulated), device {args.device}")
    header = f"{'global batch':>12} | " + " | ".join(f"{i:>22}" for i in args.impls)
    print(header + "\n" + "-" * len(header))
    for n in args.batches:
        cells = []
        for impl in args.impls:
            r = next(x for x in rows if x["impl"] == impl and x["global_batch"] == n)
            cells.append(
                f"{'skipped':>22}" if "skipped" in r else f"{r['peak_loss_mem_MiB']:9.0f} MiB {r['time_s']:7.2f} s"
            )
        print(f"{n:>12} | " + " | ".join(cells))
    meta = {
        "machine": platform.node(),
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "argv": sys.argv,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(meta, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for impl in args.impls:
            pts = [
                (r["global_batch"], r["peak_loss_mem_MiB"]) for r in rows if r["impl"] == impl and "skipped" not in r
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=impl)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="global batch",
            ylabel="peak loss memory (MiB)",
            title=f"contrastive loss memory, D={args.dim}, world={args.world}, {args.device}",
        )
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
        fig.savefig(Path(args.out).with_suffix(".png"), dpi=120, bbox_inches="tight")
    except ImportError:
        print("(matplotlib not installed: no plot)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
