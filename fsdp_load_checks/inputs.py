"""What a model is fed, by its class: the same inputs on every rank and in the reference process.

Every model gets (BATCH, SEQ) token ids; an encoder-decoder (T5, BART) the
same ids as `decoder_input_ids`; a vision-language model of a family listed
in `IMAGE_FAMILIES` also one image per sequence, built from its config, with
the image tokens its language model expects written over the first positions
of each sequence (what its processor would produce for `<image> text`). A
vision-language model of another family gets text only: its language model
and projector path, not the vision tower.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

IMAGE_SEED = 0  # the image's pixels: uniform [0, 1) from this seed, the same in every process


def _image(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(IMAGE_SEED))


def _image_token(config) -> int:
    token = getattr(config, "image_token_id", None)
    return config.image_token_index if token is None else token


# model_type -> config -> (the pixel inputs for one image per sequence of a (batch, seq) batch, the image's tokens)
# Each follows the family's image processor and its model's feature count (transformers 5.x modeling_*.py).
def _llava(config, batch: int):
    # CLIP tower, vision_feature_select_strategy "default": the CLS feature dropped, one token per patch
    size, patch = config.vision_config.image_size, config.vision_config.patch_size
    return {"pixel_values": _image((batch, 3, size, size))}, (size // patch) ** 2


def _gemma3(config, batch: int):
    # SigLIP tower average-pooled to mm_tokens_per_image; token_type_ids mark the image (bidirectional attention)
    size = config.vision_config.image_size
    return {"pixel_values": _image((batch, 3, size, size))}, config.mm_tokens_per_image


def _idefics3(config, batch: int):
    # (batch, images, 3, H, W); the connector's pixel shuffle merges scale_factor**2 patches into one token
    size, patch = config.vision_config.image_size, config.vision_config.patch_size
    return {"pixel_values": _image((batch, 1, 3, size, size))}, (size // patch) ** 2 // config.scale_factor**2


def _mistral3(config, batch: int):
    # Pixtral takes each image's size; the patch merger merges spatial_merge_size**2 patches into one token
    size, patch = config.vision_config.image_size, config.vision_config.patch_size
    inputs = {"pixel_values": _image((batch, 3, size, size)), "image_sizes": torch.tensor([[size, size]] * batch)}
    return inputs, ((size // patch) // config.spatial_merge_size) ** 2


QWEN2_VL_IMAGE = 28  # pixels a side: a 2 x 2 grid of 14-pixel patches, one token after the 2 x 2 merge


def _qwen2_vl(config, batch: int):
    # flattened patches (t*h*w per image, 3 * temporal_patch_size * patch**2) and each image's (t, h, w) grid
    vision = config.vision_config
    side = QWEN2_VL_IMAGE // vision.patch_size
    patch_values = 3 * vision.temporal_patch_size * vision.patch_size**2
    inputs = {"pixel_values": _image((batch * side * side, patch_values)),
              "image_grid_thw": torch.tensor([[1, side, side]] * batch)}
    return inputs, side * side // vision.spatial_merge_size**2


IMAGE_FAMILIES: dict[str, Callable] = {
    "llava": _llava, "gemma3": _gemma3, "idefics3": _idefics3, "mistral3": _mistral3, "qwen2_vl": _qwen2_vl,
}


def model_inputs(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The forward's keyword inputs for (batch, seq) token ids, by the model's class (module docstring).

    Floating pixel inputs take the dtype of the model's first floating
    parameter (a mixed-precision policy casts them like any input). Raises
    ValueError when a sequence is too short for an image's tokens.
    """
    config = model.config
    inputs = {"input_ids": ids}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids
    family = IMAGE_FAMILIES.get(config.model_type)
    if family is None or getattr(config, "vision_config", None) is None:
        return inputs
    pixels, tokens = family(config, ids.shape[0])
    image_token = _image_token(config)
    # Qwen2-VL finds an image by its vision-start token, as its processor writes it
    row = ([config.vision_start_token_id] if config.model_type == "qwen2_vl" else []) + [image_token] * tokens
    if len(row) > ids.shape[1]:
        raise ValueError(f"{config.model_type}: an image takes {len(row)} tokens, the sequence has {ids.shape[1]}")
    ids = ids.clone()
    ids[:, : len(row)] = torch.tensor(row, dtype=ids.dtype)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    inputs["input_ids"] = ids
    inputs.update({k: v.to(ids.device, dtype if v.is_floating_point() else v.dtype) for k, v in pixels.items()})
    image_positions = (ids == image_token).long()
    if config.model_type == "gemma3":
        inputs["token_type_ids"] = image_positions  # 1: image (its bidirectional attention block)
    if config.model_type == "qwen2_vl":
        inputs["mm_token_type_ids"] = image_positions  # 1: image (M-RoPE's 3-D positions)
    return inputs
