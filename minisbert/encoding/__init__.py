"""The jobs ``SentenceEncoder`` (``minisbert/encoder.py``) hands out, one module each, read in this order:

- ``constructor``: ``SentenceEncoder(name, **kwargs)``'s keywords, sentence-transformers' names included.
- ``settings``: prompts, similarity function, ``truncate_dim``, ``max_seq_length``: checked, overridden.
- ``runners``: the packed runner built (or refused) for a setting; which runner ``encode`` uses.
- ``moves``: moving and casting every module (``to``, ``half``, ``cuda``, ...).
- ``pickling``: what a pickled or deep-copied encoder carries.
- ``prompts``: the prompt ``encode`` prepends and how many tokens it takes.
- ``arguments``: ``encode``'s arguments checked and normalised, once.
- ``inference``: texts -> sentence embeddings in this process (what each worker also runs).
- ``features``: the model inputs (``tokenize``) and the token-embeddings / feature-dict outputs.
- ``routing``: ``encode`` in this process or in worker processes (``minisbert.workers``).
- ``outputs``: the result converted as sentence-transformers returns it (array, tensor, list).
- ``training``: fine-tuning's train/eval switch and its embeddings with gradients.
- ``evaluation``: sentence-transformers' evaluators run on the encoder, and where they record metrics.
"""
