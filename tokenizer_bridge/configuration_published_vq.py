"""Configuration of the published research tokenizers that ship as raw checkpoints: IBQ and Open-MAGVIT2
(TencentARC/SEED-Voken) and LlamaGen's VQ (FoundationVision/LlamaGen); see :mod:`.modeling_published_vq`.

:class:`PublishedVQConfig` holds the original's own architecture fields under their original names (``ch``,
``ch_mult``, ``num_res_blocks``, ``attn_resolutions``, ``resolution``, ``z_channels``, ``embed_dim``, the codebook
size ``n_embed`` as ``codebook_size``) plus a ``family``. :meth:`PublishedVQConfig.from_preset` builds each published
checkpoint's configuration (from the original's YAML configs and model code). Parameter counts of the model each
preset builds (``tests/tokenizer_bridge/test_published_vq.py`` counts them on the meta device; each equals the count
of the original modules built from the same configuration), beside the figures the authors publish, rounded, in
their READMEs (SEED-Voken's text-conditional comparison table; LlamaGen's tokenizer table):

================================  ===========  ======  =========  ==============================================
preset                            parameters   grid    published  checkpoint / original config
================================  ===========  ======  =========  ==============================================
``ibq-1024``                      107,049,859  16x16   --         IBQ ``imagenet_ibqgan_1024.yaml``
``ibq-8192``                      108,884,867  16x16   --         IBQ ``imagenet_ibqgan_8192.yaml``
``ibq-16384``                     110,982,019  16x16   --         IBQ ``imagenet_ibqgan_16384.yaml``
``ibq-262144``                    173,896,579  16x16   --         IBQ ``imagenet_ibqgan_262144.yaml``
``ibq-pretrain-16384``            110,982,019  16x16   200M       ``IBQ_pretrain_16384.ckpt``
``ibq-pretrain-262144``           173,896,579  16x16   200M       ``IBQ_pretrain_262144.ckpt``
``open-magvit2-128-L``            112,021,653  16x16*  --         ``imagenet_lfqgan_128_L.yaml`` (ds8)
``open-magvit2-256-L``            115,127,829  16x16   --         ``imagenet_lfqgan_256_L.yaml``
``open-magvit2-pretrain-16384``   115,094,033  16x16   100M       ``pretrain256_16384.ckpt``
``open-magvit2-pretrain-262144``  115,127,829  16x16   100M       ``pretrain256_262144.ckpt``
``llamagen-ds8``                   70,109,835  32x32   70M        ``vq_ds8_c2i.pt``
``llamagen-ds16``                  71,883,403  16x16   72M        ``vq_ds16_c2i.pt``, ``vq_ds16_t2i.pt``
================================  ===========  ======  =========  ==============================================

Grids are for 256 px images (* the 128-L model downsamples by 8: 16x16 at 128 px). The IBQ pretrain figure (200M)
is the README's rounding; the code of that config builds the count above (the codebook alone is ``K x 256``).
"""

from __future__ import annotations

from typing import Optional, Sequence

from transformers import PreTrainedConfig

FAMILIES = ("ibq", "llamagen", "open_magvit2")
ARCHITECTURE_FIELDS = ("family", "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution", "z_channels",
                       "embed_dim", "codebook_size", "in_channels", "out_ch", "l2_normalize", "codebook_l2_norm",
                       "codebook_show_usage")

_IBQ = dict(family="ibq", ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=4, attn_resolutions=[16], resolution=256,
            z_channels=256, embed_dim=256)
_MAGVIT = dict(family="open_magvit2", ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=4, resolution=128,
               z_channels=18, embed_dim=18, codebook_size=2**18, factorized_bits=[6, 12])
_LLAMAGEN = dict(family="llamagen", ch=128, num_res_blocks=2, z_channels=256, embed_dim=8, codebook_size=16384,
                 codebook_l2_norm=True, codebook_show_usage=True)
PRESETS = {
    **{f"ibq-{k}": dict(_IBQ, codebook_size=k) for k in (1024, 8192, 16384, 262144)},
    **{f"ibq-pretrain-{k}": dict(_IBQ, codebook_size=k) for k in (16384, 262144)},
    "open-magvit2-128-L": dict(_MAGVIT, ch_mult=[1, 2, 2, 4]),
    "open-magvit2-256-L": dict(_MAGVIT),
    "open-magvit2-pretrain-16384": dict(_MAGVIT, z_channels=14, embed_dim=14, codebook_size=2**14,
                                        factorized_bits=None),
    "open-magvit2-pretrain-262144": dict(_MAGVIT),
    "llamagen-ds8": dict(_LLAMAGEN, ch_mult=[1, 2, 2, 4]),
    "llamagen-ds16": dict(_LLAMAGEN, ch_mult=[1, 1, 2, 2, 4]),
}


