"""A causal LM loaded from a GGUF file, made an ordinary one: what :func:`~mllm.bundle.bundle.save_bundle` and the
llm stage's :func:`~mllm.model.build_text_model` both call.

``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`` de-quantizes the GGUF blocks into float weights
(wherever no GGUF matmul kernel is installed), yet leaves its ``GgufHfQuantizer`` attached, and that quantizer says it
is not serializable, so ``save_pretrained`` refuses the model. The weights are plain already: detaching the quantizer
leaves a model that saves as a vanilla safetensors checkpoint and reloads with ``from_pretrained`` alone.
"""

from __future__ import annotations


def is_gguf_model(model) -> bool:
    """Whether ``model`` still carries the quantizer transformers attaches when it loads a GGUF file."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    return str(getattr(method, "value", method)) == "gguf"


def as_plain_model(model):
    """Detach the GGUF quantizer of a de-quantized GGUF model, in place, and return the model; any other model is
    returned unchanged (other quantizers decide for themselves whether they save).

    Raises:
        ValueError: some weights stayed packed in GGUF blocks (a GGUF matmul kernel was used): they have no float
            values to save or to train.
    """
    if not is_gguf_model(model):
        return model
    packed = [name for name, p in model.named_parameters() if not p.is_floating_point()]
    if packed:
        raise ValueError(
            f"{len(packed)} weights of this GGUF model stayed packed in GGUF blocks (e.g. {packed[0]}), so they cannot "
            "be saved or trained as float weights: load it de-quantized with from_pretrained(..., gguf_file=..., "
            "quantization_config=GgufConfig(dequantize=True))")
    model.hf_quantizer.remove_quantization_config(model)
    for module in model.modules():  # the quantizer marks every sub-model's config; transformers tests hasattr()
        config = getattr(module, "config", None)
        if config is not None:
            vars(config).pop("_is_quantized", None)
    return model
