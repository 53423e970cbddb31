"""Texts to token ids: the tokenizers-library tokenizer, KoBERT's SentencePiece, long-text cutting."""
