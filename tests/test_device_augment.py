"""The batched data path (--data-device cuda/batch) against timm's PIL train transform, on CPU tensors.

Tolerances, and why:
- point ops (autocontrast, equalize, invert, posterize, solarize, solarize-add, colour, contrast,
  brightness, sharpness): identical pixels. They are lookup tables and blends built with Pillow's
  own integer and float32 arithmetic.
- geometric ops (rotate, shear, translate): the same matrix as the one Pillow's Image.transform gets
  (asserted exactly), and pixels within 1 level on at most 0.1% of pixels (identical on this project's
  machine): the bicubic is Pillow's formula, in float64 and in Pillow's order of operations, but a C
  compiler may fuse multiply-adds, which can move a value across a truncation boundary.
- the crop's resize: Pillow's resize exactly, or (for the shapes where Pillow 13 runs its vertical
  pass first) exactly Pillow's horizontal-then-vertical passes: a few levels apart on some pixels
  from the rounding of the 8-bit image between the passes.
- the whole transform (crop, resize, flip, two RandAugment ops): mean difference under 1 level;
  a 1-level difference after the resize can move an equalize or solarize lookup by more.
"""

from __future__ import annotations

import io
import json
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TLA, assert_clean_error, run_tla
from PIL import Image
from timm.data import auto_augment as aa
from torchvision.transforms import functional as tvf

from tla_jobs.config import TrainConfig
from tla_jobs.data import gpu_augment as ga
from tla_jobs.data.crops import CropTransform, collate_crops, decode
from tla_jobs.data.loaders import SeededSamples, build_transforms
from tla_jobs.data.params import HEAD, TrainParams, ops_of
from tla_jobs.train import checkpoint as ckpt

FILL = (124, 116, 104)  # timm's img_mean fill for ImageNet's mean, what the recipe passes


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    from sklearn.datasets import load_sample_images

    return load_sample_images().images[0][10:419, 100:525].copy()  # 425 x 409, ImageNet-sized


def as_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def seed_all(seed: int) -> None:  # what SeededSamples does before each sample
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)


# ------------------------------------------------------------------------------------- op by op


POINT_CASES = [("AutoContrast", 0), ("Equalize", 0), ("Invert", 0), ("PosterizeIncreasing", 3),
               ("PosterizeIncreasing", 1), ("PosterizeIncreasing", 0), ("SolarizeIncreasing", 77),
               ("SolarizeIncreasing", 256), ("SolarizeAdd", 99), ("ColorIncreasing", 1.83),
               ("ColorIncreasing", 0.14), ("ContrastIncreasing", 1.55), ("ContrastIncreasing", 0.37),
               ("BrightnessIncreasing", 1.9), ("BrightnessIncreasing", 0.21), ("SharpnessIncreasing", 1.7),
               ("SharpnessIncreasing", 0.1)]


@pytest.mark.parametrize("name, arg", POINT_CASES)
def test_point_ops_equal_timms_pil_ops(photo, name, arg):
    import tla_jobs.data.loaders  # noqa: F401  (tla's posterize for 0 bits, as the PIL path runs it)

    img = Image.fromarray(photo[:224, :224])
    fn = aa.NAME_TO_OP[name]
    expected = fn(img, arg, fillcolor=FILL, resample=Image.BICUBIC) if fn.__code__.co_argcount > 1 else fn(img)
    got = ga.POINT_OPS[name](as_tensor(img)[None].float(), torch.tensor([float(arg)], dtype=torch.float64))
    assert torch.equal(got[0].to(torch.uint8), as_tensor(expected))


@pytest.mark.parametrize("name, arg", [("Rotate", 27.4), ("Rotate", -8.9), ("ShearX", 0.29), ("ShearY", -0.17),
                                       ("TranslateXRel", 0.41), ("TranslateYRel", -0.33)])
