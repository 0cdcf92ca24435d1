"""`tla data pack` and packed folders as --data-path: standard shards (read back with webdataset), an
index that reads every sample with one pread, resume after a kill, atomic shards, one-line errors, and
training on a packed folder that is the same run as on the ImageFolder it came from."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, assert_clean_error, once, run_tla
from PIL import Image

from tla_jobs.data import shards


@pytest.fixture(scope="session")
def packed(shared_dir, digits) -> Path:
    """The digits dataset packed into small shards (several per split), once per session."""
    def make():
        dst = shared_dir / "data" / "digits-packed"
        run_tla("data", "pack", digits, dst, "--shard-size", "64KB", check=True)
        return str(dst)

    return Path(once(shared_dir, "digits-packed", make))


def tiny_folder(root: Path, classes=("a", "b"), per_class=3, ext="png") -> Path:
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                img = Image.fromarray(np.full((8, 8, 3), 40 * c + k, np.uint8))
                img.save(root / split / name / f"{k}.{ext}")
    return root


def test_pack_writes_standard_shards_that_webdataset_reads(packed, digits):
    wds = pytest.importorskip("webdataset")
    manifest = json.loads((packed / "index.json").read_text())
    classes = json.loads((packed / "classes.json").read_text())
    assert classes == sorted(p.name for p in (digits / "train").iterdir())
    for split in ("train", "val"):
        names = [s["name"] for s in manifest["splits"][split]["shards"]]
        assert len(names) > 1 and all((packed / n).stat().st_size <= 65536 for n in names)
        seen = {}
        ds = wds.WebDataset([str(packed / n) for n in names], shardshuffle=False).to_tuple("__key__", "png", "cls")
        for key, data, cls in ds:
            seen[key] = (data, int(cls))
        files = sorted((digits / split).glob("*/*.png"))
        assert len(seen) == len(files) == manifest["splits"][split]["samples"]
        for f in files:  # the image's bytes as stored and its class number
            data, label = seen[f"{f.parent.name}/{f.stem}"]
            assert data == f.read_bytes() and classes[label] == f.parent.name
        # the index: one pread per sample gives those bytes; sample i is ImageFolder's sample i
        idx = shards.load_split(packed, split, with_keys=True)
        reader = shards.ShardReader(idx)
        for i, f in enumerate(files):
            assert idx.keys[i] == f"{f.parent.name}/{f.stem}" and reader.read(i) == f.read_bytes()
        reader.close()
        counts = manifest["splits"][split]["counts"]
        assert counts == {c: len(list((digits / split / c).glob("*.png"))) for c in classes}
    # train is shuffled across shards (a streaming reader sees every class in a shard); val is in order
    first = json.loads((packed / "train-000000.idx.json").read_text())
    assert len(set(first["labels"])) > 5
    assert json.loads((packed / "val-000000.idx.json").read_text())["order"] == list(range(len(
        json.loads((packed / "val-000000.idx.json").read_text())["order"])))


def test_pack_resumes_after_a_kill_keeping_finished_shards(packed, tmp_path):
    src = json.loads((packed / "index.json").read_text())["source"]
    dst = tmp_path / "p"
    shutil.copytree(packed, dst)
    manifest = json.loads((dst / "index.json").read_text())
    # what a kill leaves: no manifest yet (the plan file instead), a half-written temporary shard, a
    # shard renamed into place whose index was not written yet, and a shard damaged since
    (dst / "index.json").unlink()
    (dst / ".pack.json").write_text(json.dumps({"source": src, "shard_size": 65536}))
    (dst / ".train-000003.tar.tmp-999").write_bytes(b"\0" * 1000)
    (dst / "train-000002.idx.json").unlink()
    with open(dst / "train-000001.tar", "r+b") as f:
        f.seek(2000)
        f.write(b"damaged")
    mtimes = {p.name: p.stat().st_mtime_ns for p in dst.glob("*.tar")}
    proc = run_tla("data", "pack", src, dst, "--shard-size", "64KB", check=True)
    assert "kept" in proc.stdout
    again = json.loads((dst / "index.json").read_text())
    assert again["splits"] == manifest["splits"]  # the same shards, byte for byte (sha256)
    rewritten = {p.name for p in dst.glob("*.tar") if p.stat().st_mtime_ns != mtimes[p.name]}
    assert rewritten == {"train-000001.tar", "train-000002.tar"}
    assert not list(dst.glob(".*.tmp-*")) and not (dst / ".pack.json").exists()


def test_pack_refuses_bad_input_in_one_line(tmp_path):
    bad = tiny_folder(tmp_path / "unreadable")
    (bad / "train" / "a" / "1.png").write_bytes((bad / "train" / "a" / "1.png").read_bytes()[:30])
    assert_clean_error(run_tla("data", "pack", bad, tmp_path / "o1"), "unreadable image")
    assert not (tmp_path / "o1" / "index.json").exists() and not list((tmp_path / "o1").glob("*.tar"))

    dup = tiny_folder(tmp_path / "dup")
    shutil.copy(dup / "train" / "b" / "0.png", dup / "train" / "b" / "0.jpg")
    assert_clean_error(run_tla("data", "pack", dup, tmp_path / "o2"), "duplicate key 'b/0'")

    empty = tiny_folder(tmp_path / "empty")
    for f in (empty / "val" / "b").iterdir():
        f.unlink()
    assert_clean_error(run_tla("data", "pack", empty, tmp_path / "o3"), "has no images")

    other = tmp_path / "not-ours"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert_clean_error(run_tla("data", "pack", tiny_folder(tmp_path / "ok"), other), "not a packed dataset")
    assert (other / "notes.txt").read_text() == "mine"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_pack_on_a_full_disk_says_so_and_keeps_nothing_half_written(tmp_path, digits):
    full = tmp_path / "small"
    full.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(full)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        proc = run_tla("data", "pack", digits, full / "p", "--shard-size", "64KB")
        assert_clean_error(proc, "no space left")
        left = list((full / "p").iterdir())
        assert not [p for p in left if ".tmp-" in p.name] and not (full / "p" / "index.json").exists()
        for tar in (full / "p").glob("*.tar"):  # each shard in place is whole, with its index
            assert json.loads(tar.with_suffix(".idx.json").read_text())["bytes"] == tar.stat().st_size
    finally:
        subprocess.run(["umount", str(full)])


def test_a_packed_folder_passes_the_data_check_and_a_damaged_one_fails(packed, tmp_path):
    from tla_jobs.data.folders import check_image_folder

    train, val = check_image_folder(packed)
    assert train.size == 1442 and val.size == 355 and len(train.classes) == 10
    dst = tmp_path / "p"
    shutil.copytree(packed, dst)
    os.truncate(dst / "val-000001.tar", 100)
    proc = run_tla("train", "--data-path", dst, "--output-dir", tmp_path / "run", "--max-steps", "1",
                   *[a for a in FAST if a not in ("--dataset", "digits")])
    assert_clean_error(proc, "val-000001.tar has 100 bytes")


def _train(data: Path, out: Path, workers: str) -> tuple[str, dict]:
    args = [a for a in FAST if a not in ("--dataset", "digits")]
    args[args.index("--workers") + 1] = workers
    run_tla("train", "--dataset", "imagefolder", "--data-path", data, "--output-dir", out, "--epochs", "1",
            "--seed", "3", "--checkpoint-every-epochs", "0", "--no-tensorboard", *args, check=True)
    checksum = re.search(r"final weights checksum (\w+)", (out / "log_rank0.txt").read_text()).group(1)
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return checksum, row


def test_training_on_packed_data_is_the_same_run_as_on_its_image_folder(packed, digits, tmp_path):
    """Same samples in the same order with the same augmentation: the same weights, bit for bit (one
    process, the same operations), and val evaluated whole and in order: the same val metrics. The
    packed run reads with 2 loader workers (each opens its own shard files), the folder run in-process."""
    folder_sum, folder_row = _train(digits, tmp_path / "folder", "0")
    packed_sum, packed_row = _train(packed, tmp_path / "packed", "2")
    assert packed_sum == folder_sum
    for k in ("train_loss", "val_loss", "acc1", "acc5"):
        assert packed_row[k] == folder_row[k], k


# ------------------------------------------------------------------------------------------- staging

STAGE = """
import logging, sys
from tla_jobs.data.staging import stage
logging.basicConfig(level=logging.INFO, format="%(message)s")
print(stage(sys.argv[1], sys.argv[2]))
"""


def _stage_in(n: int, src: Path, root: Path) -> list[subprocess.CompletedProcess]:
    """n processes staging at once, as the ranks of one node do."""
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", STAGE, str(src), str(root)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(n)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def test_staging_copies_once_per_node_verified_and_reuses_the_copy(packed, tmp_path):
    from tla_jobs.data import staging

    root = tmp_path / "local-ssd"
    procs = _stage_in(3, packed, root)
    assert all(p.returncode == 0 for p in procs), [p.stderr for p in procs]
    dests = {p.stdout.strip() for p in procs}
    assert len(dests) == 1 and Path(dests.pop()).parent == root
    assert sum("staged " in p.stderr for p in procs) == 1  # one rank copied; the others waited and found it
    manifest = json.loads((packed / "index.json").read_text())
    dest = root / staging._name(packed, manifest)
    assert staging.staged(dest, manifest) and not list(dest.glob(".*.tmp-*"))
    for m in staging._files(manifest):
        assert shards.file_sha256(dest / m["name"]) == m["sha256"]
    # the copy reads as the source does
    assert shards.PackedDataset(dest, "val").reader.read(7) == shards.PackedDataset(packed, "val").reader.read(7)

    # a later job on this node: used as it is, nothing copied
    mtimes = {p: p.stat().st_mtime_ns for p in dest.iterdir()}
    again = _stage_in(1, packed, root)[0]
    assert "already staged" in again.stderr and {p: p.stat().st_mtime_ns for p in dest.iterdir()} == mtimes

    # a copy damaged since (a shard cut short): that shard copied again, the others verified and kept
    victim = dest / manifest["splits"]["train"]["shards"][1]["name"]
    os.truncate(victim, 1000)
    assert _stage_in(1, packed, root)[0].stdout.strip() == str(dest)
    assert shards.file_sha256(victim) == manifest["splits"]["train"]["shards"][1]["sha256"]
    assert all(p.stat().st_mtime_ns == mtimes[p] for p in dest.glob("*.tar") if p != victim)


def test_staging_falls_back_to_reading_in_place_with_one_warning(packed, tmp_path):
    image_folder = _stage_in(1, tmp_path, tmp_path / "x")[0]  # not packed: nothing to stage
    assert image_folder.stdout.strip() == str(tmp_path) and "packed folders only" in image_folder.stderr
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        proc = _stage_in(1, packed, small)[0]
        assert proc.returncode == 0 and proc.stdout.strip() == str(packed)
        warnings = [ln for ln in proc.stderr.splitlines() if "in place" in ln]
        assert len(warnings) == 1 and "not enough room" in warnings[0]
    finally:
        subprocess.run(["umount", str(small)])


def test_a_run_with_stage_data_trains_from_the_copy_and_reports_staging(packed, tmp_path):
    from types import SimpleNamespace

    from tla_jobs.data.staging import stage_for_run
    from tla_jobs.jobs.state import _last_event

    out = tmp_path / "run"
    args = [a for a in FAST if a not in ("--dataset", "digits")]
    run_tla("train", "--data-path", packed, "--stage-data", tmp_path / "local", "--output-dir", out,
            "--max-steps", "2", "--no-tensorboard", *args, check=True)
    log = (out / "log_rank0.txt").read_text()
    assert f"reading the data from {tmp_path / 'local'}/digits-packed-" in log
    # what rank 0 writes while it stages, and how `tla status` says it
    out2 = tmp_path / "run2"
    out2.mkdir()
    stage_for_run(str(tmp_path / "local2"), packed, out2, rank=0, world_size=2)
    beat = json.loads((out2 / "heartbeat.json").read_text())
    assert beat["phase"] == "staging" and beat["staged_bytes"] == beat["stage_bytes"] > 0
    event = _last_event(SimpleNamespace(state="RUNNING", heartbeat=beat, waiting_for_ranks=False, attempts=[]), None)
    assert event.startswith(f"staging data to {tmp_path / 'local2'}: ") and "(100%)" in event
