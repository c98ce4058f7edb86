"""ShardDataModule in a real 2-process DDP run (Lightning Trainer, strategy="ddp", gloo on CPU, 2 DataLoader
workers per rank): every rank trains on the same number of batches, its own draws from every train shard, and the
validation shards are split over ranks and workers so that every sample is read exactly once. With
core.cli.RankSeed, the ranks start from the same weights and draw different random numbers in training, and a
checkpoint holds every rank's random streams.

The run is started once for the module, as users start it: this file runs as a script and Lightning's
launcher starts the second rank the same way. Each rank writes what it saw to a JSON file that the tests read.
(``ddp_spawn`` would make the DataLoader workers start by spawning too, each re-importing torch: far slower.)
"""

import csv
import faulthandler
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from core.cli import RankSeed, random_state, set_random_state
from core.data import ShardDataModule
from test_data_stream import VectorTransform, write_vectors

WORLD, BATCH, EPOCHS, WORKERS = 2, 4, 2, 2
TRAIN_SAMPLES, VAL_SAMPLES, SAMPLES_PER_EPOCH = 40, 21, 40


class RecordingModel(L.LightningModule):
    """Trains a linear layer; records, per epoch, the keys and shards of the batches this rank sees."""

    def __init__(self, out_dir: str):
        super().__init__()
        self.out_dir = out_dir
        self.layer = torch.nn.Linear(4, 1)
        self.initial_weight = self.layer.weight.tolist()  # as built, before DDP broadcasts rank 0's weights
        self.train_batches: list[list[str]] = []  # per epoch: the url of every training sample
        self.train_keys: list[str] = []
        self.val_keys: list[list[str]] = []  # per epoch: the key of every validation sample
        self.val_urls: list[list[str]] = []
        self.draws: list[float] = []  # torch.rand in the first training step, as a mask or a colour step draws

    def on_train_epoch_start(self):
        self.train_batches.append([])

    def training_step(self, batch, batch_idx):
        if not self.draws:
            self.draws = torch.rand(4).tolist()
        self.train_batches[-1].append(batch["__url__"])
        self.train_keys += batch["__key__"]
        return torch.nn.functional.mse_loss(self.layer(batch["x"]).squeeze(1), batch["label"].float())

    def on_validation_epoch_start(self):
        self.val_keys.append([])
        self.val_urls.append([])

    def validation_step(self, batch, batch_idx):
        self.val_keys[-1] += batch["__key__"]
        self.val_urls[-1] += batch["__url__"]

    def on_fit_end(self):
        record = {
            "rank": self.global_rank,
            "world_size": self.trainer.world_size,
            "train_batches": [len(epoch) for epoch in self.train_batches],
            "train_urls": sorted({url for epoch in self.train_batches for batch in epoch for url in batch}),
            "train_keys": self.train_keys,
            "val_keys": self.val_keys,
            "val_urls": self.val_urls,
            "batches_per_epoch": self.trainer.datamodule.batches_per_epoch(),
            "num_training_batches": self.trainer.num_training_batches,
            "draws": self.draws,
            "initial_weight": self.initial_weight,
        }
        with open(f"{self.out_dir}/rank{self.global_rank}.json", "w") as f:
            json.dump(record, f)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def run(train: str, val: str, out_dir: str) -> None:
    """One rank of the DDP run (Lightning starts the other by running this script again)."""
    L.seed_everything(0)  # as the recipes' CLI does, on every rank
    dm = ShardDataModule(train, val=val, batch_size=BATCH, num_workers=WORKERS, samples_per_epoch=SAMPLES_PER_EPOCH,
                         train_transform=VectorTransform(), val_transform=VectorTransform())  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", devices=WORLD, strategy="ddp", max_epochs=EPOCHS, log_every_n_steps=1,
                        logger=CSVLogger(out_dir, name="logs", version=0), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=out_dir, callbacks=[RankSeed()])  # fmt: skip
    trainer.fit(RecordingModel(out_dir), dm)
    # Every rank builds the checkpoint (rank 0 writes it), then draws: the checkpoint must let each rank redraw that.
    trainer.save_checkpoint(f"{out_dir}/end.ckpt")
    with open(f"{out_dir}/after_save{trainer.global_rank}.json", "w") as f:
        json.dump(torch.rand(4).tolist(), f)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ddp")
    train = write_vectors(tmp_path, "train", TRAIN_SAMPLES, per_shard=10)  # 4 shards: 2 per rank
    val = write_vectors(tmp_path, "val", VAL_SAMPLES, per_shard=7)  # 3 shards: uneven over ranks
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    result = subprocess.run([sys.executable, __file__, train, val, str(tmp_path)], env={**env, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=110)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-8000:]
    records = []
    for rank in range(WORLD):
        with open(tmp_path / f"rank{rank}.json") as f, open(tmp_path / f"after_save{rank}.json") as g:
            records.append({**json.load(f), "after_save": json.load(g), "checkpoint": str(tmp_path / "end.ckpt")})
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as f:
        records[0]["logged"] = [row for row in csv.DictReader(f) if row.get("data/samples_read")]
    return records


