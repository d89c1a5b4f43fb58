"""Where a step's time and memory go at scale: a communication and memory model per engine (paper figures).

For ViT-B/16 and ViT-L/14 at 8, 64 and 512 GPUs and a 32k-256k global batch, per GPU and per step:
  - the embedding all-gather of the contrastive loss (image + text, forward) and its gradient reduce-scatter;
  - gradient all-reduce (DDP, ZeRO-1) or reduce-scatter + parameter all-gather (ZeRO-2), plus ZeRO-3's second
    parameter all-gather in backward;
  - model-state memory (fp32 weights, grads, AdamW moments) per engine; the loss's logits memory, gathered
    (B x N) vs clipkit's tiled loss (B x chunk);
  - compute time at an assumed MFU, and communication time at assumed bus bandwidths, so the table says which
    dominates.
Parameter counts and forward FLOPs are measured on the real open_clip models (torch's FlopCounterMode, one
sample); bandwidths and MFU are stated assumptions (edit them on the command line).

    python benchmarks/scale_model.py [--mfu 0.4 --peak-tflops 989 --intra-gbps 360 --inter-gbps 45]
"""

from __future__ import annotations

import argparse

import torch
from results_io import write_results  # benchmarks/ is on sys.path when run as a script
from torch.utils.flop_counter import FlopCounterMode

MODELS = {"ViT-B-16": "ViT-B/16", "ViT-L-14": "ViT-L/14"}
GPUS = (8, 64, 512)
BATCHES = (32_768, 65_536, 131_072, 262_144)
GB = 1e9


def measure(name: str) -> dict:
    """Parameters, embedding width and forward FLOPs per (image, caption) pair of the open_clip model."""
    import open_clip

    # Train mode with autograd on: nn.MultiheadAttention's inference fast path is invisible to the counter.
    model = open_clip.create_model(name, device="cpu", output_dict=True).train()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    image, text = torch.zeros(1, 3, size, size), torch.zeros(1, model.context_length, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        out = model(image, text)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "embed_dim": out["image_features"].shape[-1],
        "fwd_flops": counter.get_total_flops(),
    }


def step_model(m: dict, world: int, batch: int, args) -> dict:
    """Per-GPU bytes moved, memory and seconds for one step of global batch ``batch`` on ``world`` GPUs."""
    P, D, local = m["params"], m["embed_dim"], batch // world
    ring = (world - 1) / world  # fraction of a buffer each rank sends (and receives) in a ring collective
    embed = 2 * batch * D * 4  # image + text embeddings of the whole batch, fp32
    comm = {
        "embeddings": 2 * ring * embed,  # all-gather forward + reduce-scatter of their gradient backward
        "ddp": 2 * ring * 4 * P,  # all-reduce of fp32 grads
        "zero1": 2 * ring * 4 * P,  # reduce-scatter grads + all-gather updated params
        "zero2": 2 * ring * 4 * P,
        "zero3": 3 * ring * 4 * P,  # + a second parameter all-gather in backward
    }
    states = {  # fp32 weights (4) + grads (4) + AdamW moments (8) bytes per parameter
        "ddp": 16 * P,
        "zero1": 8 * P + 8 * P / world,
        "zero2": 4 * P + 12 * P / world,
        "zero3": 16 * P / world,
    }
    logits_gathered = 3 * local * batch * 4  # logits, softmax, their gradient (fp32), i2t and t2i share one
    logits_tiled = 3 * local * 4096 * 4  # one chunk of 4,096 columns at a time
    # Bandwidth: inside a node until the job spans nodes, then the inter-node links bound the ring.
    bus = (args.intra_gbps if world <= 8 else args.inter_gbps) * GB
    compute_s = 3 * m["fwd_flops"] * local / (args.peak_tflops * 1e12 * args.mfu)
    row = {"world": world, "batch": batch, "local_batch": local, "compute_s": compute_s}
    for engine in ("ddp", "zero1", "zero2", "zero3"):
        row[f"{engine}_comm_gb"] = (comm[engine] + comm["embeddings"]) / GB
        row[f"{engine}_comm_s"] = (comm[engine] + comm["embeddings"]) / bus
        row[f"{engine}_states_gb"] = states[engine] / GB
    row["embed_comm_gb"] = comm["embeddings"] / GB
    row["logits_gathered_gb"] = logits_gathered / GB
    row["logits_tiled_gb"] = logits_tiled / GB
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mfu", type=float, default=0.40)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--intra-gbps", type=float, default=360.0, help="NVLink bus bandwidth, GB/s per GPU")
    parser.add_argument("--inter-gbps", type=float, default=45.0, help="inter-node bus bandwidth, GB/s per GPU")
    parser.add_argument("--out", default="benchmarks/out/scale_model.json")
    args = parser.parse_args()

    results = {"assumptions": vars(args), "models": {}}
    for name, label in MODELS.items():
        m = measure(name)
        rows = [step_model(m, w, b, args) for w in GPUS for b in BATCHES if b % w == 0]
        results["models"][name] = {**m, "rows": rows}
        print(
            f"\n{label}: {m['params'] / 1e6:.0f}M params, embed {m['embed_dim']}, "
            f"{m['fwd_flops'] / 1e9:.1f} GFLOPs forward per pair"
        )
        print(
            "| GPUs | global batch | compute s | embed all-gather GB | DDP/ZeRO-1/2 comm GB (s) | ZeRO-3 comm GB (s) "
            "| states GB DDP / Z1 / Z2 / Z3 | logits GB gathered / tiled |"
        )
        print("|---:|---:|---:|---:|---:|---:|---|---|")
        for r in rows:
            print(
                f"| {r['world']} | {r['batch'] // 1024}k | {r['compute_s']:.2f} | {r['embed_comm_gb']:.2f} "
                f"| {r['ddp_comm_gb']:.2f} ({r['ddp_comm_s']:.2f}) "
                f"| {r['zero3_comm_gb']:.2f} ({r['zero3_comm_s']:.2f}) "
                f"| {r['ddp_states_gb']:.1f} / {r['zero1_states_gb']:.1f} / {r['zero2_states_gb']:.2f} / "
                f"{r['zero3_states_gb']:.2f} | {r['logits_gathered_gb']:.1f} / {r['logits_tiled_gb']:.2f} |"
            )
    write_results(args.out, results)


if __name__ == "__main__":
    main()
