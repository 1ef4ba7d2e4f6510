"""Every autoencoder family behind one interface (see base.py). Importing this registers them all."""
from saekit.autoencoders.base import REGISTRY, Autoencoder, Output, build  # noqa: F401
