"""Property tests (hypothesis) over the entry points that read untrusted input: the span parser (strict and
repairing), ``UnifiedProcessor.decode`` / ``batch_decode``, ``load_image`` and ``ImageVocab.from_dict``.

Each property says what a result must be and that the only exceptions are the documented ones (``MalformedImageSpanError``
for spans, ``ValueError`` for decode inputs and vocab records, ``ImageLoadError`` for images). The default suite runs
``DEFAULT_EXAMPLES`` per entry point; ``pytest -m fuzz tests/tokenizer_bridge/test_fuzz.py -s`` runs
``FUZZ_EXAMPLES`` each and prints how many inputs each entry point got and how many raised a documented error.
"""

from __future__ import annotations

import io
import json
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mllm.text_tokenizers import build_word_tokenizer
from tokenizer_bridge import VisualTokenizer, VisualTokenizerConfig
from tokenizer_bridge.image_loading import ImageLoadError, load_image
from tokenizer_bridge.image_processing_visual_tokenizer import VisualTokenizerImageProcessor
from tokenizer_bridge.processing_unified import UnifiedProcessor
from tokenizer_bridge.vocab.bridge import add_image_tokens
from tokenizer_bridge.vocab.image_vocab import ImageVocab
from tokenizer_bridge.vocab.spans import MalformedImageSpanError

DEFAULT_EXAMPLES, FUZZ_EXAMPLES = 200, 10_000
COUNTS: Counter = Counter()  # (entry point, "inputs" | "documented errors") -> count

VOCABS = {
    "grid": ImageVocab(offset=53, codebook_size=16, boi_token_id=50, eoi_token_id=51, eol_token_id=52,
                       grid_size=(2, 3)),
    "variable_levels": ImageVocab(offset=60, codebook_size=4, boi_token_id=50, eoi_token_id=51, eol_token_id=52,
                                  size_token_offset=53, grid_size=(3, 4), variable_size=True, num_levels=2,
                                  level_order="level", separate_level_ranges=True),
    "budgets": ImageVocab(offset=60, codebook_size=8, boi_token_id=50, eoi_token_id=51, budget_token_offset=53,
                          layout="sequence", budgets=[2, 4], factors=[2, 4]),
    "unified": ImageVocab(offset=None, codebook_size=4, boi_token_id=50, eoi_token_id=51, eol_token_id=52,
                          grid_size=(2, 2), token_ids=[7, 9, 11, 13]),
}


def properties(fn, **strategies):
    """The property ``fn`` as two tests: ``DEFAULT_EXAMPLES`` in the default suite (derandomized, so it is the same
    run every time) and ``FUZZ_EXAMPLES`` under ``-m fuzz`` (random)."""
    def run(examples: int):
        return settings(max_examples=examples, deadline=None, database=None, derandomize=examples != FUZZ_EXAMPLES,
                        suppress_health_check=list(HealthCheck))(given(**strategies)(fn))

    return run(DEFAULT_EXAMPLES), pytest.mark.fuzz(run(FUZZ_EXAMPLES))


def documented(entry: str, call, *errors):
    """``call()``, counting the input, and the documented errors it may raise; anything else fails the test."""
    COUNTS[entry, "inputs"] += 1
    try:
        return call()
    except errors:
        COUNTS[entry, "documented errors"] += 1
        return None


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    for entry in sorted({e for e, _ in COUNTS}):
        print(f"\nfuzz {entry}: {COUNTS[entry, 'inputs']} inputs, {COUNTS[entry, 'documented errors']} documented "
              "errors, 0 other exceptions")


# ---------------------------------------------------------------------------------------------- spans
def span_tokens(vocab: ImageVocab) -> st.SearchStrategy:
    """Token sequences near the grammar: well-formed spans with edits, and free mixes of span and other ids."""
    def valid(draw_ids):
        return vocab.build_span(draw_ids).tolist()

    special = [vocab.boi_token_id, vocab.eoi_token_id] + ([vocab.eol_token_id] if vocab.eol_token_id else [])
    pool = st.sampled_from(special + vocab.size_token_ids + vocab.budget_token_ids
                           + vocab.image_token_ids().tolist() + [0, 3, 49, vocab.max_token_id + 1])
    free = st.lists(pool, max_size=40).map(lambda t: [vocab.boi_token_id] + t)
    edits = st.tuples(st.integers(0, 10**6), st.lists(st.tuples(st.integers(0, 60), st.sampled_from("dir"), pool),
                                                      max_size=4))
    return st.one_of(free, edits.map(lambda e: _edited(vocab, *e)))


