"""Network parts of the visual tokenizers: conv and ViT encoders/decoders, slot attention, the diffusion decoder,
foundation-model encoders and the perceptual/Gram losses."""