class PublishedVQConfig(PreTrainedConfig):
    """Args (the original's names):
    family: ``"ibq"``, ``"llamagen"`` or ``"open_magvit2"``.
    ch, ch_mult, num_res_blocks: base width, per-level width multipliers (``downsample = 2 ** (len(ch_mult) - 1)``)
        and residual blocks per level (the decoders have one more per level for IBQ and LlamaGen).
    attn_resolutions, resolution: IBQ only: self-attention at the levels whose side (counted from ``resolution``)
        is listed; LlamaGen attends at its deepest level, Open-MAGVIT2 nowhere.
    z_channels, embed_dim: encoder output channels and code dimension (``quant_conv`` maps one to the other; for
        Open-MAGVIT2 both equal ``log2(codebook_size)``, one bit per channel).
    codebook_size: the original's ``n_embed`` / ``codebook_size``.
    l2_normalize: IBQ's config flag, recorded as given. SEED-Voken's ``IBQ`` class passes it only to the plain
        VQ quantizer that its index-propagation quantizer replaces, so it changes nothing, here as there.
    codebook_l2_norm: LlamaGen: ids by cosine similarity, codes l2-normalised when decoded.
    codebook_show_usage: LlamaGen: the checkpoint holds the 65536-entry ``quantize.codebook_used`` buffer.
    factorized_bits: Open-MAGVIT2: the bit split its AR models predict (``[6, 12]``: 6 low bits, then 12), the
        ``factors`` of a factorized image vocabulary (:attr:`factors`); None: not factorized.
    """

    model_type = "published_vq_tokenizer"

    def __init__(self, family: str = "ibq", ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 4, attn_resolutions: Sequence[int] = (16,), resolution: int = 256,
                 z_channels: int = 256, embed_dim: int = 256, codebook_size: int = 16384, in_channels: int = 3,
                 out_ch: int = 3, dropout: float = 0.0, l2_normalize: bool = False, codebook_l2_norm: bool = True,
                 codebook_show_usage: bool = True, factorized_bits: Optional[Sequence[int]] = None, **kwargs):
        for derived in ("downsample",):
            kwargs.pop(derived, None)
        self.family, self.ch, self.ch_mult = family, int(ch), [int(m) for m in ch_mult]
        self.num_res_blocks, self.attn_resolutions = int(num_res_blocks), [int(r) for r in attn_resolutions]
        self.resolution, self.z_channels, self.embed_dim = int(resolution), int(z_channels), int(embed_dim)
        self.codebook_size, self.in_channels, self.out_ch = int(codebook_size), int(in_channels), int(out_ch)
        self.dropout, self.l2_normalize = float(dropout), bool(l2_normalize)
        self.codebook_l2_norm, self.codebook_show_usage = bool(codebook_l2_norm), bool(codebook_show_usage)
        self.factorized_bits = None if factorized_bits is None else [int(b) for b in factorized_bits]
        self.downsample = 2 ** (len(self.ch_mult) - 1)
        self._check()
        super().__init__(**kwargs)

    def _check(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {list(FAMILIES)}, got {self.family!r}")
        if self.family == "open_magvit2":
            if self.codebook_size != 2**self.z_channels or self.embed_dim != self.z_channels:
                raise ValueError(f"open_magvit2: codebook_size must be 2**z_channels and embed_dim == z_channels "
                                 f"(one bit per channel), got codebook_size={self.codebook_size}, "
                                 f"z_channels={self.z_channels}, embed_dim={self.embed_dim}")
            if self.factorized_bits is not None and sum(self.factorized_bits) != self.z_channels:
                raise ValueError(f"factorized_bits {self.factorized_bits} must add up to z_channels={self.z_channels}")
        if self.family == "llamagen" and self.codebook_show_usage and self.codebook_size > 65536:
            raise ValueError("llamagen: codebook_show_usage keeps a 65536-entry usage buffer; codebook_size > 65536")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "PublishedVQConfig":
        """The configuration of a published checkpoint (:data:`PRESETS`), e.g. ``"ibq-16384"``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def factors(self) -> Optional[list[int]]:
        """Radices of the factorized image vocabulary (``[2**6, 2**12]`` for ``factorized_bits=[6, 12]``): sub-token
        0 holds the low bits, exactly as :class:`~tokenizer_bridge.ImageLayout` orders ``factors``."""
        return None if self.factorized_bits is None else [2**b for b in self.factorized_bits]

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Id-map size for an image of ``height x width`` pixels."""
        if height % self.downsample or width % self.downsample:
            raise ValueError(f"image size {height}x{width} is not a multiple of downsample={self.downsample}")
        return height // self.downsample, width // self.downsample
