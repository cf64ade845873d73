"""Depth head: every residual level of an image position predicted from one LLM hidden state.

A residual visual tokenizer gives each image position ``L`` ids (``image_ids`` ``(h, w, L)``). Writing them as ``L``
tokens per position multiplies the sequence length by ``L``. Following RQ-Transformer (Lee et al., CVPR 2022,
arXiv:2203.01941) and DnD-Transformer (Chen et al., arXiv:2410.01912), :class:`DepthHeadModel` keeps one sequence
position per image position instead:

- **input**: at an image position the LLM reads the *sum* of the ``L`` level embeddings (one table per level, the
  residual analogue of summing the codes themselves); text positions read the LLM's own token embeddings;
- **output**: the hidden state that precedes an image position feeds a small causal transformer over the levels
  (:class:`DepthHead`, RQ-Transformer's "depth transformer"): at level ``l`` it reads the hidden state plus the summed
  embeddings of levels ``< l`` and predicts level ``l`` over the per-level codebook;
- **loss**: next-token cross-entropy on text targets plus, on image targets, the *sum* over levels of the per-level
  cross-entropy, averaged over target positions;
- **generation** (:meth:`DepthHeadModel.generate_image`): at each image position the levels are sampled one after the
  other from the depth head, then their summed embedding is fed to the LLM (one LLM step per position).

Batches hold ``input_ids`` ``(B, T)`` and ``level_ids`` ``(B, T, L)`` (``-1`` at text positions; the token id at an
image position is ignored). :func:`build_depth_head_stage` trains one as the ``llm`` stage of a recipe whose model
section sets ``depth_head`` (text-to-image and captioning tasks; spans ``<boi> (h*w positions) <eoi>``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.utils import ModelOutput

from ..data.tasks import PLACEHOLDER, Example

IGNORE_INDEX = -100
CONFIG_NAME, WEIGHTS_NAME, SPAN_NAME = "depth_head.json", "depth_head.safetensors", "image_span.json"
DEPTH_TASKS = ("captioning", "text_to_image")
BOI, EOI = "<boi>", "<eoi>"


@dataclass
class DepthHeadOutput(ModelOutput):
    """``loss``: mean over target positions of text CE / level-summed image CE; ``level_logits`` ``(n, L, K)`` of
    the ``n`` image targets in (batch, position) order; ``level_losses`` ``(L,)`` mean CE of each level."""

    loss: Optional[torch.Tensor] = None
    text_loss: Optional[torch.Tensor] = None
    image_loss: Optional[torch.Tensor] = None
    level_losses: Optional[torch.Tensor] = None
    level_logits: Optional[torch.Tensor] = None


class DepthHead(nn.Module):
    """A small causal transformer over the ``L`` levels of one position.

    Input at level ``l``: ``norm(hidden) + level_position[l] + norm(sum_{l' < l} embed_{l'}(id_{l'}))``; output:
    logits over the codebook of level ``l`` (one output matrix per level). It owns the level embeddings, which the LLM
    reads too (summed over the levels of a position), as RQ-Transformer shares its code embeddings. The two norms
    matter: the LLM's final hidden states are O(1) while embeddings start at text scale (0.02), and without them the
    depth head learns to ignore the earlier levels.
    """

    def __init__(self, hidden: int, num_levels: int, codebook_size: int, num_layers: int = 1, num_heads: int = 4,
                 embedding_std: float = 0.02):
        super().__init__()
        self.num_levels, self.codebook_size = num_levels, codebook_size
        self.level_embeddings = nn.Embedding(num_levels * codebook_size, hidden)  # row l * K + k: level l, id k
        nn.init.normal_(self.level_embeddings.weight, std=embedding_std)
        self.level_position = nn.Parameter(torch.zeros(num_levels, hidden))
        # the LLM's hidden states and the (small, text-scale) level embeddings meet at one scale
        self.hidden_norm, self.code_norm = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        layer = nn.TransformerEncoderLayer(hidden, num_heads, 2 * hidden, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Parameter(torch.randn(num_levels, codebook_size, hidden) * 0.02)  # (L, K, H)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(num_levels), persistent=False)

    def level_inputs(self, hidden: torch.Tensor, level_ids: torch.Tensor) -> torch.Tensor:
        """``(N, H)`` hidden states + ``(N, l)`` ids of the first ``l`` levels -> ``(N, l + 1, H)`` depth inputs."""
        embedded = self.level_embeddings(flat_level_ids(level_ids, self.codebook_size))  # (N, l, H)
        before = F.pad(embedded.cumsum(dim=1), (0, 0, 1, 0))  # (N, l + 1, H): sum of the levels before each
        depth = level_ids.shape[1] + 1
        return self.hidden_norm(hidden)[:, None] + self.level_position[:depth] + self.code_norm(before)

    def forward(self, hidden: torch.Tensor, level_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``(N, L, K)`` from hidden states ``(N, H)`` and the true ids ``(N, L)``."""
        x = self.level_inputs(hidden, level_ids[:, :-1])  # (N, L, H)
        x = self.norm(self.blocks(x, mask=self.causal, is_causal=True))
        return torch.einsum("nlh,lkh->nlk", x, self.out)

    @torch.no_grad()
    def sample(self, hidden: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
               do_sample: bool = True) -> torch.LongTensor:
        """Levels ``(N, L)`` drawn one after the other (greedy when ``do_sample`` is False)."""
        ids = hidden.new_zeros((hidden.shape[0], 0), dtype=torch.long)
        for level in range(self.num_levels):
            x = self.level_inputs(hidden, ids)  # (N, level + 1, H)
            x = self.norm(self.blocks(x, mask=self.causal[: level + 1, : level + 1], is_causal=True))
            logits = x[:, -1] @ self.out[level].T  # (N, K)
            ids = torch.cat([ids, pick(logits, temperature, top_k, do_sample)[:, None]], dim=1)
        return ids


class DepthHeadModel(nn.Module):
    """A causal LM whose image positions carry all ``L`` residual levels, read and written through a depth head.

    Args:
        llm: a Hugging Face causal LM (its decoder must accept ``inputs_embeds``, ``position_ids`` and a cache).
        num_levels: ``L``, residual levels per position.
        codebook_size: ``K``, ids per level.
        depth_layers / depth_heads: size of :class:`DepthHead` (its width is the LLM's hidden size; heads default to
            the LLM's attention heads).
    """

    def __init__(self, llm, num_levels: int, codebook_size: int, depth_layers: int = 1,
                 depth_heads: Optional[int] = None):
        super().__init__()
        if num_levels < 1 or codebook_size < 1:
            raise ValueError(f"num_levels and codebook_size must be positive, got {num_levels}, {codebook_size}")
        text = llm.config.get_text_config()
        self.llm = llm
        self.head_config = dict(num_levels=num_levels, codebook_size=codebook_size, depth_layers=depth_layers,
                                depth_heads=depth_heads or text.num_attention_heads)
        std = getattr(text, "initializer_range", 0.02) / num_levels**0.5  # the sum of L rows has the text scale
        self.depth_head = DepthHead(text.hidden_size, num_levels, codebook_size, depth_layers,
                                    self.head_config["depth_heads"], std)

    @property
    def level_embeddings(self) -> nn.Embedding:
        return self.depth_head.level_embeddings

    @property
    def num_levels(self) -> int:
        return self.head_config["num_levels"]

    def embed(self, input_ids: torch.LongTensor, level_ids: torch.LongTensor) -> torch.Tensor:
        """``(B, T)`` ids + ``(B, T, L)`` level ids -> ``(B, T, H)`` input embeddings (summed levels at images)."""
        is_image = level_ids[..., 0] >= 0  # (B, T)
        text = self.llm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
        levels = self.level_embeddings(flat_level_ids(level_ids.clamp(min=0), self.head_config["codebook_size"]))
        return torch.where(is_image[..., None], levels.sum(dim=-2), text)

    def hidden_states(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, cache=None) -> torch.Tensor:
        """Last-layer hidden states ``(B, t, H)`` of the newest ``t`` inputs; positions count real tokens only."""
        positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)[:, -inputs_embeds.shape[1]:]
        out = self.llm.get_decoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                     position_ids=positions, past_key_values=cache, use_cache=cache is not None)
        return out.last_hidden_state

    def forward(self, input_ids: torch.LongTensor, level_ids: torch.LongTensor,
                attention_mask: Optional[torch.Tensor] = None, labels: Optional[torch.LongTensor] = None,
                **unused) -> DepthHeadOutput:
        """Loss on the targets that ``labels`` (``(B, T)``, ``-100``: no loss) keep; at image positions ``labels``
        only say *whether* there is a loss, the targets are ``level_ids``. Default: every non-padding position."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        is_image = level_ids[..., 0] >= 0  # (B, T)
        if labels is None:
            labels = input_ids.masked_fill(is_image, 0).masked_fill(attention_mask == 0, IGNORE_INDEX)
        hidden = self.hidden_states(self.embed(input_ids, level_ids), attention_mask)[:, :-1]  # predicts t + 1
        targets, target_image = labels[:, 1:], is_image[:, 1:]
        text_rows = (targets != IGNORE_INDEX) & ~target_image
        image_rows = (targets != IGNORE_INDEX) & target_image
        text_logits = self.llm.get_output_embeddings()(hidden[text_rows])  # (n_text, V)
        text_ce = F.cross_entropy(text_logits.float(), targets[text_rows], reduction="sum")
        level_targets = level_ids[:, 1:][image_rows]  # (n_image, L)
        level_logits = self.depth_head(hidden[image_rows], level_targets)  # (n_image, L, K)
        level_ce = F.cross_entropy(level_logits.flatten(0, 1).float(), level_targets.flatten(), reduction="none")
        level_ce = level_ce.view(-1, self.num_levels)  # (n_image, L)
        n_text, n_image = int(text_rows.sum()), level_ce.shape[0]
        loss = (text_ce + level_ce.sum()) / max(n_text + n_image, 1)
        return DepthHeadOutput(loss=loss, text_loss=text_ce.detach() / max(n_text, 1),
                               image_loss=level_ce.detach().sum(dim=1).mean() if n_image else None,
                               level_losses=level_ce.detach().mean(dim=0) if n_image else None,
                               level_logits=level_logits)

    @torch.no_grad()
    def generate_image(self, prompt_ids: torch.LongTensor, grid: Union[int, Sequence[int]],
                       attention_mask: Optional[torch.Tensor] = None, temperature: float = 1.0,
                       top_k: Optional[int] = None, do_sample: bool = True) -> torch.LongTensor:
        """Level ids of one image after each prompt (which should end with ``<boi>``): ``(P,)`` -> ``(h*w, L)``,
        ``(B, P)`` (left-padded, with ``attention_mask``) -> ``(B, h*w, L)``. One LLM step per position."""
        single = prompt_ids.dim() == 1
        prompt_ids = prompt_ids[None] if single else prompt_ids
        mask = torch.ones_like(prompt_ids) if attention_mask is None else attention_mask.to(prompt_ids.device)
        positions = grid if isinstance(grid, int) else int(torch.tensor(grid).prod())
        cache = DynamicCache(config=self.llm.config)
        hidden = self.hidden_states(self.llm.get_input_embeddings()(prompt_ids), mask, cache)[:, -1]  # (B, H)
        generated = []
        for step in range(positions):
            ids = self.depth_head.sample(hidden, temperature, top_k, do_sample)  # (B, L)
            generated.append(ids)
            if step + 1 < positions:
                embedded = self.level_embeddings(flat_level_ids(ids, self.head_config["codebook_size"])).sum(dim=1)
                mask = F.pad(mask, (0, 1), value=1)
                hidden = self.hidden_states(embedded[:, None], mask, cache)[:, -1]
        out = torch.stack(generated, dim=1)  # (B, h*w, L)
        return out[0] if single else out

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> None:
        """The LLM as a plain HF checkpoint, plus ``depth_head.json`` and ``depth_head.safetensors``."""
        self.llm.save_pretrained(directory)
        own = {k: v.contiguous() for k, v in self.state_dict().items() if not k.startswith("llm.")}
        save_file(own, os.path.join(directory, WEIGHTS_NAME))
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(self.head_config, f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], **llm_kwargs) -> "DepthHeadModel":
        with open(os.path.join(directory, CONFIG_NAME)) as f:
            config = json.load(f)
        model = cls(AutoModelForCausalLM.from_pretrained(directory, **llm_kwargs), **config)
        missing, unexpected = model.load_state_dict(load_file(os.path.join(directory, WEIGHTS_NAME)), strict=False)
        if unexpected or any(not k.startswith("llm.") for k in missing):
            raise ValueError(f"{WEIGHTS_NAME} in {directory} does not match {CONFIG_NAME}: missing "
                             f"{[k for k in missing if not k.startswith('llm.')]}, unexpected {unexpected}")
        return model


def flat_level_ids(level_ids: torch.LongTensor, codebook_size: int) -> torch.LongTensor:
    """Level ``l``'s id ``k`` -> row ``l * K + k`` of the level embedding table (last axis = level)."""
    levels = torch.arange(level_ids.shape[-1], device=level_ids.device)
    return level_ids + levels * codebook_size


def pick(logits: torch.Tensor, temperature: float, top_k: Optional[int], do_sample: bool) -> torch.LongTensor:
    """One id per row of ``(N, K)`` logits: argmax, or a sample after temperature and top-k."""
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1).squeeze(1)