def test_geometric_ops_use_pils_matrix_and_match_its_pixels(photo, name, arg, monkeypatch):
    img = Image.fromarray(photo[:224, :200])  # not square: width and height must not be swapped
    seen = []
    original = Image.Image.transform

    def spy(self, size, method, data=None, *a, **kw):
        seen.append(tuple(data))
        return original(self, size, method, data, *a, **kw)

    monkeypatch.setattr(Image.Image, "transform", spy)
    expected = as_tensor(aa.NAME_TO_OP[name](img, arg, fillcolor=FILL, resample=Image.BICUBIC))
    matrix = ga.affine_matrix(name, arg, img.width, img.height)
    assert seen == [matrix]
    got = ga.affine(as_tensor(img)[None].float(), torch.tensor([matrix], dtype=torch.float64), FILL)[0]
    diff = (got.int() - expected.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.001, (diff.max(), (diff > 0).float().mean())
    assert (got == torch.tensor(FILL).view(3, 1, 1)).all(0).any(), "the corners are filled with timm's fill"


def test_resize_of_the_crops_is_pils_resize(photo):
    """Pillow's resize(BICUBIC), exactly: its coefficients and fixed point, 8 bits between its two
    passes. Pillow 13 runs the vertical pass first for some shapes; there the crop must equal Pillow's
    two passes in that order, run one by one (so no pixel is left to a tolerance)."""
    rng = np.random.default_rng(0)
    shapes = [(300, 260), (409, 425), (40, 60), (224, 224), (17, 409), (224, 300)]
    shapes += [(int(rng.integers(8, 409)), int(rng.integers(8, 425))) for _ in range(26)]
    crops = [photo[:h, :w].copy() for h, w in shapes]
    flat = torch.cat([torch.from_numpy(c).reshape(-1) for c in crops])
    got = ga.resize_crops(flat, [(h, w, 3) for h, w in shapes], (224, 224))
    other_order = 0
    for (h, _w), crop, out in zip(shapes, crops, got, strict=True):
        img = Image.fromarray(crop)
        if torch.equal(out, as_tensor(img.resize((224, 224), Image.BICUBIC))):
            continue
        other_order += 1
        assert torch.equal(out, as_tensor(img.resize((224, h), Image.BICUBIC).resize((224, 224), Image.BICUBIC)))
    assert other_order < len(shapes) / 2


def test_resize_chunks_bound_the_padding_of_large_photos():
    """A batch with a few photos of thousands of pixels a side (ImageNet has some) is not padded to them."""
    shapes = [(400, 350, 3)] * 200 + [(4000, 3000, 3), (3000, 2000, 3)] + [(100, 80, 3)] * 54
    chunks = ga._chunks(shapes)
    assert sorted(i for c in chunks for i in c) == list(range(len(shapes)))
    for chunk in chunks:
        padded = len(chunk) * max(shapes[i][0] for i in chunk) * max(shapes[i][1] for i in chunk)
        assert len(chunk) <= ga.RESIZE_CHUNK and (padded <= ga.RESIZE_BUDGET or len(chunk) == 1)
    assert [200] in chunks and [201] in chunks


def test_whole_transform_matches_timms_on_the_same_seeds(photo):
    cfg = TrainConfig()
    pil_tf = build_transforms(cfg, 224)[0]
    params = TrainParams(pil_tf)
    crop_tf, augment = CropTransform(params), ga.DeviceAugment(params)
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    expected, samples = [], []
    for seed in range(24):
        seed_all(seed)
        expected.append(pil_tf(Image.open(io.BytesIO(data)).convert("RGB")))
        seed_all(seed)
        samples.append((crop_tf(data), 0))
    (flat, shapes, rows), _ = collate_crops(samples)
    got = augment(flat, shapes, rows)
    diff = (got.int() - torch.stack(expected).int()).abs().float()
    assert got.shape == (24, 3, 224, 224) and got.dtype == torch.uint8
    assert diff.mean() < 1.0, diff.mean(dim=(1, 2, 3))
    assert {name for r in rows for name, _ in ops_of(r, params)} >= {"Rotate", "Equalize"} or len(rows) < 24


def test_device_ops_never_read_a_device_value():
    """The device side of a batch queues its work without the host waiting for the device: run on
    'meta' tensors (shapes only, no values), where reading a value (item, tolist, bool, a copy to the
    host) raises, every op of the batch goes through."""
    params = TrainParams(build_transforms(TrainConfig(), 32)[0])
    rows = []
    for i in range(200):
        seed_all(i)
        rows.append(params.draw(40 + i % 50, 60 + i % 70))
    rows = torch.stack(rows)
    assert {name for r in rows for name, _ in ops_of(r, params)} == set(params.op_names)
    shapes = torch.tensor([(int(r[2]), int(r[3]), 3) for r in rows])
    flat = torch.empty(int(shapes.prod(1).sum()), dtype=torch.uint8, device="meta")
    out = ga.DeviceAugment(params)(flat, shapes, rows)
    assert (out.device.type, out.shape, out.dtype) == ("meta", (200, 3, 32, 32), torch.uint8)
    with pytest.raises((RuntimeError, NotImplementedError)):
        out.sum().item()  # what a hidden synchronisation would have done


def test_decode_gives_pils_pixels(photo, tmp_path):
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, "JPEG", quality=90)
    assert torch.equal(decode(buf.getvalue()), torch.from_numpy(np.array(Image.open(buf).convert("RGB"))))
    png = io.BytesIO()
    Image.fromarray(photo).save(png, "PNG")
    assert torch.equal(decode(png.getvalue()), torch.from_numpy(photo))


