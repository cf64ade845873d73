"""Generation with a bridged LLM: the span-grammar logits processor, classifier-free guidance, the depth head for
residual ids, and the inference helpers (text -> image ids -> PIL images, image -> caption)."""
