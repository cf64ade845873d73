"""mllm: model helpers, data, training, generation and evaluation around tokenizer-bridge."""
