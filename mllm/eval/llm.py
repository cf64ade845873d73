"""LLM-level evaluation of a bridged bundle: does the LLM model images, read them, draw them, and still speak?

    vtok eval bundle --bundle DIR --out OUT

- image-token perplexity: teacher-forced loss over the image tokens of text-to-image sequences built from held-out
  shapes images (never trained on), under the full softmax and under a softmax restricted to the tokens the span
  grammar allows at each image token (its image class, what constrained decoding samples from: the K ids of a
  single-level vocabulary, the id range of a residual level or of a factorized sub-token, the text tokens of a
  unified codebook); a uniform guess over those classes scores ``uniform_perplexity`` (K for a single range). Every
  layout of :class:`~tokenizer_bridge.ImageVocab` is measured per token: ``<boi>``, ``<eol>``, size tokens and
  ``<eoi>`` are left out, as they are forced;
- caption accuracy and text-to-image attribute accuracy on the held-out shapes split (:func:`mllm.eval.llm.evaluate_llm`);
- text-only perplexity: a bundle stores only the bridged model, so the "before vs after bridging" comparison is made
  inside it — full softmax (mass leaks to image tokens) against the softmax restricted to the original text
  vocabulary ``[:text_vocab_size]`` (as if the image rows were absent); with ``base_model`` the original LLM's
  perplexity on the same token ids is reported as well.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from tokenizer_bridge.evaluation.suites import environment
from tokenizer_bridge.image_processing_visual_tokenizer import to_pil_images

from ..bundle.bundle import load_bundle
from ..data import shapes
from ..data.records import encode_images
from ..data.tasks import PLACEHOLDER, t2i_prompt
from ..generation.guidance import guided_generate_image_ids
from ..generation.inference import (
    caption_image_ids,
    default_image_size,
    generate_image_ids,
)
from ..generation.logits import find_image_spans

IGNORE_INDEX = -100
GUIDANCE_SCALE = 2.0  # classifier-free guidance scale of the text-to-image evaluation


def _shifted(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits ``(B, T-1, V)`` and their targets ``(B, T-1)`` (IGNORE_INDEX where there is no loss)."""
    out = model(input_ids=batch["input_ids"].to(model.device), attention_mask=batch["attention_mask"].to(model.device))
    return out.logits[:, :-1].float(), batch["labels"][:, 1:].to(model.device)


def image_token_classes(vocab, input_ids: torch.Tensor, vocab_size: int) -> torch.LongTensor:
    """``(B, T)`` image class of every image token inside a (well-formed) image span of ``input_ids``: the id range it
    was drawn from (a level's or a sub-token's range, or the unified-codebook table; see
    :meth:`ImageVocab.class_token_mask`); -1 for text, ``<boi>``, ``<eol>``, size/budget tokens, ``<eoi>`` and padding.

    The class ranges of a vocabulary are disjoint and hold image tokens only, so a token's class is found from the
    token itself, whatever the layout; each span is checked with :meth:`ImageVocab.parse_span` first.
    """
    masks = vocab.class_token_mask(vocab_size)  # (C, V)
    token_class = torch.where(masks.any(dim=0), masks.int().argmax(dim=0), -1)  # (V,)
    classes = torch.full(input_ids.shape, -1, dtype=torch.long)
    for row, ids in enumerate(input_ids.cpu()):
        for start, end in find_image_spans(ids, vocab):
            vocab.parse_span(ids[start:end])  # raises on a malformed span
            classes[row, start + 1 : end - 1] = token_class[ids[start + 1 : end - 1]]
    return classes


