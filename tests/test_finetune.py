"""core.finetune: layer-wise learning-rate decay, and fine-tuning an export next to its random init."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from core.data.write import write_shards
from core.export import describe_encoder, export_checkpoint, load_encoder
from core.finetune import layer_decay_groups, train_classifier
from core.finetune import main as finetune_main
from core.schedules import WarmupCosine
from core.resnet import ResNet
from core.vit import ViT

IMAGE_8PX = {"modality": "image", "size": [8, 8], "mean": [0.5] * 3, "std": [0.25] * 3}
VIT_8PX = dict(input_size=(8, 8), patch_size=(4, 4), size="tiny", dim=16, depth=3, heads=2, pool="mean")


def test_layer_decay_scales_each_block_and_skips_decay_on_biases_and_norms():
    vit, head = ViT(**VIT_8PX), torch.nn.Linear(16, 10)
    groups = layer_decay_groups(vit, head, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    params = [*vit.parameters(), *head.parameters()]
    assert sum(len(g["params"]) for g in groups) == len(params) == len(scale)  # each parameter in one group
    # 3 blocks: the embedding is layer 0 (0.5^4), block i is layer i + 1, the final norm and the head layer 4
    assert scale[id(vit.patch_embed.proj.weight)] == scale[id(vit.cls_token)] == 0.5**4
    for i, block in enumerate(vit.blocks):
        assert {scale[id(p)] for p in block.parameters()} == {0.5 ** (3 - i)}
    assert scale[id(vit.norm.weight)] == scale[id(head.weight)] == scale[id(head.bias)] == 1.0
    assert decay[id(head.weight)] == decay[id(vit.blocks[0].attn.qkv.weight)] == 0.05
    assert decay[id(head.bias)] == decay[id(vit.blocks[0].norm1.weight)] == decay[id(vit.cls_token)] == 0.0
    # an exported encoder groups its ViT the same way; a ResNet, or no decay, trains everything at lr
    encoder = torch.nn.Module()
    encoder.backbone = vit
    assert [g["lr_scale"] for g in layer_decay_groups(encoder, head, 0.05, 0.5)] == [g["lr_scale"] for g in groups]
    for backbone, d in ((ResNet(18, small_images=True, width=4), 0.5), (vit, 1.0)):
        assert {g["lr_scale"] for g in layer_decay_groups(backbone, head, 0.05, d)} == {1.0}
    # without layer decay a ViT's groups differ only in weight decay, the class token still undecayed
    flat = layer_decay_groups(vit, head, 0.05, 1.0)
    assert len(flat) == 2 and any(p is vit.cls_token for g in flat if g["weight_decay"] == 0.0 for p in g["params"])
    # a learned position table is layer 0 and undecayed, as in MAE's fine-tuning
    learned = ViT(**VIT_8PX, pos_embed="learned")
    (group,) = [g for g in layer_decay_groups(learned, head, 0.05, 0.5) if any(p is learned.pos_embed for p in g["params"])]
    assert group["lr_scale"] == 0.5**4 and group["weight_decay"] == 0.0


def tone_shards(tmp_path, unlabelled: tuple[str, ...] = (), flip_val: bool = False) -> list[str]:
    """8x8 noise images, dark or light; the label is the tone (in the val split the other tone's with
    `flip_val`). 64 training and 40 validation samples; those keyed in `unlabelled` have no label."""
    rng = np.random.default_rng(0)

    def samples(n, prefix, flip=False):
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray((rng.integers(0, 100, (8, 8, 3)) + 150 * (i % 2)).astype(np.uint8)).save(buf, format="PNG")
            yield {"__key__": f"{prefix}{i}", "png": buf.getvalue(), **({} if f"{prefix}{i}" in unlabelled else {"cls": (i + flip) % 2})}

    write_shards(samples(64, "t"), str(tmp_path / "train-%06d.tar"))
    write_shards(samples(40, "v", flip_val), str(tmp_path / "val-%06d.tar"))
    return ["--train", str(tmp_path / "train-000000.tar"), "--val", str(tmp_path / "val-000000.tar")]


def export_vit(tmp_path, seed: int) -> str:
    torch.manual_seed(seed)
    backbone, prefix = ViT(**VIT_8PX), "model.encoder."
    state = {prefix + k: v for k, v in backbone.state_dict().items()}
    torch.save({"state_dict": state, "encoders": {"image": describe_encoder(prefix, backbone, IMAGE_8PX)}}, tmp_path / f"{seed}.ckpt")
    (folder,) = export_checkpoint(str(tmp_path / f"{seed}.ckpt"), str(tmp_path / f"export{seed}"))
    return folder


def rows(out: str) -> dict[str, float]:
    return {line.split("|")[1].strip(): float(line.split("|")[2]) for line in out.splitlines() if line.startswith(("| pretrained", "| random init"))}


def test_finetune_learns_and_treats_both_encoders_alike(tmp_path, capsys, one_thread):
    """An export holding exactly the weights the random-init row draws (seed 0) must score exactly as that row:
    the same head, batches and crops for both. Both learn the tone."""
    shards = tone_shards(tmp_path)
    args = [*shards, "--num-classes", "2", "--steps", "30", "--batch-size", "16", "--lr", "3e-3", "--layer-decay", "0.75"]
    folder = export_vit(tmp_path, 0)
    torch.manual_seed(0)  # as core.finetune draws its random init
    fresh, exported = load_encoder(folder, pretrained=False).state_dict(), load_encoder(folder).state_dict()
    assert all(fresh[k].equal(exported[k]) for k in exported)
    finetune_main([folder, *args])
    scores = rows(capsys.readouterr().out)
    assert scores["pretrained"] == scores["random init"] >= 90.0


def test_finetune_starts_the_arms_from_the_export_and_from_seed_zeros_draw_with_equal_heads_and_batches(tmp_path, monkeypatch):
    import core.finetune

    seen = []

    def train(backbone, head, batches, steps, lr, weight_decay, layer_decay, label_smoothing):
        x, _ = next(batches)
        seen.append((backbone.state_dict(), head, head.weight.detach().clone(), x))
        return 0.0

    monkeypatch.setattr(core.finetune, "train_classifier", train)
    folder = export_vit(tmp_path, 7)  # weights no seed-0 draw gives
    finetune_main([folder, *tone_shards(tmp_path), "--num-classes", "2", "--steps", "1"])
    (pretrained, head, head_start, x), (random_init, other_head, other_head_start, other_x) = seen
    exported = load_encoder(folder).state_dict()
    torch.manual_seed(0)  # as core.finetune draws its random init
    drawn = load_encoder(folder, pretrained=False).state_dict()
    assert all(pretrained[k].equal(exported[k]) for k in exported) and all(random_init[k].equal(drawn[k]) for k in drawn)
    assert not all(random_init[k].equal(exported[k]) for k in exported)
    assert head is not other_head and head_start.equal(other_head_start) and x.equal(other_x)


def test_finetune_trains_in_train_mode_scores_in_eval_mode_and_decays_each_layers_rate(tmp_path, monkeypatch):
    import itertools

    import core.finetune

    modes, rates, real_load, real_step = [], [], core.finetune.load_encoder, torch.optim.AdamW.step

    def load(*args, **kwargs):
        encoder = real_load(*args, **kwargs)
        encoder.register_forward_hook(lambda module, inputs, output: modes.append(module.training))
        return encoder

    def step(optimizer, *args, **kwargs):
        rates.append([(group["lr"], group["lr_scale"]) for group in optimizer.param_groups])
        return real_step(optimizer, *args, **kwargs)

    monkeypatch.setattr(core.finetune, "load_encoder", load)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    finetune_main([export_vit(tmp_path, 0), *tone_shards(tmp_path), "--num-classes", "2", "--steps", "3", "--lr", "1e-3",
                   "--layer-decay", "0.5"])  # fmt: skip
    # Each arm: 3 training forwards in train mode, then the val batches in eval mode.
    assert [(mode, len(list(run))) for mode, run in itertools.groupby(modes)] == [(True, 3), (False, 1), (True, 3), (False, 1)]
    schedule = WarmupCosine(1, 3)
    for step_rates in (rates[:3], rates[3:]):
        for i, groups in enumerate(step_rates):
            assert len({scale for _, scale in groups}) > 1  # the layers' scales differ...
            assert all(lr == pytest.approx(1e-3 * scale * schedule(i)) for lr, scale in groups)  # ...and are applied


def test_finetune_scores_on_the_val_split(tmp_path, capsys, one_thread):
    """Val labels the other way round: a classifier that learned the tone is wrong on every val sample
    (scored on the training split, it would be right)."""
    args = ["--num-classes", "2", "--steps", "30", "--batch-size", "16", "--lr", "3e-3"]
    finetune_main([export_vit(tmp_path, 0), *tone_shards(tmp_path, flip_val=True), *args])
    assert max(rows(capsys.readouterr().out).values()) <= 10.0


def test_each_pass_over_the_shards_draws_new_views(tmp_path):
    """64 samples in batches of 16: the fifth batch holds the first one's samples, in new crops."""
    from core.finetune import endless, train_transform

    train = tone_shards(tmp_path)[1]
    batches = endless(train, train_transform(IMAGE_8PX, (0.3, 1.0)), 16, "image")
    first, second = [next(batches) for _ in range(4)], [next(batches) for _ in range(4)]
    assert all(a[1].equal(b[1]) for a, b in zip(first, second))
    assert not any(a[0].equal(b[0]) for a, b in zip(first, second))


