"""SSD detector with an EfficientNet backbone and FPN/BiFPN necks (seed 001 of the studies)."""
