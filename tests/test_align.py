"""TL-Align core: token-grid CutMix, label propagation (every path: second-call, fused, explicit), soft targets."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.loss import SoftTargetCrossEntropy

from tla_jobs.align import (
    AlignedModel,
    UnsupportedModelError,
    aligned_forward,
    check_supported,
    mixed_targets,
    propagate_labels,
    smoothed_one_hot,
    token_cutmix,
)
from tla_jobs.align.attention import resolve_path

# Tiny configurations of the real timm classes: (name, kwargs, patch size, image size).
MODELS = {
    "deit": ("deit_tiny_patch16_224", dict(img_size=64, depth=3, embed_dim=48, num_heads=3), 16, 64),
    "distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8, depth=3, embed_dim=48,
                                                          num_heads=3), 8, 32),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=64, window_size=4, depths=(2, 2, 2),
                                                  embed_dim=24, num_heads=(1, 2, 3), drop_path_rate=0.0), 4, 64),
}


def make(kind: str, dtype=torch.float32, **extra):
    name, kw, patch, size = MODELS[kind]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7, **{**kw, **extra}).to(dtype)
    return model, patch, size


def batch(size, b=4, dtype=torch.float32, seed=1):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def mixed(kind, dtype=torch.float32, mode="batch", seed=3):
    model, patch, size = make(kind, dtype)
    mix = token_cutmix(batch(size, dtype=dtype), patch, mode=mode, generator=torch.Generator().manual_seed(seed))
    return model, mix


def first(logits):
    return logits[0] if isinstance(logits, tuple) else logits


# ------------------------------------------------------------------------------------------ CutMix


def test_cutmix_snaps_to_grid_and_corrects_lambda():
    images = batch(64, b=6)
    mix = token_cutmix(images, 16, generator=torch.Generator().manual_seed(5))
    w = mix.patch_weights
    assert w.shape == (6, 16)
    assert set(w.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(mix.partner, torch.tensor([5, 4, 3, 2, 1, 0]))
    grid = w[0].view(4, 4)
    for gy in range(4):
        for gx in range(4):
            tile = (slice(None), slice(None), slice(gy * 16, gy * 16 + 16), slice(gx * 16, gx * 16 + 16))
            source = images if grid[gy, gx] == 1 else images.flip(0)
            assert torch.equal(mix.images[tile], source[tile]), "every token must come from one image"
    # batch mode: one box for all; λ = 1 - box area / N
    assert torch.equal(w, w[:1].expand_as(w))
    lam = 1 - (w[0] == 0).sum().item() / 16
    assert w.mean(1).allclose(torch.full((6,), lam))


def test_cutmix_mixes_every_batch_and_is_seeded():
    images = batch(64, b=2)
    boxes = [token_cutmix(images, 16, generator=torch.Generator().manual_seed(s)).patch_weights for s in range(40)]
    assert sum(bool((b < 1).any()) for b in boxes) > 30  # λ==1 is redrawn; only degenerate boxes stay unmixed
    again = token_cutmix(images, 16, generator=torch.Generator().manual_seed(7)).patch_weights
    assert torch.equal(again, token_cutmix(images, 16, generator=torch.Generator().manual_seed(7)).patch_weights)


def test_cutmix_elem_mode_draws_per_sample():
    images = batch(64, b=8)
    mix = token_cutmix(images, 16, mode="elem", generator=torch.Generator().manual_seed(2))
    assert len({tuple(r.tolist()) for r in mix.patch_weights}) > 1
    own = mix.patch_weights.view(8, 4, 4).repeat_interleave(16, 1).repeat_interleave(16, 2).unsqueeze(1).bool()
    assert torch.equal(mix.images, torch.where(own, images, images.flip(0)))


@pytest.mark.parametrize("kwargs, message", [
    (dict(patch_size=15), "not a multiple"), (dict(patch_size=16, mode="pair"), "mode"),
    (dict(patch_size=16, alpha=0.0), "alpha"),
])
def test_cutmix_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        token_cutmix(batch(64), **kwargs)


# --------------------------------------------------------------------------------------- propagation


FAST_PATHS = ["second", "fused"]  # the explicit path is the reference they are checked against


def test_path_is_chosen_per_device():
    assert resolve_path("auto", "cpu") == "fused"
    assert resolve_path("auto", "cuda") == "second"
    assert resolve_path("explicit", "cuda") == "explicit"
    with pytest.raises(ValueError, match="unknown label path"):
        resolve_path("magic", "cpu")


@pytest.mark.parametrize("path", FAST_PATHS)
@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_fast_paths_equal_explicit(kind, dtype, tol, path):
    model, mix = mixed(kind, dtype, mode="elem")
    model.train()  # drop-path off in these configs, so both runs see the same network
    lf, wf = aligned_forward(model, mix.images, mix.patch_weights, path=path)
    le, we = aligned_forward(model, mix.images, mix.patch_weights, path="explicit")
    assert wf.dtype in (torch.float32, torch.float64)
    assert (wf - we).abs().max().item() < tol
    assert (first(lf) - first(le)).abs().max().item() < tol * 10
    assert not torch.allclose(wf, mix.patch_weights.mean(1).to(wf.dtype).view(-1, *[1] * (wf.ndim - 1)))


@pytest.mark.parametrize("kind", list(MODELS))
def test_logits_equal_plain_model_in_eval(kind):
    model, mix = mixed(kind)
    model.eval()
    logits, _ = aligned_forward(model, mix.images, mix.patch_weights)
    plain = model(mix.images)
    if kind == "distilled":
        assert isinstance(logits, tuple) and len(logits) == 2
        logits = (logits[0] + logits[1]) / 2  # what the distilled model returns outside distilled training
    assert torch.allclose(logits, plain, atol=1e-6)


def _captured_attention(model, images):
    """The softmax attention of every block, taken from timm's own unfused path via a hook."""
    maps = []
    for mod in model.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = False
            mod.attn_drop.register_forward_hook(lambda _m, _i, out: maps.append(out.detach()))
    model(images)
    return maps


