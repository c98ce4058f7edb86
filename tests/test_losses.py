"""Each loss against a small case computed independently, element by element, with numpy, and the siamese
losses against lightly's implementations."""

import math

import numpy as np
import pytest
import torch

from core.losses import barlow_twins_loss, clip_loss, dino_center, dino_collapse_diagnostics, dino_loss, dino_targets, masked_patch_loss, negative_cosine, siglip_loss, vicreg_loss


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def l2n(x):
    return x / x.norm(dim=-1, keepdim=True)


# ---------------------------------------------------------------- masked autoencoding


def masked_patch_loss_by_hand(pred, target, mask, norm_pix):
    pred, target, mask = pred.numpy(), target.numpy(), mask.numpy()
    total, count = 0.0, 0
    for b in range(pred.shape[0]):
        for n in range(pred.shape[1]):
            if not mask[b, n]:
                continue
            t = target[b, n]
            if norm_pix:
                t = (t - t.mean()) / math.sqrt(t.var(ddof=1) + 1e-6)
            total += sum((pred[b, n, i] - t[i]) ** 2 for i in range(len(t))) / len(t)
            count += 1
    return total / count


@pytest.mark.parametrize("norm_pix", [True, False])
def test_masked_patch_loss_matches_hand_computation(norm_pix):
    pred, target = rand(2, 5, 6, seed=1), rand(2, 5, 6, seed=2) * 3 + 1
    mask = torch.tensor([[True, False, True, False, False], [False, True, True, True, False]])
    loss = masked_patch_loss(pred, target, mask, norm_pix=norm_pix)
    assert loss.item() == pytest.approx(masked_patch_loss_by_hand(pred, target, mask, norm_pix), rel=1e-10)


def test_masked_patch_loss_ignores_visible_patches():
    pred, target = rand(2, 5, 6, seed=1), rand(2, 5, 6, seed=2)
    mask = torch.tensor([[True, False, True, False, False], [False, True, True, True, False]])
    changed = pred.clone()
    changed[~mask] += 10.0
    for norm_pix in (True, False):
        assert masked_patch_loss(changed, target, mask, norm_pix) == masked_patch_loss(pred, target, mask, norm_pix)
    changed_hidden = pred.clone()
    changed_hidden[0, 0] += 1.0
    assert masked_patch_loss(changed_hidden, target, mask) != masked_patch_loss(pred, target, mask)


def test_masked_patch_loss_norm_pix_targets_are_normalised():
    # A target that is an affine map of the prediction's normalised pattern gives zero loss only with norm_pix.
    pattern = torch.tensor([[[-1.0, 0.0, 1.0]]], dtype=torch.float64)
    target = 4.0 * pattern + 7.0
    mask = torch.ones(1, 1, dtype=torch.bool)
    assert masked_patch_loss(pattern, target, mask, norm_pix=True).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_patch_loss(pattern, target, mask, norm_pix=False).item() == pytest.approx(((-1 - 3) ** 2 + (0 - 7) ** 2 + (1 - 11) ** 2) / 3)


# ---------------------------------------------------------------- SimSiam / BYOL


def test_negative_cosine_value_and_stop_gradient():
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    z = torch.tensor([[1.0, 1.0], [0.0, -3.0]], requires_grad=True)
    loss = negative_cosine(p, z)
    assert loss.item() == pytest.approx(-(1 / math.sqrt(2) + -1.0) / 2)
    loss.backward()
    assert z.grad is None
    assert p.grad is not None and p.grad.abs().sum() > 0


def test_negative_cosine_random_case():
    p, z = rand(4, 3, seed=3), rand(4, 3, seed=4)
    pn, zn = p.numpy(), z.numpy()
    expected = -np.mean([pn[i] @ zn[i] / np.linalg.norm(pn[i]) / np.linalg.norm(zn[i]) for i in range(4)])
    assert negative_cosine(p, z).item() == pytest.approx(expected, rel=1e-12)


