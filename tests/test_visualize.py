"""Reconstruction pictures (core.visualize): the rows a masked autoencoder shows, how they are made
displayable, the PNG grid they are saved as, and when and where a picture is saved."""

import os
from types import SimpleNamespace

import torch
from lightning.pytorch.loggers import CSVLogger
from torchvision.io import read_image

from core.masking import patchify, unpatchify
from core.visualize import pictures_due, pictures_path, reconstruction_rows, save_reconstructions, to_display


def png(path) -> torch.Tensor:
    """A saved picture as floats in [0, 1], (C, H, W)."""
    return read_image(str(path)).float() / 255


def test_rows_are_the_masked_input_the_whole_prediction_and_the_prediction_pasted_where_hidden():
    """The prediction row shows every predicted patch, also the visible ones, and only the hidden patches
    of the pasted row come from the prediction."""
    g = torch.Generator().manual_seed(0)
    x, patch = torch.randn(2, 3, 8, 8, generator=g), (4, 4)
    pred = torch.randn(2, 4, 48, generator=g)
    mask = torch.tensor([[True, False, False, True], [False, True, True, False]])
    masked, prediction, pasted = reconstruction_rows(x, pred, mask, patch, norm_pix=False)
    target, hidden = patchify(x, patch), mask[..., None]
    to_px = lambda p: unpatchify(p, patch, (2, 2), 3)  # noqa: E731
    torch.testing.assert_close(masked, to_px(torch.where(hidden, 0.0, target)))
    torch.testing.assert_close(prediction, to_px(pred))
    torch.testing.assert_close(pasted, to_px(torch.where(hidden, pred, target)))


def test_norm_pix_predictions_are_mapped_back_with_each_patchs_own_mean_and_std():
    g = torch.Generator().manual_seed(1)
    x, patch = 3 * torch.randn(2, 3, 8, 8, generator=g) + 2, (4, 4)
    target = patchify(x, patch)
    normalised = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    _, prediction, _ = reconstruction_rows(x, normalised, torch.ones(2, 4, dtype=torch.bool), patch, norm_pix=True)
    torch.testing.assert_close(prediction, x, atol=1e-4, rtol=0)


def test_clips_show_their_frames_side_by_side_in_order():
    clip = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 3, 1, 1).expand(1, 1, 3, 2, 2)  # frame t is flat at t / 2
    shown = to_display(clip, mean=[0.0], std=[1.0])
    assert shown.shape == (1, 1, 2, 6)
    torch.testing.assert_close(shown[0, 0], torch.tensor([[0.0, 0.0, 0.5, 0.5, 1.0, 1.0]] * 2))


def test_normalised_images_are_mapped_back_to_pixels_and_clipped_to_the_displayable_range():
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    pixels = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(to_display((pixels - m) / s, mean, std), pixels)
    # A prediction past the pixel range shows saturated, never out of [0, 1].
    out_of_range = to_display(torch.full((1, 3, 2, 2), 10.0), mean, std), to_display(torch.full((1, 3, 2, 2), -10.0), mean, std)
    assert out_of_range[0].eq(1).all() and out_of_range[1].eq(0).all()
    # A mean without a std is no normalisation to undo: min-max scaling instead.
    assert to_display(torch.arange(4.0).view(1, 1, 2, 2) * 10, mean=[0.5]).aminmax() == (torch.tensor(0.0), torch.tensor(1.0))


def test_without_mean_and_std_each_item_is_scaled_by_its_own_range():
    """Spectrograms of a batch differ in loudness: one item's range must not flatten another's; a flat item
    shows flat (not NaN)."""
    quiet, loud = torch.linspace(0, 1, 16).view(1, 1, 4, 4), torch.linspace(-50, 50, 16).view(1, 1, 4, 4)
    shown = to_display(torch.cat([quiet, loud, torch.full_like(quiet, 3.0)]))
    expected = torch.linspace(0, 1, 16).view(1, 4, 4)
    torch.testing.assert_close(shown[0], expected)
    torch.testing.assert_close(shown[1], expected)
    assert shown[2].eq(0).all()