# ------------------------------------------------------------------------------- the same draws


def test_parameters_are_timms_own_draws_over_10000_samples(monkeypatch):
    """Each sample's crop box, flip, RandAugment ops and levels, drawn by the batched path, are the
    very numbers timm's PIL transform draws under the same seed (identity, 10,000 samples)."""
    size = 16  # the draws do not depend on the output size; a small one keeps timm's pixel work cheap
    pil_tf = build_transforms(TrainConfig(), size)[0]
    params = TrainParams(pil_tf)
    crop_t, flip_t, ra = pil_tf.transforms[:3]
    seen: dict = {}
    get_params = crop_t.get_params

    def spy_box(img, scale, ratio):
        seen["box"] = get_params(img, scale, ratio)
        return seen["box"]

    monkeypatch.setattr(crop_t, "get_params", spy_box)
    hflip = tvf.hflip
    monkeypatch.setattr(tvf, "hflip", lambda img: (seen.__setitem__("flip", 1.0), hflip(img))[1])

    def recorder(op):
        fn = op.aug_fn

        def record(img, *args, **kw):
            seen["ops"].append((op.name, float(args[0]) if args else 0.0))
            return fn(img, *args, **kw)
        return record

    for op in ra.ops:
        monkeypatch.setattr(op, "aug_fn", recorder(op))
    rng = np.random.default_rng(0)
    counts, levels = Counter(), {}
    for seed in range(10_000):
        w, h = int(rng.integers(8, 40)), int(rng.integers(8, 40))
        img = Image.new("RGB", (w, h), (seed % 256, 90, 200))
        seen.clear()
        seen.update(ops=[], flip=0.0)
        seed_all(seed * 7919 + 13)
        pil_tf(img)
        seed_all(seed * 7919 + 13)
        row = params.draw(w, h)
        assert tuple(int(v) for v in row[:4]) == seen["box"] and row[4] == seen["flip"], seed
        assert ops_of(row, params) == seen["ops"], seed
        for name, level in seen["ops"]:
            counts[name] += 1
            levels.setdefault(name, []).append(level)
    # and that distribution is RandAugment's: 2 layers x p 0.5 over 15 ops, magnitude 9 ± 0.5 (inc1)
    assert set(counts) == set(aa._RAND_INCREASING_TRANSFORMS)
    expected = 10_000 * 2 * 0.5 / 15
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 36.1, (chi2, counts)  # chi-square, 14 degrees of freedom, p = 0.001
    rotate = np.abs(levels["Rotate"])
    assert 26.0 < rotate.mean() < 28.0 and rotate.max() <= 30.0  # 9/10 x 30 degrees, noise 0.5/10 x 30
    assert 0.4 < np.mean(np.array(levels["Rotate"]) > 0) < 0.6  # randomly negated


def test_parameters_do_not_depend_on_the_image_content_or_decoder(photo):
    params = TrainParams(build_transforms(TrainConfig(), 224)[0])
    crop_tf = CropTransform(params)
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, "JPEG", quality=90)
    seed_all(5)
    crop, row = crop_tf(buf.getvalue())
    seed_all(5)
    assert torch.equal(row, params.draw(photo.shape[1], photo.shape[0]))
    assert crop.shape == (int(row[2]), int(row[3]), 3) and row.shape == (HEAD + 4,)


