"""Pure helpers of the fixed loader (fsdp_load_checks/loaders/fixed.py), on plain modules; the zoo runs the rest."""

from __future__ import annotations

import torch
from torch import nn

from fsdp_load_checks.loaders.fixed import tied_holders


class T5Like(nn.Module):
    """One embedding held by three modules: `shared`, `encoder_embed` and the head (T5)."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Embedding(8, 4)
        self.encoder_embed = nn.Embedding(8, 4)
        self.encoder_embed.weight = self.shared.weight
        self.norm = nn.LayerNorm(4)
        self.lm_head = nn.Linear(4, 8, bias=False)
        self.lm_head.weight = self.shared.weight


class Predictions(nn.Module):
    """A head whose own bias is its decoder's bias (BertLMPredictionHead)."""

    def __init__(self):
        super().__init__()
        self.transform = nn.Linear(4, 4)
        self.decoder = nn.Linear(4, 8)
        self.bias = nn.Parameter(torch.zeros(8))
        self.decoder.bias = self.bias


class BertMlmLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(8, 4)
        self.predictions = Predictions()
        self.predictions.decoder.weight = self.embed.weight


def test_every_other_holder_of_a_tail_parameter_joins_the_tail_group():
    model = T5Like()
    group = tied_holders(model, [model.norm, model.shared, model.lm_head])
    assert [id(m) for m in group] == [id(m) for m in (model.norm, model.shared, model.lm_head, model.encoder_embed)]


def test_a_holder_that_contains_a_listed_module_replaces_it():
    model = BertMlmLike()
    group = tied_holders(model, [model.embed, model.predictions.decoder])
    # predictions holds the decoder's bias directly; the decoder, its child, is covered by it
    assert [id(m) for m in group] == [id(model.embed), id(model.predictions)]


def test_without_ties_beyond_the_listed_modules_the_group_is_unchanged():
    model = T5Like()
    model.encoder_embed.weight = nn.Parameter(model.shared.weight.detach().clone())
    model.lm_head.weight = nn.Parameter(model.shared.weight.detach().clone())
    listed = [model.norm, model.shared]
    assert [id(m) for m in tied_holders(model, listed)] == [id(m) for m in listed]


def test_the_round_trip_reads_back_through_a_loaders_own_get_state_dict():
    """rank/after.py reads the round trip back with the grouped gather only where that equals accelerate's own
    `get_state_dict` (tests/test_gather.py); the fix set replaces the method (A4), so it is called instead."""
    import accelerate

    from fsdp_load_checks import loaders
    from fsdp_load_checks.rank.after import grouped_read_back

    accelerator = object.__new__(type("FSDP2Accelerator", (accelerate.Accelerator,), {"is_fsdp2": True}))
    assert grouped_read_back(accelerator) == accelerate.__version__.startswith("1.15.")
    with loaders.get("fixed").patch():
        assert not grouped_read_back(accelerator)
    assert grouped_read_back(accelerator) == accelerate.__version__.startswith("1.15.")
