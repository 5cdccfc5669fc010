"""Prompts -> images: what the sampling CLI, the evaluation harness and the online FID callback call
for a generator, whatever its paradigm. A pipeline holds the net, the image tokenizer that decodes
its output and the sampling settings the training run chose (overridable per call).

Each generator's paradigm (``unifuse.paradigms``) names its pipeline class; the discrete-token
generators (AR GPT, MaskGIT) share :class:`TokenImagePipeline`.
"""

from unifuse.pipelines.base import Pipeline
from unifuse.pipelines.latent import LatentDiffusionPipeline
from unifuse.pipelines.tokens import TokenImagePipeline
from unifuse.pipelines.transfusion import TransfusionPipeline

__all__ = ["LatentDiffusionPipeline", "Pipeline", "TokenImagePipeline", "TransfusionPipeline"]
