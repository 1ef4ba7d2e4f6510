"""Every autoencoder family behind one interface (see base.py). Importing this registers them all."""
from saekit.autoencoders.base import REGISTRY, Autoencoder, Output, build  # noqa: F401
from saekit.autoencoders import classical  # noqa: F401,E402
from saekit.autoencoders import pca  # noqa: F401,E402
from saekit.autoencoders import rbm  # noqa: F401,E402
from saekit.autoencoders import relu_l1  # noqa: F401,E402
from saekit.autoencoders import topk  # noqa: F401,E402
from saekit.autoencoders import batchtopk  # noqa: F401,E402
from saekit.autoencoders import jumprelu  # noqa: F401,E402
