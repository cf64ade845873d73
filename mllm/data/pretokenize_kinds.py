"""The three record kinds of ``vtok pretokenize``, told apart by a record's fields, and the form they are stored in.

    captions        {"image": "a.jpg", "caption": "a red circle"}
    documents       {"content": [{"type": "text", "text": "..."}, {"type": "image", "image": "a.jpg"}, ...],
                     "prefix": 1}                                   (optional: content items that are context, no loss)
    conversations   {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.jpg"},
                                                               {"type": "text", "text": "what is this?"}]},
                                  {"role": "assistant", "content": "a red circle"}]}           (the HF chat format)
                    {"messages": [{"role": "user", "content": "<image> what is this?"}, ...], "images": ["a.jpg"]}
                    {"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\\nwhat is this?"},
                                                         {"from": "gpt", "value": "a red circle"}]}  (LLaVA's files)

**Detection** (:func:`record_kind`): a record with ``messages`` (or LLaVA's ``conversations``) is a conversation; one
whose ``content`` is a list is a document; any other is a caption record. A source has one kind, the kind of its first
record that parses (:func:`source_kind`, or given explicitly); a record of another kind in it is a malformed record.

**Images.** An image part names its image with an ``image``, ``path`` or ``url`` key: a path (relative to the source
file's folder, or to ``image_root``) or ``{"bytes", "path"}`` (a ``save_to_disk`` image). An image part without one,
and every ``<image>`` in a text, takes the next image of the record's ``images`` list (the LLaVA convention; LLaVA's
single ``image`` is a list of one). The two counts must agree, else the record is skipped as ``image_count_mismatch``.

**Stored form** (the ``record`` column of the pre-tokenized dataset, a JSON string; ``<image>`` stands for the next
image of the row's ``image_ids`` list, in reading order)::

    documents       {"content": ["a red circle", "<image>", "then a blue square", "<image>"], "prefix": 1}
    conversations   {"messages": [{"role": "user", "content": "<image> what is this?"},
                                  {"role": "assistant", "content": "a red circle"}]}

Document items are texts or exactly ``"<image>"`` (texts are split at placeholders and stripped, empty ones dropped;
``prefix`` counts stored items). Message contents are strings (text parts and placeholders joined by spaces, as
:func:`mllm.data.conversation.message_text` joins them); LLaVA's ``human``/``gpt`` are ``user``/``assistant``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import datasets

from .sources import saved_dataset
from .tasks import PLACEHOLDER

KINDS = ("captions", "documents", "conversations")
LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
IMAGE_KEYS = ("image", "path", "url")
JSON_COLUMN = "json"  # a JSONL source of documents or conversations: one raw line per row, parsed by the worker


class BadRecord(ValueError):
    """A record that is skipped and counted under ``reason`` (a bad-record reason of the manifest)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Parsed:
    """A document or conversation record in its stored form: the JSON text structure and its images in order."""

    record: str
    images: tuple


def record_kind(row: dict) -> str:
    """``"conversations"``, ``"documents"`` or ``"captions"`` from the fields of one record."""
    if "messages" in row or "conversations" in row:
        return "conversations"
    if isinstance(row.get("content"), list):
        return "documents"
    return "captions"


def source_kind(path: str, split: str = "train") -> str:
    """The kind of a source: that of the first record of a JSONL file or ``save_to_disk`` folder that parses; image
    folders, CSV lists and tar shards hold captions."""
    if os.path.isfile(path) and path.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8") as f:
            rows = (json_row(line) for line in f if line.strip())
            return next((record_kind(row) for row in rows if row), "captions")
    saved = saved_dataset(path, split) if os.path.isdir(path) else None
    return record_kind(saved[0]) if saved is not None and len(saved) else "captions"


def read_records(path: str, split: str = "train") -> datasets.Dataset:
    """A documents or conversations source as a dataset of records: a ``JSON_COLUMN`` of raw lines for a JSONL file,
    or the columns of a ``save_to_disk`` folder (images left undecoded)."""
    if os.path.isfile(path) and path.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
        return datasets.Dataset.from_dict({JSON_COLUMN: lines})
    saved = saved_dataset(path, split) if os.path.isdir(path) else None
    if saved is None:
        raise ValueError(f"documents and conversations are read from a .jsonl file or a save_to_disk folder, not "
                         f"{path!r}")
    return saved.cast(datasets.Features({k: _undecoded(v) for k, v in saved.features.items()}))


def parse_row(row: dict, kind: str, root: Optional[str]) -> Parsed:
    """One source row (``{JSON_COLUMN: line}`` or a dataset row) -> its stored form, or :class:`BadRecord`."""
    if set(row) == {JSON_COLUMN}:
        row = json_row(row[JSON_COLUMN])
        if not row:
            raise BadRecord("malformed_record", "not a JSON object")
    found = record_kind(row)
    if found != kind:
        raise BadRecord("malformed_record", f"a {found} record in a {kind} source")
    return PARSERS[kind](row, root)


