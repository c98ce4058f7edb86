"""Text encoders and tokenizers for the text towers of CLIP/SigLIP/CLAP and for masked-language-model pretraining.

Two encoders share one interface: `forward(input_ids, attention_mask) -> (B, D)` pools the per-token states of
`tokens(input_ids, attention_mask) -> (B, L, D)` by a mean over the real (non-pad) tokens.

- `TextTransformer`: a from-scratch bidirectional transformer (the ViT `Block`s of core.vit) over a project tokenizer.
- `HFTextEncoder`: any Hugging Face `AutoModel` read from a local directory, pooled like sentence-transformers.

Tokenizers: `train_tokenizer` learns a byte-level BPE vocabulary (Radford et al., "Language Models are Unsupervised
Multitask Learners", 2019) and saves it as a Hugging Face tokenizer directory, so a project tokenizer and a
pretrained model's tokenizer load the same way (`load_tokenizer`) and `TextTokenizer` serves both.

CLI: `python -m core.text train-tokenizer (--files F [F ...] | --shards PATTERN) --vocab-size N --out DIR`.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from core.data.decoders import broken_sample, member_extension
from core.data.shards import expand_urls, read_shard
from core.vit import Block, init_weights

PAD, BOS, EOS, MASK = "<pad>", "<bos>", "<eos>", "<mask>"


def _local_dir(path: str, expected: tuple[str, ...], what: str) -> Path:
    """`path` as a directory holding at least one of the `expected` files, or a clear error (nothing is downloaded)."""
    folder = Path(path)
    if not folder.is_dir() or not any((folder / name).is_file() for name in expected):
        raise FileNotFoundError(
            f"{what} path {str(path)!r} is not a local directory containing {' or '.join(expected)}; "
            "hub names are never downloaded, so save or export the files to a directory first"
        )
    return folder


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str) -> PreTrainedTokenizerFast:
    """Learn a byte-level BPE vocabulary of `vocab_size` tokens from `texts` and save it to `out_dir`.

    Byte-level means every string encodes (no unknown token) and decodes back exactly. Special tokens: <pad>,
    <bos> (prepended, the sequence start), <eos> (appended) and <mask> (for masked-language modelling).
    Saved as a Hugging Face tokenizer directory (tokenizer.json + tokenizer_config.json) so that `load_tokenizer`
    and `TextTokenizer` treat it like any pretrained model's tokenizer.
    """
    specials = [PAD, BOS, EOS, MASK]
    if vocab_size <= len(specials) + 256:
        raise ValueError(f"vocab_size={vocab_size} must exceed the 256 byte tokens plus {len(specials)} special tokens")
    tok = Tokenizer(models.BPE())
    # No prefix space: decode(encode(text)) must give `text` back unchanged.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))],
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, mask_token=MASK)
    hf.save_pretrained(out_dir)
    return hf


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory: one saved by `train_tokenizer`, or a pretrained model's."""
    folder = _local_dir(path, ("tokenizer.json", "tokenizer_config.json"), "tokenizer")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)


class TextTokenizer:
    """Text to fixed-length `{"input_ids", "attention_mask"}` (long tensors), for data pipelines and encoders.

    A single string gives (max_len,) tensors, so a batch collates by stacking; a list gives (B, max_len).
    Longer texts are cut to max_len, keeping the closing special token. Works for project and pretrained
    tokenizers alike (see `load_tokenizer`).
    """

    def __init__(self, path: str, max_len: int = 77):
        self.tokenizer = load_tokenizer(path)
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"the tokenizer in {path!r} has no pad token, so it cannot pad to max_len={max_len}")
        # Right-side padding and truncation whatever the tokenizer's config says: with left padding, learned
        # absolute positions would shift with the padded length (decoder tokenizers often pad left).
        self.tokenizer.padding_side = self.tokenizer.truncation_side = "right"
        self.max_len = max_len
        self.pad_id: int = self.tokenizer.pad_token_id
        self.mask_id: int | None = self.tokenizer.mask_token_id
        self.special_ids: list[int] = sorted(self.tokenizer.all_special_ids)
        self.vocab_size = len(self.tokenizer)

    def __call__(self, texts: str | list[str]) -> dict[str, torch.Tensor]:
        out = self.tokenizer(
            texts,
            max_length=self.max_len,
            truncation=True,
            padding="max_length",
            return_token_type_ids=False,
            return_tensors="pt",
        )
        if isinstance(texts, str):
            return {k: v[0] for k, v in out.items()}  # (1, L) -> (L,)
        return dict(out)


