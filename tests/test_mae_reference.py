"""core.mae_reference on its own, against the official MAE code (facebookresearch/mae, models_mae.py) written
out here where the recipes' comparisons (tests/test_mae.py and the others) cannot tell: the norms' eps and
frozen position tables, how many patches stay visible, the noise drawn when none is given, the loss on
normalized pixels, and the full gather indices whose memory the benchmarks measure."""

import pytest
import torch
from torch import nn

from core.mae_reference import ReferenceMAE

SHAPE = dict(image_size=(16, 12), patch_size=4, in_chans=3, dim=32, depth=2, heads=2, decoder_dim=16, decoder_depth=1, decoder_heads=2)
N = 4 * 3  # patches


def reference(**changes) -> ReferenceMAE:
    torch.manual_seed(0)
    model = ReferenceMAE(**{**SHAPE, **changes})
    with torch.no_grad():  # the recipes copy position tables in: nonzero, as they are there
        model.pos_embed[:, 1:].normal_()
        model.decoder_pos_embed[:, 1:].normal_()
        model.mask_token.normal_()
    return model


def official_patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """models_mae.py's patchify, (B, C, H, W) -> (B, L, p*p*C), for non-square images."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, H // p * (W // p), p * p * C)


def test_every_layer_norm_has_the_official_eps_and_the_position_tables_stay_frozen():
    """models_mae.py: norm_layer=partial(nn.LayerNorm, eps=1e-6) everywhere; fixed sin-cos positions
    (requires_grad=False), which a training step neither differentiates nor updates."""
    model = reference()
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * 2 + 1 + 2 * 1 + 1 and all(m.eps == 1e-6 for m in norms)
    loss = model(torch.randn(2, 3, 16, 12))[0]
    loss.backward()
    assert not model.pos_embed.requires_grad and model.pos_embed.grad is None
    assert not model.decoder_pos_embed.requires_grad and model.decoder_pos_embed.grad is None
    assert model.cls_token.grad is not None and model.mask_token.grad is not None


@pytest.mark.parametrize("mask_ratio, visible", [(0.75, 3), (0.6, 4), (0.9, 1)])
def test_the_lowest_noise_stays_visible_int_of_the_visible_share_of_patches(mask_ratio, visible):
    """len_keep = int(L * (1 - mask_ratio)), rounded down: 12 * 0.4 = 4.8 keeps 4."""
    model = reference(mask_ratio=mask_ratio)
    noise = torch.rand(3, N, generator=torch.Generator().manual_seed(1))
    _, pred, mask = model(torch.randn(3, 3, 16, 12), noise)
    ranks = noise.argsort(1).argsort(1)
    assert torch.equal(mask, (ranks >= visible).float())
    assert pred.shape == (3, N, 4 * 4 * 3)


def test_without_noise_the_mask_comes_from_torch_rand_as_the_official_code_draws_it():
    """The same seed gives the official code's mask: torch.rand(B, N) drawn first thing."""
    model, images = reference(), torch.randn(2, 3, 16, 12)
    torch.manual_seed(7)
    loss, _, mask = model(images)
    torch.manual_seed(7)
    noise = torch.rand(2, N)
    ref_loss, _, ref_mask = model(images, noise)
    assert torch.equal(mask, ref_mask) and torch.equal(loss, ref_loss)


def test_defaults_are_the_papers_three_quarters_hidden():
    model = ReferenceMAE(**SHAPE)
    assert model(torch.randn(2, 3, 16, 12))[2].sum(1).tolist() == [9.0, 9.0]


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_loss_is_the_official_mean_squared_error_over_hidden_patches(norm_pix_loss):
    """Targets as models_mae.py: patches in (p, q, c) order, normalized by their mean and unbiased variance
    plus 1e-6 (pixels of variance ~1e-6, where the eps and the bias show), averaged over hidden patches."""
    model = reference(norm_pix_loss=norm_pix_loss)
    images = 1e-3 * torch.randn(2, 3, 16, 12, generator=torch.Generator().manual_seed(2))
    loss, pred, mask = model(images, torch.rand(2, N, generator=torch.Generator().manual_seed(3)))
    target = official_patchify(images, 4)
    if norm_pix_loss:
        target = (target - target.mean(dim=-1, keepdim=True)) / (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
    expected = (((pred - target) ** 2).mean(dim=-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)


def test_unshuffle_puts_each_visible_token_back_in_its_place_and_the_mask_token_elsewhere():
    """The decoder's input: the class token first, then in patch order each visible token where its patch
    was and the mask token at every hidden place, positions added."""
    model = reference()
    noise = torch.rand(2, N, generator=torch.Generator().manual_seed(4))
    visible = noise.argsort(1)[:, :3]  # (2, 3): the patches kept, in their shuffled order
    restore = noise.argsort(1).argsort(1)
    x = torch.randn(2, 1 + 3, 16)
    seq = model.unshuffle(x, restore) - model.decoder_pos_embed
    torch.testing.assert_close(seq[:, 0], x[:, 0])
    for b in range(2):
        for i in range(N):
            kept = (visible[b] == i).nonzero()
            expected = x[b, 1 + kept.item()] if len(kept) else model.mask_token[0, 0]
            torch.testing.assert_close(seq[b, 1 + i], expected)


def test_the_gathers_keep_full_int64_indices_for_the_backward_as_the_official_code():
    """models_mae.py gathers with index.repeat(1, 1, D), not a stride-0 expand: the reference's memory is
    the official code's, a full (B, K, D) index in the encoder and (B, N, D') in the decoder."""
    model, B = reference(), 2
    saved = []

    def pack(t):
        if t.dtype == torch.int64 and t.dim() == 3:
            saved.append((tuple(t.shape), t.untyped_storage().nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(B, 3, 16, 12))
    assert sorted(saved) == sorted([((B, 3, 32), B * 3 * 32 * 8), ((B, N, 16), B * N * 16 * 8)])
