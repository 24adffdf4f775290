"""sealdiff: build, detect, remove and measure backdoors in diffusion models."""

__version__ = "0.1.0"