def masked_mean(tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, L, D) token states over the positions where attention_mask (B, L) is nonzero: (B, D)."""
    weights = attention_mask.to(tokens.dtype).unsqueeze(-1)  # (B, L, 1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class TextTransformer(nn.Module):
    """A bidirectional transformer text encoder: token + learned position embeddings, pre-norm blocks, LayerNorm.

    Pooling is the mean over real tokens (as sentence-transformers pools BERT; Reimers & Gurevych 2019), not
    CLIP's causal <eos> token: the same pooling as `HFTextEncoder`, it does not depend on the padded length,
    and every position is trained by masked-language-model objectives, which leave a single pooling token untrained.
    The defaults are the size of CLIP's text tower (Radford et al. 2021): width 512, 12 layers, 8 heads, 77 tokens.

    vocab_size: the tokenizer's vocabulary size (`TextTokenizer.vocab_size`).
    pad_id: the tokenizer's pad id; its embedding is fixed at zero (`nn.Embedding(padding_idx=...)`).
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int = 512,
        depth: int = 12,
        heads: int = 8,
        max_len: int = 77,
        pad_id: int = 0,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        self.config = dict(
            vocab_size=vocab_size, dim=dim, depth=depth, heads=heads, max_len=max_len, pad_id=pad_id, mlp_ratio=mlp_ratio
        )
        self.embed_dim, self.max_len = dim, max_len
        self.token_embed = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_len, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        init_weights(self)
        # BERT's embedding init (Devlin et al. 2019); the pad row stays zero as padding_idx intends.
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)
        with torch.no_grad():
            self.token_embed.weight[pad_id].zero_()

    def tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Per-token states (B, L, D) of input_ids (B, L); attention_mask (B, L) is 1 on real tokens, 0 on padding."""
        L = input_ids.shape[1]
        if L > self.max_len:
            raise ValueError(f"input_ids has {L} tokens, more than max_len={self.max_len}")
        x = self.token_embed(input_ids) + self.pos_embed[:, :L]  # (B, L, D)
        # Padding is masked as a key only: every query then attends to real tokens alone.
        key_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L), broadcast over heads and queries
        for block in self.blocks:
            x = block(x, key_mask)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(self.tokens(input_ids, attention_mask), attention_mask)  # (B, D)


class HFTextEncoder(nn.Module):
    """A pretrained Hugging Face encoder (e.g. all-MiniLM-L6-v2) read from a local directory, mean-pooled.

    Only safetensors weights are read (`use_safetensors=True`: a checkpoint that only has pickled weights is
    refused, never unpickled) and nothing is downloaded. Tokenize with `TextTokenizer(path)` of the same directory.
    The embedding is the mean of the last hidden states over the attention mask, as sentence-transformers pools;
    it is not L2-normalised (contrastive losses normalise). `core.export` does not export it yet (its config
    is only the local path it was read from): a continued model is saved by its training checkpoint.
    """

    def __init__(self, path: str):
        super().__init__()
        folder = _local_dir(path, ("config.json",), "HFTextEncoder")
        self.config = dict(path=path)
        # float32 master weights whatever dtype the checkpoint was saved in (transformers keeps the stored one).
        # trust_remote_code=False: a folder whose config names its own code would otherwise ask on a terminal.
        self.model = AutoModel.from_pretrained(
            str(folder), local_files_only=True, use_safetensors=True, dtype=torch.float32, trust_remote_code=False
        )
        # BERT's pooler (a dense layer on [CLS]) is not used by mean pooling: it would get no gradient, which
        # DDP without find_unused_parameters stops on at the second step.
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None
        self.embed_dim: int = self.model.config.hidden_size
        self.max_len: int | None = getattr(self.model.config, "max_position_embeddings", None)
        # RoBERTa, XLM-R and MPNet number positions from padding_idx + 1: that many rows of the table are never used.
        offset = getattr(getattr(self.model, "embeddings", None), "padding_idx", None)
        if self.max_len is not None and offset is not None:
            self.max_len -= offset + 1
        self.train()  # from_pretrained leaves the model in eval mode; a fresh module is in train mode, like any other

    def tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Per-token states (B, L, D): the model's last hidden layer."""
        if self.max_len is not None and input_ids.shape[1] > self.max_len:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens, more than the model's {self.max_len} positions: tokenize with a smaller max_len")
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(self.tokens(input_ids, attention_mask), attention_mask)  # (B, D)


def read_text_files(paths: Iterable[str]) -> Iterator[str]:
    """Lines of UTF-8 text files."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            yield from f


def read_shard_texts(pattern: str, key: str = "txt") -> Iterator[str]:
    """The `key` member of every sample in the WebDataset shards matching `pattern`, decoded as UTF-8.

    pattern: a brace pattern (`data/train-{000000..000009}.tar`), a glob (`data/train-*.tar`) or a pipe/URL, as
    the training stream takes. Samples without the member or with bytes that are not UTF-8 are skipped and
    counted, as are those the stream skips (`core.data.decoders.broken_sample`: a repeated member, a link where
    a file should be, a read cut short); a warning names the first. No sample with text is an error.
    """
    found, skipped, first = 0, 0, ""
    for url in expand_urls(pattern):
        for sample in read_shard(url):
            # The member itself, or the one member whose last extension it is, as the training stream decodes
            # (`caption.txt` or `0001.txt` of a dotted key for "txt").
            members = [k for k in sample if not k.startswith("__") and (k == key or member_extension(k) == key)]
            data = sample[members[0]] if len(members) == 1 and broken_sample(sample) is None else None
            try:
                text = data.decode("utf-8") if isinstance(data, bytes) else None
            except UnicodeDecodeError:
                text = None
            if text is None:
                skipped += 1
                first = first or f"sample {sample['__key__']!r} of {url} (members: {sorted(k for k in sample if not k.startswith('__'))})"
                continue
            found += 1
            yield text
    if skipped:
        warnings.warn(f"skipped {skipped} samples without a UTF-8 {key!r} member in {pattern!r}, the first {first}")
    if not found:
        raise KeyError(f"no sample in {pattern!r} has a UTF-8 {key!r} member ({skipped} read; the first: {first})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m core.text", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train-tokenizer", help="learn a byte-level BPE tokenizer and save it to a directory")
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--files", nargs="+", help="UTF-8 text files, read line by line")
    source.add_argument("--shards", help="WebDataset shards: a brace pattern or a glob")
    train.add_argument("--key", default="txt", help="the shard member holding the text (default: txt)")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--out", required=True, help="directory to save tokenizer.json and tokenizer_config.json in")
    args = parser.parse_args(argv)
    texts = read_text_files(args.files) if args.files else read_shard_texts(args.shards, args.key)
    tok = train_tokenizer(texts, args.vocab_size, args.out)
    print(f"saved a {len(tok)}-token tokenizer to {args.out}")


if __name__ == "__main__":
    main()
