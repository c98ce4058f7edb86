"""kNN and linear probes on separable vs unlearnable data, the collapse measure, and the online probe's
clear stop when the encoder has diverged."""

import csv
import math
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from core.probe import (
    OnlineProbe,
    attentive_probe_accuracy,
    embedding_std,
    is_collapsed,
    knn_accuracy,
    linear_probe_accuracy,
    log_embedding_std,
    probe_scores,
    rankme,
    split_halves,
)

CLASSES, DIM = 4, 8


def clusters(n_per_class: int, seed: int, spread: float = 0.3):
    """Gaussian blobs around well separated class centres (the same centres for every seed)."""
    centres = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(123)) * 3
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(CLASSES).repeat_interleave(n_per_class)
    x = centres[y] + spread * torch.randn(len(y), DIM, generator=g)
    return x, y


def test_probes_separate_clusters():
    train_x, train_y = clusters(30, seed=1)
    test_x, test_y = clusters(30, seed=2)
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=10) >= 0.95
    assert linear_probe_accuracy(train_x, train_y, test_x, test_y) >= 0.95


def test_probes_are_at_chance_on_random_labels():
    g = torch.Generator().manual_seed(3)
    train_x, test_x = torch.randn(400, DIM, generator=g), torch.randn(400, DIM, generator=g)
    train_y, test_y = torch.randint(0, CLASSES, (400,), generator=g), torch.randint(0, CLASSES, (400,), generator=g)
    chance = 1 / CLASSES
    assert abs(knn_accuracy(train_x, train_y, test_x, test_y) - chance) < 0.1
    assert abs(linear_probe_accuracy(train_x, train_y, test_x, test_y) - chance) < 0.1


def test_knn_votes_are_weighted_by_similarity():
    # One very close neighbour of class 0 against two farther ones of class 1.
    train_x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    train_y = torch.tensor([0, 1, 1])
    test_x, test_y = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    # exp(1/0.07) > 2 exp(0.6/0.07): the close neighbour wins; at temperature 10 the majority does.
    assert math.exp(1 / 0.07) > 2 * math.exp(0.6 / 0.07) and math.exp(1 / 10) < 2 * math.exp(0.6 / 10)
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=3, temperature=0.07) == 1.0
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=3, temperature=10.0) == 0.0
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=1) == 1.0
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=1, temperature=10.0) == 1.0  # the majority is not asked
    # k larger than the training set uses all of it.
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=50, temperature=10.0) == 0.0


def test_probe_scores_on_split_halves():
    x, y = clusters(20, seed=4)
    train_x, train_y, test_x, test_y = split_halves(x, y)
    assert len(train_x) + len(test_x) == len(x)
    assert sorted(torch.cat([train_x, test_x]).sum(1).tolist()) == sorted(x.sum(1).tolist())  # a partition
    cyclic = torch.arange(100) % 10  # shards written in label order must still give both halves every class
    _, fit_y, _, test_y_cyclic = split_halves(torch.zeros(100, 1), cyclic)
    assert fit_y.unique().numel() == 10 and test_y_cyclic.unique().numel() == 10
    scores = probe_scores(train_x, train_y, test_x, test_y)
    assert set(scores) == {"linear_acc", "knn_acc"}
    assert min(scores.values()) >= 0.95


def test_probes_fit_on_the_training_split_and_score_on_the_test_split():
    """The same points with every label moved on by one: a probe fitted on the training labels is wrong on
    every test point (fitted on the test labels, or scored on the training ones, it would be right)."""
    train_x, train_y = clusters(30, seed=1)
    test_y = (train_y + 1) % CLASSES
    assert linear_probe_accuracy(train_x, train_y, train_x, test_y) <= 0.05
    assert knn_accuracy(train_x, train_y, train_x, test_y) <= 0.05
    tokens, token_y = marked_tokens(1000, seed=1)
    assert attentive_probe_accuracy(tokens, token_y, tokens, (token_y + 1) % CLASSES, epochs=20, lr=1e-2) <= 0.1


def test_probes_standardise_with_the_training_statistics_only():
    """Test features shifted far off the training ones: standardised with the training statistics they all
    land on one side (near chance); with their own statistics the shift would vanish (near 1). (The
    attentive probe's statistics: `test_both_probes_take_their_statistics_from_the_training_split`.)"""
    train_x, train_y = clusters(30, seed=1)
    test_x, test_y = clusters(30, seed=2)
    assert linear_probe_accuracy(train_x, train_y, test_x + 100, test_y) < 0.5


