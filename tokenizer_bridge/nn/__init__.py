"""Network parts of the visual tokenizers: conv and ViT encoders/decoders, slot attention, the diffusion decoder,
foundation-model encoders, the perceptual/Gram losses, and the discriminators and adversarial loss of GAN training.

The dicts below are the one place where a config's architecture name becomes a class; the configs validate names
against their keys and the models build from their values.
"""

from .conv import ConvDecoder, ConvEncoder
from .diffusion import DiffusionDecoder
from .discriminator import DISCRIMINATORS
from .foundation import FoundationEncoder
from .slots import BroadcastDecoder
from .vit import ViTDecoder, ViTEncoder

# VisualTokenizerConfig.encoder / .decoder
ENCODERS = {"conv": ConvEncoder, "vit": ViTEncoder, "foundation": FoundationEncoder}
DECODERS = {"conv": ConvDecoder, "vit": ViTDecoder, "diffusion": DiffusionDecoder}
# SlotTokenizerConfig.backbone / .decoder
BACKBONES = {"conv": ConvEncoder}
SLOT_DECODERS = {"diffusion": DiffusionDecoder, "broadcast": BroadcastDecoder}

# the recipe's adversarial.discriminator.type: DISCRIMINATORS (imported from .discriminator)

__all__ = ["BACKBONES", "DECODERS", "DISCRIMINATORS", "ENCODERS", "SLOT_DECODERS"]
