"""XLM-RoBERTa encoder (Conneau et al., 2019): RoBERTa's network, unchanged, with a multilingual vocabulary.

transformers' ``modeling_xlm_roberta.py`` is a copy of ``modeling_roberta.py`` ("Copied from"), so the
math, the position ids (``pad_token_id + 1`` onwards) and the checkpoint names are ``roberta.py``'s.
What differs is data, not code:
- the vocabulary: SentencePiece Unigram, 250,002 pieces, fairseq's ids (``<s>``=0, ``<pad>``=1,
  ``</s>``=2, ``<unk>``=3; a SentencePiece id ``i >= 3`` is ``i + 1``), read from ``tokenizer.json`` or,
  in older folders, from ``sentencepiece.bpe.model`` (``text/sentencepiece.py``);
- sizes: bge-m3 and KURE-v1 are XLM-R large (24 layers, 1024 wide, 16 heads) with 8,194 positions
  (8,192 tokens), multilingual-e5-base and KoE5-like models base size with 514 (512 tokens).
"""

from __future__ import annotations

from minisbert.models import roberta
from minisbert.models.roberta import RobertaModel as XlmRobertaModel  # noqa: F401  (the same class)

PREFIXES = roberta.PREFIXES  # transformers' XLMRobertaPreTrainedModel.base_model_prefix is "roberta"
CHECKPOINT_NAMES = roberta.CHECKPOINT_NAMES
IGNORED_KEYS = roberta.IGNORED_KEYS
CARRIED_KEYS = roberta.CARRIED_KEYS
build = roberta.build
max_tokens = roberta.max_tokens
