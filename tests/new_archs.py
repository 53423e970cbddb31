"""Tiny random XLM-RoBERTa and ModernBERT checkpoints in sentence-transformers layout, built with
transformers, with tokenizers of the real models' kinds trained on Korean text:

- XLM-R: a SentencePiece Unigram model (fairseq ids) converted by transformers into ``tokenizer.json``,
  and optionally only ``sentencepiece.bpe.model`` as older folders ship;
- ModernBERT: a byte-level BPE ``tokenizer.json`` with ModernBERT's ``[CLS]``/``[SEP]``/``[PAD]`` tokens.

The configs keep every value that changes the numerics at the real models' settings (bge-m3's
``pad_token_id=1``, 1e-5 LayerNorm eps; ModernBERT's rotary bases, windows, GeGLU, no biases).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from korean_text import korean_sentences

SPM_TEXT = korean_sentences(3000, seed=1) + [
    "The quick brown fox jumps over the lazy dog.", "café naïve 123,456원 😀", "query: passage: 검색"]

XLMR_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 hidden_act="gelu", pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1,
                 layer_norm_eps=1e-5, max_position_embeddings=2050)

MODERNBERT_TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=96,
                       max_position_embeddings=4096, global_attn_every_n_layers=3, local_attention=16,
                       global_rope_theta=160000.0, local_rope_theta=10000.0, norm_eps=1e-5, norm_bias=False,
                       attention_bias=False, mlp_bias=False, hidden_activation="gelu")

_SPM: dict[int, bytes] = {}


def spm_model(vocab_size: int = 1500) -> bytes:
    import sentencepiece as spm

    if vocab_size not in _SPM:
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(SPM_TEXT), model_writer=buf, vocab_size=vocab_size,
                                       model_type="unigram", character_coverage=0.9995, num_threads=1,
                                       minloglevel=2)
        _SPM[vocab_size] = buf.getvalue()
    return _SPM[vocab_size]


def write_st_modules(folder: Path, width: int, pooling: str, normalize: bool, max_seq_length: int,
                     prompts: dict | None = None) -> None:
    (folder / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": max_seq_length, "do_lower_case": False}), encoding="utf-8")
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": width, "pooling_mode": pooling}), encoding="utf-8")
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules, indent=2), encoding="utf-8")
    if prompts:
        (folder / "config_sentence_transformers.json").write_text(json.dumps(
            {"prompts": prompts, "default_prompt_name": None, "similarity_fn_name": "cosine"}), encoding="utf-8")


def perturb(model, seed: int) -> None:
    """Random init leaves LayerNorm weights at 1 and biases at 0; perturb every parameter so no term hides."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)


def make_xlmr_checkpoint(folder: Path, *, pooling: str = "cls", normalize: bool = True, max_seq_length: int = 2048,
                         spm_only: bool = False, config: dict | None = None, seed: int = 0,
                         prompts: dict | None = None) -> Path:
    """bge-m3-like (CLS + Normalize) or multilingual-e5-like (mean, prompts) tiny XLM-R folder."""
    import torch
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sentencepiece.bpe.model").write_bytes(spm_model())
    tok = transformers.XLMRobertaTokenizer.from_pretrained(str(folder))  # converts the SentencePiece model
    if not spm_only:
        tok.save_pretrained(str(folder))
    else:
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "XLMRobertaTokenizer", "model_max_length": max_seq_length, "bos_token": "<s>",
             "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>", "pad_token": "<pad>",
             "cls_token": "<s>", "mask_token": "<mask>"}), encoding="utf-8")
    torch.manual_seed(seed)
    cfg = transformers.XLMRobertaConfig(**dict(XLMR_TINY, vocab_size=len(tok), **(config or {})))
    model = transformers.XLMRobertaModel(cfg, add_pooling_layer=False)
    perturb(model, seed)
    model.eval().save_pretrained(folder, safe_serialization=True)
    write_st_modules(folder, cfg.hidden_size, pooling, normalize, max_seq_length, prompts)
    return folder


_BPE = []


def byte_level_bpe():
    """A byte-level BPE tokenizer (tokenizers.Tokenizer) with ModernBERT's special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if not _BPE:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=1200, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"])
        tok.train_from_iterator(SPM_TEXT, trainer)
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        _BPE.append(tok)
    return _BPE[0]


def make_modernbert_checkpoint(folder: Path, *, pooling: str = "mean", normalize: bool = False,
                               max_seq_length: int = 2048, config: dict | None = None, seed: int = 0,
                               prompts: dict | None = None) -> Path:
    """gte-modernbert-like tiny ModernBERT folder; ``config`` overrides MODERNBERT_TINY (windows, biases...)."""
    import torch
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe = byte_level_bpe()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
        mask_token="[MASK]", model_max_length=max_seq_length)
    fast.save_pretrained(str(folder))
    ids = {t: bpe.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]")}
    values = dict(MODERNBERT_TINY, vocab_size=bpe.get_vocab_size(), pad_token_id=ids["[PAD]"],
                  bos_token_id=ids["[CLS]"], cls_token_id=ids["[CLS]"], eos_token_id=ids["[SEP]"],
                  sep_token_id=ids["[SEP]"], **(config or {}))
    torch.manual_seed(seed)
    model = transformers.ModernBertModel(transformers.ModernBertConfig(**values))
    perturb(model, seed)
    model.eval().save_pretrained(folder, safe_serialization=True)
    write_st_modules(folder, values["hidden_size"], pooling, normalize, max_seq_length, prompts)
    return folder


def add_m3_heads(folder: Path, *, colbert_dim: int | None = None, seed: int = 0) -> Path:
    """bge-m3's two extra heads beside the folder's files, as FlagEmbedding saves them (``torch.save`` of
    each ``nn.Linear``'s state dict): ``sparse_linear.pt`` (hidden -> 1) and ``colbert_linear.pt``
    (hidden -> hidden, or ``colbert_dim``). Weights of about unit gain, so that ReLU keeps roughly half the
    tokens' lexical weights and drops the others."""
    import torch

    folder = Path(folder)
    hidden = json.loads((folder / "config.json").read_text(encoding="utf-8"))["hidden_size"]
    torch.manual_seed(seed)
    sparse, colbert = torch.nn.Linear(hidden, 1), torch.nn.Linear(hidden, colbert_dim or hidden)
    with torch.no_grad():
        for linear in (sparse, colbert):
            linear.weight.normal_(0, hidden ** -0.5)
            linear.bias.normal_(0, 0.3)
    torch.save({k: v.clone() for k, v in sparse.state_dict().items()}, folder / "sparse_linear.pt")
    torch.save({k: v.clone() for k, v in colbert.state_dict().items()}, folder / "colbert_linear.pt")
    return folder
