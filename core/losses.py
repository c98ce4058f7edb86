"""Pretraining losses as functions, each with its paper.

Functions whose result depends on other ranks' samples take `gather: bool` and use
core.distributed.gather_with_grad. With `gather=True`, the mean of the ranks' losses, and the gradient once
DDP has averaged it, equal those of one process on the concatenated global batch; each rank's own loss may
differ (VICReg's invariance term and the CLIP/SigLIP losses are computed on the rank's rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from core.distributed import all_reduce_mean, gather_with_grad, world


def masked_patch_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True) -> torch.Tensor:
    """Mean squared error on hidden patches only (He et al., "Masked Autoencoders Are Scalable Vision
    Learners", 2022, Sec. 3).

    pred, target: (B, N, P) patches (core.masking.patchify); mask: (B, N), True = hidden.
    norm_pix: normalise each target patch by its own mean and variance, which the paper found gives
    better representations.
    """
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)  # (B, N)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum().clamp(min=1)


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """-cos(p, stopgrad(z)), averaged over the batch (Chen & He, "Exploring Simple Siamese Representation
    Learning", 2021). BYOL's loss (Grill et al. 2020) is 2 + 2 * this: the normalised MSE.
    In float32 at least, also under bf16 autocast: CUDA's autocast promotes cosine_similarity, CPU's does not, and
    bf16 spaces cosines near 1 by 2^-8, which is the whole of BYOL's loss late in training."""
    dtype = torch.promote_types(p.dtype, torch.float32)
    return -F.cosine_similarity(p.to(dtype), z.detach().to(dtype), dim=-1).mean()


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 5e-3, gather: bool = True) -> torch.Tensor:
    """Barlow Twins (Zbontar et al., "Barlow Twins: Self-Supervised Learning via Redundancy Reduction",
    2021): push the cross-correlation matrix of the two views' embeddings, each standardised over the
    global batch, to the identity. z1, z2: (B, D)."""
    if gather:
        z1, z2 = gather_with_grad(z1), gather_with_grad(z2)  # (world * B, D)
    n = z1.shape[0]
    z1 = (z1 - z1.mean(0)) / z1.std(0, unbiased=False).clamp(min=1e-6)
    z2 = (z2 - z2.mean(0)) / z2.std(0, unbiased=False).clamp(min=1e-6)
    c = z1.T @ z2 / n  # (D, D)
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag


def vicreg_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    sim_weight: float = 25.0,
    var_weight: float = 25.0,
    cov_weight: float = 1.0,
    gather: bool = True,
) -> torch.Tensor:
    """VICReg (Bardes et al., "VICReg: Variance-Invariance-Covariance Regularization", 2022): invariance
    (MSE between views) + variance (hinge keeping each dimension's std above 1) + covariance (off-diagonal
    covariance squared, divided by D). Variance and covariance use the global batch. z1, z2: (B, D)."""
    invariance = F.mse_loss(z1, z2)  # per-rank mean; DDP's gradient average makes it global
    if gather:
        z1, z2 = gather_with_grad(z1), gather_with_grad(z2)  # (world * B, D)
    n, d = z1.shape
    variance, covariance = 0.0, 0.0
    for z in (z1, z2):
        z = z - z.mean(dim=0)
        std = torch.sqrt(z.var(dim=0) + 1e-4)
        variance = variance + F.relu(1 - std).mean() / 2
        cov = z.T @ z / (n - 1)  # (D, D)
        covariance = covariance + (cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()) / d
    return sim_weight * invariance + var_weight * variance + cov_weight * covariance


