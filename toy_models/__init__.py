"""Toy `PreTrainedModel`s built only for this suite, registered with the Auto classes on import.

Every process that loads a toy checkpoint (ranks, the reference) imports
this package first; the checkpoint's config names the model type.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from toy_models.decoder import ToyDecoderConfig, ToyForCausalLM

AutoConfig.register(ToyDecoderConfig.model_type, ToyDecoderConfig, exist_ok=True)
AutoModelForCausalLM.register(ToyDecoderConfig, ToyForCausalLM, exist_ok=True)

__all__ = ["ToyDecoderConfig", "ToyForCausalLM"]
