"""Tests for tokenizer_bridge.vocab.bridge and mllm.text_tokenizers: ids, round trips, and unchanged text behaviour."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    PreTrainedTokenizer,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    SentencePieceBackend,
)
from transformers.utils import logging as hf_logging

from mllm.text_tokenizers import build_sentencepiece_tokenizer, build_word_tokenizer
from tokenizer_bridge.vocab.bridge import (
    add_image_tokens,
    bridge_llm,
    codebook_embeddings,
    init_image_embeddings_from_codebook,
    resize_llm,
)
from tokenizer_bridge.vocab.image_vocab import ImageVocab

hf_logging.set_verbosity_error()

CAPTIONS = [
    "a red circle at the top left.",
    "a blue square at the bottom right, next to a green triangle.",
    "two small yellow stars near the center of the image",
    "the big purple circle is below the orange square!",
    "hello world, this is a tiny caption corpus for tests.",
]
PROMPTS = ["a red circle at the", "two small yellow stars near the center of", "the big"]
K = 64  # codebook size for model tests
GRID = (3, 4)


@pytest.fixture(autouse=True)
def one_torch_thread():
    # Tiny matmuls: intra-op thread hand-off costs far more than the math (100x slower on a loaded 2-core box).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_tokenizer(kind: str):
    if kind == "word":
        return build_word_tokenizer(CAPTIONS)
    return build_sentencepiece_tokenizer(CAPTIONS * 4, vocab_size=80)


def make_model(kind: str, vocab_size: int, pad_rows: int = 0):
    """Tiny causal LM with random but fixed weights; ``pad_rows`` extra embedding rows beyond the tokenizer."""
    torch.manual_seed(0)
    rows = vocab_size + pad_rows
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, initializer_range=0.5)
    if kind.startswith("llama"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=rows, tie_word_embeddings=kind == "llama_tied", **small))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=rows, **small))
    elif kind == "phi":  # untied head with a bias
        model = PhiForCausalLM(PhiConfig(vocab_size=rows, **small))
        with torch.no_grad():
            model.lm_head.bias.normal_()
    elif kind == "gpt2":  # tied, embeddings under transformer.wte / lm_head
        model = GPT2LMHeadModel(GPT2Config(vocab_size=rows, n_embd=32, n_layer=2, n_head=4, initializer_range=0.5,
                                           bos_token_id=1, eos_token_id=2))
    else:
        raise ValueError(kind)
    return model.eval()


def text_batch(tokenizer):
    tokenizer.padding_side = "left"
    return tokenizer(PROMPTS, padding=True, return_tensors="pt")


@torch.no_grad()
def run_text(model, tokenizer, batch, suppress=None):
    logits = model(**batch).logits
    out = model.generate(**batch, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=None, suppress_tokens=suppress)
    return logits, out


# ------------------------------------------------------------------------------------------------ tokenizers
def test_word_tokenizer_round_trip(tmp_path):
    tok = build_word_tokenizer(CAPTIONS)
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    ids = tok("a red circle, at the top left.").input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "a red circle, at the top left."
    assert tok("a zebra").input_ids[-1] == tok.unk_token_id
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("a red circle, at the top left.").input_ids == ids
    assert again.pad_token_id == tok.pad_token_id


def test_sentencepiece_tokenizer_is_sentencepiece_backed(tmp_path):
    tok = build_sentencepiece_tokenizer(CAPTIONS * 4, vocab_size=80, workdir=tmp_path / "spm")
    assert isinstance(tok, SentencePieceBackend) and isinstance(tok, PreTrainedTokenizer)
    assert type(tok.sp_model).__name__ == "SentencePieceProcessor"
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    text = "the big purple circle is below the orange square!"
    assert tok.decode(tok(text).input_ids) == text
    tok.save_pretrained(tmp_path / "saved")
    again = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert type(again) is SentencePieceBackend
    assert again(text).input_ids == tok(text).input_ids


# ------------------------------------------------------------------------------------------------ add_image_tokens
@pytest.mark.parametrize("kind", ["word", "spm"])
@pytest.mark.parametrize("layout", ["grid", "sequence"])
def test_add_image_tokens_gives_contiguous_ids(kind, layout):
    tok = make_tokenizer(kind)
    n_text = len(tok)
    before = [tok(p).input_ids for p in PROMPTS]
    kwargs = dict(grid_size=GRID) if layout == "grid" else dict(num_tokens=5)
    vocab = add_image_tokens(tok, 300, layout=layout, tokenizer_fingerprint="abc", **kwargs)

    n_special = 3 if layout == "grid" else 2
    assert vocab.text_vocab_size == n_text
    assert vocab.special_token_ids == list(range(n_text, n_text + n_special))
    assert tok.convert_tokens_to_ids(["<boi>", "<eoi>"]) == [vocab.boi_token_id, vocab.eoi_token_id]
    if layout == "grid":
        assert tok.convert_tokens_to_ids("<eol>") == vocab.eol_token_id
    assert vocab.offset == n_text + n_special and vocab.id_range == (vocab.offset, vocab.offset + 300)
    images = [f"<img_{i}>" for i in range(300)]
    assert tok.convert_tokens_to_ids(images) == list(range(*vocab.id_range))
    assert len(tok) == vocab.offset + 300
    assert vocab.tokenizer_fingerprint == "abc" and vocab.layout == layout
    assert [tok(p).input_ids for p in PROMPTS] == before  # text tokenization unchanged


@pytest.mark.parametrize("kind", ["word", "spm"])
def test_built_span_decodes_to_token_strings(kind):
    tok = make_tokenizer(kind)
    vocab = add_image_tokens(tok, 300, grid_size=(2, 3))
    image_ids = torch.tensor([[5, 0, 299], [17, 42, 8]])
    span = vocab.build_span(image_ids)
    expected = ["<boi>", "<img_5>", "<img_0>", "<img_299>", "<eol>",
                "<img_17>", "<img_42>", "<img_8>", "<eol>", "<eoi>"]
    assert tok.convert_ids_to_tokens(span.tolist()) == expected
    assert tok.decode(span).replace(" ", "") == "".join(expected)
    # specials are dropped by skip_special_tokens, image tokens (not special) are kept
    kept = tok.decode(span, skip_special_tokens=True).replace(" ", "")
    assert kept == "".join(e for e in expected if e.startswith("<img_"))
    # literal token strings in text are parsed as the tokens (documented added-token behaviour)
    ids = tok("a red <img_42> circle", add_special_tokens=False).input_ids
    assert vocab.offset + 42 in ids


@pytest.mark.parametrize("kind", ["word", "spm"])
def test_rebridging_raises_and_leaves_tokenizer_alone(kind):
    tok = make_tokenizer(kind)
    add_image_tokens(tok, 16, grid_size=GRID)
    size = len(tok)
    with pytest.raises(ValueError, match="already bridged"):
        add_image_tokens(tok, 16, grid_size=GRID)
    assert len(tok) == size


def test_non_contiguous_ids_raise(monkeypatch):
    import tokenizer_bridge.vocab.bridge as bridge

    real = bridge._add_plain_tokens
    monkeypatch.setattr(bridge, "_add_plain_tokens", lambda tok, contents: real(tok, contents[::-1]))
    with pytest.raises(ValueError, match="contiguous"):
        add_image_tokens(make_tokenizer("word"), 16, grid_size=GRID)


def test_bad_layout_arguments_raise_before_mutation():
    tok = make_tokenizer("word")
    size = len(tok)
    with pytest.raises(ValueError, match="grid_size"):
        add_image_tokens(tok, 16, layout="grid")
    with pytest.raises(ValueError, match="num_tokens"):
        add_image_tokens(tok, 16, layout="sequence")
    with pytest.raises(ValueError, match="layout"):
        add_image_tokens(tok, 16, layout="cube")
    with pytest.raises(ValueError, match="init tensor"):
        bridge_llm(make_model("llama_tied", size), tok, 16, grid_size=GRID, init=torch.zeros(15, 32))
    assert len(tok) == size


@pytest.mark.parametrize("kind", ["word", "spm"])
def test_bridged_tokenizer_round_trip_keeps_ids(kind, tmp_path):
    tok = make_tokenizer(kind)
    vocab = add_image_tokens(tok, 1000, grid_size=GRID)
    tok.save_pretrained(tmp_path)
    vocab.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert type(again) is type(tok)
    images = [f"<img_{i}>" for i in range(1000)]
    assert again.convert_tokens_to_ids(images) == list(range(*vocab.id_range))
    assert again.convert_tokens_to_ids(["<boi>", "<eoi>", "<eol>"]) == vocab.special_token_ids
    assert len(again) == len(tok)
    assert [again(p).input_ids for p in PROMPTS] == [tok(p).input_ids for p in PROMPTS]
    assert ImageVocab.from_pretrained(tmp_path) == vocab
    with pytest.raises(ValueError, match="already bridged"):
        add_image_tokens(again, 1000, grid_size=GRID)


# ------------------------------------------------------------------------------------------------ models
MODEL_CASES = [
    ("word", "llama_tied", 0),
    ("word", "llama_untied", 0),
    ("word", "gpt2", 0),
    ("word", "qwen2", 0),
    ("word", "phi", 0),
    ("spm", "llama_tied", 0),
    ("spm", "llama_untied", 0),
    ("spm", "gpt2", 0),
    ("word", "llama_tied", 13),  # embedding has padding rows beyond len(tokenizer)
    ("spm", "qwen2", 13),
]


@pytest.mark.parametrize("tok_kind,model_kind,pad_rows", MODEL_CASES)
def test_text_behaviour_unchanged_after_bridging(tok_kind, model_kind, pad_rows):
    tok = make_tokenizer(tok_kind)
    n_text = len(tok)
    model = make_model(model_kind, n_text, pad_rows)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (model_kind in ("llama_tied", "gpt2"))
    gen_before = model.generation_config.to_dict()
    batch = text_batch(tok)
    # padding rows are not tokens (no string decodes to them): a trained model never predicts them
    suppress = list(range(n_text, n_text + pad_rows)) or None
    logits_before, out_before = run_text(model, tok, batch, suppress)
    embed_before = model.get_input_embeddings().weight[:n_text].clone()

    vocab = bridge_llm(model, tok, K, grid_size=GRID)

    rows = model.get_input_embeddings().weight.shape[0]
    assert rows == max(n_text + pad_rows, vocab.offset + K) == model.config.vocab_size
    assert model.get_output_embeddings().weight.shape[0] == rows
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    assert model.generation_config.to_dict() == gen_before
    assert torch.equal(model.get_input_embeddings().weight[:n_text], embed_before)
    assert text_batch(tok)["input_ids"].tolist() == batch["input_ids"].tolist()
    logits_after, out_after = run_text(model, tok, batch)
    assert logits_after.shape[-1] == rows
    # every new row holds the mean text row, so its logit is the mean text logit: it can never win a greedy step
    mean_logit = logits_before[..., :n_text].mean(-1, keepdim=True)
    torch.testing.assert_close(logits_after[..., n_text:], mean_logit.expand_as(logits_after[..., n_text:]),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(logits_after[..., :n_text], logits_before[..., :n_text], atol=1e-5, rtol=0)
    assert out_after.shape[1] == batch["input_ids"].shape[1] + 20
    assert torch.equal(out_after, out_before)
    assert len(set(out_after[:, -20:].flatten().tolist())) > 1  # a real continuation, not one repeated token


@pytest.mark.parametrize("model_kind", ["llama_tied", "llama_untied", "phi"])
def test_new_rows_are_the_mean_of_text_rows(model_kind):
    tok = make_tokenizer("word")
    n_text = len(tok)
    model = make_model(model_kind, n_text, pad_rows=5)
    heads = [model.get_input_embeddings(), model.get_output_embeddings()]
    means = [m.weight[:n_text].mean(0) for m in heads]
    bias_mean = model.lm_head.bias[:n_text].mean() if model_kind == "phi" else None
    bridge_llm(model, tok, K, grid_size=GRID)
    for module, mean in zip([model.get_input_embeddings(), model.get_output_embeddings()], means):
        new = module.weight[n_text:]  # specials, image rows and the reused padding rows
        torch.testing.assert_close(new, mean.expand_as(new))
    if bias_mean is not None:
        torch.testing.assert_close(model.lm_head.bias[n_text:], bias_mean.expand(model.lm_head.bias.shape[0] - n_text))


def test_normal_init_matches_text_std():
    tok = make_tokenizer("word")
    n_text = len(tok)
    model = make_model("llama_untied", n_text)
    std = model.get_input_embeddings().weight[:n_text].std()
    torch.manual_seed(1)
    bridge_llm(model, tok, 4096, grid_size=GRID, init="normal")
    new = model.get_input_embeddings().weight[n_text:]
    assert abs(new.mean()) < 0.05 * std
    assert abs(new.std() / std - 1) < 0.05


def test_tensor_init_and_pad_to_multiple_of():
    tok = make_tokenizer("word")
    model = make_model("llama_untied", len(tok))
    codes = torch.randn(K, 32)  # e.g. projected codebook vectors
    vocab = add_image_tokens(tok, K, grid_size=GRID)
    rows = resize_llm(model, vocab, init=codes, pad_to_multiple_of=64)
    assert rows % 64 == 0 and rows >= vocab.offset + K and model.config.vocab_size == rows
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        start, end = vocab.id_range
        torch.testing.assert_close(module.weight[start:end], codes)
        mean = module.weight[: vocab.text_vocab_size].mean(0)
        for other in (module.weight[vocab.text_vocab_size:start], module.weight[end:]):
            torch.testing.assert_close(other, mean.expand_as(other))


def test_resize_needs_text_vocab_size():
    vocab = ImageVocab(offset=30, codebook_size=4, boi_token_id=28, eoi_token_id=29, layout="sequence", num_tokens=2)
    with pytest.raises(ValueError, match="text_vocab_size"):
        resize_llm(make_model("llama_tied", 28), vocab)


@pytest.mark.parametrize("model_kind", ["llama_tied", "llama_untied", "gpt2"])
def test_bridged_model_save_load_round_trip(model_kind, tmp_path):
    tok = make_tokenizer("spm")
    model = make_model(model_kind, len(tok), pad_rows=3)
    vocab = bridge_llm(model, tok, K, grid_size=GRID)
    with torch.no_grad():  # make image rows distinct so a lost or misaligned row would show
        model.get_input_embeddings().weight[vocab.offset:].normal_()
    prompt = tok("a red circle", return_tensors="pt").input_ids
    span = vocab.build_span(torch.arange(12).view(3, 4))[None]
    input_ids = torch.cat([prompt, span], dim=1)
    model.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "model.safetensors")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.vocab_size == model.config.vocab_size
    tied = loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    assert tied == (model_kind != "llama_untied")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, model(input_ids).logits)


def _fsq_tokenizer():
    from tokenizer_bridge import VisualTokenizer, VisualTokenizerConfig

    torch.manual_seed(0)
    config = VisualTokenizerConfig(encoder="vit", decoder="vit", quantizer={"type": "fsq", "levels": [4, 4, 4]},
                                   encoder_options={"width": 16, "depth": 1, "num_heads": 2},
                                   decoder_options={"width": 16, "depth": 1, "num_heads": 2},
                                   latent_dim=8, downsample=8, image_size=32)
    return VisualTokenizer(config).eval()


def test_codebook_embeddings_keep_the_codebook_geometry_at_the_text_scale():
    vt = _fsq_tokenizer()
    assert vt.codebook_size == K
    text = torch.randn(40, 256) * 0.3 + 2.0
    rows = codebook_embeddings(vt, text, seed=3)
    assert rows.shape == (K, 256)
    torch.testing.assert_close(rows, codebook_embeddings(vt, text, seed=3))  # seeded: the same rows every time
    assert not torch.allclose(rows, codebook_embeddings(vt, text, seed=4))
    assert abs(rows.mean() - 2.0) < 0.05 and abs(rows.std() / text.std() - 1) < 0.15
    # distances between embeddings follow distances between the codes' vectors (a random projection keeps them)
    codes = vt.quantizer.lookup_flat(torch.arange(K)).detach()
    codes = (codes - codes.mean(0)) / codes.std(0)
    upper = torch.triu_indices(K, K, 1)
    d_codes = torch.cdist(codes, codes)[upper[0], upper[1]]
    d_rows = torch.cdist(rows, rows)[upper[0], upper[1]]
    assert torch.corrcoef(torch.stack([d_codes, d_rows]))[0, 1] > 0.9


def test_codebook_init_writes_the_input_rows_only_and_keeps_text_behaviour():
    tok = make_tokenizer("word")
    model = make_model("llama_untied", len(tok))
    batch = text_batch(tok)
    before, _ = run_text(model, tok, batch)
    vt = _fsq_tokenizer()
    vocab = bridge_llm(model, tok, K, grid_size=GRID, visual_tokenizer=vt)
    head_rows = model.get_output_embeddings().weight.detach().clone()
    init_image_embeddings_from_codebook(model, vocab, vt, seed=5)
    start, end = vocab.id_range
    embed = model.get_input_embeddings().weight
    expected = codebook_embeddings(vt, embed[: vocab.text_vocab_size], seed=5)
    torch.testing.assert_close(embed[start:end], expected)
    assert embed[start:end].std(0).mean() > 0.1 * embed[: vocab.text_vocab_size].std()  # the rows now differ
    torch.testing.assert_close(model.get_output_embeddings().weight, head_rows)  # the head keeps the mean rows
    after, _ = run_text(model, tok, batch)
    torch.testing.assert_close(after[..., : vocab.text_vocab_size], before)
    with pytest.raises(ValueError, match="image tokens but the visual tokenizer"):
        other = make_model("llama_untied", len(make_tokenizer("word")))
        init_image_embeddings_from_codebook(
            other, bridge_llm(other, make_tokenizer("word"), 2 * K, grid_size=GRID, visual_tokenizer=vt), vt)
