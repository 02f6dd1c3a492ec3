"""Batched augmentations: shapes, ranges, per-sample randomness, reproducibility."""
from __future__ import annotations

import torch

from sslfeatures.augment import Views, ViewSpec, ops, random_patch_mask


def _batch(photos, n=8, size=48):
    imgs = [torch.from_numpy(p[:size, :size]).permute(2, 0, 1) for p in photos[:n]]
    return torch.stack(imgs)


def test_ops_keep_range_and_shape(photos):
    torch.manual_seed(0)
    x = _batch(photos).float() / 255
    y = ops.random_resized_crop(x, 32)
    assert y.shape == (len(x), 3, 32, 32)
    for fn in (lambda t: ops.color_jitter(t, p=1.0), lambda t: ops.random_grayscale(t, 1.0),
               lambda t: ops.gaussian_blur(t, 1.0, ref_size=32),  # sigma as at 224 px, not ~0
               lambda t: ops.solarize(t, 1.0)):
        z = fn(y)
        assert z.shape == y.shape and z.min() >= 0 and z.max() <= 1
        assert not torch.allclose(z, y)


def test_full_crop_without_flip_is_identity(photos):
    x = _batch(photos).float() / 255
    y = ops.random_resized_crop(x, 48, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_p=0.0)
    assert torch.allclose(x, y, atol=1e-5)
    flipped = ops.random_resized_crop(x, 48, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_p=1.0)
    assert torch.allclose(x.flip(-1), flipped, atol=1e-5)


def test_parameters_differ_per_sample(photos):
    x = _batch(photos, n=1).float().repeat(16, 1, 1, 1) / 255
    y = ops.random_resized_crop(x, 32)
    assert len({round(float(v), 4) for v in y.mean((1, 2, 3))}) > 10


def test_views_are_reproducible_from_the_seed(photos):
    views = Views.from_config([{"count": 2}, {"size_frac": 0.5, "count": 3}])
    x = _batch(photos)
    torch.manual_seed(3)
    a = views(x, 32)
    torch.manual_seed(3)
    b = views(x, 32)
    assert [v.shape[-1] for v in a] == [32, 32, 16, 16, 16]
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_patch_mask():
    keep, mask, restore = random_patch_mask(4, 16, 0.75)
    assert keep.shape == (4, 4) and mask.sum(1).tolist() == [12.0] * 4
    # the kept patches are exactly the unmasked ones
    for i in range(4):
        assert set(keep[i].tolist()) == set((mask[i] == 0).nonzero().squeeze(1).tolist())


def test_view_spec_rejects_unknown_keys():
    import pytest

    with pytest.raises(ValueError, match="unknown view option"):
        ViewSpec.from_dict({"scael": [0.2, 1.0]})