def test_an_unreadable_image_is_skipped_on_the_batched_path_too(photo, tmp_path):
    from torchvision.datasets import ImageFolder

    from tla_jobs.data.crops import read_bytes

    (tmp_path / "a").mkdir()
    for k in range(4):
        Image.fromarray(photo[k * 40:k * 40 + 150, :200]).save(tmp_path / "a" / f"{k}.jpg", quality=90)
    (tmp_path / "a" / "1.jpg").write_bytes((tmp_path / "a" / "1.jpg").read_bytes()[:30])  # cut mid-header
    params = TrainParams(build_transforms(TrainConfig(), 224)[0])
    ds = SeededSamples(ImageFolder(str(tmp_path), transform=CropTransform(params), loader=read_bytes))
    (crop, row), _ = ds[(1, 77)]
    seed_all(77)
    assert torch.equal(row, params.draw(200, 150)) and crop.shape == (int(row[2]), int(row[3]), 3)


def test_unsupported_recipes_are_refused_or_fall_back():
    from tla_jobs.data.loaders import batched_params
    from tla_jobs.errors import TlaError

    jitter = TrainConfig(aa="none", data_device="batch")  # no RandAugment: timm adds ColorJitter
    with pytest.raises(TlaError, match="ColorJitter"):
        batched_params(jitter, 32, torch.device("cpu"))
    assert batched_params(TrainConfig(aa="none"), 32, torch.device("cuda")) is None  # auto: the PIL path
    assert batched_params(TrainConfig(), 32, torch.device("cpu")) is None  # auto on a CPU: the PIL path
    assert batched_params(TrainConfig(data_device="batch"), 32, torch.device("cpu")) is not None
    with pytest.raises(TlaError, match="needs a CUDA device"):
        batched_params(TrainConfig(data_device="cuda"), 32, torch.device("cpu"))


