"""Tokenizer evaluation: reconstruction, detail and text-preservation suites, codebook use, codec baselines and
alignment (:mod:`.suites`), with their test patterns, OCR and codecs. Suites take their images as arguments."""
