"""Is the pretrained encoder any good? Linear probe and kNN accuracy of an exported encoder on labelled
shards, next to the same architecture at random init and the raw inputs.

    python -m core.evaluate runs/mae-demo/export --train 'data/demo/image/train-{000000..000003}.tar' \
        --val 'data/demo/image/val-{000000..000001}.tar'

The probes are fitted on (up to --train-limit) training samples and scored on the validation samples,
all seen through the deterministic evaluation view of the encoder's input (no augmentation).

``--target json.<field>`` probes another property of the samples than their class, read from their JSON
metadata (``--target json.background`` on the demo images): what an encoder encodes besides what it should.

``--attentive`` (ViT encoders) also fits an attentive probe on every patch token, as V-JEPA and AIM evaluate
frozen encoders (core.probe.AttentivePooler), with the input's patches as the raw-input tokens: mean
pooling can average away what only a few tokens hold, such as where in a clip a shape moves.

``--init-seeds N`` draws the random-init baseline N times (seeds 0 to N-1) and adds a row of their mean: one
draw of a small network's weights can move its probe by a point or two, as much as a short pretraining gains.

``--rank`` also reports RankMe (core.probe.rankme), the effective rank of the val features: a rank far
below the feature width is the dimensional collapse that joint-embedding methods can fall into while every
dimension still varies.

``--device`` (default: ``cuda`` when there is one) runs the encoders and fits the probes there; the data is
decoded on the CPU either way. On a GPU an attentive probe of a whole split takes seconds, not minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

import torch

from core.data.decoders import UnusableSample
from core.export import Encoder, load_encoder
from core.probe import attentive_probe_accuracy, probe_scores, rankme


def eval_transform(spec: dict):
    """The deterministic view of raw samples that an exported encoder's input spec describes."""
    from core import augment

    modality = spec["modality"]
    if modality == "image":  # exports from before core.export.validation_view hold no resize: theirs was the size
        size, mean, std = spec["size"][0], tuple(spec["mean"]), tuple(spec["std"])
        return augment.ImageEval(size, resize=spec.get("resize", size), interpolation=spec.get("interpolation", "bicubic"), mean=mean, std=std)
    if modality == "video":
        size, mean, std, short_clips = spec["size"][0], tuple(spec["mean"]), tuple(spec["std"]), spec.get("short_clips", "error")
        interpolation = spec.get("interpolation", "bilinear")  # exports from before it was recorded: VideoClip's default
        return augment.VideoClip(spec["frames"], spec["stride"], size, train=False, interpolation=interpolation, mean=mean, std=std, short_clips=short_clips)
    if modality == "audio":
        return augment.AudioClip(spec["sample_rate"], spec["seconds"], train=False)
    raise ValueError(f"core.evaluate probes image, video and audio encoders, not {modality!r}")


class WithTarget:
    """The evaluation view of a sample plus its probe target: ``label``, or ``json.<field>`` of its metadata."""

    def __init__(self, view, target: str):
        if target != "label" and not target.startswith("json."):
            raise ValueError(f"target {target!r} must be 'label' or 'json.<field>'")
        self.view, self.target = view, target

    def __call__(self, sample: dict) -> dict:
        out = self.view(sample)
        where = f"sample {sample.get('__key__')!r} of {sample.get('__url__')!r}"
        # Skipped and counted by the stream, as an undecodable sample is, rather than ending the evaluation.
        if self.target == "label" and "label" not in sample:
            raise UnusableSample("no 'label'", f"{where} has no label (a .cls member); --target json.<field> probes a metadata field")
        if self.target != "label":
            field = self.target.removeprefix("json.")
            meta = sample.get("json")
            if not isinstance(meta, dict) or field not in meta:
                raise UnusableSample(f"no json.{field}", f"{where} has no JSON field {field!r}")
            out["target"] = str(meta[field])
        return out


def refuse_shared_shards(train: str, val: str, why: str) -> None:
    """A ValueError when the --train and --val patterns name a shard in common (./val-0.tar and /abs/val-0.tar
    are one file): a score on them would not be held out."""
    from core.data import expand_urls

    def same_files(pattern: str) -> set[str]:
        return {url if ":" in url.split("/")[0] else os.path.realpath(url) for url in expand_urls(pattern)}

    shared = sorted(same_files(train) & same_files(val))
    if shared:
        raise ValueError(f"--train and --val share {len(shared)} shard(s), {shared[0]} first: {why}")


@torch.no_grad()
def features(
    encoders: dict[str, Encoder], urls: str, limit: int, batch_size: int, num_workers: int, target: str = "label", tokens: bool = False,
    device: str = "cpu",
):
    """{name: (N, D) features} for each encoder plus "raw input" (the encoder's input, flattened), the
    targets (class labels, or the JSON field's values as strings with ``target="json.<field>"``), and with
    ``tokens`` {name: (N, L, D') patch tokens} (fp16, to hold a whole split in memory), else None. The
    encoders must be on ``device``; the features stay there."""
    from core.data import read_batches

    first = next(iter(encoders.values()))
    key = first.input["modality"]
    names = [*encoders, "raw input"]
    out, out_tokens = {name: [] for name in names}, {name: [] for name in names}
    targets, seen = [], 0
    transform = WithTarget(eval_transform(first.input), target)
    for batch in read_batches(urls, transform, batch_size, num_workers=num_workers):
        take = min(len(batch[key]), limit - seen)  # the last batch only up to the limit: encoding more is wasted
        x = batch[key][:take].to(device)
        for name, enc in encoders.items():
            out[name].append(enc(x).float())
            if tokens:
                out_tokens[name].append(enc.tokens(x).half())
        out["raw input"].append(first.preprocess(x).flatten(1).float())
        if tokens:
            out_tokens["raw input"].append(first.raw_tokens(x).half())
        targets += (batch["label"].tolist() if target == "label" else batch["target"])[:take]
        seen += take
        if seen >= limit:
            break
    pooled = {k: torch.cat(v) for k, v in out.items()}
    return pooled, targets, {k: torch.cat(v) for k, v in out_tokens.items()} if tokens else None