@torch.no_grad()
def image_token_perplexity(model, processor, captions: Sequence[str], image_ids, batch_size: int = 16) -> dict:
    """Teacher-forced perplexity of the image tokens in ``draw: <caption>`` -> ``<image>`` sequences.

    ``image_ids`` is a batch tensor or a list of per-image tensors (any layout). Each image token is scored under the
    full softmax and under the softmax over the tokens its image class allows (see the module docstring).
    """
    vocab = processor.image_vocab
    allowed = None  # (C, V): tokens each image class allows, built at the logits' width
    nll_full, nll_image, log_uniform, correct, count = 0.0, 0.0, 0.0, 0, 0
    class_sizes = set()
    for start in range(0, len(captions), batch_size):
        chunk = list(captions[start : start + batch_size])
        batch = processor(text=[t2i_prompt(c) for c in chunk], target=[PLACEHOLDER] * len(chunk),
                          image_ids=[[ids] for ids in image_ids[start : start + batch_size]], padding=True,
                          return_tensors="pt")
        logits, targets = _shifted(model, batch)
        if allowed is None:
            allowed = vocab.class_token_mask(logits.shape[-1]).to(logits.device)
            sizes = allowed.sum(dim=1)  # (C,)
        classes = image_token_classes(vocab, batch["input_ids"], logits.shape[-1])[:, 1:].to(logits.device)
        mask = (classes >= 0) & (targets != IGNORE_INDEX)  # image ids only: not <boi>, <eol>, sizes, <eoi>, text
        logits, targets, classes = logits[mask], targets[mask], classes[mask]
        nll_full += float(F.cross_entropy(logits, targets, reduction="sum"))
        restricted = logits.masked_fill(~allowed[classes], float("-inf"))  # (n, V)
        nll_image += float(F.cross_entropy(restricted, targets, reduction="sum"))
        correct += int((restricted.argmax(-1) == targets).sum())
        log_uniform += float(sizes[classes].double().log().sum())
        class_sizes.update(sizes[classes].unique().tolist())
        count += int(mask.sum())
    if not count:
        raise ValueError("no image tokens to score: pass at least one caption with its image ids")
    uniform = class_sizes.pop() if len(class_sizes) == 1 else math.exp(log_uniform / count)
    return {
        "image_token_perplexity": math.exp(nll_full / count),
        "image_token_perplexity_within_image_ids": math.exp(nll_image / count),
        "image_token_accuracy": correct / count,
        "uniform_perplexity": uniform,
        "num_image_tokens": count,
    }


@torch.no_grad()
def text_perplexity(model, processor, texts: Sequence[str], base_model=None, batch_size: int = 16) -> dict:
    """Perplexity of plain ``texts`` under the full softmax and restricted to the text vocabulary (and the base
    model's, when given); ``mass_on_non_text_tokens`` is the mean probability the bridged model puts outside it."""
    text_vocab = _text_vocab_size(processor.image_vocab)
    sums = {"full": 0.0, "text_only": 0.0, "base": 0.0, "mass": 0.0}
    count = 0
    for start in range(0, len(texts), batch_size):
        batch = processor(target=list(texts[start : start + batch_size]), padding=True, return_tensors="pt")
        logits, targets = _shifted(model, batch)
        mask = targets != IGNORE_INDEX
        logits, targets = logits[mask], targets[mask]
        sums["full"] += float(F.cross_entropy(logits, targets, reduction="sum"))
        sums["text_only"] += float(F.cross_entropy(logits[:, :text_vocab], targets, reduction="sum"))
        sums["mass"] += float((1 - logits.softmax(-1)[:, :text_vocab].sum(-1)).sum())
        if base_model is not None:
            base_logits, _ = _shifted(base_model, batch)
            sums["base"] += float(F.cross_entropy(base_logits[mask][:, :text_vocab], targets, reduction="sum"))
        count += int(mask.sum())
    return {
        "text_perplexity": math.exp(sums["full"] / count),
        "text_perplexity_text_vocab_only": math.exp(sums["text_only"] / count),
        "base_model_text_perplexity": math.exp(sums["base"] / count) if base_model is not None else None,
        "mass_on_non_text_tokens": sums["mass"] / count,
        "num_text_tokens": count,
        "text_vocab_size": text_vocab,
    }


def _text_vocab_size(vocab) -> int:
    if vocab.text_vocab_size is not None:
        return int(vocab.text_vocab_size)
    # the bridge's tokens follow the text vocabulary (unified codebooks add at most the span markers)
    first = vocab.special_token_ids + vocab.size_token_ids + ([] if vocab.is_unified else [vocab.offset])
    return int(min(first))