@pytest.mark.parametrize("path", FAST_PATHS)
@pytest.mark.parametrize("kind", ["deit", "distilled"])
def test_matches_full_k_class_propagation_like_the_reference(kind, path):
    """Push (B, N, K) smoothed label distributions through Ā of each block, as the reference does."""
    model, mix = mixed(kind, torch.float64)
    model.eval()
    targets = torch.tensor([0, 3, 5, 6])
    k = 7
    y_a = smoothed_one_hot(targets, k).double()
    y_b = y_a[mix.partner]
    own = mix.patch_weights.double().unsqueeze(-1)
    patch_labels = own * y_a[:, None] + (1 - own) * y_b[:, None]
    prefix = model.num_prefix_tokens
    lam = mix.patch_weights.double().mean(1, keepdim=True)
    labels = torch.cat([(lam * y_a + (1 - lam) * y_b)[:, None].expand(-1, prefix, -1), patch_labels], 1)
    for attn in _captured_attention(model, mix.images):
        labels = (attn.mean(1) @ labels + labels) / 2
    _, w = aligned_forward(model, mix.images, mix.patch_weights.double(), path=path)
    expected = mixed_targets(targets, mix.partner, w, k).double()
    got = labels[:, :prefix] if kind == "distilled" else labels[:, 0]
    assert (got - expected).abs().max().item() < 1e-6  # mixed_targets works in float32
    # and the explicit K-class path of propagate_labels agrees with the hooked reference
    for full_path in ("explicit", path):  # K-class labels through every path
        _, full = propagate_labels(model, mix.images, patch_labels, path=full_path)
        assert (full[:, prefix:] - labels[:, prefix:]).abs().max().item() < 1e-10


@pytest.mark.parametrize("path", FAST_PATHS)
def test_swin_k_class_propagation_matches_scalar_weights(path):
    model, mix = mixed("swin", torch.float64, mode="elem")
    targets = torch.tensor([1, 2, 3, 4])
    y_a = smoothed_one_hot(targets, 7).double()
    own = mix.patch_weights.double().unsqueeze(-1)
    patch_labels = own * y_a[:, None] + (1 - own) * y_a[mix.partner][:, None]
    _, full = propagate_labels(model, mix.images, patch_labels, path="explicit")
    _, w = aligned_forward(model, mix.images, mix.patch_weights.double(), path=path)
    expected = mixed_targets(targets, mix.partner, w, 7).double()
    assert (full.flatten(1, 2).mean(1) - expected).abs().max().item() < 1e-6
    assert full.shape[1:3] == (4, 4)  # 16x16 tokens merged twice