def test_finetune_needs_the_number_of_classes(tmp_path):
    with pytest.raises(SystemExit):
        finetune_main([str(tmp_path), "--train", "x", "--val", "y", "--steps", "1"])


def test_finetune_names_the_option_a_wrong_value_breaks(tmp_path):
    """--batch-size 0 trained on the whole split as one batch, --steps 0 scored an untrained head, a label past
    --num-classes failed in cross_entropy without naming the option."""
    shards, folder = tone_shards(tmp_path), export_vit(tmp_path, 0)
    for option, value, message in [("--steps", "0", "steps=0 must be at least 1"), ("--batch-size", "-1", "batch_size=-1 must be at least 1"),
                                   ("--drop-path", "1.5", r"drop_path=1.5 must be in \[0, 1\)")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            finetune_main([folder, *shards, "--num-classes", "2", "--steps", "1", option, value])
    with pytest.raises(ValueError, match="label 1 in the training shards: num_classes=1 takes labels 0 to 0"):
        finetune_main([folder, *shards, "--num-classes", "1", "--steps", "1", "--batch-size", "64"])


def test_finetune_refuses_val_shards_it_trains_on(tmp_path):
    """It scored the fine-tuned models on their own training samples and called that val accuracy."""
    shards, folder = tone_shards(tmp_path), export_vit(tmp_path, 0)
    with pytest.raises(ValueError, match="--train and --val share 1 shard.*train-000000.tar first: the fine-tuned models"):
        finetune_main([folder, "--train", f"{{{shards[1]},{shards[3]}}}", "--val", f"{tmp_path}/./train-000000.tar", "--num-classes", "2", "--steps", "1"])


def test_a_sample_without_a_label_is_skipped_not_a_failed_run(tmp_path, capsys):
    """It failed the batching of the whole run (a TypeError, or a KeyError when first in its batch)."""
    shards, folder = tone_shards(tmp_path, unlabelled=("t0", "v0")), export_vit(tmp_path, 0)
    finetune_main([folder, *shards, "--num-classes", "2", "--steps", "2", "--batch-size", "64"])
    assert "| pretrained" in capsys.readouterr().out


def test_finetune_hands_stochastic_depth_and_label_smoothing_to_both_runs(tmp_path, capsys, monkeypatch):
    import core.finetune

    seen = []

    def train(backbone, head, batches, steps, lr, weight_decay, layer_decay, label_smoothing):
        seen.append(([round(b.drop_path_rate, 6) for b in backbone.vit_backbone().blocks], label_smoothing))
        return 0.0

    monkeypatch.setattr(core.finetune, "train_classifier", train)
    shards = tone_shards(tmp_path)
    finetune_main([export_vit(tmp_path, 0), *shards, "--num-classes", "2", "--steps", "1", "--drop-path", "0.2", "--label-smoothing", "0.1"])
    rates = torch.linspace(0, 0.2, VIT_8PX["depth"]).tolist()
    assert seen == [([round(r, 6) for r in rates], 0.1)] * 2  # pretrained and random init alike
    assert rates[-1] == pytest.approx(0.2)

    # An export whose ViT was pretrained with stochastic depth fine-tunes without it unless asked.
    seen.clear()
    backbone, prefix = ViT(**VIT_8PX, drop_path=0.1), "model.encoder."
    state = {prefix + k: v for k, v in backbone.state_dict().items()}
    torch.save({"state_dict": state, "encoders": {"image": describe_encoder(prefix, backbone, IMAGE_8PX)}}, tmp_path / "dp.ckpt")
    (folder,) = export_checkpoint(str(tmp_path / "dp.ckpt"), str(tmp_path / "dp"))
    finetune_main([folder, *shards, "--num-classes", "2", "--steps", "1"])
    assert seen == [([0.0] * VIT_8PX["depth"], 0.0)] * 2


@pytest.mark.parametrize("steps, warmup", [(30, 3), (5, 1)])
def test_fine_tuning_warms_up_over_the_first_tenth_then_decays_to_zero(adamw_rates, steps, warmup):
    backbone, head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
    batches = ((torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(100))
    train_classifier(backbone, head, batches, steps, lr=1e-3)
    rates = [step[0] for step in adamw_rates]
    assert len(rates) == steps and all(step == [step[0]] * len(step) for step in adamw_rates)  # no layer decay: one rate
    assert rates[: warmup + 1] == pytest.approx([1e-3 * (i + 1) / warmup for i in range(warmup)] + [1e-3])
    assert all(a > b for a, b in zip(rates[warmup:], rates[warmup + 1 :])) and rates[-1] < 0.2 * 1e-3


def test_a_val_label_past_num_classes_is_named_not_scored_wrong(tmp_path):
    """The head cannot predict it, so every such sample would count as a miss and the score read low."""
    shards, folder = tone_shards(tmp_path), export_vit(tmp_path, 0)
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    write_shards([{"__key__": f"v{i}", "png": png.getvalue(), "cls": i} for i in range(3)], str(tmp_path / "wide-%06d.tar"))
    with pytest.raises(ValueError, match="label 2 in the val shards: num_classes=2 takes labels 0 to 1"):
        finetune_main([folder, *shards[:2], "--val", str(tmp_path / "wide-000000.tar"), "--num-classes", "2", "--steps", "1"])