def evaluation_image_size(vocab, visual_tokenizer) -> int:
    """Side in pixels of the square held-out shapes images a bundle is evaluated on: what its id grid covers (a
    variable-size grid: its :func:`~mllm.generation.inference.default_image_size`), or for a sequence layout the resolution the
    visual tokenizer was trained at (``config.image_size``)."""
    if vocab.layout == "sequence":
        size = getattr(visual_tokenizer.config, "image_size", None)
        if not size:
            raise ValueError("a sequence-layout bundle is evaluated at its visual tokenizer's config.image_size, "
                             "which this visual tokenizer does not record")
        return int(size)
    h, w = default_image_size(vocab) if vocab.variable_size else vocab.grid_size
    if h != w:
        raise ValueError(f"the held-out shapes images are square but this bundle generates {h}x{w} id grids")
    return int(h * visual_tokenizer.config.downsample)


def load_base_model(path: Optional[str]):
    if path is None:
        return None
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(path):
        raise FileNotFoundError(f"base model {path!r} not found: give the folder of the LLM that was bridged")
    return AutoModelForCausalLM.from_pretrained(path).eval()


def evaluate_bundle(bundle_dir, seed: int = 0, texts: Optional[Sequence[str]] = None,
                    base_model: Optional[str] = None, keep_samples: bool = False) -> dict:
    """All LLM-level checks on a bundle; ``seed`` picks the held-out shapes split (the demo recipe's ``data.seed``);
    ``texts`` default to the held-out captions. Returns a JSON-ready dict (+ ``_samples`` when ``keep_samples``)."""
    if not (Path(bundle_dir) / "config.json").is_file():
        raise FileNotFoundError(f"no bundle at {str(bundle_dir)!r}: expected the folder written by save_bundle "
                                "(config.json, model.safetensors, image_vocab.json, visual_tokenizer/)")
    model, processor = load_bundle(bundle_dir)
    model.eval()
    vt = processor.visual_tokenizer
    if vt is None:
        raise ValueError("evaluate_bundle needs a bundle with a visual tokenizer (visual_tokenizer/) to encode the "
                         "held-out images and decode the generated ones")
    size = evaluation_image_size(processor.image_vocab, vt)
    timings, result = {}, {"bundle": str(bundle_dir), "image_size": size, "seed": seed}

    start = time.perf_counter()
    specs, images = heldout_examples(seed, size)
    result["image_tokens"] = image_token_perplexity(model, processor, [s.caption for s in specs],
                                                    encode_images(vt.eval(), images))
    timings["image_tokens"] = time.perf_counter() - start

    start = time.perf_counter()
    llm = evaluate_llm(model, processor, seed, size)
    pictures, llm_specs = llm.pop("_pictures"), llm.pop("_specs")
    result["llm"] = llm
    timings["llm"] = time.perf_counter() - start

    start = time.perf_counter()
    source = "given texts" if texts else "held-out shapes captions"
    texts = list(texts) if texts else [s.caption for s in specs]
    result["text"] = {**text_perplexity(model, processor, texts, load_base_model(base_model)), "source": source}
    timings["text"] = time.perf_counter() - start

    result["timings"] = timings
    result["config"] = {
        "llm": json.loads(model.config.to_json_string(use_diff=False)),
        "image_vocab": processor.image_vocab.to_dict(),
        "visual_tokenizer": json.loads(vt.config.to_json_string(use_diff=False)),
    }
    result["versions"] = environment()
    if keep_samples:
        result["_samples"] = {"pictures": pictures, "captions": [s.caption for s in llm_specs]}
    return result


def heldout_examples(seed: int, size: int) -> tuple[list, list]:
    """Held-out specs and one jittered render of each."""
    specs = shapes.make_splits(seed=seed).heldout
    dataset = shapes.ShapesDataset(specs, size=size, seed=seed + 12345)
    return specs, [dataset[i]["image"] for i in range(len(specs))]



CEILING_RENDERS = 10  # jittered renders of each held-out spec in `tokenizer_ceiling`


