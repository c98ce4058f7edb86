"""ViT token shapes, encoding only kept patches, exact masking counts, patch order, the MAE decoder and the ResNet backbone."""

import math

import numpy as np
import pytest
import torch
import torchvision

from core.heads import MAEDecoder
from core.masking import patchify, random_mask, time_freq_mask, tube_mask, unpatchify
from core.resnet import ResNet
from core.vit import PatchEmbed, ViT, drop_path, sincos_pos_embed

TINY = dict(dim=16, depth=1, heads=2)


@pytest.mark.parametrize(
    "input_size, patch_size, in_chans, grid",
    [
        ((8, 12), (4, 4), 3, (2, 3)),  # image
        ((4, 8, 8), (2, 4, 4), 3, (2, 2, 2)),  # video tubelets
        ((16, 32), (4, 8), 1, (4, 4)),  # spectrogram (mel bins, frames)
    ],
)
def test_vit_token_and_embedding_shapes(input_size, patch_size, in_chans, grid):
    torch.manual_seed(0)
    vit = ViT(input_size=input_size, patch_size=patch_size, in_chans=in_chans, **TINY)
    n = math.prod(grid)
    assert vit.grid == grid and vit.num_patches == n
    x = torch.randn(2, in_chans, *input_size)
    assert vit.tokens(x).shape == (2, 1 + n, 16)
    assert vit(x).shape == (2, 16)
    keep_idx, _ = random_mask(2, n, 0.5)
    assert vit.tokens(x, keep_idx).shape == (2, 1 + n // 2, 16)


def test_tokens_encode_only_kept_patches():
    torch.manual_seed(0)
    vit = ViT(input_size=(8, 8), patch_size=(4, 4), in_chans=1, pool="mean", **TINY).eval()
    x = torch.randn(1, 1, 8, 8)
    keep_idx = torch.tensor([[0, 3]])  # grid 2x2: keep top-left and bottom-right, hide (0, 1) and (1, 0)
    base = vit.tokens(x, keep_idx)

    hidden_changed = x.clone()
    hidden_changed[..., 0:4, 4:8] += 5.0  # patch 1
    hidden_changed[..., 4:8, 0:4] -= 5.0  # patch 2
    torch.testing.assert_close(vit.tokens(hidden_changed, keep_idx), base, rtol=0, atol=0)

    kept_changed = x.clone()
    kept_changed[..., 4:8, 4:8] += 5.0  # patch 3
    assert not torch.allclose(vit.tokens(kept_changed, keep_idx), base, atol=1e-4)
    # Without a mask the hidden patches do count.
    assert not torch.allclose(vit.tokens(hidden_changed), vit.tokens(x), atol=1e-4)


def test_patch_embed_rejects_indivisible_and_wrong_sizes():
    with pytest.raises(ValueError, match=r"\(10, 8\).*\(4, 4\).*axis 0"):
        PatchEmbed((10, 8), (4, 4), 3, 8)
    with pytest.raises(ValueError, match="2D or 3D"):
        PatchEmbed((8, 8), (2, 4, 4), 3, 8)
    embed = PatchEmbed((8, 8), (4, 4), 3, 8)
    with pytest.raises(ValueError, match=r"\(8, 12\)"):
        embed(torch.zeros(1, 3, 8, 12))


def test_random_mask_exact_counts():
    gen = torch.Generator().manual_seed(0)
    for n, ratio, kept in [(196, 0.75, 49), (10, 0.9, 1), (1000, 0.9, 100), (16, 0.5, 8), (7, 0.5, 3)]:
        keep_idx, mask = random_mask(4, n, ratio, generator=gen)
        assert keep_idx.shape == (4, kept), (n, ratio)
        assert mask.shape == (4, n)
        assert (mask.sum(1) == n - kept).all()
        for b in range(4):
            assert keep_idx[b].unique().numel() == kept
            assert (keep_idx[b].diff() > 0).all()  # sorted, the order the encoder sees
            assert not mask[b, keep_idx[b]].any()
    # Different samples get different masks.
    keep_idx, _ = random_mask(8, 64, 0.75, generator=gen)
    assert len({tuple(row.tolist()) for row in keep_idx}) > 1


def test_tube_mask_shares_the_spatial_mask_over_time():
    t, h, w = 4, 3, 5
    keep_idx, mask = tube_mask(3, (t, h, w), 0.6, generator=torch.Generator().manual_seed(1))
    kept_per_frame = h * w - math.floor(h * w * 0.6)
    assert keep_idx.shape == (3, t * kept_per_frame)
    assert mask.shape == (3, t * h * w)
    assert (mask.sum(1) == t * (h * w - kept_per_frame)).all()
    frames = mask.view(3, t, h * w)
    for b in range(3):
        for i in range(1, t):
            assert torch.equal(frames[b, i], frames[b, 0])
        assert (keep_idx[b].diff() > 0).all()
        assert not mask[b, keep_idx[b]].any()


def test_tube_and_time_freq_masks_count_as_videomae_and_audiomae_do():
    # VideoMAE hides int(196 * 0.9) = 176 places per frame (20 visible, not int(196 * 0.1) = 19).
    assert tube_mask(2, (8, 14, 14), 0.9)[0].shape == (2, 8 * 20)
    # AudioMAE keeps int(64 * 0.4) = 25 time columns and int(8 * 0.5) = 4 frequency rows of its 8 x 64 grid.
    assert time_freq_mask(2, (8, 64), time_mask_ratio=0.6, freq_mask_ratio=0.5)[0].shape == (2, 4 * 25)


def test_time_freq_mask_hides_whole_rows_and_columns():
    f, t = 6, 10
    keep_idx, mask = time_freq_mask(4, (f, t), time_mask_ratio=0.3, freq_mask_ratio=0.5, generator=torch.Generator().manual_seed(2))
    n_f, n_t = f - 3, t - 3
    assert keep_idx.shape == (4, n_f * n_t)
    grid = mask.view(4, f, t)
    for b in range(4):
        hidden_rows = grid[b].all(dim=1)
        hidden_cols = grid[b].all(dim=0)
        assert int(hidden_rows.sum()) == f - n_f and int(hidden_cols.sum()) == t - n_t
        # Every hidden patch lies in a hidden row or a hidden column; every other patch is visible.
        expected = hidden_rows.view(f, 1) | hidden_cols.view(1, t)
        assert torch.equal(grid[b], expected)
        assert not mask[b, keep_idx[b]].any()


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_mask_ratio_outside_open_interval_raises(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        random_mask(2, 16, ratio)
    with pytest.raises(ValueError, match="mask_ratio"):
        tube_mask(2, (2, 4, 4), ratio)
    with pytest.raises(ValueError, match="time_mask_ratio"):
        time_freq_mask(2, (4, 4), ratio, 0.5)
    with pytest.raises(ValueError, match="freq_mask_ratio"):
        time_freq_mask(2, (4, 4), 0.5, ratio)


def test_mask_that_keeps_nothing_raises_naming_the_setting():
    with pytest.raises(ValueError, match="mask_ratio=0.9 leaves no visible patch of 4"):
        random_mask(2, 4, 0.9)
    with pytest.raises(ValueError, match="freq_mask_ratio=0.9 leaves no visible frequency row of 8"):
        time_freq_mask(2, (8, 64), 0.6, 0.9)
    with pytest.raises(ValueError, match="time_mask_ratio=0.99 leaves no visible time column of 64"):
        time_freq_mask(2, (8, 64), 0.99, 0.5)


def test_tube_mask_that_leaves_no_visible_place_raises():
    # Float error can round int(H * W * ratio) up to every place: the encoder would then see the class token alone.
    with pytest.raises(ValueError, match=r"mask_ratio=0.9999999 leaves no visible place of 4"):
        tube_mask(2, (3, 2, 2), 1 - 1e-7)


def test_time_freq_mask_hides_other_rows_and_columns_in_each_sample():
    # One draw of rows or of columns shared by the batch would hide the same bins in every sample of a step.
    _, mask = time_freq_mask(16, (6, 8), time_mask_ratio=0.5, freq_mask_ratio=0.5, generator=torch.Generator().manual_seed(3))
    grid = mask.view(16, 6, 8)
    hidden_rows, hidden_cols = grid.all(dim=2), grid.all(dim=1)  # (B, F), (B, T)
    assert len({tuple(r) for r in hidden_rows.tolist()}) > 1 and len({tuple(c) for c in hidden_cols.tolist()}) > 1


@pytest.mark.parametrize("shape, patch_size", [((2, 3, 8, 12), (4, 4)), ((2, 3, 4, 8, 8), (2, 4, 4)), ((2, 1, 16, 32), (4, 8))])
def test_patchify_round_trip(shape, patch_size):
    x = torch.randn(shape)
    patches = patchify(x, patch_size)
    grid = tuple(s // p for s, p in zip(shape[2:], patch_size))
    assert patches.shape == (shape[0], math.prod(grid), math.prod(patch_size) * shape[1])
    assert torch.equal(unpatchify(patches, patch_size, grid, shape[1]), x)


def test_patchify_patch_content_by_hand():
    # (1, 2, 4, 4) image, 2x2 patches: patch k = (row, col) of the 2x2 grid, features (py, px, c).
    x = torch.arange(32.0).view(1, 2, 4, 4)
    patches = patchify(x, (2, 2))
    for k in range(4):
        gy, gx = divmod(k, 2)
        expected = [x[0, c, 2 * gy + py, 2 * gx + px].item() for py in range(2) for px in range(2) for c in range(2)]
        assert patches[0, k].tolist() == expected


def test_patchify_rejects_indivisible():
    with pytest.raises(ValueError, match=r"\(5, 8\)"):
        patchify(torch.zeros(1, 3, 5, 8), (4, 4))


def test_patchify_rejects_a_patch_of_another_rank():
    # A 3D tubelet on a 2D image (or the reverse) must fail naming both shapes, not deep in a reshape.
    with pytest.raises(ValueError, match=r"\(8, 8\).*\(2, 4, 4\)"):
        patchify(torch.zeros(1, 3, 8, 8), (2, 4, 4))


@pytest.mark.parametrize("input_size, patch_size", [((8, 12), (4, 4)), ((4, 8, 8), (2, 4, 4))])
def test_patchify_order_matches_patch_embed_tokens(input_size, patch_size):
    """A PatchEmbed whose conv copies each pixel of the patch to one output channel must reproduce
    patchify exactly: same patch order (token k) and same feature order."""
    c = 2
    p = math.prod(patch_size)
    embed = PatchEmbed(input_size, patch_size, c, dim=p * c)
    with torch.no_grad():
        embed.proj.bias.zero_()
        embed.proj.weight.zero_()  # (dim, C, *patch_size)
        for j in range(p * c):
            offset, channel = divmod(j, c)  # patchify's features are (*patch positions, channel)
            position = [0] * len(patch_size)
            for axis in reversed(range(len(patch_size))):
                offset, position[axis] = divmod(offset, patch_size[axis])
            embed.proj.weight[(j, channel, *position)] = 1.0
    x = torch.randn(2, c, *input_size)
    torch.testing.assert_close(embed(x), patchify(x, patch_size), rtol=0, atol=1e-6)


@pytest.mark.parametrize("grid, dim", [((2, 3), 16), ((2, 2, 3), 24), ((14, 14), 64), ((3, 4, 4), 10)])
def test_sincos_pos_embed_shape_and_distinct_rows(grid, dim):
    pe = sincos_pos_embed(grid, dim)
    n = math.prod(grid)
    assert pe.shape == (n, dim)
    assert torch.isfinite(pe).all()
    distances = torch.cdist(pe, pe) + torch.eye(n) * 1e3
    assert distances.min() > 1e-3


def test_sincos_pos_embed_values_by_hand():
    # 1x2 grid, dim 4: axis 0 gets 2 channels (sin, cos of row * 1), axis 1 gets 2 (sin, cos of col * 1).
    pe = sincos_pos_embed((1, 2), 4)
    expected = torch.tensor([[0.0, 1.0, 0.0, 1.0], [0.0, 1.0, math.sin(1.0), math.cos(1.0)]])
    torch.testing.assert_close(pe, expected)
    with pytest.raises(ValueError, match="even"):
        sincos_pos_embed((2, 2), 7)


def test_mae_decoder_starts_as_maes_does():
    """Its mask token drawn from N(0, 0.02), linears xavier-uniform with zero biases (the official code's
    initialize_weights); the tests against that code copy weights over, so they cannot see the init."""
    torch.manual_seed(0)
    decoder = MAEDecoder((16, 16), 32, 48, dim=512, depth=1, heads=8)
    assert decoder.mask_token.std().item() == pytest.approx(0.02, rel=0.15)
    for linear in (m for m in decoder.modules() if isinstance(m, torch.nn.Linear)):
        bound = math.sqrt(6 / (linear.in_features + linear.out_features))
        assert linear.weight.abs().max() <= bound and linear.weight.abs().max() > 0.9 * bound and not linear.bias.any()


def test_mae_decoder_shape_and_visible_tokens_in_place():
    torch.manual_seed(0)
    grid, enc_dim, patch_dim = (2, 3), 12, 5
    n = math.prod(grid)
    decoder = MAEDecoder(grid, enc_dim, patch_dim, dim=8, depth=1, heads=2)
    keep_idx = torch.tensor([[1, 4], [0, 5]])
    tokens = torch.randn(2, 3, enc_dim)
    assert decoder(tokens, keep_idx).shape == (2, n, patch_dim)

    # With no blocks each output depends only on its own position, so it can be checked token by token.
    flat = MAEDecoder(grid, enc_dim, patch_dim, dim=8, depth=0, heads=2)
    out = flat(tokens, keep_idx)
    with torch.no_grad():
        for b in range(2):
            visible = {int(idx): k for k, idx in enumerate(keep_idx[b])}
            for i in range(n):
                x = flat.embed(tokens[b, 1 + visible[i]]) if i in visible else flat.mask_token[0, 0]
                expected = flat.pred(flat.norm(x + flat.pos_embed[0, i]))
                torch.testing.assert_close(out[b, i], expected)


def test_drop_path_drops_whole_samples_in_training_only():
    torch.manual_seed(0)
    branch = torch.randn(4000, 3, 5)
    out = drop_path(branch, 0.25, training=True)
    dropped = (out == 0).flatten(1).all(1)  # (B,): a sample's branch goes whole or not at all
    torch.testing.assert_close(out[~dropped], branch[~dropped] / 0.75)  # the kept ones scaled to keep the mean
    assert abs(dropped.float().mean().item() - 0.25) < 0.03
    assert drop_path(branch, 0.25, training=False) is branch and drop_path(branch, 0.0, training=True) is branch


def test_vit_stochastic_depth_rises_over_the_blocks_and_is_off_at_evaluation():
    torch.manual_seed(0)
    vit = ViT(input_size=(8, 8), patch_size=(4, 4), dim=16, depth=5, heads=2, drop_path=0.2)
    assert [round(b.drop_path_rate, 6) for b in vit.blocks] == [0.0, 0.05, 0.1, 0.15, 0.2]
    assert vit.config["drop_path"] == 0.2  # exports rebuild it
    x = torch.randn(64, 3, 8, 8)
    vit.train()
    assert not torch.allclose(vit(x), vit(x))  # each call drops other paths
    vit.eval()
    torch.testing.assert_close(vit(x), vit(x))
    with pytest.raises(ValueError, match="drop_path"):
        ViT(input_size=(8, 8), patch_size=(4, 4), **TINY, drop_path=1.0)


def test_tokens_of_other_sizes_only_when_asked_with_the_position_table_resized():
    torch.manual_seed(0)
    vit = ViT(input_size=(16, 16), patch_size=(4, 4), **TINY)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(vit.tokens(x, any_size=True), vit.tokens(x))  # its own size: its own table
    assert vit.tokens(torch.randn(2, 3, 8, 12), any_size=True).shape == (2, 1 + 2 * 3, 16)
    # A table that varies along the width only stays so when resized: the rows of the small grid are equal.
    vit.pos_embed.copy_(torch.linspace(0, 1, 4).repeat(4).view(1, 16, 1).expand(1, 16, 16))
    small = vit.positions((2, 3)).view(2, 3, 16)
    torch.testing.assert_close(small[0], small[1])
    with pytest.raises(ValueError, match="expected input of spatial size"):
        vit.tokens(torch.randn(2, 3, 8, 8))  # a masked autoencoder's wrong data size still fails
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        vit.tokens(torch.randn(2, 3, 10, 10), any_size=True)
    clip = ViT(input_size=(4, 8, 8), patch_size=(2, 4, 4), **TINY)
    with pytest.raises(ValueError, match="only 2D position tables"):
        clip.tokens(torch.randn(1, 3, 4, 4, 4), any_size=True)


def test_a_learned_position_table_trains_exports_and_is_resized_for_smaller_crops(tmp_path):
    torch.manual_seed(0)
    vit = ViT(input_size=(16, 16), patch_size=(4, 4), **TINY, pos_embed="learned", init="trunc_normal")
    assert isinstance(vit.pos_embed, torch.nn.Parameter) and vit.pos_embed.shape == (1, 16, 16)
    assert "pos_embed" in vit.state_dict()  # so an export carries it
    vit.tokens(torch.randn(2, 3, 8, 8), any_size=True).sum().backward()  # a local crop, through the resized table
    assert vit.pos_embed.grad is not None and vit.pos_embed.grad.abs().sum() > 0
    assert 0.015 < vit.blocks[0].mlp[0].weight.std() < 0.025 and vit.blocks[0].mlp[0].bias.abs().max() == 0
    fixed = ViT(input_size=(16, 16), patch_size=(4, 4), **TINY)
    assert "pos_embed" not in fixed.state_dict()
    assert fixed.blocks[0].mlp[0].weight.std() > 0.1  # xavier-uniform: sqrt(2 / (16 + 64)) = 0.16
    with pytest.raises(ValueError, match="pos_embed"):
        ViT(input_size=(16, 16), patch_size=(4, 4), **TINY, pos_embed="rope")
    with pytest.raises(ValueError, match="init"):
        ViT(input_size=(16, 16), patch_size=(4, 4), **TINY, init="xavier")


def test_sincos_pos_embed_rows_are_row_major_over_the_grid():
    """On a grid that is not square: on (1, 2) or (2, 2) the two axis orders give the same table."""
    pe = sincos_pos_embed((2, 3), 8)  # channels 0-3: the row's sin/cos, 4-7: the column's
    for k in range(6):
        torch.testing.assert_close(pe[k, :4], pe[(k // 3) * 3, :4])  # patch k lies in row k // 3
        torch.testing.assert_close(pe[k, 4:], pe[k % 3, 4:])  # and in column k % 3
    assert not torch.allclose(pe[1, 4:], pe[0, 4:]) and not torch.allclose(pe[3, :4], pe[0, :4])


def mae_1d_sincos(dim: int, pos: np.ndarray) -> np.ndarray:
    """MAE's get_1d_sincos_pos_embed_from_grid (facebookresearch/mae, util/pos_embed.py)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def test_sincos_pos_embed_is_maes_table_with_its_halves_swapped():
    # The table is a non-persistent buffer rebuilt at load time: its values are part of every checkpoint's meaning.
    size, dim = 4, 16
    grid = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64))  # as MAE: columns first
    mae = np.concatenate([mae_1d_sincos(dim // 2, grid[0]), mae_1d_sincos(dim // 2, grid[1])], axis=1)
    swapped = np.concatenate([mae[:, dim // 2 :], mae[:, : dim // 2]], axis=1)
    torch.testing.assert_close(sincos_pos_embed((size, size), dim), torch.from_numpy(swapped).float())


def test_sincos_pos_embed_gives_the_first_axis_the_channels_left_over():
    # 10 channels over (T, H, W): 6 for time, 2 each for rows and columns, so video tables stay as trained.
    t, h, w = np.meshgrid(np.arange(2.0), np.arange(3.0), np.arange(4.0), indexing="ij")
    expected = np.concatenate([mae_1d_sincos(6, t), mae_1d_sincos(2, h), mae_1d_sincos(2, w)], axis=1)
    torch.testing.assert_close(sincos_pos_embed((2, 3, 4), 10), torch.from_numpy(expected).float())


def test_smaller_grids_get_the_position_table_resized_bicubically():
    # DINO's local crops read positions from a bicubic resize (Keys' a = -0.75, align_corners=False), as DINO's code.
    vit = ViT(input_size=(16, 16), patch_size=(4, 4), **TINY)
    vit.pos_embed.copy_(torch.tensor([0.0, 1.0, 4.0, 9.0]).repeat(4).view(1, 16, 1).expand(1, 16, 16))
    # Columns 0.5 and 2.5 of the 4-wide table, weights (-3, 19, 19, -3) / 32, the border column repeated.
    expected = torch.tensor([(19 * 1 - 3 * 4) / 32, (-3 * 1 + 19 * 4 + 19 * 9 - 3 * 9) / 32])
    torch.testing.assert_close(vit.positions((2, 2))[0, :, 0], expected.repeat(2))


def test_cls_pool_returns_the_class_token_and_mean_pool_the_patch_tokens():
    # A linear probe on "cls" must read the class token, not the first patch.
    torch.manual_seed(0)
    vit = ViT(input_size=(8, 8), patch_size=(4, 4), **TINY).eval()
    x = torch.randn(2, 3, 8, 8)
    tokens = vit.tokens(x)
    assert torch.equal(vit(x), tokens[:, 0])
    vit.pool = "mean"
    torch.testing.assert_close(vit(x), tokens[:, 1:].mean(dim=1))


def test_vit_mlp_width_follows_mlp_ratio_and_width_must_split_into_heads():
    # Configs that set mlp_ratio (exports rebuild from it) must get that width; a bad split fails when built.
    vit = ViT(input_size=(8, 8), patch_size=(4, 4), dim=16, depth=1, heads=2, mlp_ratio=2.0)
    assert vit.blocks[0].mlp[0].out_features == 32 and vit.blocks[0].mlp[2].in_features == 32
    with pytest.raises(ValueError, match="width 16 is not divisible by 3 heads"):
        ViT(input_size=(8, 8), patch_size=(4, 4), dim=16, depth=1, heads=3)


def test_mae_init_treats_the_patch_projection_as_a_linear_layer():
    # MAE's initialize_weights: xavier-uniform over the (dim, C * p * p) view of the kernel, not the conv's fans.
    torch.manual_seed(0)
    proj = ViT(input_size=(16, 16), patch_size=(8, 8), dim=64, depth=1, heads=2).patch_embed.proj
    bound = math.sqrt(6 / (3 * 8 * 8 + 64))
    assert 0.9 * bound < proj.weight.abs().max() <= bound and not proj.bias.any()


@pytest.mark.parametrize("init, pos_embed", [("mae", "sincos"), ("trunc_normal", "learned")])
def test_class_token_and_learned_positions_start_small(init, pos_embed):
    # MAE, DeiT and DINO draw them with std 0.02: a zero class token or unit-scale positions train otherwise.
    torch.manual_seed(0)
    vit = ViT(input_size=(32, 32), patch_size=(4, 4), dim=512, depth=1, heads=8, init=init, pos_embed=pos_embed)
    assert vit.cls_token.std().item() == pytest.approx(0.02, rel=0.15)
    if pos_embed == "learned":
        assert vit.pos_embed.std().item() == pytest.approx(0.02, rel=0.05)


# ---------------------------------------------------------------- ResNet


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_is_torchvisions_without_its_classifier(depth):
    # Same stem, strides, widths and blocks as torchvision's: its weights load in order and give its pooled features.
    torch.manual_seed(0)
    ours = ResNet(depth).eval()
    theirs = getattr(torchvision.models, f"resnet{depth}")()
    theirs.fc = torch.nn.Identity()
    theirs.eval()
    ours.load_state_dict(dict(zip(ours.state_dict(), theirs.state_dict().values(), strict=True)))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


def test_resnet_small_image_stem_keeps_32_pixel_inputs_at_4x4():
    # The CIFAR stem (stride 1, no max-pool): the ImageNet one would shrink 32 px to 1x1 before the last stage.
    x = torch.randn(2, 3, 32, 32)
    small, large = ResNet(18, small_images=True, width=4), ResNet(18, width=4)
    assert small.stages(small.stem(x)).shape == (2, 32, 4, 4) and large.stages(large.stem(x)).shape == (2, 32, 1, 1)


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_blocks_start_as_the_identity_unless_asked_not_to(depth):
    # Goyal et al. 2017: with the branch's last BatchNorm at zero, a block passes relu(x) on, which eases large-batch training.
    torch.manual_seed(0)
    for zero_init in (True, False):
        net = ResNet(depth, small_images=True, width=4) if zero_init else ResNet(depth, small_images=True, zero_init_residual=False, width=4)
        blocks = [b for s in net.stages for b in s if b.downsample is None]
        assert len(blocks) == (5 if depth == 18 else 12)
        for block in blocks:
            x = torch.randn(2, block.conv1.in_channels, 4, 4)
            assert torch.equal(block(x), torch.relu(x)) == zero_init


def test_resnet_convs_start_as_torchvisions():
    # Kaiming-normal over fan-out (torchvision's init): the 7x7 stem's std is sqrt(2 / (64 * 49)), not sqrt(2 / (3 * 49)).
    torch.manual_seed(0)
    net = ResNet(18)
    for conv in (net.stem[0], net.stages[1][0].downsample[0]):
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)


def test_resnet_rejects_unknown_depths_and_empty_widths():
    # Both come from configs: a typo must fail naming the setting, not build a network without channels.
    with pytest.raises(ValueError, match=r"depth=101 must be one of \[18, 34, 50\]"):
        ResNet(101)
    with pytest.raises(ValueError, match="width=0 must be positive"):
        ResNet(18, width=0)