def test_the_linear_probe_standardises_features_of_any_scale():
    """The class in eight dimensions 1e-4 small, beside eight of loud noise: standardised, the probe reads
    the class; on the raw scales its weight decay would make the small dimensions too dear to use."""
    train_x, train_y = clusters(30, seed=1)
    test_x, test_y = clusters(30, seed=2)
    g = torch.Generator().manual_seed(0)
    loud = [torch.cat([x * 1e-4, 100 * torch.randn(len(x), DIM, generator=g)], 1) for x in (train_x, test_x)]
    assert linear_probe_accuracy(loud[0], train_y, loud[1], test_y) >= 0.9


def overlapping_classes(n: int, g: torch.Generator, dim: int = 16):
    centres = torch.randn(CLASSES, dim, generator=torch.Generator().manual_seed(5)) * 0.5
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return centres[y] + torch.randn(n, dim, generator=g), y


def test_a_feature_constant_over_the_training_split_does_not_decide_the_test_predictions():
    """A channel dead on the training images (a random-init encoder's, a silent mel bin) and barely alive on
    the test ones: clamped to a std of 1e-6 it became a feature of about 1e4, whose untrained weights then
    outweighed the small margins between overlapping classes, and the probe fell to chance."""
    g = torch.Generator().manual_seed(0)
    (train_x, train_y), (test_x, test_y) = overlapping_classes(400, g), overlapping_classes(400, g)
    clean = linear_probe_accuracy(train_x, train_y, test_x, test_y)
    dead = torch.cat([train_x, torch.zeros(len(train_x), 1)], 1)
    alive = torch.cat([test_x, 0.01 * torch.rand(len(test_x), 1, generator=g)], 1)
    assert clean >= 0.6 and abs(linear_probe_accuracy(dead, train_y, alive, test_y) - clean) <= 0.02


def test_both_probes_take_their_statistics_from_the_training_split(monkeypatch):
    import core.probe

    seen, real = [], core.probe.training_statistics
    monkeypatch.setattr(core.probe, "training_statistics", lambda x: seen.append(x.clone()) or real(x))
    train_x, train_y = clusters(10, seed=1)
    linear_probe_accuracy(train_x, train_y, train_x + 5, train_y)
    tokens, token_y = marked_tokens(20, seed=1)
    attentive_probe_accuracy(tokens, token_y, tokens + 5, token_y, epochs=1)
    assert len(seen) == 2 and torch.equal(seen[0], train_x) and torch.equal(seen[1], tokens.reshape(-1, DIM))


def test_the_k_nearest_neighbours_vote_and_no_more():
    """k=2 of the three points of `test_knn_votes_are_weighted_by_similarity`: at temperature 10 the close
    class-0 neighbour (weight e^0.1) outvotes the one class-1 neighbour in the two (e^0.06); a third voter
    would tip it."""
    train_x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    train_y = torch.tensor([0, 1, 1])
    assert knn_accuracy(train_x, train_y, torch.tensor([[1.0, 0.0]]), torch.tensor([0]), k=2, temperature=10.0) == 1.0


def test_split_halves_of_an_odd_count_share_no_sample():
    x = torch.arange(101.0)[:, None]
    fit_x, _, test_x, _ = split_halves(x, torch.zeros(101, dtype=torch.long))
    assert sorted(torch.cat([fit_x, test_x]).flatten().tolist()) == list(range(101)) and len(fit_x) == 50


def test_online_probe_scores_the_half_it_did_not_fit(tmp_path):
    """Random labels: a probe scored on the samples it was fitted on would read near 100% (each sample
    its own nearest neighbour); on the held-out half, near chance."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, DIM, generator=g), torch.randint(0, CLASSES, (200,), generator=g)
    metrics = online_probe_metrics(x, y, tmp_path, batch_size=50)
    assert metrics["probe/knn_acc"] < 0.5 and metrics["probe/linear_acc"] < 0.5


def test_embedding_std_by_hand():
    z = torch.randn(6, 3, generator=torch.Generator().manual_seed(5))
    zn = z.numpy() / np.linalg.norm(z.numpy(), axis=1, keepdims=True)
    expected = np.mean([np.std(zn[:, d], ddof=1) for d in range(3)])
    assert embedding_std(z).item() == pytest.approx(expected, rel=1e-5)


def test_rankme_counts_the_directions_in_use():
    """RankMe is D for features spread alike over D orthogonal directions, 1 for features on one line,
    and the paper's formula (singular values normalised to sum to 1, exp of their entropy) in between."""
    eye = torch.eye(8).repeat(4, 1)  # (32, 8): every direction alike
    assert rankme(eye) == pytest.approx(8.0, rel=1e-4)
    line = torch.randn(32, 1, generator=torch.Generator().manual_seed(0)) @ torch.randn(1, 8, generator=torch.Generator().manual_seed(1))
    assert rankme(line) == pytest.approx(1.0, abs=1e-3)
    z = torch.randn(50, 6, generator=torch.Generator().manual_seed(2)) * torch.tensor([5.0, 3, 1, 1, 0.1, 0.1])
    s = np.linalg.svd(z.numpy(), compute_uv=False)
    p = s / s.sum() + 1e-7
    assert rankme(z) == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-4)
    assert 1.0 < rankme(z) < 6.0