@pytest.mark.parametrize("kind", list(MODELS))
def test_weights_stay_in_unit_interval_and_pure_images_stay_one(kind):
    model, mix = mixed(kind)
    _, w = aligned_forward(model, mix.images, mix.patch_weights)
    assert w.min() >= 0 and w.max() <= 1
    _, w_own = aligned_forward(model, mix.images, torch.ones_like(mix.patch_weights))
    assert torch.equal(w_own, torch.ones_like(w_own))
    # a mixup batch: uniform weights λ everywhere, propagation is the identity (the reference crashes)
    _, w_mixup = aligned_forward(model, mix.images, torch.full_like(mix.patch_weights, 0.3))
    assert torch.allclose(w_mixup, torch.full_like(w_mixup, 0.3), atol=1e-6)


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_uniform_attention_keeps_cls_weight_at_lambda(depth):
    model, patch, size = make("deit", depth=depth)
    with torch.no_grad():
        for blk in model.blocks:  # zero queries and keys: every attention row is uniform
            dim = blk.attn.qkv.in_features
            blk.attn.qkv.weight[: 2 * dim] = 0
            blk.attn.qkv.bias[: 2 * dim] = 0
    mix = token_cutmix(batch(size), patch, mode="elem", generator=torch.Generator().manual_seed(9))
    _, w = aligned_forward(model, mix.images, mix.patch_weights)
    assert torch.allclose(w, mix.patch_weights.mean(1), atol=1e-6)


@pytest.mark.parametrize("path", FAST_PATHS)
@pytest.mark.parametrize("kind", list(MODELS))
def test_no_gradient_through_labels_and_same_parameter_gradients(kind, path):
    model, mix = mixed(kind)
    model.train()
    weights = mix.patch_weights.clone().requires_grad_(True)
    logits, w = aligned_forward(model, mix.images, weights, path=path)
    assert not w.requires_grad
    targets = mixed_targets(torch.tensor([0, 1, 2, 3]), mix.partner, w, 7)
    crit = SoftTargetCrossEntropy()
    if kind == "distilled":
        loss = (crit(logits[0], targets[:, 0]) + crit(logits[1], targets[:, 1])) / 2
    else:
        loss = crit(logits, targets)
    loss.backward()
    assert weights.grad is None
    aligned = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    if kind == "distilled":
        model.set_distilled_training(True)
        plain = model(mix.images)
        ((crit(plain[0], targets[:, 0]) + crit(plain[1], targets[:, 1])) / 2).backward()
    else:
        crit(model(mix.images), targets).backward()
    assert aligned.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        assert torch.allclose(aligned[name], p.grad, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("path", FAST_PATHS)
@pytest.mark.parametrize("kind", list(MODELS))
def test_cpu_autocast_bfloat16(kind, path):
    model, mix = mixed(kind)
    _, w32 = aligned_forward(model, mix.images, mix.patch_weights, path="explicit")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, w = aligned_forward(model, mix.images, mix.patch_weights, path=path)
        targets = mixed_targets(torch.arange(4), mix.partner, w, 7)
        loss = SoftTargetCrossEntropy()(first(logits), targets if w.ndim == 1 else targets[:, 0])
    loss.backward()
    assert w.dtype == torch.float32 and torch.isfinite(first(logits)).all()
    assert (w - w32).abs().max() < 3e-2


def test_aligned_model_wrapper_for_ddp():
    model, mix = mixed("deit")
    model.eval()
    wrapped = AlignedModel(model)
    assert torch.equal(wrapped(mix.images), model(mix.images))
    logits, w = wrapped(mix.images, mix.patch_weights)
    assert w.shape == (4,)


# ------------------------------------------------------------------------------------------- targets


def test_mixed_targets_rows_sum_to_one_and_interpolate():
    targets = torch.tensor([0, 1, 2])
    partner = torch.tensor([2, 1, 0])
    t = mixed_targets(targets, partner, torch.tensor([1.0, 0.5, 0.25]), 4, smoothing=0.1)
    assert torch.allclose(t.sum(1), torch.ones(3))
    assert torch.allclose(t[0], torch.tensor([0.925, 0.025, 0.025, 0.025]))
    assert torch.allclose(t[2], 0.25 * smoothed_one_hot(torch.tensor([2]), 4)[0]
                          + 0.75 * smoothed_one_hot(torch.tensor([0]), 4)[0])
    two = mixed_targets(targets, partner, torch.tensor([[1.0, 0.0]] * 3), 4)
    assert two.shape == (3, 2, 4) and torch.allclose(two[:, 1], smoothed_one_hot(targets[partner], 4))


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name, kwargs, message", [
    ("resnet18", {}, "ResNet"),
    ("vit_tiny_patch16_224", dict(img_size=32, depth=1, class_token=False, global_pool="avg"), "cls token"),
    ("vit_tiny_patch16_224", dict(img_size=32, depth=1, patch_drop_rate=0.5), "patch dropout"),
])
def test_unsupported_models_get_a_clear_error(name, kwargs, message):
    model = timm.create_model(name, num_classes=3, **kwargs)
    with pytest.raises(UnsupportedModelError, match=message):
        check_supported(model)
    with pytest.raises(UnsupportedModelError, match="supported:"):
        aligned_forward(model, torch.randn(2, 3, 32, 32), torch.ones(2, 4))


