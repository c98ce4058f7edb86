"""Every masked-autoencoder recipe trains under bf16 autocast (`--trainer.precision=bf16-mixed`, the GPU
runs' precision): a few demo steps through the real CLI on the CPU, where Lightning autocasts to bf16 too,
with the pictures and the online probe on bf16 activations."""

import pytest
import torch

from conftest import mae_demo_run
from recipes.audiomae.model import AudioMAE
from recipes.cropmae.model import CropMAE
from recipes.mae.model import MAE
from recipes.videomae.model import VideoMAE

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("model_class, recipe", [(MAE, "mae"), (VideoMAE, "videomae"), (AudioMAE, "audiomae"), (CropMAE, "cropmae")])
def test_demo_config_trains_in_bf16_mixed_precision(model_class, recipe, tmp_path):
    cli = mae_demo_run(model_class, recipe, tmp_path, "--trainer.precision=bf16-mixed", "--model.encoder_depth=1")
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert cli.trainer.precision == "bf16-mixed"
    with cli.trainer.precision_plugin.forward_context():  # what the training steps ran under
        linear = next(m for m in cli.model.encoder.modules() if isinstance(m, torch.nn.Linear))
        assert linear(torch.randn(2, linear.in_features)).dtype == torch.bfloat16
