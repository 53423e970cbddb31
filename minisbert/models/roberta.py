"""RoBERTa encoder (Liu et al., 2019): BERT's blocks with one difference that matters at inference.

What differs from BERT (everything else is imported from ``bert.py``):
- position ids count only real tokens and start at ``pad_token_id + 1``:
  ``cumsum(ids != pad) * (ids != pad) + pad``. With klue/roberta-base's pad id 1 the first token sits
  at position 2, which is why ``max_position_embeddings`` is 514 for 512 usable tokens, and pads all
  share position ``pad`` (their embeddings are masked anyway);
- type_vocab_size is 1 in klue/roberta-base (one segment row), layer_norm_eps 1e-5;
- checkpoint keys carry the ``roberta.`` prefix and an ``lm_head`` instead of BERT's ``cls``.

Mirrors ``create_position_ids_from_input_ids`` in transformers' ``modeling_roberta.py``:
https://github.com/huggingface/transformers/blob/v4.44.0/src/transformers/models/roberta/modeling_roberta.py#L1554
"""

from __future__ import annotations

import torch

from minisbert.errors import ConfigError
from minisbert.models import bert
from minisbert.models.bert import BertConfig, BertModel


def roberta_position_ids(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """(B, T) ids -> (B, T) positions: real tokens get pad+1, pad+2, ...; pads get pad."""
    is_token = (input_ids != pad_token_id).int()  # (B, T)
    return (torch.cumsum(is_token, dim=1) * is_token + pad_token_id).long()


class RobertaModel(BertModel):
    """BertModel with RoBERTa's position ids; the forward is inherited unchanged."""

    def position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return roberta_position_ids(input_ids, self.config.pad_token_id)


PREFIXES = ("roberta.",)
CHECKPOINT_NAMES = bert.CHECKPOINT_NAMES
IGNORED_KEYS = (
    r"(roberta\.)?pooler\..*",
    r"lm_head\..*",
    r"(roberta\.)?embeddings\.position_ids",
)
CARRIED_KEYS = bert.CARRIED_KEYS  # RobertaModel has BertModel's pooler


def build(hf_config: dict) -> RobertaModel:
    """The model in eval mode (no dropout); training turns train mode on explicitly."""
    cfg = BertConfig.from_hf(hf_config)
    if cfg.max_position_embeddings <= cfg.pad_token_id + 1:
        raise ConfigError(f"config.json: max_position_embeddings={cfg.max_position_embeddings} leaves no "
                          f"position after pad_token_id + 1 = {cfg.pad_token_id + 1}")
    return RobertaModel(cfg).eval()


def max_tokens(cfg: BertConfig) -> int:
    """Longest sequence the position table can hold (512 for klue/roberta-base's 514 rows)."""
    return cfg.max_position_embeddings - cfg.pad_token_id - 1
