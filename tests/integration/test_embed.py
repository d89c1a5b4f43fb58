"""`clipkit embed` (issue 29): embeddings of a webdataset in clip-retrieval's layout, checked against the model's
own embeddings and the shards' own keys, resumed after a kill -9 with nothing embedded twice or missed, split over
two torchrun ranks with the same result, with the CLIP-score filter and a faiss index."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import run_cli
from tests.ports import free_port

BIN = Path(sys.executable).parent
THRESHOLD = 0.05


def bash(command: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1", **env}
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=full, capture_output=True, text=True, timeout=900)


def shard_keys(train: Path) -> list[list[str]]:
    """Each shard's keys in tar order (part N = shard N)."""
    out = []
    for shard in sorted(train.glob("*.tar")):
        with tarfile.open(shard) as tar:
            out.append(list(dict.fromkeys(m.name.split(".")[0] for m in tar.getmembers())))
    return out


def read_parts(out: Path, n: int) -> list[dict]:
    parts = []
    for i in range(n):
        meta = pq.read_table(out / "metadata" / f"metadata_{i}.parquet").to_pydict()
        img, txt = np.load(out / "img_emb" / f"img_emb_{i}.npy"), np.load(out / "text_emb" / f"text_emb_{i}.npy")
        parts.append({"meta": meta, "img": img, "txt": txt})
    return parts


@pytest.fixture(scope="module")
def embedded(demo_run, small_demo, tmp_path_factory):
    """One uninterrupted single-process embed of the small demo's 4 training shards (a shell glob as the spec)."""
    root = tmp_path_factory.mktemp("embed")
    extra = "embed.index=true " if _has_faiss() else ""
    proc = bash(
        f"clipkit embed checkpoint={demo_run[0]} data.train={small_demo}/train/*.tar out={root}/out "
        f"embed.batch_size=64 embed.filter_threshold={THRESHOLD} {extra}data.num_workers=2",
        root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "out", proc


def _has_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def test_layout_keys_and_embeddings_are_the_models(embedded, demo_run, small_demo):
    from clipkit.checkpoint import resolve
    from clipkit.eval.embedding import eval_transform
    from clipkit.evaluate import load_trained

    out, proc = embedded
    keys = shard_keys(small_demo / "train")
    parts = read_parts(out, len(keys))
    assert "embedded 2000 samples in 4 parts" in proc.stdout
    for part, want in zip(parts, keys, strict=True):
        assert part["meta"]["key"] == want  # every sample of its shard, once, in tar order
        assert part["img"].shape == (len(want), 128) and part["img"].dtype == np.float16  # (clipkit-tiny: 128-d)
        assert np.allclose(np.linalg.norm(part["img"].astype(np.float32), axis=1), 1, atol=2e-3)
    # The model's own embeddings of a few samples (its eval preprocessing; the caption the same seeded pick).
    built, _ = load_trained(resolve(demo_run[0]), torch.device("cpu"))
    built.model.eval()
    from PIL import Image

    first = sorted((small_demo / "train").glob("*.tar"))[0]
    with tarfile.open(first) as tar:
        sample_keys = parts[0]["meta"]["key"][:5]
        images = [Image.open(tar.extractfile(f"{k}.jpg")).convert("RGB") for k in sample_keys]
    captions = parts[0]["meta"]["caption"][:5]
    with torch.no_grad():
        img = torch.nn.functional.normalize(
            built.model.encode_image(torch.stack([eval_transform(built.model)(i) for i in images])), dim=-1
        )
        txt = torch.nn.functional.normalize(built.model.encode_text(built.tokenizer(captions)), dim=-1)
    assert np.abs(parts[0]["img"][:5].astype(np.float32) - img.numpy()).max() < 2e-3
    assert np.abs(parts[0]["txt"][:5].astype(np.float32) - txt.numpy()).max() < 2e-3
    # clip_score is the cosine of the pair, and the filter lists the keys at or above the threshold
    for i, part in enumerate(parts):
        score = (part["img"].astype(np.float32) * part["txt"].astype(np.float32)).sum(1)
        assert np.allclose(part["meta"]["clip_score"], score, atol=1e-5)
        passed = (out / "filtered" / f"keys_{i}.txt").read_text().split()
        assert passed == [
            k for k, s in zip(part["meta"]["key"], part["meta"]["clip_score"], strict=True) if s >= THRESHOLD
        ]


def test_the_faiss_index_finds_each_image_first(embedded):
    faiss = pytest.importorskip("faiss")
    out, _ = embedded
    index = faiss.read_index(str(out / "image.index"))
    img = np.concatenate([np.load(out / "img_emb" / f"img_emb_{i}.npy") for i in range(4)]).astype(np.float32)
    assert index.ntotal == len(img) == 2000
    _, ids = index.search(img[:50], 1)
    assert (ids[:, 0] == np.arange(50)).mean() > 0.9  # (float16 ties aside, each image is its own nearest)


def test_a_killed_embed_resumes_without_a_sample_twice_or_missed(embedded, demo_run, small_demo, tmp_path):
    ref, _ = embedded
    out = tmp_path / "out"
    args = [f"checkpoint={demo_run[0]}", f"data.train={small_demo}/train/{{00000..00003}}.tar", f"out={out}"]
    args += ["embed.batch_size=64", f"embed.filter_threshold={THRESHOLD}", "data.num_workers=0"]
    killed = run_cli("embed", *args, env={"CLIPKIT_FAULTS": "kill:embed_part@2"})  # SIGKILL after part 1
    assert killed.returncode == -9
    assert sorted(p.name for p in (out / "metadata").iterdir()) == ["metadata_0.parquet", "metadata_1.parquet"]
    resumed = run_cli("embed", *args, check=True)
    assert "2 of 4 parts to embed" in resumed.stderr
    keys = [k for part in read_parts(out, 4) for k in part["meta"]["key"]]
    assert len(keys) == len(set(keys)) == 2000  # nothing twice, nothing missed
    for got, want in zip(read_parts(out, 4), read_parts(ref, 4), strict=True):
        assert got["meta"]["key"] == want["meta"]["key"] and np.array_equal(got["img"], want["img"])
        assert np.array_equal(got["txt"], want["txt"])


def test_two_ranks_write_what_one_process_writes(embedded, demo_run, small_demo, tmp_path):
    ref, _ = embedded
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    cmd += ["-m", "clipkit", "embed", f"checkpoint={demo_run[0]}", f"data.train={small_demo}/train/*.tar"]
    cmd += [f"out={out}", "embed.batch_size=64", f"embed.filter_threshold={THRESHOLD}", "data.num_workers=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for got, want in zip(read_parts(out, 4), read_parts(ref, 4), strict=True):
        assert got["meta"] == want["meta"] and np.array_equal(got["img"], want["img"])
        assert np.array_equal(got["txt"], want["txt"])
    assert json.loads((out / "summary.json").read_text())["this_run"]["samples"] == 2000


def test_an_out_of_another_run_or_foreign_files_is_refused(embedded, demo_run, small_demo, tmp_path):
    ref, _ = embedded
    other = tmp_path / "other"
    shutil.copytree(ref, other)
    proc = run_cli("embed", f"checkpoint={demo_run[0]}", f"data.train={small_demo}/train/00000.tar", f"out={other}")
    assert proc.returncode == 1 and "holds embeddings of another run" in proc.stderr and "data" in proc.stderr
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    proc = run_cli("embed", f"checkpoint={demo_run[0]}", f"data.train={small_demo}/train/00000.tar", f"out={foreign}")
    assert proc.returncode == 1 and "not empty" in proc.stderr and (foreign / "notes.txt").read_text() == "mine"
