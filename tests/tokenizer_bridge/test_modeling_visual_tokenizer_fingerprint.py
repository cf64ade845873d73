"""The visual-tokenizer fingerprint ignores config.json keys the config class does not know (issue 15, defect 14)."""

import json

import torch

from tokenizer_bridge import VisualTokenizer, VisualTokenizerConfig


def test_an_unknown_config_key_does_not_change_the_fingerprint(tmp_path):
    torch.manual_seed(0)
    visual_tokenizer = VisualTokenizer(VisualTokenizerConfig(base_channels=16, latent_dim=16, codebook_size=32,
                                                             downsample=8, image_size=32)).eval()
    visual_tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, comment="made on the big machine", seed=3)))
    loaded = VisualTokenizer.from_pretrained(tmp_path)
    assert loaded.config.comment == "made on the big machine"  # kept, as transformers keeps unknown keys
    assert loaded.fingerprint() == visual_tokenizer.fingerprint()
    (tmp_path / "config.json").write_text(json.dumps(dict(config, codebook_size=16)))
    changed = VisualTokenizer.from_pretrained(tmp_path, ignore_mismatched_sizes=True)
    assert changed.fingerprint() != visual_tokenizer.fingerprint()  # a known key still counts
