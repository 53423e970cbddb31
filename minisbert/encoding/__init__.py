"""The jobs ``SentenceEncoder`` (``minisbert/encoder.py``) hands out, read in this order:

- ``options``: ``SentenceEncoder(name, **kwargs)``'s keywords; prompts, similarity function,
  ``truncate_dim``, ``max_seq_length`` checked and overridden; the prompt ``encode`` prepends.
- ``runners``: the packed runner built (or refused) for a setting; which runner ``encode`` uses.
- ``calls``: one ``encode`` call: arguments checked once, run here or in worker processes, the result
  converted as sentence-transformers returns it.
- ``workers``: sentence-transformers' multi-process pool (spawned workers, the cores shared out).
- ``inference``: texts -> sentence embeddings in this process (what each worker also runs), the model
  inputs (``tokenize``) and the token-embeddings / feature-dict outputs.
- ``copies``: moving and casting every module (``to``, ``half``, ``cuda``, ...) and what a pickled or
  deep-copied encoder carries.
- ``training``: fine-tuning's train/eval switch, its embeddings with gradients, and sentence-transformers'
  evaluators run on the encoder.
"""