def test_grid_has_an_item_per_column_and_a_row_per_row_separated_by_white(tmp_path):
    """4 rows of 3 items (of 4x4 pixels, one pixel of padding): the grid is 21 x 16; max_items cuts columns.
    The folder is made as needed."""
    mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    g = torch.Generator().manual_seed(3)
    rows = [torch.rand(3, 3, 4, 4, generator=g) for _ in range(4)]
    path = str(tmp_path / "run" / "reconstructions" / "val_step0000002.png")
    assert save_reconstructions(path, rows, mean, std) == path
    picture = png(path)
    assert picture.shape == (3, 4 * 5 + 1, 3 * 5 + 1)
    for r, row in enumerate(rows):
        for i, item in enumerate(row):
            cell = picture[:, 1 + 5 * r : 5 + 5 * r, 1 + 5 * i : 5 + 5 * i]
            torch.testing.assert_close(cell, item, atol=1 / 255, rtol=0, msg=f"row {r}, item {i}")
    assert picture[:, ::5, :].eq(1).all() and picture[:, :, ::5].eq(1).all()  # the padding between cells
    save_reconstructions(path, rows, mean, std, max_items=2)
    assert png(path).shape == (3, 21, 11)


def test_spectrograms_show_low_frequencies_at_the_bottom_scaled_by_the_original(tmp_path):
    original = torch.arange(16.0).view(1, 1, 4, 4)  # (B, 1, frequency, time): value = 4 * frequency + time
    flat = torch.full_like(original, 7.5)  # a prediction that learned only the mean
    path = tmp_path / "spec.png"
    save_reconstructions(str(path), [original, flat])
    picture = png(path)[0]  # grey: one channel is enough
    assert picture.shape == (2 * 5 + 1, 6)
    torch.testing.assert_close(picture[1:5, 1:5], (original[0, 0] / 15).flip(0), atol=1 / 255, rtol=0)
    torch.testing.assert_close(picture[6:10, 1:5], torch.full((4, 4), 0.5), atol=1 / 255, rtol=0)


def test_pictures_are_due_every_n_optimizer_steps_on_rank_zero():
    def due(step, batch_idx=None, every=3, accumulate=1, zero=True):
        trainer = SimpleNamespace(global_step=step, accumulate_grad_batches=accumulate, is_global_zero=zero)
        return pictures_due(trainer, step if batch_idx is None else batch_idx, every)

    assert [step for step in range(10) if due(step)] == [0, 3, 6, 9]
    assert [step for step in range(4) if due(step, every=1)] == [0, 1, 2, 3]
    assert not any(due(step, every=0) for step in range(4))
    assert not due(3, zero=False)
    assert [i for i in range(4) if due(0, i, accumulate=2)] == [0, 2]


def test_pictures_go_to_the_loggers_folder_named_by_split_and_zero_padded_step(tmp_path):
    name = "train_step0001234.png"
    trainer = SimpleNamespace(global_step=1234, default_root_dir=str(tmp_path / "root"), logger=None)
    assert pictures_path(trainer, "train") == os.path.join(tmp_path, "root", "reconstructions", name)
    # CSV (and TensorBoard) loggers: their versioned log folder.
    trainer.logger = CSVLogger(save_dir=str(tmp_path), name="run", version=3)
    assert pictures_path(trainer, "val") == os.path.join(tmp_path, "run", "version_3", "reconstructions", "val" + name[5:])
    # Any other logger: its save_dir, the run's folder if it has none (fast_dev_run's stand-in; it had been the
    # current folder).
    trainer.logger = SimpleNamespace(save_dir=str(tmp_path / "other"), log_dir=str(tmp_path / "not-this"))
    assert pictures_path(trainer, "train") == os.path.join(tmp_path, "other", "reconstructions", name)
    trainer.logger = SimpleNamespace(save_dir=None)
    assert pictures_path(trainer, "train") == os.path.join(tmp_path, "root", "reconstructions", name)
    trainer.logger, trainer.global_step = None, 12345678  # past seven digits the step is written whole
    assert pictures_path(trainer, "train").endswith("train_step12345678.png")

