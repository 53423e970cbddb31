"""One module per architecture; this dict is the only place that maps ``model_type`` to code.

Each module provides ``build(hf_config) -> nn.Module`` (on whatever device is current, so the
loader can build on ``meta``), ``max_tokens(config)``, ``PREFIXES`` (the checkpoint prefix of the
bare model, e.g. ``bert.``), ``CHECKPOINT_NAMES`` (Hugging Face key -> our parameter, ``{i}`` for
the layer) and ``IGNORED_KEYS`` (regular expressions for keys deliberately not loaded).
"""

from minisbert.models import bert, deberta_v2, modernbert, roberta, xlm_roberta

ARCHITECTURES = {
    "bert": bert,
    "roberta": roberta,
    "deberta-v2": deberta_v2,
    "xlm-roberta": xlm_roberta,
    "modernbert": modernbert,
}
