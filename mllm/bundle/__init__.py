"""One folder (or Hub repo) holding a bridged LLM and its processor: save/load (:mod:`.bundle`), the generated
model card (:mod:`.model_card`) and the remote code that loads it without this package (:mod:`.remote_code`)."""

from .bundle import Bundle, load_bundle, push_bundle_to_hub, read_recipe, save_bundle

__all__ = ["Bundle", "load_bundle", "push_bundle_to_hub", "read_recipe", "save_bundle"]
