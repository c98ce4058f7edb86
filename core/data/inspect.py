"""Check shards before training: how many samples decode, which are skipped and why, which extensions occur.

    python -m core.data.inspect 'data/demo/image/train-{000000..000003}.tar' --limit 1000

Samples are decoded as training decodes them (``core.data.decoders.decode_sample``), videos whole (training
decodes the frames of its clips). Exits with status 1 when no sample could be read, and 2 when the pattern
names no shard.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass, field

from core.data.decoders import SampleError, decode_sample, decoded_whole, member_extension
from core.data.shards import expand_urls, read_shard

EXAMPLES_PER_REASON = 3


@dataclass
class ShardReport:
    """What reading some shards found."""

    shards: int = 0
    samples_read: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> samples
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> a few "url key: message"
    shard_errors: list[str] = field(default_factory=list)  # "url: error"
    extensions: Counter = field(default_factory=Counter)  # member extension -> members
    decoded_keys: Counter = field(default_factory=Counter)  # decoded key -> samples

    @property
    def samples_seen(self) -> int:
        return self.samples_read + sum(self.skipped.values())


def inspect_shards(patterns: str | list[str], limit: int | None = None) -> ShardReport:
    """Read the shards in order and decode every sample (the first ``limit`` samples with ``limit``)."""
    report = ShardReport()
    for url in expand_urls(patterns):
        if limit is not None and report.samples_seen >= limit:
            break
        report.shards += 1
        try:
            for raw in read_shard(url):
                check_sample(raw, report)
                if limit is not None and report.samples_seen >= limit:
                    break
        except Exception as error:
            report.shard_errors.append(f"{url}: {type(error).__name__}: {error.args[0] if error.args else error}")
    return report


def check_sample(raw: dict, report: ShardReport) -> None:
    """Decode one raw sample and add the outcome to ``report``."""
    report.extensions.update(member_extension(name) for name in raw if not name.startswith("__"))
    try:
        decoded = decoded_whole(decode_sample(raw))  # every frame of a video, where training decodes a clip's
    except SampleError as error:
        report.skipped[error.reason] += 1
        examples = report.examples.setdefault(error.reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(f"{raw['__url__']} {raw['__key__']}: {error}")
        return
    report.samples_read += 1
    report.decoded_keys.update(key for key in decoded if not key.startswith("__"))


def format_report(report: ShardReport) -> str:
    def counts(counter: Counter) -> str:
        return ", ".join(f"{name} ({n})" for name, n in sorted(counter.items())) or "none"

    lines = [
        f"shards read: {report.shards}",
        f"samples read: {report.samples_read}",
        f"samples skipped: {sum(report.skipped.values())}",
    ]
    for reason, n in sorted(report.skipped.items()):
        lines.append(f"  {reason}: {n}")
        lines += [f"    e.g. {example}" for example in report.examples[reason]]
    lines.append(f"unreadable shards: {len(report.shard_errors)}")
    lines += [f"  {error}" for error in report.shard_errors]
    lines.append(f"extensions seen: {counts(report.extensions)}")
    lines.append(f"decoded keys: {counts(report.decoded_keys)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.data.inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("patterns", nargs="+", help="shard patterns: brace ranges, globs, pipe: commands, URLs")
    parser.add_argument("--limit", type=int, default=None, help="stop after this many samples")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any sample is skipped or any shard unreadable")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit {args.limit}: must be at least 1")
    try:
        report = inspect_shards(args.patterns, args.limit)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_report(report))
    if report.samples_read == 0:
        print(f"error: no sample could be read from {' '.join(args.patterns)}", file=sys.stderr)
        return 1
    if args.strict and (report.skipped or report.shard_errors):
        print(f"error (--strict): {sum(report.skipped.values())} samples skipped, {len(report.shard_errors)} shards unreadable", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
