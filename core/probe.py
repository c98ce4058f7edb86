"""Measuring representations: a linear probe and a kNN classifier on frozen features, an attentive probe
on frozen tokens, collapse measures, and the callback that runs the first two on the validation split
during pretraining.

The features are detached and the probes are fitted after the fact, so monitoring never changes the
encoder's gradients.
"""

from __future__ import annotations

import contextlib
import math

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn

from core.schedules import WarmupCosine
from core.vit import CrossAttention


@torch.no_grad()
def knn_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, k: int = 20, temperature: float = 0.07
) -> float:
    """Weighted kNN on cosine similarity (Wu et al. 2018, as in DINO's evaluation): each of the k nearest
    training samples votes for its class with weight exp(similarity / temperature)."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    train_x, test_x = F.normalize(train_x.float(), dim=1), F.normalize(test_x.float(), dim=1)
    k = min(k, train_x.shape[0])
    correct = 0
    for start in range(0, test_x.shape[0], 1024):
        sims, idx = (test_x[start : start + 1024] @ train_x.T).topk(k, dim=1)  # (b, k)
        votes = torch.zeros(sims.shape[0], num_classes, device=sims.device)
        votes.scatter_add_(1, train_y[idx], (sims / temperature).exp())
        correct += (votes.argmax(1) == test_y[start : start + 1024]).sum().item()
    return correct / test_x.shape[0]


@contextlib.contextmanager
def fitting():
    """What fitting a probe needs wherever it runs: autograd on, also inside ``torch.inference_mode`` (Lightning's
    ``validate`` runs there, where ``enable_grad`` alone does nothing), and the CPU generator seeded with 0
    (the probes' weights and batch orders draw from it, on the CPU) and restored afterwards. Only the CPU's:
    ``torch.manual_seed`` would also reseed every GPU's generator, so after each validation every rank would
    draw the same masks and augmentations."""
    with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(0)
        yield


def training_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of the training features (N, D), by which the probes standardise both
    splits. A dimension constant over the training features is scaled by 1, as sklearn's StandardScaler
    does: divided by its (clamped) zero std, a test value a hair off that constant became a feature of 1e4
    whose weight no training gradient had shaped, and it decided every prediction."""
    mean, std = x.mean(0), x.std(0)
    return mean, torch.where(std < 1e-6, torch.ones_like(std), std)


def linear_probe_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    weight_decay: float = 1e-4,
    steps: int = 100,
) -> float:
    """Multinomial logistic regression on standardised features, fitted full-batch with L-BFGS.

    Standardising with the training statistics plays the role of MAE's parameter-free BatchNorm before the
    linear head: features of very different scales become comparable."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    with fitting():
        # Computed here, outside inference mode: tensors made in it cannot be saved for backward.
        mean, std = training_statistics(train_x.float())
        train_x, test_x, train_y = (train_x.float() - mean) / std, (test_x.float() - mean) / std, train_y.clone()
        head = torch.nn.Linear(train_x.shape[1], num_classes).to(train_x.device)
        opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(head(train_x), train_y) + weight_decay * head.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
    with torch.no_grad():
        return (head(test_x).argmax(1) == test_y).float().mean().item()


class AttentivePooler(torch.nn.Module):
    """A learned query attends over a frozen encoder's tokens (B, N, D), then a linear classifier: the
    attentive probe with which V-JEPA (Bardes et al. 2024) and AIM (El-Nouby et al. 2024) evaluate frozen
    encoders. Mean pooling averages away what only a few tokens hold, such as where in a clip a shape
    moves; the query can weigh those tokens. Takes standardised tokens (see `attentive_probe_accuracy`)."""

    def __init__(self, dim: int, num_classes: int, heads: int = 4):
        super().__init__()
        self.query = torch.nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.attn = CrossAttention(dim, heads if dim % heads == 0 else 1)
        self.head = torch.nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = self.attn(self.query.expand(tokens.shape[0], -1, -1), tokens)  # (B, 1, D)
        return self.head(pooled[:, 0])  # (B, num_classes)


def attentive_probe_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    epochs: int = 30,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
) -> float:
    """Accuracy of an `AttentivePooler` fitted on frozen tokens train_x (N, L, D) with AdamW and a
    one-epoch warmup then cosine, scored on test_x (M, L, D). Seeded, so the same tokens give the same
    score.

    Each dimension is standardised with the training tokens' statistics, as the linear probe does; not a
    LayerNorm per token, which would erase what sets raw patches apart (a patch's mean brightness)."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    flat = train_x.reshape(-1, train_x.shape[-1]).float()
    mean, std = training_statistics(flat)
    del flat

    def standardised(x):
        return (x.float() - mean) / std

    steps_per_epoch = max(train_x.shape[0] // batch_size, 1)
    with fitting():
        probe = AttentivePooler(train_x.shape[-1], num_classes).to(train_x.device)
        opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(steps_per_epoch, epochs * steps_per_epoch))
        for _ in range(epochs):
            order = torch.randperm(train_x.shape[0])
            for i in range(steps_per_epoch):
                idx = order[i * batch_size : (i + 1) * batch_size]
                loss = F.cross_entropy(probe(standardised(train_x[idx])), train_y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    correct = 0
    with torch.no_grad():
        for start in range(0, test_x.shape[0], 1024):
            predicted = probe(standardised(test_x[start : start + 1024])).argmax(1)
            correct += (predicted == test_y[start : start + 1024]).sum().item()
    return correct / test_x.shape[0]


def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of L2-normalised embeddings (B, D), as a 0-dim tensor on z's device. Healthy
    embeddings spread over the sphere and give about 1/sqrt(D); a collapsed encoder (every input mapped to
    one point) gives 0."""
    return F.normalize(z.detach().float(), dim=1).std(0).mean()


@torch.no_grad()
def rankme(features: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al., "RankMe: Assessing the Downstream Performance of Pretrained Self-Supervised
    Representations by Their Rank", ICML 2023): the effective rank exp(entropy) of the singular values of
    (N, D) features, normalised to sum to 1. Between 1 (every input on one line) and min(N, D) (all
    directions used alike); it catches dimensional collapse, which a per-dimension std does not."""
    s = torch.linalg.svdvals(features.float())  # (min(N, D),)
    p = s / s.sum().clamp(min=torch.finfo(s.dtype).tiny) + eps  # all-zero features (a dead ReLU): 1, not NaN
    return torch.exp(-(p * p.log()).sum()).item()


def is_collapsed(std: float, dim: int, fraction: float = 0.1) -> bool:
    """Collapse: the embeddings' spread is below `fraction` of the 1/sqrt(D) of a uniform spread."""
    return std < fraction / dim**0.5


def log_embedding_std(module: L.LightningModule, z: torch.Tensor, name: str = "train/embedding_std") -> torch.Tensor:
    """Log `embedding_std` of this step's embeddings z (B, D) under `name`, and warn when they have
    collapsed (`is_collapsed`): a collapsed joint-embedding run does not recover by itself.

    The check reads the value on the host, which makes the CPU wait for the GPU's queued work, so it runs
    only on the steps whose metrics reach the logger (`trainer.log_every_n_steps`), which read it anyway."""
    std = embedding_std(z)
    module.log(name, std)
    trainer = module._trainer  # None outside a Trainer: check every call
    # Lightning's own test for "this step's metrics are written" (its +1 counts the step being taken; 0 is never).
    if trainer is not None and not trainer._logger_connector.should_update_logs:
        return std
    if is_collapsed(std.item(), z.shape[-1]):
        # A constant message: Python shows it once per run instead of at every step.
        rank_zero_warn(
            f"{type(module).__name__}: the embeddings have collapsed ({name} is under 10% of the "
            f"1/sqrt({z.shape[-1]}) of a uniform spread); every input maps to nearly the same point"
        )
    return std


def probe_scores(train_x, train_y, test_x, test_y) -> dict[str, float]:
    return {
        "linear_acc": linear_probe_accuracy(train_x, train_y, test_x, test_y),
        "knn_acc": knn_accuracy(train_x, train_y, test_x, test_y),
    }


def split_halves(x: torch.Tensor, y: torch.Tensor, seed: int = 0):
    """A fixed random split of one labelled set into fitting and testing halves. Random, not by position:
    shards are often written in label order."""
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    fit, test = order[: x.shape[0] // 2], order[x.shape[0] // 2 :]
    return x[fit], y[fit], x[test], y[test]


class OnlineProbe(L.Callback):
    """After every validation epoch, fit a linear probe and a kNN classifier on the features of half of the
    validation split and log their accuracy on the other half as `probe/linear_acc` and `probe/knn_acc`.
    Also log the spread of those features: `probe/embedding_std` (0 when every input maps to one point)
    and `probe/rankme` (`rankme`, low when the features fold onto a few directions: dimensional collapse,
    which the std does not show).

    The LightningModule provides `embed(batch) -> (B, D)`: the encoder's embedding of the clean inputs, and
    batches carry `"label"`. Features of all ranks are gathered, so every rank logs the same number. A sample
    seen again in the same validation run (`data.val_batches` re-reads a rank's shards) is probed once: in
    both halves, kNN would find it as its own neighbour. At most `max_samples` rows are kept over all ranks
    (each rank its share, the rest of the batch that reaches it dropped), so the probe reads the same on one
    process as on many.
    """

    needs_why = "the online probe (off: --probe.max_samples 0)"  # in the skip warning of a sample without a label

    def __init__(self, max_samples: int = 10_000):
        self.max_samples = max_samples
        self.features: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.embedded = 0  # rows embedded this run, repeats included: every rank stops at the same batch
        self.seen: set[tuple[str, str]] = set()  # (shard, key) of the samples kept this run

    @property
    def needs_entries(self) -> tuple[str, ...]:
        """What every validation sample must hold: `core.data.ShardDataModule.val_dataloader` reads this (and
        `needs_why`) from the trainer's callbacks and skips and counts the samples without it."""
        return ("label",) if self.max_samples > 0 else ()

    def on_validation_epoch_start(self, trainer, pl_module):
        self.features, self.labels, self.embedded, self.seen = [], [], 0, set()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        # Under FSDP `embed` is a collective: whether to call it must depend on what every rank has alike.
        # max_samples is the whole probe's: each rank embeds its share, so the probe reads alike at any world size.
        room = math.ceil(self.max_samples / trainer.world_size) - self.embedded
        if room <= 0:
            return
        if "label" not in batch:
            raise KeyError(
                "OnlineProbe needs a 'label' in every validation batch (a .cls member in each val sample); "
                f"this batch has {sorted(batch)}. Turn the probe off with --probe.max_samples 0."
            )
        with torch.no_grad():
            # The batch's rows past this rank's share are dropped: the whole probe holds max_samples at any world size.
            features = pl_module.embed(batch).detach().float().cpu()[:room]
        self.embedded += len(features)
        new = list(range(len(features)))  # batches without keys (not from shards): every row
        if "__key__" in batch:
            new, urls = [], batch.get("__url__", [""] * len(batch["__key__"]))
            for i, sample in zip(range(len(features)), zip(urls, batch["__key__"])):
                if sample not in self.seen:
                    self.seen.add(sample)
                    new.append(i)
        self.features.append(features[new])
        self.labels.append(batch["label"].detach().cpu()[new])

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or not self.features:
            return
        x, y = gather_ragged(pl_module, torch.cat(self.features)), gather_ragged(pl_module, torch.cat(self.labels))
        self.features, self.labels = [], []
        if not x.isfinite().all():
            # Stop here rather than deep inside the probe's L-BFGS: nothing later in this run can recover.
            bad = (~x.isfinite().all(dim=1)).sum().item()
            raise FloatingPointError(
                f"OnlineProbe: {bad} of {len(x)} validation embeddings hold NaN or inf at step {trainer.global_step}: "
                "the encoder has diverged. Resume from an earlier checkpoint with a lower learning rate or "
                "--trainer.precision 32-true."
            )
        if y.unique().numel() < 2:
            return
        scores = probe_scores(*split_halves(x, y))
        pl_module.log_dict({f"probe/{k}": v for k, v in scores.items()}, rank_zero_only=True)
        pl_module.log("probe/embedding_std", embedding_std(x), rank_zero_only=True)
        pl_module.log("probe/rankme", rankme(x), rank_zero_only=True)


def gather_ragged(pl_module: L.LightningModule, x: torch.Tensor) -> torch.Tensor:
    """Concatenate tensors of possibly different lengths from every rank (validation shards need not split
    evenly), in rank order."""
    if pl_module.trainer.world_size == 1:
        return x
    device = pl_module.device
    n = torch.tensor([x.shape[0]], device=device)
    sizes = pl_module.all_gather(n).flatten().tolist()
    padded = torch.zeros(max(sizes), *x.shape[1:], dtype=x.dtype, device=device)
    padded[: x.shape[0]] = x.to(device)
    gathered = pl_module.all_gather(padded)  # (world, max, ...)
    return torch.cat([gathered[r, :s] for r, s in enumerate(sizes)]).cpu()