# ---------------------------------------------------------------------------------------------- training stage
class DepthSamples:
    """Task examples -> tensors for :class:`DepthHeadModel`: each ``<image>`` becomes ``<boi>``, one position per
    image position (token id ``pad``, level ids from the image) and ``<eoi>``; loss on the target (+ EOS) only."""

    def __init__(self, tokenizer, num_levels: int):
        self.tokenizer, self.num_levels = tokenizer, num_levels
        self.boi, self.eoi = tokenizer.convert_tokens_to_ids(BOI), tokenizer.convert_tokens_to_ids(EOI)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def render(self, text: str, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids ``(n,)`` and level ids ``(n, L)`` of ``text`` with its placeholders filled by ``image`` ``(N, L)``."""
        ids, levels = [], []
        for i, part in enumerate(text.split(PLACEHOLDER)):
            if i:
                ids += [torch.tensor([self.boi]), torch.full((len(image),), self.pad), torch.tensor([self.eoi])]
                levels += [self._no_levels(1), image, self._no_levels(1)]
            words = torch.tensor(self.tokenizer(part, add_special_tokens=False)["input_ids"], dtype=torch.long)
            ids.append(words)
            levels.append(self._no_levels(len(words)))
        return torch.cat(ids), torch.cat(levels)

    def sample(self, example: Example, image: torch.Tensor) -> dict:
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        prompt, prompt_levels = self.render(example.prompt, image)
        target, target_levels = self.render(example.target, image)
        eos = torch.tensor([self.tokenizer.eos_token_id])
        input_ids = torch.cat([torch.tensor(bos, dtype=torch.long), prompt, target, eos])
        level_ids = torch.cat([self._no_levels(len(bos)), prompt_levels, target_levels, self._no_levels(1)])
        labels = input_ids.clone()
        labels[: len(bos) + len(prompt)] = IGNORE_INDEX
        return {"input_ids": input_ids, "level_ids": level_ids, "labels": labels}

    def collate(self, samples: list[dict]) -> dict:
        """Right-pad to the longest sample."""
        pads = {"input_ids": self.pad, "level_ids": -1, "labels": IGNORE_INDEX}
        batch = {k: nn.utils.rnn.pad_sequence([s[k] for s in samples], batch_first=True, padding_value=v)
                 for k, v in pads.items()}
        lengths = torch.tensor([len(s["input_ids"]) for s in samples])
        batch["attention_mask"] = (torch.arange(batch["input_ids"].shape[1]) < lengths[:, None]).long()
        return batch

    def _no_levels(self, n: int) -> torch.Tensor:
        return torch.full((n, self.num_levels), -1, dtype=torch.long)