@pytest.mark.timeout(120)
def test_the_logged_data_counters_are_summed_over_the_ranks(ranks):
    # Rank 0's logger writes them: summed, they count both ranks' samples (rank 0 alone read 14 of the 21
    # validation samples). The validation counters ride along with the training ones, from epoch 2 on.
    logged = {int(row["step"]): row for row in ranks[0]["logged"]}
    per_epoch = SAMPLES_PER_EPOCH // (BATCH * WORLD)
    assert sorted(logged) == list(range(EPOCHS * per_epoch))
    assert {float(logged[step]["data/val_samples_read"]) for step in range(per_epoch, 2 * per_epoch)} == {VAL_SAMPLES}
    assert float(logged[per_epoch]["data/samples_read"]) >= WORLD * per_epoch * BATCH


@pytest.mark.timeout(120)
def test_every_rank_trains_on_the_same_number_of_batches(ranks):
    expected = math.ceil(SAMPLES_PER_EPOCH / (BATCH * WORLD))
    assert [r["world_size"] for r in ranks] == [WORLD] * WORLD
    for record in ranks:
        assert record["batches_per_epoch"] == record["num_training_batches"] == expected
        assert record["train_batches"] == [expected] * EPOCHS


@pytest.mark.timeout(120)
def test_every_rank_resamples_from_every_train_shard(ranks):
    """As webdataset's ResampledShards: no split of the shards over ranks (with replacement none is needed,
    and a split favours the shards of ranks holding fewer); the ranks' own seeds keep their draws apart."""
    urls = [set(r["train_urls"]) for r in ranks]
    assert len(urls[0] | urls[1]) == math.ceil(TRAIN_SAMPLES / 10)
    assert not urls[0].isdisjoint(urls[1])  # seeds 0/0 and 0/1 share shards here: under a split they could not
    assert ranks[0]["train_keys"] != ranks[1]["train_keys"]


@pytest.mark.timeout(120)
def test_val_shards_are_read_once_over_ranks_and_workers(ranks):
    for epoch in range(EPOCHS):
        keys = [r["val_keys"][epoch] for r in ranks]
        assert sorted(keys[0] + keys[1]) == [f"val_{i:06d}" for i in range(VAL_SAMPLES)]  # all, no duplicates
        urls = [set(r["val_urls"][epoch]) for r in ranks]
        assert urls[0].isdisjoint(urls[1]) and len(urls[0]) == 2 and len(urls[1]) == 1


@pytest.mark.timeout(120)
def test_ranks_start_alike_and_draw_their_own_random_numbers(ranks):
    assert ranks[0]["initial_weight"] == ranks[1]["initial_weight"]
    assert ranks[0]["draws"] != ranks[1]["draws"]


@pytest.mark.timeout(120)
def test_a_checkpoint_holds_every_ranks_random_streams(ranks):
    streams = torch.load(ranks[0]["checkpoint"], weights_only=True)["callbacks"]["RankSeed"]["ranks"]
    assert len(streams) == WORLD
    ours = random_state()  # this test process's own, given back after
    try:
        for rank, state in enumerate(streams):
            set_random_state(state)
            assert torch.rand(4).tolist() == ranks[rank]["after_save"]
    finally:
        set_random_state(ours)
    assert ranks[0]["after_save"] != ranks[1]["after_save"]


def test_rank_seed_leaves_rank_zero_alone_and_reseeds_the_others():
    torch.manual_seed(0)
    expected = torch.rand(4)
    for rank, changed in ((0, False), (1, True)):
        torch.manual_seed(0)
        RankSeed().setup(SimpleNamespace(global_rank=rank), None, "fit")
        assert torch.equal(torch.rand(4), expected) != changed


if __name__ == "__main__":
    # Both ranks run this. A rank still running after 90 s (the run takes about 10) prints every thread's stack
    # and exits, so a hang fails the test with where each rank waited, before the 110-s limit above.
    faulthandler.dump_traceback_later(90, exit=True)
    torch.set_num_threads(1)
    run(*sys.argv[1:])