def test_negative_cosine_keeps_float32_under_cpu_bf16_autocast():
    """Under autocast the heads hand over bf16 embeddings. Near cos = 1 a bf16 cosine rounds BYOL's loss away
    (its spacing there is 2^-8); CPU autocast does not promote cosine_similarity to float32 as CUDA's does."""
    z = rand(64, 32, seed=5).bfloat16()
    p = (z.double() + 0.01 * rand(64, 32, seed=6)).bfloat16().requires_grad_()
    expected = negative_cosine(p.detach().double(), z.double()).item()  # the exact loss of these bf16 values
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = negative_cosine(p, z)
    assert loss.dtype == torch.float32
    assert 1 + loss.item() == pytest.approx(1 + expected, rel=1e-3) and 1 + expected > 1e-5
    loss.backward()
    assert p.grad.dtype == torch.bfloat16 and p.grad.abs().sum() > 0


# ---------------------------------------------------------------- Barlow Twins / VICReg


def barlow_by_hand(z1, z2, lambd):
    z1, z2 = z1.numpy(), z2.numpy()
    n, d = z1.shape
    s1 = (z1 - z1.mean(0)) / z1.std(0)  # numpy's std is the population std
    s2 = (z2 - z2.mean(0)) / z2.std(0)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(s1[b, i] * s2[b, j] for b in range(n)) / n
            loss += (c - 1) ** 2 if i == j else lambd * c**2
    return loss


def test_barlow_twins_matches_hand_computation():
    z1, z2 = rand(6, 4, seed=5), rand(6, 4, seed=6)
    assert barlow_twins_loss(z1, z2, lambd=0.1, gather=False).item() == pytest.approx(barlow_by_hand(z1, z2, 0.1), rel=1e-10)


def test_barlow_twins_stays_finite_with_a_dimension_constant_over_the_batch():
    """A dead embedding dimension standardises to 0 (its std is clamped), not to 0/0: a NaN would end the run."""
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randn(8, 4, generator=g, dtype=torch.float64)
    z1[:, 2], z2[:, 1] = 3.0, -1.0
    z1.requires_grad_(), z2.requires_grad_()
    loss = barlow_twins_loss(z1, z2, gather=False)
    loss.backward()
    assert loss.isfinite() and z1.grad.isfinite().all() and z2.grad.isfinite().all()
    s1, s2 = ((z - z.mean(0)) / z.std(0, unbiased=False) for z in (z1.detach(), z2.detach()))
    s1[:, 2], s2[:, 1] = 0.0, 0.0
    c = s1.T @ s2 / 8
    assert loss.item() == pytest.approx(((c.diagonal() - 1).pow(2).sum() + 5e-3 * (c.pow(2).sum() - c.diagonal().pow(2).sum())).item(), rel=1e-12)


def test_barlow_twins_is_zero_for_identical_decorrelated_views():
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]) * 3 + 2
    assert barlow_twins_loss(z, z.clone(), gather=False).item() == pytest.approx(0.0, abs=1e-6)
    # Swapping the columns of one view puts all correlation off the diagonal: D on-diagonal misses.
    assert barlow_twins_loss(z, z.flip(1), lambd=0.5, gather=False).item() == pytest.approx(2 + 0.5 * 2, rel=1e-5)


def vicreg_by_hand(z1, z2, sim_w, var_w, cov_w):
    z1, z2 = z1.numpy(), z2.numpy()
    n, d = z1.shape
    invariance = sum((z1[b, i] - z2[b, i]) ** 2 for b in range(n) for i in range(d)) / (n * d)
    variance, covariance = 0.0, 0.0
    for z in (z1, z2):
        centred = z - z.mean(0)
        for i in range(d):
            std = math.sqrt(sum(centred[b, i] ** 2 for b in range(n)) / (n - 1) + 1e-4)
            variance += max(0.0, 1 - std) / d / 2
        for i in range(d):
            for j in range(d):
                if i != j:
                    covariance += (sum(centred[b, i] * centred[b, j] for b in range(n)) / (n - 1)) ** 2 / d
    return sim_w * invariance + var_w * variance + cov_w * covariance


def test_vicreg_matches_hand_computation():
    # Scale 0.5 keeps some stds below 1, so the variance hinge is active for part of the dimensions.
    z1, z2 = rand(7, 3, seed=7) * 0.5, rand(7, 3, seed=8) * 1.5
    loss = vicreg_loss(z1, z2, sim_weight=2.0, var_weight=3.0, cov_weight=0.5, gather=False)
    assert loss.item() == pytest.approx(vicreg_by_hand(z1, z2, 2.0, 3.0, 0.5), rel=1e-10)


# ---------------------------------------------------------------- CLIP / SigLIP


