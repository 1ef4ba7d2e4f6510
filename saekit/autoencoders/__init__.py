"""Every autoencoder family behind one interface (base.py), each with its config beside its model:
the SAE family (sae.py: relu_l1, topk, batchtopk, jumprelu, matryoshka, gated; the TopK fast path in kernels.py and
triton_kernels.py), transcoders (transcoder.py: transcoder, skip_transcoder; they predict an MLP's output from
its input), the classical family (classical.py: linear, nonlinear, denoising, contractive;
pca.py) and RBMs (rbm.py). Importing this package registers them all in ``REGISTRY``
(kind -> (model class, config class)).

Imports nothing of lm/, data/ or training/: a saved model loads and runs with this package alone.
"""
from saekit.autoencoders.base import (REGISTRY, Autoencoder, AutoencoderConfig, Output, build,  # noqa: F401
                                      registry)
from saekit.autoencoders.kernels import KernelOptions  # noqa: F401
from saekit.autoencoders.classical import (ContractiveConfig, DenoisingConfig, LinearConfig,  # noqa: F401,E402
                                           NonlinearConfig)
from saekit.autoencoders.pca import PCAConfig  # noqa: F401,E402
from saekit.autoencoders.rbm import RBMConfig  # noqa: F401,E402
from saekit.autoencoders.relu_l1 import ReLUConfig  # noqa: F401,E402
from saekit.autoencoders.topk import TopKConfig  # noqa: F401,E402
from saekit.autoencoders.batchtopk import BatchTopKConfig  # noqa: F401,E402
from saekit.autoencoders.jumprelu import JumpReLUConfig  # noqa: F401,E402
from saekit.autoencoders.matryoshka import MatryoshkaConfig  # noqa: F401,E402
from saekit.autoencoders.gated import GatedConfig  # noqa: F401,E402
from saekit.autoencoders.transcoder import SkipTranscoderConfig, TranscoderConfig  # noqa: F401,E402
