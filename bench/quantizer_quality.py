"""Quantizer quality at equal bits per image: the same tiny conv autoencoder trained with each quantizer.

    python bench/quantizer_quality.py [--steps 300] [--batch-size 32] [--json out.json] [--markdown out.md]

Model: :class:`~tokenizer_bridge.VisualTokenizer` with a tiny conv encoder/decoder (32 px images, downsample 8 ->
4x4 ids), only the quantizer changes. Every variant spends 10 bits per id (160 bits per 32 px image):
- ``vq``: K=1024; ``ibq``: K=1024; ``fsq``: levels [8, 5, 5, 5] (1000 codes, 9.97 bits); ``lfq``: 10 bits;
  ``rvq``: residual VQ, 2 levels x 32 codes.
- ours (``tokenizer_bridge.quantizers``) and the peer's equivalent where vector-quantize-pytorch has one
  (``VectorQuantize``, ``FSQ``, ``LFQ``, ``ResidualVQ``; it has no IBQ), plugged into the same autoencoder through
  :class:`PeerAdapter`, which returns our ``QuantizerOutput`` fields. Each library's quantizer runs with its own
  defaults unless ``VARIANTS`` says otherwise (see the notes column).

Data: the tokenizer stage's training mixture (``mllm.training.stages.tokenizer.tokenizer_training_pixels``: shapes renders + photo crops,
32 px). Held-out: the held-out photos center-resized to 64 px (8x8 ids), random 32 px crops of the held-out photos, and
renders of the held-out shapes combinations. Same seed, same init of the conv parts, same batches for every variant.

Reported: PSNR (dB, mean over images) on each held-out set; over all held-out ids together, codebook utilisation
(fraction of the ``2^10``-ish code space used; residual ids are combined as ``id0 + 32 * id1``) and perplexity
(``exp`` of the entropy of the id histogram).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time

import torch
from torch import nn

from mllm.data import photos, shapes
from mllm.training.recipe import DataRecipe, Recipe
from mllm.training.stages.tokenizer import tokenizer_training_pixels
from tokenizer_bridge import VisualTokenizer, VisualTokenizerConfig
from tokenizer_bridge.image_processing_visual_tokenizer import to_pixel_values
from tokenizer_bridge.metrics import psnr
from tokenizer_bridge.quantizers import QuantizerOutput, usage_metrics

BITS = 10
ARCH = dict(image_size=32, base_channels=32, latent_dim=16, downsample=8, num_res_blocks=1,
            reconstruction_loss="l1+l2")

# name -> (impl, what to build, notes). Ours are VisualTokenizerConfig keyword arguments; the peer's are constructor
# keyword arguments of its class (dim is filled in).
VARIANTS: dict[str, dict] = {
    "vq/ours": dict(impl="ours", config=dict(quantizer="vq", codebook_size=1 << BITS),
                    notes="learned codebook, k-means init, commitment 0.25, dead-code restart below 0.04 of an even "
                          "share (defaults)"),
    "vq/peer": dict(impl="peer", cls="VectorQuantize", kwargs=dict(codebook_size=1 << BITS),
                    notes="EMA decay 0.8, rotation trick, commitment 1 (defaults)"),
    "ibq/ours": dict(impl="ours", config=dict(quantizer="ibq", codebook_size=1 << BITS),
                     notes="entropy regulariser 0.05 (defaults)"),
    "fsq/ours": dict(impl="ours", config=dict(quantizer="fsq", quantizer_options=dict(levels=[8, 5, 5, 5])),
                     peer_projection_init="FSQ",
                     notes="levels [8,5,5,5], projections 16->4->16 (initial weights = the peer's)"),
    "fsq/peer": dict(impl="peer", cls="FSQ", kwargs=dict(levels=[8, 5, 5, 5]),
                     notes="levels [8,5,5,5], projections 16->4->16"),
    "lfq/ours": dict(impl="ours", config=dict(quantizer="lfq", quantizer_options=dict(bits=BITS)),
                     peer_projection_init="LFQ",
                     notes="entropy 0.1, commitment 0.25 (defaults; initial projections = the peer's)"),
    "lfq/peer": dict(impl="peer", cls="LFQ", kwargs=dict(codebook_size=1 << BITS),
                     notes="entropy 0.1, commitment 0 (defaults)"),
    "rvq/ours": dict(impl="ours", config=dict(quantizer="vq", codebook_size=32, residual_levels=2),
                     notes="2 levels x 32 codes, learned, k-means init, dead-code restart 0.04 (defaults)"),
    "rvq/peer": dict(impl="peer", cls="ResidualVQ", kwargs=dict(codebook_size=32, num_quantizers=2),
                     notes="2 levels x 32 codes, EMA decay 0.8 (defaults)"),
}
DEFAULT_VARIANTS = list(VARIANTS)
# Investigation variants (not run by default: --variants NAME,...): the former defaults and the alternatives tried.
VARIANTS.update({
    "ibq/ours-noentropy": dict(impl="ours", config=dict(quantizer="ibq", codebook_size=1 << BITS,
                                                        quantizer_options=dict(entropy_weight=0.0)),
                               notes="no entropy regulariser (the former default)"),
    "vq/ours-norestart": dict(impl="ours", config=dict(quantizer="vq", codebook_size=1 << BITS, dead_code_threshold=0.0),
                              notes="learned, k-means init, no dead-code restart (the former default)"),
    "vq/ours-ema": dict(impl="ours", config=dict(quantizer="vq", codebook_size=1 << BITS, codebook_update="ema",
                                                 ema_decay=0.95),
                        notes="EMA 0.95 + dead-code restart 0.04"),
    "fsq/ours-owninit": dict(impl="ours", config=dict(quantizer="fsq", quantizer_options=dict(levels=[8, 5, 5, 5])),
                             notes="as fsq/ours, projections from our own random draw"),
    "lfq/ours-owninit": dict(impl="ours", config=dict(quantizer="lfq", quantizer_options=dict(bits=BITS)),
                             notes="as lfq/ours, projections from our own random draw"),
    "lfq/ours-nocommit": dict(impl="ours", config=dict(quantizer="lfq", quantizer_options=dict(bits=BITS,
                                                                                                commitment_weight=0.0)),
                              peer_projection_init="LFQ", notes="entropy 0.1, commitment 0 (the peer's defaults)"),
    "rvq/ours-norestart": dict(impl="ours", config=dict(quantizer="vq", codebook_size=32, residual_levels=2,
                                                        dead_code_threshold=0.0),
                               notes="2 levels x 32 codes, learned, no restart (the former default)"),
    "rvq/ours-ema": dict(impl="ours", config=dict(quantizer="vq", codebook_size=32, residual_levels=2,
                                                  codebook_update="ema", ema_decay=0.95),
                         notes="2 levels x 32 codes, EMA 0.95 + restart 0.04"),
})


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--num-train", type=int, default=4096)
    p.add_argument("--heldout-crops", type=int, default=256)
    p.add_argument("--heldout-shapes-per-spec", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds; metrics are averaged over them")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated names from VARIANTS")
    p.add_argument("--override", action="append", default=[],
                   help="NAME=JSON: extra keyword arguments for a variant (config for ours, constructor for the peer)")
    p.add_argument("--merge", help="saved rows (JSON) to update: variants measured now replace their saved rows, the "
                                  "others are kept (e.g. re-measure ours after a change, keep the peer's rows)")
    p.add_argument("--json", help="write the result rows here")
    p.add_argument("--markdown", help="write the Markdown table here")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------- peer adapter
class PeerAdapter(nn.Module):
    """A vector-quantize-pytorch quantizer behind our quantizer interface: ``(B, D, h, w)`` latents in,
    :class:`QuantizerOutput` (``quantized``, ``image_ids`` ``(B, h, w)`` or ``(B, h, w, L)``, ``loss``, ``metrics``)
    out."""

    def __init__(self, peer: nn.Module, kind: str, dim: int, codebook_size: int, num_levels: int = 1):
        super().__init__()
        self.peer, self.kind = peer, kind
        self.dim, self.codebook_size, self.num_levels = dim, codebook_size, num_levels

    def forward(self, latents: torch.Tensor) -> QuantizerOutput:
        b, d, h, w = latents.shape
        x = latents.permute(0, 2, 3, 1).reshape(b, h * w, d)  # (B, N, D)
        out = self.peer(x)
        if self.kind == "FSQ":
            quantized, ids = out
            loss = x.new_zeros(())
        else:
            quantized, ids, loss = out[0], out[1], out[2]
            loss = loss.sum() if torch.is_tensor(loss) else x.new_tensor(float(loss))
        quantized = quantized.reshape(b, h, w, d).permute(0, 3, 1, 2)
        ids = ids.long().reshape(b, h, w, *([self.num_levels] if self.num_levels > 1 else []))
        flat = ids.reshape(-1, self.num_levels)
        metrics = usage_metrics(flat[:, 0], self.codebook_size)
        return QuantizerOutput(quantized=quantized, image_ids=ids, loss=loss, metrics=metrics)


def reference_model(seed: int) -> VisualTokenizer:
    """The conv encoder/decoder every variant starts from (for a seed)."""
    torch.manual_seed(seed)
    return VisualTokenizer(VisualTokenizerConfig(**ARCH, quantizer="vq", codebook_size=1 << BITS, kmeans_init=False))


def build_model(name: str, overrides: dict, seed: int) -> VisualTokenizer:
    """Variant ``name`` with the encoder and decoder weights of :func:`reference_model` (identical for all variants)."""
    spec = VARIANTS[name]
    reference = reference_model(seed)
    if spec["impl"] == "ours":
        torch.manual_seed(seed + 1)
        model = VisualTokenizer(VisualTokenizerConfig(**ARCH, **{**spec["config"], **overrides}))
        model.encoder.load_state_dict(reference.encoder.state_dict())
        model.decoder.load_state_dict(reference.decoder.state_dict())
        if spec.get("peer_projection_init"):  # same projection weights as the peer variant of the same seed
            peer = build_model(f"{name.split('/')[0]}/peer", {}, seed).quantizer.peer
            for ours_proj, name_ in ((model.quantizer.project_in, "project_in"), (model.quantizer.project_out, "project_out")):
                theirs = getattr(peer, name_)
                ours_proj.load_state_dict(theirs.state_dict())
        return model
    import vector_quantize_pytorch as vqp

    model = reference
    torch.manual_seed(seed + 1)
    kwargs = {**spec["kwargs"], **overrides}
    cls = getattr(vqp, spec["cls"])
    peer = cls(dim=ARCH["latent_dim"], **kwargs)
    if spec["cls"] == "FSQ":
        size = math.prod(kwargs["levels"])
    else:
        size = kwargs["codebook_size"]
    model.quantizer = PeerAdapter(peer, spec["cls"], ARCH["latent_dim"], size, kwargs.get("num_quantizers", 1))
    return model


# ---------------------------------------------------------------------------------------------------- data
def datasets(args) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    recipe = Recipe(stage="tokenizer", output_dir=tempfile.gettempdir(),
                    data=DataRecipe(image_size=32, num_train=args.num_train, seed=0))
    train = tokenizer_training_pixels(recipe)
    _, heldout_names = photos.photo_splits()
    split = shapes.make_splits(seed=0)
    heldout_shapes = shapes.ShapesDataset(split.heldout, size=32, seed=1,
                                          samples_per_spec=args.heldout_shapes_per_spec)
    heldout = {
        "photos64": to_pixel_values([photos.center_resize(n, 64) for n in heldout_names]),
        "photo_crops32": to_pixel_values(photos.random_crops(heldout_names, 32, args.heldout_crops,
                                                              seed=1, scale=(0.1, 0.6))),
        "shapes32": to_pixel_values([heldout_shapes[i]["image"] for i in range(len(heldout_shapes))]),
    }
    return train, heldout


# ---------------------------------------------------------------------------------------------------- train / eval
def train(model: VisualTokenizer, pixels: torch.Tensor, args, seed: int) -> dict:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start, last = time.perf_counter(), {}
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
        idx = torch.randint(0, len(pixels), (args.batch_size,), generator=gen)
        out = model(pixels[idx])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        last = {"train_psnr": out.metrics["psnr"], "train_loss": float(out.loss.detach())}
    return {**last, "train_seconds": time.perf_counter() - start}


def joint_ids(ids: torch.Tensor, num_levels: int, level_size: int) -> torch.Tensor:
    """Ids ``(..., L)`` of a residual quantizer -> one id per position in ``[0, level_size ** L)``."""
    if num_levels == 1:
        return ids.reshape(-1)
    flat = ids.reshape(-1, num_levels)
    out = torch.zeros(flat.shape[0], dtype=torch.long)
    for level in reversed(range(num_levels)):
        out = out * level_size + flat[:, level]
    return out


@torch.no_grad()
def evaluate(model: VisualTokenizer, heldout: dict[str, torch.Tensor]) -> dict:
    model.eval()
    levels = getattr(model.quantizer, "num_levels", 1)
    size = model.quantizer.codebook_size
    result, all_ids = {}, []
    for name, pixels in heldout.items():
        scores = []
        for i in range(0, len(pixels), 64):
            batch = pixels[i : i + 64]
            latents = model.encode_latents(batch)
            q = model.quantizer(latents)
            reconstruction = model.decoder(q.quantized)
            scores.append(psnr(reconstruction.clamp(-1, 1), batch))
            all_ids.append(joint_ids(q.image_ids, levels, size))
        result[f"psnr_{name}"] = float(torch.cat(scores).mean())
    total = size**levels
    stats = usage_metrics(torch.cat(all_ids), total)
    result.update(codebook_usage=stats["codebook_usage"], perplexity=stats["perplexity"], code_space=total,
                  heldout_ids=int(sum(i.numel() for i in all_ids)))
    return result


METRICS = ("psnr_photos64", "psnr_photo_crops32", "psnr_shapes32", "codebook_usage", "perplexity", "train_psnr",
           "train_seconds")


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    overrides = {}
    for item in args.override:
        name, _, value = item.partition("=")
        overrides[name] = json.loads(value)
    seeds = [int(x) for x in args.seeds.split(",") if x]
    train_pixels, heldout = datasets(args)
    rows = []
    for name in [n for n in args.variants.split(",") if n]:
        spec = VARIANTS[name]
        row = dict(variant=name, quantizer=name.split("/")[0], impl=spec["impl"],
                   notes=spec["notes"] + (f"; overrides {overrides[name]}" if name in overrides else ""),
                   steps=args.steps, batch_size=args.batch_size, seeds=seeds, error=None)
        per_seed = []
        for seed in seeds:
            try:
                model = build_model(name, overrides.get(name, {}), seed)
            except ImportError:
                row["error"] = "peer not installed"
                break
            result = train(model, train_pixels, args, seed)
            result.update(evaluate(model, heldout))
            per_seed.append(result)
            print(f"  {name:<9} seed {seed}: photos64 {result['psnr_photos64']:.2f} dB  crops "
                  f"{result['psnr_photo_crops32']:.2f} dB  shapes {result['psnr_shapes32']:.2f} dB  usage "
                  f"{result['codebook_usage']:.3f}  ppl {result['perplexity']:.0f}  ({result['train_seconds']:.0f} s)",
                  file=sys.stderr, flush=True)
        if per_seed:
            for key in METRICS:
                values = [r[key] for r in per_seed]
                row[key] = sum(values) / len(values)
                row[key + "_per_seed"] = values
            row.update(code_space=per_seed[0]["code_space"], heldout_ids=per_seed[0]["heldout_ids"])
        rows.append(row)
    return rows


def _cell(row: dict, key: str, spec: str) -> str:
    """Mean over seeds, with the per-seed values when there are several."""
    values = row[key + "_per_seed"]
    mean = format(row[key], spec)
    return mean if len(values) == 1 else f"{mean} ({' / '.join(format(v, spec) for v in values)})"


def table(rows: list[dict]) -> list[str]:
    lines = ["| variant | PSNR photos 64px | PSNR photo crops 32px | PSNR shapes 32px | usage | perplexity | "
             "code space | train s | settings |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['variant']} | - | - | - | - | - | - | - | {r['error']} |")
            continue
        lines.append(f"| {r['variant']} | {_cell(r, 'psnr_photos64', '.2f')} | {_cell(r, 'psnr_photo_crops32', '.2f')} | "
                     f"{_cell(r, 'psnr_shapes32', '.2f')} | {_cell(r, 'codebook_usage', '.3f')} | "
                     f"{_cell(r, 'perplexity', '.0f')} | {r['code_space']} | {r['train_seconds']:.0f} | {r['notes']} |")
    return lines


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = run(args)
    if args.merge:
        with open(args.merge) as f:
            saved = json.load(f)
        fresh = {r["variant"]: r for r in rows}
        rows = [fresh.pop(r["variant"], r) for r in saved] + list(fresh.values())
    lines = table(rows)
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("# Quantizer quality at equal bits (10 bits per id, 4x4 ids per 32 px image)\n\n")
            f.write(f"Same tiny conv autoencoder ({ARCH}), {args.steps} steps, batch {args.batch_size}, AdamW lr "
                    f"{args.lr}, seeds {args.seeds} (mean, then per-seed values). Produced by "
                    "`python bench/quantizer_quality.py`.\n\n")
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