def clip_by_hand(a, b, scale):
    a, b = a.numpy(), b.numpy()
    n = a.shape[0]
    logits = [[scale * (a[i] @ b[j]) for j in range(n)] for i in range(n)]
    loss = 0.0
    for i in range(n):
        row = -logits[i][i] + math.log(sum(math.exp(logits[i][j]) for j in range(n)))
        col = -logits[i][i] + math.log(sum(math.exp(logits[j][i]) for j in range(n)))
        loss += (row + col) / 2
    return loss / n


def test_clip_loss_matches_hand_computation():
    a, b = l2n(rand(5, 4, seed=9)), l2n(rand(5, 4, seed=10))
    logit_scale = torch.tensor(math.log(3.0), dtype=torch.float64)
    assert clip_loss(a, b, logit_scale, gather=False).item() == pytest.approx(clip_by_hand(a, b, 3.0), rel=1e-10)


def siglip_by_hand(a, b, scale, bias):
    a, b = a.numpy(), b.numpy()
    n = a.shape[0]
    loss = 0.0
    for i in range(n):
        for j in range(n):
            label = 1.0 if i == j else -1.0
            loss += math.log(1 + math.exp(-label * (scale * (a[i] @ b[j]) + bias)))
    return loss / n


def test_siglip_loss_matches_hand_computation():
    a, b = l2n(rand(5, 4, seed=11)), l2n(rand(5, 4, seed=12))
    logit_scale = torch.tensor(math.log(10.0), dtype=torch.float64)
    logit_bias = torch.tensor(-2.0, dtype=torch.float64)
    loss = siglip_loss(a, b, logit_scale, logit_bias, gather=False)
    assert loss.item() == pytest.approx(siglip_by_hand(a, b, 10.0, -2.0), rel=1e-10)


def test_contrastive_losses_prefer_matching_pairs():
    a = l2n(rand(6, 8, seed=13))
    shuffled = a[torch.tensor([1, 2, 3, 4, 5, 0])]
    scale, bias = torch.tensor(math.log(10.0), dtype=torch.float64), torch.tensor(-5.0, dtype=torch.float64)
    assert clip_loss(a, a, scale, gather=False) < clip_loss(a, shuffled, scale, gather=False)
    assert siglip_loss(a, a, scale, bias, gather=False) < siglip_loss(a, shuffled, scale, bias, gather=False)


# ---------------------------------------------------------------- DINO


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_dino_loss_matches_hand_computation():
    k, batch = 5, 3
    student = [rand(batch, k, seed=20 + i) for i in range(4)]  # 2 global + 2 local crops
    teacher = [rand(batch, k, seed=30 + i) for i in range(2)]
    center = rand(1, k, seed=40)
    s_temp, t_temp = 0.2, 0.05
    total, pairs = 0.0, 0
    for ti in range(2):
        for si in range(4):
            if si == ti:
                continue
            for b in range(batch):
                target = softmax((teacher[ti][b].numpy() - center[0].numpy()) / t_temp)
                log_p = np.log(softmax(student[si][b].numpy() / s_temp))
                total += -(target * log_p).sum() / batch
            pairs += 1
    assert pairs == 6
    loss = dino_loss(student, dino_targets(teacher, center, teacher_temp=t_temp), student_temp=s_temp)
    assert loss.item() == pytest.approx(total / pairs, rel=1e-10)


def test_dino_loss_teacher_gets_no_gradient():
    student = [rand(2, 4, seed=i).requires_grad_() for i in range(2)]
    teacher = [rand(2, 4, seed=10 + i).requires_grad_() for i in range(2)]
    dino_loss(student, dino_targets(teacher, torch.zeros(1, 4, dtype=torch.float64))).backward()
    assert all(t.grad is None for t in teacher)
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)


