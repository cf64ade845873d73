"""Data: the shapes and photographs that ship for the demo and tests, tasks (captioning, text-to-image,
decompression, interleaved, chat), conversations, packing, pre-tokenization and the llm stage's records."""
