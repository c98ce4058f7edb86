"""The command line every recipe shares: LightningCLI with the project's callbacks built in.

A recipe's train.py is

    from core.cli import run
    from recipes.mae.model import MAE
    if __name__ == "__main__":
        run(MAE)

and is driven by YAML: `python recipes/mae/train.py fit --config recipes/mae/configs/demo.yaml`.
`--print_config` shows every option; the resolved config is saved as config.yaml next to the logs.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from core.probe import OnlineProbe


class RecipeCLI(LightningCLI):
    """Adds, to every recipe, an online probe (`probe.*`) and checkpointing that keeps `last.ckpt`
    (`checkpoint.*`), so `fit --ckpt_path last` resumes a broken run."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(OnlineProbe, "probe")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0, "checkpoint.every_n_train_steps": 500})
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})


def run(model_class: type[L.LightningModule], datamodule_class: type[L.LightningDataModule] | None = None, args=None) -> RecipeCLI:
    if datamodule_class is None:
        from core.data import ShardDataModule

        datamodule_class = ShardDataModule
    return RecipeCLI(
        model_class,
        datamodule_class,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