def _edited(vocab: ImageVocab, seed: int, edits) -> list[int]:
    rng = np.random.default_rng(seed)
    h, w = vocab._largest_size()
    if vocab.variable_size:
        h, w = int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1))
    elif vocab.has_budgets:
        w = int(rng.choice(vocab.budgets))
    shape = ((w,) if vocab.layout == "sequence" else (h, w)) + ((vocab.num_levels,) if vocab.num_levels > 1 else ())
    tokens = vocab.build_span(torch.as_tensor(rng.integers(0, vocab.codebook_size, shape))).tolist()
    for at, how, token in edits:
        at = at % (len(tokens) + 1)
        if how == "d" and at < len(tokens):
            del tokens[at]
        elif how == "i":
            tokens.insert(at, token)
        elif at < len(tokens):
            tokens[at] = token
    return tokens


def _span_property(vocab: ImageVocab, tokens: list[int]) -> None:
    span = torch.tensor(tokens, dtype=torch.long)
    ids = documented("parse_span (strict)", lambda: vocab.parse_span(span), MalformedImageSpanError)
    if ids is not None:
        assert vocab.build_span(ids).tolist() == tokens  # strict parsing accepts exactly the spans it builds
    parsed = documented("repair_span", lambda: vocab.repair_span(span), MalformedImageSpanError)
    if parsed is not None:
        assert (parsed.repairs == []) == (ids is not None)  # "well formed" exactly when it was
        assert torch.equal(vocab.parse_span(vocab.build_span(parsed.image_ids)), parsed.image_ids)


def _span_test(vocab: ImageVocab):
    def span_parser(tokens):
        _span_property(vocab, tokens)
    return span_parser


for _name, _vocab in VOCABS.items():
    globals()[f"test_span_parser_{_name}"], globals()[f"test_fuzz_span_parser_{_name}"] = properties(
        _span_test(_vocab), tokens=span_tokens(_vocab))


# ---------------------------------------------------------------------------------------------- decode
torch.manual_seed(0)
VISUAL_TOKENIZER = VisualTokenizer(VisualTokenizerConfig(base_channels=16, latent_dim=16, codebook_size=16,
                                                         downsample=8, image_size=16)).eval()
TOKENIZER = build_word_tokenizer(["a red green blue circle square"])
DECODE_VOCAB = add_image_tokens(TOKENIZER, 16, grid_size=(2, 2), visual_tokenizer=VISUAL_TOKENIZER)


@pytest.fixture(scope="module")
def processor():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield UnifiedProcessor(VisualTokenizerImageProcessor(size=16), TOKENIZER, DECODE_VOCAB,
                           visual_tokenizer=VISUAL_TOKENIZER)
    torch.set_num_threads(threads)


def _decode_inputs(size: int) -> st.SearchStrategy:
    token = st.one_of(st.integers(-2, size + 2), st.just(-100), st.integers(0, size - 1),
                      st.sampled_from([2**63, -(2**63) - 1, 2**64, 2**31]))
    odd = st.one_of(st.floats(allow_nan=True), st.booleans(), st.text(max_size=2), st.none())
    sequence = st.lists(st.one_of(token, token, token, odd), max_size=30)
    as_tensor = st.lists(st.integers(-100, size + 2), max_size=30).map(lambda t: torch.tensor(t, dtype=torch.long))
    floats = st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=5).map(torch.tensor)
    return st.one_of(sequence, sequence, as_tensor, floats, st.lists(sequence, max_size=3))