def test_collapse_detection():
    d = 32
    g = torch.Generator().manual_seed(6)
    spread = torch.randn(512, d, generator=g)
    collapsed = torch.randn(1, d, generator=g).expand(512, d) * 5 + 1e-4 * torch.randn(512, d, generator=g)
    spread_std, collapsed_std = embedding_std(spread).item(), embedding_std(collapsed).item()
    assert spread_std == pytest.approx(1 / math.sqrt(d), rel=0.1)
    assert collapsed_std < 1e-3
    assert not is_collapsed(spread_std, d)
    assert is_collapsed(collapsed_std, d)


def test_collapse_is_checked_on_the_logged_steps_only(monkeypatch, tmp_path):
    """The check reads the std on the host, a wait for the GPU; it runs where the logger reads it anyway."""
    import core.probe

    checked = []
    monkeypatch.setattr(core.probe, "is_collapsed", lambda std, dim: checked.append(std) or True)

    class Collapsed(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 8)

        def training_step(self, batch, batch_idx):
            z = self.layer(batch) * 0 + 1  # every input at one point
            log_embedding_std(self, z)
            return z.sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(log_every_n_steps):
        trainer = L.Trainer(max_steps=7, log_every_n_steps=log_every_n_steps, logger=L.pytorch.loggers.CSVLogger(tmp_path),
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        trainer.fit(Collapsed(), torch.utils.data.DataLoader(torch.randn(32, 4), batch_size=4))
        return trainer

    with pytest.warns(UserWarning, match="embeddings have collapsed"):
        trainer = fit(3)
    assert len(checked) == 2  # steps 2 and 5 of 7, the steps the logger writes
    assert {row["step"] for row in csv.DictReader(open(f"{trainer.logger.log_dir}/metrics.csv"))} == {"2", "5"}
    checked.clear()
    fit(0)  # logging off: Lightning takes 0, so must this
    assert checked == []


def marked_tokens(n: int, seed: int, length: int = 6):
    """Token sets in which every sample holds all four class vectors, at shuffled positions, and a marker
    on the token of its own class: the mean over tokens is the same for every class; only a probe that
    can find the marked token reads the class."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    tokens = 0.1 * torch.randn(n, length, DIM, generator=g)
    for i in range(n):
        positions = torch.randperm(length, generator=g)[:CLASSES]
        tokens[i, positions, :CLASSES] += torch.eye(CLASSES) * 3  # class vector c at positions[c]
        tokens[i, positions[y[i]], -1] += 3  # the marker
    return tokens, y


def test_attentive_probe_reads_the_token_that_mean_pooling_averages_away():
    train_x, train_y = marked_tokens(1000, seed=1)
    test_x, test_y = marked_tokens(400, seed=2)
    assert linear_probe_accuracy(train_x.mean(1), train_y, test_x.mean(1), test_y) <= 0.4  # chance: 0.25
    accuracy = attentive_probe_accuracy(train_x, train_y, test_x, test_y, epochs=20, lr=1e-2)
    assert accuracy >= 0.9
    assert attentive_probe_accuracy(train_x, train_y, test_x, test_y, epochs=20, lr=1e-2) == accuracy  # seeded


class DivergedEncoder(L.LightningModule):
    """Its embedding has turned NaN, as a diverged run's does."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(DIM, DIM)

    def training_step(self, batch, batch_idx):
        return self.layer(batch["x"]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        pass

    def embed(self, batch):
        return self.layer(batch["x"]) * float("nan")  # (B, DIM)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_online_probe_stops_a_diverged_run_with_a_clear_error(tmp_path):
    x, y = clusters(8, seed=0)
    loader = torch.utils.data.DataLoader([{"x": a, "label": b} for a, b in zip(x, y)], batch_size=8)
    trainer = L.Trainer(
        max_steps=2, val_check_interval=2, num_sanity_val_steps=0, callbacks=[OnlineProbe()], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        default_root_dir=tmp_path,
    )  # fmt: skip
    with pytest.raises(FloatingPointError, match="32 of 32 validation embeddings hold NaN or inf at step 2"):
        trainer.fit(DivergedEncoder(), train_dataloaders=loader, val_dataloaders=loader)


class ClusterEncoder(DivergedEncoder):
    def embed(self, batch):
        return batch["x"]  # (B, DIM): the clusters themselves


def online_probe_metrics(x: torch.Tensor, y: torch.Tensor, tmp_path, batch_size: int) -> dict:
    """What the online probe logs after `trainer.validate` over the features x (N, DIM) themselves."""
    loader = torch.utils.data.DataLoader([{"x": a, "label": b} for a, b in zip(x, y)], batch_size=batch_size)
    trainer = L.Trainer(
        callbacks=[OnlineProbe()], logger=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.validate(ClusterEncoder(), dataloaders=loader)
    return trainer.callback_metrics


def test_online_probe_runs_under_validate_too(tmp_path):
    """`train.py validate` runs in torch.inference_mode, where the probe must still be able to fit."""
    x, y = clusters(16, seed=0)
    assert online_probe_metrics(x, y, tmp_path, batch_size=16)["probe/linear_acc"] == 1.0


def test_online_probe_asks_for_labels_by_name(tmp_path):
    loader = torch.utils.data.DataLoader([{"x": a} for a in torch.randn(8, DIM)], batch_size=8)
    trainer = L.Trainer(callbacks=[OnlineProbe()], logger=False, enable_progress_bar=False, accelerator="cpu", default_root_dir=tmp_path)
    with pytest.raises(KeyError, match="needs a 'label'.*--probe.max_samples 0"):
        trainer.validate(ClusterEncoder(), dataloaders=loader)


class CountingEncoder:
    def __init__(self):
        self.calls = 0

    def embed(self, batch):
        self.calls += 1
        return batch["x"]


def test_online_probe_keeps_a_repeated_sample_once_and_embeds_every_batch_alike():
    """`data.val_batches` re-reads a rank's shards: a repeat in both halves would be its own kNN neighbour.
    The cut at max_samples counts embedded rows, repeats included, so every rank stops at the same batch
    (under FSDP, `embed` is a collective)."""
    x = torch.arange(6.0).unsqueeze(1).expand(-1, DIM)  # sample i: all i

    def batch(keys):
        return {"x": x[keys], "label": torch.tensor(keys) % 2, "__key__": [f"s{k}" for k in keys], "__url__": ["a.tar"] * len(keys)}

    probe, encoder, one = OnlineProbe(max_samples=6), CountingEncoder(), SimpleNamespace(world_size=1)
    probe.on_validation_epoch_start(one, encoder)
    for keys in ([0, 1, 2], [2, 0, 3], [4, 5, 1]):  # 6 rows embedded after the second batch: the third is not
        probe.on_validation_batch_end(one, encoder, None, batch(keys), 0)
    assert encoder.calls == 2
    assert torch.cat(probe.features)[:, 0].tolist() == [0, 1, 2, 3]
    assert torch.cat(probe.labels).tolist() == [0, 1, 0, 1]

    # max_samples is the whole probe's: on 2 ranks each embeds 3, the same 6 rows over both.
    probe, encoder, two = OnlineProbe(max_samples=6), CountingEncoder(), SimpleNamespace(world_size=2)
    probe.on_validation_epoch_start(two, encoder)
    for keys in ([0, 1, 2], [3, 4, 5]):
        probe.on_validation_batch_end(two, encoder, None, batch(keys), 0)
    assert encoder.calls == 1

    # A share reached inside a batch: its rows past the share are dropped, repeats counted as above.
    probe, encoder = OnlineProbe(max_samples=5), CountingEncoder()
    probe.on_validation_epoch_start(one, encoder)
    for keys in ([0, 1, 2], [2, 3, 4]):
        probe.on_validation_batch_end(one, encoder, None, batch(keys), 0)
    assert torch.cat(probe.features)[:, 0].tolist() == [0, 1, 2, 3] and torch.cat(probe.labels).tolist() == [0, 1, 0, 1]


def test_rankme_of_all_zero_features_is_one():
    assert rankme(torch.zeros(16, 8)) == pytest.approx(1.0, abs=1e-3)


class DropoutEncoder(L.LightningModule):
    """BatchNorm and dropout: training draws random numbers and keeps running statistics."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(DIM, DIM), torch.nn.BatchNorm1d(DIM), torch.nn.Dropout(0.3))

    def training_step(self, batch, batch_idx):
        return (self.net(batch["x"]) - 1).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        pass

    def embed(self, batch):
        return self.net(batch["x"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_online_probe_leaves_training_as_it_would_be_without_it(tmp_path):
    """The probe's passes and fits change neither the weights, the BatchNorm statistics nor the random numbers
    that training draws afterwards."""
    x, y = clusters(8, seed=0)
    loader = torch.utils.data.DataLoader([{"x": a, "label": b} for a, b in zip(x, y)], batch_size=8)

    def trained(callbacks):
        L.seed_everything(0)
        model = DropoutEncoder()
        trainer = L.Trainer(
            max_steps=6, val_check_interval=2, num_sanity_val_steps=0, callbacks=callbacks, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
            default_root_dir=tmp_path,
        )  # fmt: skip
        trainer.fit(model, train_dataloaders=loader, val_dataloaders=loader)
        return trainer, model.state_dict()

    probed_trainer, probed = trained([OnlineProbe()])
    assert "probe/linear_acc" in probed_trainer.callback_metrics  # the probe did run
    _, plain = trained([])
    assert probed.keys() == plain.keys()
    for key in plain:
        assert torch.equal(probed[key], plain[key]), key


def test_probes_seed_the_cpu_generator_only(monkeypatch):
    """``torch.manual_seed`` also reseeds every GPU: the online probe, fitted after each validation on every
    rank, would then give every rank the same masks from there on (recorded here, where no GPU is)."""
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    x, y = clusters(16, seed=0)
    linear_probe_accuracy(x, y, x, y, steps=5)
    attentive_probe_accuracy(x[:, None].expand(-1, 3, -1), y, x[:, None].expand(-1, 3, -1), y, epochs=1)
    assert reseeded == []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)  # the recorder does record a reseed
    assert reseeded == [1]


def test_both_probes_score_every_test_sample_past_their_chunks_of_1024():
    """Both score the test split in chunks of 1,024: the score of 2,500 samples is the sample-weighted mean of
    the scores of its parts, however it is cut, and the samples they can read past the first chunk count."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(CLASSES, 1, DIM, generator=g) * 3

    def tokens(y):  # (N, 4, DIM): four noisy copies of the class centre
        return centres[y] + 0.3 * torch.randn(len(y), 4, DIM, generator=g)

    train_y, test_y = torch.randint(0, CLASSES, (64,), generator=g), torch.randint(0, CLASSES, (2500,), generator=g)
    train_x, test_x = tokens(train_y), tokens(test_y)
    test_y[:1024] = test_y[:1024][torch.randperm(1024, generator=g)]  # the first chunk's labels say nothing of its tokens
    knn = lambda x, y: knn_accuracy(train_x[:, 0], train_y, x[:, 0], y, k=5)  # noqa: E731
    attentive = lambda x, y: attentive_probe_accuracy(train_x, train_y, x, y, epochs=10, batch_size=16, lr=1e-2)  # noqa: E731
    for probe in (knn, attentive):
        whole = probe(test_x, test_y)
        assert whole >= 1476 / 2500  # all past the first chunk read
        assert whole * 2500 == pytest.approx(probe(test_x[:1500], test_y[:1500]) * 1500 + probe(test_x[1500:], test_y[1500:]) * 1000)
        assert whole * 2500 == pytest.approx(sum(probe(test_x[i : i + 500], test_y[i : i + 500]) * 500 for i in range(0, 2500, 500)))


def test_the_attentive_probe_warms_up_over_one_epoch_then_decays_to_zero(adamw_rates):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, DIM, generator=g), torch.randint(0, CLASSES, (64,), generator=g)
    attentive_probe_accuracy(x, y, x[:8], y[:8], epochs=5, batch_size=16, lr=1e-2)
    rates = [step[0] for step in adamw_rates]
    assert len(rates) == 5 * 4
    assert rates[:5] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2])
    assert all(a > b for a, b in zip(rates[4:], rates[5:])) and rates[-1] < 0.02 * 1e-2
