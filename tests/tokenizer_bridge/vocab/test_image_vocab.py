"""What ``image_vocab.json`` may hold: the record checks of ``ImageVocab.from_dict`` / ``from_pretrained``."""

from __future__ import annotations

import json

import pytest
import torch

from tokenizer_bridge.vocab.image_vocab import IMAGE_VOCAB_NAME, ImageVocab

UNICODE = ImageVocab(offset=None, codebook_size=4, boi_token_id=0, eoi_token_id=1, eol_token_id=2, grid_size=(1, 2),
                     token_ids=[10, 2**30, 7, 99])
VOCAB = ImageVocab(offset=53, codebook_size=16, boi_token_id=50, eoi_token_id=51, eol_token_id=52, grid_size=(3, 4),
                   tokenizer_fingerprint="f" * 64)


def test_a_truncated_file_names_the_file(tmp_path):
    path = VOCAB.save_pretrained(tmp_path)
    text = open(path).read()
    with open(path, "w") as f:
        f.write(text[: len(text) // 2])
    with pytest.raises(ValueError, match=f"{IMAGE_VOCAB_NAME} is not valid JSON.*truncated or corrupt"):
        ImageVocab.from_pretrained(tmp_path)
    with open(path, "wb") as f:
        f.write(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="not valid JSON"):
        ImageVocab.from_pretrained(tmp_path)


@pytest.mark.parametrize("field, value, message", [
    ("codebook_size", "64", "'codebook_size' must be an integer"),
    ("codebook_size", 16.0, "'codebook_size' must be an integer"),
    ("boi_token_id", None, "'boi_token_id' must be an integer"),
    ("offset", 2**63, "'offset' must be an integer below 2\\*\\*31"),
    ("grid_size", "3x4", "'grid_size' must be a list of integers"),
    ("grid_size", [3, "4"], "'grid_size' must be a list of integers"),
    ("variable_size", 1, "'variable_size' must be true or false"),
    ("layout", ["grid"], "'layout' must be a string"),
    ("image_token_format", "<img_{0}{1}>", "one {} field"),
    ("image_token_format", "<img_{name}>", "one {} field"),
    ("special_tokens", [1, 2, 3], "list of token strings"),
    ("extra", [], "'extra' must be an object"),
])
def test_wrong_types_give_a_value_error_naming_the_field(field, value, message):
    data = dict(VOCAB.to_dict(), **{field: value})
    with pytest.raises(ValueError, match=message):
        ImageVocab.from_dict(data)


def test_missing_and_unknown_fields_and_non_objects(tmp_path):
    data = VOCAB.to_dict()
    del data["boi_token_id"]
    with pytest.raises(ValueError, match="lacks the required fields \\['boi_token_id'\\]"):
        ImageVocab.from_dict(data)
    with pytest.raises(ValueError, match="unknown fields"):
        ImageVocab.from_dict(dict(VOCAB.to_dict(), colour="red"))
    with pytest.raises(ValueError, match="JSON object"):
        ImageVocab.from_dict([1, 2])
    with open(tmp_path / IMAGE_VOCAB_NAME, "w") as f:
        json.dump(dict(VOCAB.to_dict(), codebook_size="16"), f)
    with pytest.raises(ValueError, match=f"{IMAGE_VOCAB_NAME}: image_vocab.json field 'codebook_size'"):
        ImageVocab.from_pretrained(tmp_path)


def test_a_valid_record_round_trips(tmp_path):
    VOCAB.save_pretrained(tmp_path)
    assert ImageVocab.from_pretrained(tmp_path) == VOCAB
    assert ImageVocab.from_dict(UNICODE.to_dict()) == UNICODE


def test_unified_lookup_does_not_grow_with_the_largest_token_id():
    ids = torch.tensor([10, 2**30, 7, 99, 8, -5, 2**40])
    assert UNICODE._unified_index(ids).tolist() == [0, 1, 2, 3, -1, -1, -1]
    assert UNICODE.parse_span(UNICODE.build_span(torch.tensor([[1, 3]]))).tolist() == [[1, 3]]


def test_a_huge_id_range_is_checked_without_listing_it():
    import time
    start = time.perf_counter()
    vocab = ImageVocab.from_dict(dict(VOCAB.to_dict(), codebook_size=2**31 - 60, grid_size=[1, 1]))
    assert vocab.max_token_id == 53 + 2**31 - 60 - 1
    with pytest.raises(ValueError, match="overlaps the image ids"):
        ImageVocab.from_dict(dict(VOCAB.to_dict(), codebook_size=2**31 - 60, boi_token_id=2**30))
    assert time.perf_counter() - start < 1.0  # a listed range would take 16 GB and seconds


def test_a_factorized_codebook_may_exceed_int32_but_its_token_ids_may_not(tmp_path):
    # FSQ levels [8, 5, 5, 5] x 4 = 10**12 image ids, spelled by four sub-tokens of 1000 values each
    big = ImageVocab(offset=53, codebook_size=1000**4, boi_token_id=50, eoi_token_id=51, eol_token_id=52,
                     grid_size=(2, 2), factors=[1000] * 4)
    big.save_pretrained(tmp_path)
    loaded = ImageVocab.from_pretrained(tmp_path)
    assert loaded.codebook_size == 10**12 and loaded.num_image_tokens == 4000
    ids = torch.tensor([[0, 10**12 - 1], [123456789012, 5]])
    assert loaded.parse_span(loaded.build_span(ids)).tolist() == ids.tolist()
    with pytest.raises(ValueError, match="reach past token id 2\\*\\*31 - 1: split each id into sub-tokens"):
        ImageVocab(offset=53, codebook_size=2**40, boi_token_id=50, eoi_token_id=51, eol_token_id=52,
                   grid_size=(2, 2))
    with pytest.raises(ValueError, match="'codebook_size' must be an integer in \\[1, 2\\*\\*63\\)"):
        ImageVocab.from_dict(dict(big.to_dict(), codebook_size=2**63, factors=[2**31, 2**32]))
