"""sentence-transformers' modules around the transformer: Pooling (with its fused mean kernel), Dense,
LayerNorm, Normalize and WeightedLayerPooling."""