def test_wrong_patch_count_is_explained():
    model, patch, size = make("deit")
    with pytest.raises(ValueError, match="patch size"):
        aligned_forward(model, batch(size), torch.ones(4, 5))


@pytest.mark.parametrize("kind", list(MODELS))
def test_second_path_with_gpu_padding_equals_explicit(kind, monkeypatch):
    """On CUDA the second path pads labels to 8 channels once, before the first block; the CPU does
    not pad, so the padded walk is forced here to check it on the CPU too."""
    import tla_jobs.align.attention as attention
    import tla_jobs.align.models as models

    def padded(k, device):
        return -(-k // 8) * 8

    monkeypatch.setattr(attention, "label_channels", padded)
    monkeypatch.setattr(models, "label_channels", padded)
    model, mix = mixed(kind, torch.float64, mode="elem")
    _, ws = aligned_forward(model, mix.images, mix.patch_weights.double(), path="second")
    _, we = aligned_forward(model, mix.images, mix.patch_weights.double(), path="explicit")
    assert ws.shape == we.shape and (ws - we).abs().max().item() < 1e-10
    labels = torch.rand(4, mix.patch_weights.shape[1], 3, dtype=torch.float64)
    _, ls = propagate_labels(model, mix.images, labels, path="second")
    _, le = propagate_labels(model, mix.images, labels, path="explicit")
    assert ls.shape == le.shape and ls.shape[-1] == 3 and (ls - le).abs().max().item() < 1e-10


def test_one_head_swin_is_the_micro_swin_with_one_head_per_block():
    """tla_swin_micro_h1 (docs/results.md: where the labels move most) differs from tla_swin_micro in
    its heads only, and TL-Align runs on it."""
    from tla_jobs.train.models import build_model

    three, one = build_model("tla_swin_micro", 10), build_model("tla_swin_micro_h1", 10)

    def heads(model):
        return [blk.attn.num_heads for layer in model.layers for blk in layer.blocks]

    def shapes(model):  # the relative position bias tables have a row per head
        return {k: v.shape for k, v in model.state_dict().items() if "relative_position_bias_table" not in k}

    assert heads(three) == [3, 3, 3, 3, 6, 6] and heads(one) == [1] * 6
    assert shapes(three) == shapes(one)
    mix = token_cutmix(batch(32), 2, mode="elem", generator=torch.Generator().manual_seed(0))
    _, w = aligned_forward(one.eval(), mix.images, mix.patch_weights)
    assert w.shape == (4,) and 0 <= w.min() and w.max() <= 1
