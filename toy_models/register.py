"""Registers the toy decoder with the Auto classes: the module every toy case names in `Case.imports`.

Every process that loads a toy checkpoint (ranks, the reference) imports it
before anything else; the checkpoint's config names the model type.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from toy_models.config import ToyDecoderConfig
from toy_models.decoder import ToyForCausalLM

AutoConfig.register(ToyDecoderConfig.model_type, ToyDecoderConfig, exist_ok=True)
AutoModelForCausalLM.register(ToyDecoderConfig, ToyForCausalLM, exist_ok=True)