def test_seeded_samples_give_the_same_rows_with_any_worker_order(photo, tmp_path):
    from torchvision.datasets import ImageFolder

    from tla_jobs.data.crops import read_bytes

    (tmp_path / "a").mkdir()
    for k in range(3):
        Image.fromarray(photo[k * 50:k * 50 + 200, :300]).save(tmp_path / "a" / f"{k}.jpg", quality=90)
    params = TrainParams(build_transforms(TrainConfig(), 224)[0])
    ds = SeededSamples(ImageFolder(str(tmp_path), transform=CropTransform(params), loader=read_bytes))
    first = [ds[(i, 1000 + i)][0][1] for i in range(3)]
    again = [ds[(i, 1000 + i)][0][1] for i in reversed(range(3))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_both_paths_give_the_same_batches(photo, tmp_path):
    """The loaders of both paths over one folder: same samples, same targets, and the batched path's
    augmented images are the PIL path's (apart from the resize's pass order for some shapes, above)."""
    from tla_jobs.data.loaders import batched_params, train_loader

    rng = np.random.default_rng(1)
    for k in range(48):
        h, w = int(rng.integers(40, 160)), int(rng.integers(40, 160))
        (tmp_path / "train" / f"c{k % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo[k:k + h, 2 * k:2 * k + w]).save(tmp_path / "train" / f"c{k % 3}" / f"{k}.jpg",
                                                              quality=90)
    cfg = TrainConfig(batch_size=8, workers=0, repeated_aug=False)
    params = batched_params(cfg.model_copy(update={"data_device": "batch"}), 32, torch.device("cpu"))
    _, pil_sampler, pil_loader = train_loader(cfg, tmp_path, 32, 0, 1)
    _, crop_sampler, crop_loader = train_loader(cfg, tmp_path, 32, 0, 1, params)
    augment = ga.DeviceAugment(params)
    pil_sampler.set_epoch(1)
    crop_sampler.set_epoch(1)
    same = total = identical = 0
    for (expected, t1), (crops, t2) in zip(pil_loader, crop_loader, strict=True):
        got = augment(*crops)
        assert torch.equal(t1, t2) and got.shape == expected.shape == (8, 3, 32, 32)
        same += int((got == expected).sum())
        total += got.numel()
        identical += torch.equal(got, expected)
    assert same / total > 0.98 and identical >= 3, (same / total, identical)


# --------------------------------------------------------------------------- a run on the batched path


BATCHED = ["--model", "tla_vit_nano", "--dataset", "digits", "--batch-size", "32", "--workers", "0",
           "--no-repeated-aug", "--crop-scale", "0.7", "--drop-path", "0", "--warmup-epochs", "0",
           "--lr", "1.5e-3", "--data-device", "batch"]  # DeiT's RandAugment and erasing stay on


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


TIMING = {"images_per_s", "images_per_s_per_device", "images_per_s_steady", "tflops_per_device", "mfu", "epoch_s",
          "time", "data_wait"}


@pytest.mark.slow
def test_batched_path_sigkill_then_resume_is_exact(digits, tmp_path):
    args = [*BATCHED, "--data-path", digits, "--epochs", "2", "--checkpoint-every-min", "0.0005",
            "--step-delay", "0.05"]
    reference = tmp_path / "reference"
    ref = subprocess.Popen([*TLA, "train", *map(str, args), "--output-dir", str(reference)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*TLA, "train", *map(str, args), "--output-dir", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target, deadline, step = random.Random(7).randint(10, 30), time.time() + 300, 0
    while proc.poll() is None and time.time() < deadline:
        beat = json.loads((killed / "heartbeat.json").read_text()) if (killed / "heartbeat.json").exists() else {}
        # and once a checkpoint of this attempt is on disk: the first heartbeat past the target can come
        # just before the first save on a loaded machine, and a kill then leaves nothing to resume from
        if beat.get("pid") == proc.pid and beat.get("global_step", 0) >= target and \
                (killed / ckpt.LAST).exists():
            proc.send_signal(signal.SIGKILL)
            step = beat["global_step"]
            break
        time.sleep(0.05)
    proc.wait(timeout=600)
    assert step >= target, "the run was killed mid-way"
    run_tla("train", *args, "--output-dir", killed, check=True, timeout=600)
    _, err = ref.communicate(timeout=900)
    assert ref.returncode == 0, err[-3000:]
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in metrics(killed)]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING} for r in metrics(reference)]
    a, b = ckpt.load(killed / ckpt.LAST)[0]["model"], ckpt.load(reference / ckpt.LAST)[0]["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    starts = [json.loads(x) for x in (killed / "attempts.jsonl").read_text().splitlines() if '"start"' in x]
    assert starts[-1]["resumed_from"]["step"] > 0
    # --workers 0: the loop itself loads every batch, so it waits for data some share of each epoch
    assert all(0 < r["data_wait"] <= 1 for r in metrics(reference)), metrics(reference)
    assert "data_wait" in json.loads((reference / "heartbeat.json").read_text()) or metrics(reference)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(reference / "tensorboard")).Reload()
    assert "speed/data_wait" in events.Tags()["scalars"]


def test_data_device_cuda_without_a_gpu_is_one_line(digits, tmp_path):
    proc = run_tla("train", *BATCHED[:-1], "cuda", "--data-path", digits, "--output-dir", tmp_path / "run",
                   "--epochs", "1", "--max-steps", "1")
    assert_clean_error(proc, "needs a CUDA device")


def test_status_says_when_data_is_the_bottleneck(tmp_path):
    from conftest import runs_env, tla

    env = runs_env(tmp_path / "runs")
    for name, wait in (("starved", 0.38), ("fed", 0.02), ("odd", "lots")):
        run = env["runs"] / name
        run.mkdir(parents=True)
        now = time.time()
        (run / "run.json").write_text(json.dumps({"name": name, "created": now, "kind": "train", "evals": [],
                                                  "spec": {"model": "tla_vit_nano", "epochs": 3,
                                                           "output_dir": str(run)},
                                                  "profile": {"executor": "local"}, "submissions": []}))
        (run / "heartbeat.json").write_text(json.dumps(
            {"phase": "training", "epoch": 1, "epochs": 3, "step": 5, "steps_per_epoch": 10, "global_step": 15,
             "time": now, "train_loss": 1.0, "images_per_s": 100.0, "data_wait": wait, "world_size": 1}))
    out = tla(env, "status", "starved", check=True).stdout
    assert "waiting for data 38% of the time: more --workers or --data-device cuda" in " ".join(out.split())
    assert "waiting for data" not in tla(env, "status", "fed", check=True).stdout
    assert "waiting for data" not in tla(env, "status", "odd", check=True).stdout  # a hand-edited heartbeat