def _decode_property(processor, input_ids, mode: dict, batched: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if batched:
            out = documented("batch_decode", lambda: processor.batch_decode(input_ids, **mode), ValueError)
            assert out is None or all(_is_pieces(row) for row in out)
        else:
            out = documented("decode", lambda: processor.decode(input_ids, **mode), ValueError)
            assert out is None or _is_pieces(out)


def _is_pieces(pieces) -> bool:
    return isinstance(pieces, list) and all(isinstance(p, (str, Image.Image)) for p in pieces)


def _decode_with_images() -> st.SearchStrategy:
    """Sequences built from text, labels' -100 and image spans (often broken), so decoding reaches the images."""
    return st.lists(st.one_of(st.lists(st.integers(1, 9), max_size=4), st.just([-100, -100]),
                              span_tokens(DECODE_VOCAB)), max_size=4).map(lambda parts: sum(parts, []))


def _decode_test(processor, input_ids, mode, batched):
    if batched and isinstance(input_ids, list) and input_ids and not isinstance(input_ids[0], list):
        input_ids = [input_ids]
    _decode_property(processor, input_ids, mode, batched)


test_decode, test_fuzz_decode = properties(
    _decode_test, input_ids=st.one_of(_decode_inputs(len(TOKENIZER)), _decode_with_images()),
    mode=st.sampled_from([{}, {"lenient": True}, {"repair": True}]), batched=st.booleans())


# ---------------------------------------------------------------------------------------------- load_image
def _encoded(fmt: str, mode: str = "RGB", size=(5, 4), **kwargs) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    image.convert(mode).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


SEEDS = [_encoded("PNG"), _encoded("PNG", "LA"), _encoded("PNG", "P"), _encoded("JPEG"), _encoded("GIF"),
         _encoded("BMP"), _encoded("TIFF"), _encoded("TIFF", "I;16"), _encoded("WEBP"), _encoded("PNG", "1")]


def _mutated(seed: int, edits) -> bytes:
    data = bytearray(SEEDS[seed % len(SEEDS)])
    for at, value, how in edits:
        at %= len(data) + 1
        if how == "flip" and at < len(data):
            data[at] = value
        elif how == "cut":
            del data[at:]
        elif how == "insert":
            data[at:at] = bytes([value]) * (1 + value % 7)
    return bytes(data)


_ARRAYS = st.tuples(st.sampled_from([np.uint8, np.uint16, np.float32, np.float64, np.bool_, np.int32]),
                    st.lists(st.integers(0, 5), min_size=0, max_size=4), st.integers(0, 2**32 - 1)).map(
    lambda a: (np.random.default_rng(a[2]).random(a[1]) * np.random.default_rng(a[2]).choice([1, 255, 70000, -1])
               ).astype(a[0]))
_SOURCES = st.one_of(
    st.tuples(st.integers(0, 10**6), st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255),
                                                        st.sampled_from(["flip", "cut", "insert"])), max_size=6)
              ).map(lambda t: _mutated(*t)),
    st.binary(max_size=64), _ARRAYS,
)


def _load_test(source):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ImageLoadWarning, and Pillow's own about the corrupt data it skips
        image = documented("load_image", lambda: load_image(source, max_pixels=1 << 16), ImageLoadError)
    if image is not None:
        assert image.mode == "RGB" and image.width * image.height <= 1 << 16 and min(image.size) > 0


test_load_image, test_fuzz_load_image = properties(_load_test, source=_SOURCES)


# ---------------------------------------------------------------------------------------------- ImageVocab.from_dict
RECORDS = [v.to_dict() for v in VOCABS.values()]
_JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-3, 70),
                               st.floats(allow_nan=False), st.text(max_size=6)),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                                  max_size=3), max_leaves=6)


def _from_dict_test(record, edits):
    data = json.loads(json.dumps(RECORDS[record]))
    for field, value in edits:
        if value == "<del>":
            data.pop(field, None)
        else:
            data[field] = value
    vocab = documented("ImageVocab.from_dict", lambda: ImageVocab.from_dict(data), ValueError)
    if vocab is not None:
        assert ImageVocab.from_dict(json.loads(json.dumps(vocab.to_dict()))) == vocab


test_from_dict, test_fuzz_from_dict = properties(
    _from_dict_test, record=st.integers(0, len(RECORDS) - 1),
    edits=st.lists(st.tuples(st.sampled_from(sorted(set().union(*RECORDS)) + ["unknown"]),
                             st.one_of(_JSON, st.just("<del>"))), max_size=3))