def evaluate(
    path: str, train: str, val: str, train_limit: int = 10_000, val_limit: int = 10_000, batch_size: int = 256,
    num_workers: int = 2, target: str = "label", attentive: bool = False, rank: bool = False, device: str = "cpu",
    init_seeds: int = 1,
) -> dict:
    for name, value in (("init_seeds", init_seeds), ("train_limit", train_limit), ("val_limit", val_limit)):
        if value < 1:
            raise ValueError(f"{name}={value} must be at least 1")
    refuse_shared_shards(train, val, "the probes would be scored on samples they were fitted on")
    torch.manual_seed(0)  # the random-init encoder's weights
    encoders = {"pretrained": load_encoder(path).to(device), "random init": load_encoder(path, pretrained=False).to(device)}
    for seed in range(1, init_seeds):
        torch.manual_seed(seed)
        load_encoder(path)  # building it draws first at seed 0 too: seed 0's draw stays the "random init" row
        encoders[f"random init, seed {seed}"] = load_encoder(path, pretrained=False).to(device)
    if attentive:
        encoders["pretrained"].vit_backbone()  # a clear error now, not after a pass over the data
    train_x, train_t, train_tok = features(encoders, train, train_limit, batch_size, num_workers, target, attentive, device)
    val_x, val_t, val_tok = features(encoders, val, val_limit, batch_size, num_workers, target, attentive, device)
    unseen = set(val_t) - set(train_t)
    if unseen:
        warnings.warn(
            f"{len(unseen)} of the {len(set(val_t))} classes of the val split are not among the {len(train_t)} training "
            f"samples the probes are fitted on (--train-limit {train_limit}): they cannot be predicted. Shards written "
            "class by class hold few classes at their front; write them shuffled (core.data.write does) or raise the limit."
        )
    classes = {value: i for i, value in enumerate(sorted(set(train_t) | set(val_t)))}  # the same indices on both splits
    train_y, val_y = (torch.tensor([classes[t] for t in ts], device=device) for ts in (train_t, val_t))
    scores = {name: probe_scores(train_x[name], train_y, val_x[name], val_y) for name in train_x}
    if attentive:
        for name in scores:
            scores[name]["attentive_acc"] = attentive_probe_accuracy(train_tok[name], train_y, val_tok[name], val_y)
    if rank:
        for name in scores:
            scores[name]["rankme"] = rankme(val_x[name])
    if init_seeds > 1:
        draws = [s for name, s in scores.items() if name.startswith("random init")]
        mean = {key: sum(d[key] for d in draws) / len(draws) for key in draws[0]}
        scores = {"pretrained": scores.pop("pretrained"), f"random init, mean of seeds 0-{init_seeds - 1}": mean, **scores}
    return scores


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("encoder", help="folder written by python -m core.export")
    parser.add_argument("--train", required=True, help="labelled shards to fit the probes on")
    parser.add_argument("--val", required=True, help="held-out labelled shards to score them on")
    # A limit takes the first samples in reading order, which depends on --num-workers (workers interleave shards).
    parser.add_argument("--train-limit", type=int, default=10_000, help="fit on the first N training samples read")
    parser.add_argument("--val-limit", type=int, default=10_000, help="score on the first N val samples read")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--target", default="label", help="what the probes predict: label, or json.<field> of the metadata")
    parser.add_argument("--attentive", action="store_true", help="also fit an attentive probe on the patch tokens (ViT encoders)")
    parser.add_argument("--rank", action="store_true", help="also report RankMe, the effective rank of the val features")
    parser.add_argument("--init-seeds", type=int, default=1, help="random-init baselines to draw (seeds 0..N-1), with their mean")
    parser.add_argument("--json", help="also write the scores to this file")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the encoders run and the probes are fitted (default: cuda when there is one)"
    )
    args = parser.parse_args(argv)
    scores = evaluate(
        args.encoder, args.train, args.val, args.train_limit, args.val_limit, num_workers=args.num_workers, target=args.target,
        attentive=args.attentive, rank=args.rank, device=args.device, init_seeds=args.init_seeds,
    )
    target = "" if args.target == "label" else f", predicting {args.target}"
    columns = ["linear_acc", "knn_acc"] + ["attentive_acc"] * args.attentive + ["rankme"] * args.rank
    header = {"linear_acc": "linear probe acc", "knn_acc": "kNN acc", "attentive_acc": "attentive probe acc", "rankme": "RankMe"}
    print(f"\n| features ({args.encoder}{target}) | " + " | ".join(header[c] for c in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, s in scores.items():  # accuracies in %, RankMe as it is
        print(f"| {name} | " + " | ".join(f"{s[c]:.1f}" if c == "rankme" else f"{100 * s[c]:.1f}" for c in columns) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(scores, f, indent=2)


if __name__ == "__main__":
    main()