def test_dino_collapse_diagnostics_split_the_loss_into_teacher_entropy_and_kl():
    k, batch = 6, 4
    student = [rand(batch, k, seed=60 + i) for i in range(5)]  # 2 global + 3 local crops
    teacher = [rand(batch, k, seed=70 + i) for i in range(2)]
    center, s_temp, t_temp = rand(1, k, seed=80), 0.1, 0.04
    targets = dino_targets(teacher, center, teacher_temp=t_temp)
    loss = dino_loss(student, targets, student_temp=s_temp)
    entropy, kl = dino_collapse_diagnostics(targets, loss)
    by_hand = [softmax((teacher[v][b].numpy() - center[0].numpy()) / t_temp) for v in range(2) for b in range(batch)]
    expected_entropy = np.mean([-(t * np.log(t)).sum() for t in by_hand])
    assert entropy.item() == pytest.approx(expected_entropy, rel=1e-10)
    kls = []  # KL(teacher crop || student crop) over every pair dino_loss scores
    for ti in range(2):
        for si in range(5):
            if si != ti:
                for b in range(batch):
                    t = softmax((teacher[ti][b].numpy() - center[0].numpy()) / t_temp)
                    kls.append((t * (np.log(t) - np.log(softmax(student[si][b].numpy() / s_temp)))).sum())
    assert kl.item() == pytest.approx(np.mean(kls), rel=1e-8)


def test_dino_collapse_diagnostics_tell_uniform_from_one_hot_collapse():
    k = 64
    same = torch.zeros(8, k, dtype=torch.float64)  # every image gives the same logits, as the centre
    uniform, _ = dino_collapse_diagnostics(dino_targets([same, same], same[:1]), torch.tensor(math.log(k)))
    assert uniform.item() == pytest.approx(math.log(k))
    one_hot = torch.zeros(8, k, dtype=torch.float64)
    one_hot[:, 3] = 1.0  # one prototype wins for every image, and no centre has caught up yet
    peaked, _ = dino_collapse_diagnostics(dino_targets([one_hot, one_hot], torch.zeros(1, k, dtype=torch.float64)), torch.tensor(0.0))
    assert peaked.item() < 0.01


def test_dino_center_is_ema_of_teacher_mean():
    teacher = [rand(3, 4, seed=50), rand(3, 4, seed=51)]
    center = rand(1, 4, seed=52)
    rows = [teacher[v][b].numpy() for v in range(2) for b in range(3)]
    expected = center.numpy() * 0.8 + np.mean(rows, axis=0) * 0.2
    np.testing.assert_allclose(dino_center(center, teacher, momentum=0.8).numpy(), expected, rtol=1e-12)


# ---------------------------------------------------------------- against lightly's implementations


def test_siamese_losses_equal_lightlys():
    """A second, widely used implementation of each siamese loss (lightly.loss, a test extra) computes what
    ours computes. Barlow Twins standardises as the official code's affine-free BatchNorm1d does, which
    lightly calls: its eps of 1e-5 on the variance is all that tells the two apart."""
    from lightly.loss import BarlowTwinsLoss, NegativeCosineSimilarity, VICRegLoss

    z1 = rand(64, 32, seed=1)
    z2 = z1 + 0.5 * rand(64, 32, seed=2)
    torch.testing.assert_close(negative_cosine(z1, z2), NegativeCosineSimilarity()(z1, z2))
    torch.testing.assert_close(vicreg_loss(z1, z2, gather=False), VICRegLoss(gather_distributed=False)(z1, z2))
    lightly_barlow = BarlowTwinsLoss(lambda_param=5e-3, gather_distributed=False)(z1, z2)
    torch.testing.assert_close(barlow_twins_loss(z1, z2, gather=False), lightly_barlow, rtol=1e-3, atol=0)
    assert not torch.isclose(barlow_twins_loss(z1, z2, lambd=1e-2, gather=False), lightly_barlow, rtol=1e-3)


def test_dino_loss_and_center_equal_lightlys():
    from lightly.loss import DINOLoss

    k = 16
    teacher = [rand(8, k, seed=s).float() for s in (1, 2)]
    student = [rand(8, k, seed=s).float() for s in (3, 4, 5, 6)]  # 2 global crops, then 2 local ones
    lightly = DINOLoss(output_dim=k, warmup_teacher_temp=0.04, teacher_temp=0.04, student_temp=0.1, center_momentum=0.9)
    center = torch.zeros(1, k)  # lightly's starting center too
    for _ in range(2):  # the second call uses the center the first one moved
        expected = lightly(teacher, student, epoch=0)
        torch.testing.assert_close(dino_loss(student, dino_targets(teacher, center, 0.04), 0.1), expected)
        center = dino_center(center, teacher, 0.9)
        torch.testing.assert_close(center, lightly.center.view(1, k))
        teacher = [t + 1.0 for t in teacher]