@torch.no_grad()
def tokenizer_ceiling(visual_tokenizer, seed: int, size: int, renders_per_spec: int = CEILING_RENDERS,
                      batch_size: int = 64) -> dict:
    """Attribute accuracy of the judge on the tokenizer's reconstructions of ``renders_per_spec`` jittered renders of
    every held-out spec (other jitters than `heldout_examples`): the ceiling of ``evaluate_llm`` measured on more
    images, so that it moves by 1/420 per image instead of 1/42 on the 42 held-out specs."""
    specs = shapes.make_splits(seed=seed).heldout
    dataset = shapes.ShapesDataset(specs, size=size, seed=seed + 54321, samples_per_spec=renders_per_spec)
    items = [dataset[i] for i in range(len(dataset))]
    image_ids = encode_images(visual_tokenizer, [item["image"] for item in items])
    return reconstruction_accuracy(visual_tokenizer, image_ids, [item["spec"] for item in items], batch_size=batch_size)


@torch.no_grad()
def reconstruction_accuracy(visual_tokenizer, image_ids: torch.Tensor, specs: Sequence, to_images=to_pil_images,
                            batch_size: int = 64) -> dict:
    """The judge's attribute accuracy on the tokenizer's reconstructions of ``image_ids`` (one per spec), decoded in
    batches of ``batch_size`` and turned into images by ``to_images``."""
    judged = []
    for start in range(0, len(image_ids), batch_size):
        recon = visual_tokenizer.decode(image_ids[start : start + batch_size]).clamp(-1, 1)
        judged += [shapes.classify(image) for image in to_images(recon)]
    return shapes.attribute_accuracy(judged, specs)


def evaluate_llm(model, processor, seed: int, size: int, batch_size: int = 16,
                 guidance_scale: Optional[float] = GUIDANCE_SCALE) -> dict:
    """Caption and text-to-image accuracy on the held-out shapes split, with chance levels.

    Generated images are judged on their pixels (:func:`shapes.classify`). ``t2i_accuracy`` uses classifier-free
    guidance at ``guidance_scale`` (``None`` or 1: plain generation); ``t2i_accuracy_unguided`` is plain generation;
    ``t2i_tokenizer_ceiling`` judges the visual tokenizer's reconstructions of the held-out renders, the best any LLM
    could reach through this tokenizer; ``tokenizer_ceiling_10_renders`` is the same over ten times more renders
    (:func:`tokenizer_ceiling`), a steadier figure for comparing tokenizers.
    """
    specs, images = heldout_examples(seed, size)
    vt = processor.visual_tokenizer
    image_ids = encode_images(vt, images)
    guided = guidance_scale is not None and guidance_scale != 1
    captions, generated, guided_ids = [], [], []
    for start in range(0, len(specs), batch_size):
        chunk = [s.caption for s in specs[start : start + batch_size]]
        captions += caption_image_ids(model, processor, image_ids[start : start + batch_size])
        generated.append(generate_image_ids(model, processor, chunk))
        if guided:
            guided_ids.append(guided_generate_image_ids(model, processor, chunk, guidance_scale=guidance_scale))
    plain = processor.image_ids_to_images(list(torch.cat(generated)))
    pictures = processor.image_ids_to_images(list(torch.cat(guided_ids))) if guided else plain
    caption_acc = shapes.attribute_accuracy([shapes.parse_caption(c) for c in captions], specs)
    t2i_acc = shapes.attribute_accuracy([shapes.classify(p) for p in pictures], specs)
    plain_acc = shapes.attribute_accuracy([shapes.classify(p) for p in plain], specs)
    ceiling = reconstruction_accuracy(vt, image_ids, specs, processor.image_processor.postprocess)
    many = tokenizer_ceiling(vt, seed, size)
    return {
        "caption_accuracy": caption_acc["all"],
        "t2i_accuracy": t2i_acc["all"],
        "t2i_accuracy_unguided": plain_acc["all"],
        "t2i_tokenizer_ceiling": ceiling["all"],
        "t2i_guidance_scale": guidance_scale if guided else None,
        "caption_attribute_accuracy": caption_acc,
        "t2i_attribute_accuracy": t2i_acc,
        "t2i_attribute_accuracy_unguided": plain_acc,
        "t2i_tokenizer_ceiling_attributes": ceiling,
        "tokenizer_ceiling_10_renders": many["all"],
        "tokenizer_ceiling_10_renders_attributes": many,
        "chance": shapes.chance_levels(),
        "examples": [
            {"target": s.caption, "caption": c} for s, c in list(zip(specs, captions))[:8]
        ],
        "_pictures": pictures,
        "_specs": specs,
    }