def parse_document(row: dict, root: Optional[str]) -> Parsed:
    content, prefix = row["content"], row.get("prefix", 0)
    if not content:
        raise BadRecord("malformed_record", "the document's content is empty")
    if not isinstance(prefix, int) or isinstance(prefix, bool) or not 0 <= prefix < len(content):
        raise BadRecord("malformed_record", f"prefix must be an int in [0, {len(content)}), got {prefix!r}")
    images = _Images(row.get("images"), root)
    items, start = [], 0
    for j, part in enumerate(content):
        if j == prefix:
            start = len(items)
        part = {"type": "text", "text": part} if isinstance(part, str) else part
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            items.append(images.add(part))
        elif kind == "text" and isinstance(part.get("text"), str):
            for k, piece in enumerate(part["text"].split(PLACEHOLDER)):
                if k:
                    items.append(images.add(None))
                if piece.strip():
                    items.append(piece.strip())
        else:
            raise BadRecord("malformed_record", f"content item {j} is not a text or image part: {str(part)[:80]}")
    if start >= len(items):
        raise BadRecord("malformed_record", "nothing is left after the prefix to train on")
    return Parsed(json.dumps({"content": items, "prefix": start}), images.resolved())


def parse_conversation(row: dict, root: Optional[str]) -> Parsed:
    if "messages" in row:
        messages, listed = row["messages"], row.get("images")
    else:  # LLaVA's files: {"image": ..., "conversations": [{"from": "human", "value": ...}, ...]}
        turns = row["conversations"] if isinstance(row["conversations"], list) else None
        if turns is None or not all(isinstance(t, dict) for t in turns):
            raise BadRecord("malformed_record", "conversations must be a list of {from, value} turns")
        messages = [{"role": LLAVA_ROLES.get(t.get("from"), t.get("from")), "content": t.get("value")} for t in turns]
        listed = row.get("images", row.get("image"))
    if not isinstance(messages, list) or not messages:
        raise BadRecord("malformed_record", "messages must be a non-empty list")
    images = _Images(listed, root)
    out = [{"role": _role(m, i), "content": _content(m.get("content"), images, i)} for i, m in enumerate(messages)]
    if not any(m["role"] == "assistant" for m in out):
        raise BadRecord("malformed_record", "the conversation has no assistant turn")
    return Parsed(json.dumps({"messages": out}), images.resolved())


PARSERS = {"documents": parse_document, "conversations": parse_conversation}


def json_row(line: str) -> dict:
    """A JSON line as a dict (``{}`` when it is not a JSON object)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return {}
    return row if isinstance(row, dict) else {}


# ---------------------------------------------------------------------------------------------- helpers
class _Images:
    """The images of one record in reading order: named by their parts, or taken in turn from its ``images`` list."""

    def __init__(self, listed: Any, root: Optional[str]):
        self.listed = [] if listed is None else list(listed) if isinstance(listed, (list, tuple)) else [listed]
        self.root, self.refs, self.unnamed = root, [], 0

    def add(self, part: Optional[dict]) -> str:
        """Record the image of ``part`` (``None``: the next listed image); returns the placeholder."""
        ref = next((part[k] for k in IMAGE_KEYS if part is not None and part.get(k) is not None), None)
        self.unnamed += ref is None
        self.refs.append(ref)
        return PLACEHOLDER

    def resolved(self) -> tuple:
        if self.unnamed != len(self.listed):
            raise BadRecord("image_count_mismatch", f"{self.unnamed} image placeholder(s) without their own image but "
                                                    f"{len(self.listed)} image(s) in the record's images list")
        listed = iter(self.listed)
        return tuple(_join(self.root, next(listed) if ref is None else ref) for ref in self.refs)


def _role(message: Any, i: int) -> str:
    role = message.get("role") if isinstance(message, dict) else None
    if not isinstance(role, str) or not role:
        raise BadRecord("malformed_record", f"message {i} has no role")
    return role


def _content(content: Any, images: _Images, i: int) -> str:
    """A message's content as one string with a placeholder per image, recording its images in order."""
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise BadRecord("malformed_record", f"message {i} has no text or list content")
    pieces = []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            pieces.append(images.add(part))
        elif kind == "text" and isinstance(part.get("text"), str):
            for _ in range(part["text"].count(PLACEHOLDER)):
                images.add(None)
            pieces.append(part["text"])
        else:
            raise BadRecord("malformed_record", f"message {i} has a part that is not text or image: {str(part)[:80]}")
    return " ".join(pieces)


def _join(root: Optional[str], ref: Any) -> Any:
    if isinstance(ref, str) and root and not os.path.isabs(ref):
        return os.path.join(root, ref)
    if isinstance(ref, dict) and not ref.get("bytes"):
        return _join(root, ref.get("path"))
    return ref


def _undecoded(feature):
    """``feature`` with every ``Image`` left undecoded (``{"bytes", "path"}``): bad images are counted, not raised."""
    if isinstance(feature, datasets.Image):
        return datasets.Image(decode=False)
    if isinstance(feature, datasets.List):
        return datasets.List(_undecoded(feature.feature), length=feature.length)
    if isinstance(feature, dict):
        return {k: _undecoded(v) for k, v in feature.items()}
    return feature
