"""Layer 3, the learnable parts of LocDiff, each usable alone:

- ``shdd``: locations <-> unit-scale SHDD vectors (encoder / mode-seeking decoder modules);
- ``unet``: CS-UNet, the conditional SIREN U-Net denoiser;
- ``diffusion``: noise schedules, DDIM/DDPM samplers, SHDD-KL and MSE losses (diffusers style:
  schedulers apart from the model);
- ``retrieval``: the gallery of a retrieval-conditioned LocDiff-R and what the denoiser sees of it, and
  the kNN density baseline built from the same neighbour mixture;
- ``metric``: a query map for that gallery's search, fitted on the gallery's own rows (``retrieval_metric``);
- ``aggregate``: diffusion samples -> modes, scores and probability maps.
Imports ``checks``, ``kernels`` and ``data`` only.
"""

from .aggregate import AGGREGATES, SampleAggregator
from .diffusion import PREDICTIONS, DDIMSampler, DDPMSampler, DPMSolverSampler, NoiseSchedule, SHDDKLLoss, mse_loss
from .metric import QueryMap, fit_query_map
from .retrieval import Gallery, KNNDensity, neighbour_features, sample_holdout
from .shdd import SHDDDecoder, SHDDEncoder, degree_weights
from .unet import CSUNet, CSUNetConfig

__all__ = ["SHDDEncoder", "SHDDDecoder", "degree_weights", "CSUNet", "CSUNetConfig", "NoiseSchedule", "DDIMSampler",
           "DDPMSampler", "DPMSolverSampler", "SHDDKLLoss", "mse_loss", "PREDICTIONS", "Gallery", "KNNDensity", "neighbour_features", "sample_holdout",
           "SampleAggregator", "AGGREGATES", "QueryMap", "fit_query_map"]