def clip_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, gather: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE (Radford et al., "Learning Transferable Visual Models From Natural Language
    Supervision", 2021; van den Oord et al. 2018). a, b: (B, D) L2-normalised embeddings of matching pairs;
    logit_scale: the learnable log inverse temperature. With gather, this rank's samples are contrasted
    against every rank's (labels offset by rank * B, like open_clip's `local_loss`)."""
    rank, _ = world()
    b_all, a_all, offset = b, a, 0
    if gather:
        a_all, b_all = gather_with_grad(a), gather_with_grad(b)  # (world * B, D)
        offset = rank * a.shape[0]
    scale = logit_scale.exp()
    labels = torch.arange(a.shape[0], device=a.device) + offset
    logits_a = scale * a @ b_all.T  # (B, world * B)
    logits_b = scale * b @ a_all.T  # (B, world * B)
    return (F.cross_entropy(logits_a, labels) + F.cross_entropy(logits_b, labels)) / 2


def siglip_loss(
    a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor, gather: bool = True
) -> torch.Tensor:
    """Pairwise sigmoid loss (Zhai et al., "Sigmoid Loss for Language Image Pre-Training", 2023): every
    (a_i, b_j) pair is a binary problem, positive iff i == j; no softmax over the batch. a, b: (B, D)
    L2-normalised; logit_scale (log temperature) and logit_bias are learnable scalars. Normalised by the
    local batch size, as in the paper."""
    rank, _ = world()
    b_all, offset = b, 0
    if gather:
        b_all = gather_with_grad(b)  # (world * B, D)
        offset = rank * a.shape[0]
    logits = logit_scale.exp() * a @ b_all.T + logit_bias  # (B, world * B)
    labels = -torch.ones_like(logits)
    labels[torch.arange(a.shape[0]), torch.arange(a.shape[0]) + offset] = 1.0
    return -F.logsigmoid(labels * logits).sum() / a.shape[0]


@torch.no_grad()
def dino_targets(teacher: list[torch.Tensor], center: torch.Tensor, teacher_temp: float = 0.04) -> list[torch.Tensor]:
    """DINO's teacher side (Caron et al. 2021, Sec. 3.1): the teacher's logits (B, K) of each global crop,
    centred by the running mean `center` (1, K) (see `dino_center`) and sharpened by a low temperature,
    as distributions over the K prototypes. No gradient flows into the teacher."""
    return [F.softmax((t - center) / teacher_temp, dim=-1) for t in teacher]


def dino_loss(student: list[torch.Tensor], targets: list[torch.Tensor], student_temp: float = 0.1) -> torch.Tensor:
    """Self-distillation with no labels (Caron et al., "Emerging Properties in Self-Supervised Vision
    Transformers", 2021): cross-entropy between the teacher distribution of each global crop and the
    student distribution of every other crop, averaged over the pairs.

    student: logits (B, K) for all crops (globals first); targets: `dino_targets` of the global crops."""
    log_probs = [F.log_softmax(s / student_temp, dim=-1) for s in student]
    total, pairs = 0.0, 0
    for ti, target in enumerate(targets):
        for si, log_p in enumerate(log_probs):
            if si == ti:  # the same view seen by both networks carries no signal
                continue
            total = total + (-target * log_p).sum(dim=-1).mean()
            pairs += 1
    return total / pairs


@torch.no_grad()
def dino_collapse_diagnostics(targets: list[torch.Tensor], loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two numbers Caron et al. (2021, Sec. 5.3 and Fig. 7) watch to tell DINO's two collapses apart:
    the mean entropy of the teacher's distributions and the KL divergence from teacher to student. A
    collapsed student copies its teacher, so the KL goes to 0; the entropy then goes to 0 when one
    prototype dominates (sharpening alone) and to ln K when the outputs are uniform (centring alone).
    targets, loss: what `dino_loss` took and returned. Every teacher crop meets the same number of student
    crops there, so the loss is entropy + KL."""
    probs = torch.cat(targets)  # (n_global * B, K)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(dim=-1).mean()
    return entropy, loss.detach() - entropy


@torch.no_grad()
def dino_center(center: torch.Tensor, teacher: list[torch.Tensor], momentum: float = 0.9) -> torch.Tensor:
    """EMA of the teacher's mean logits over the global batch (all ranks), which keeps one dimension from
    dominating (Caron et al. 2021, Eq. 4)."""
    batch_center = all_reduce_mean(torch.cat(teacher).mean(dim=0, keepdim=True))  # (1, K)
    return center * momentum + batch_center * (1 - momentum)
