"""Where image ids live in an LLM vocabulary: the layout of an image span, the id mapping, span building and
parsing (strict and repairing), and the bridge that adds the tokens to a tokenizer and resizes an LLM."""
