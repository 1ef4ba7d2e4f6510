"""saekit: find the features a transformer computes with sparse autoencoders."""
__version__ = "0.1.0"
