"""The errors minisbert raises. Every message names the file or key and what is wrong with it."""


class MinisbertError(Exception):
    """Base class of every error minisbert raises on purpose."""


class ConfigError(MinisbertError, ValueError):
    """A config file asks for something invalid or not implemented."""


class CheckpointError(MinisbertError, ValueError):
    """A weights file is unreadable, incomplete, or does not fit the model."""


class UnsupportedModuleError(MinisbertError, ValueError):
    """``modules.json`` names a sentence-transformers module minisbert does not implement."""


class ModelNotFoundError(MinisbertError, OSError):
    """A path, short name or hub id that cannot be found (or fetched) with its needed files."""


class MissingDependencyError(MinisbertError, ImportError):
    """An optional package a model needs is not installed (e.g. sentencepiece for KoBERT)."""


class DataFormatError(MinisbertError, ValueError):
    """A data file (STS pairs, training examples) that cannot be read; the message starts with ``file:line``."""


class DataNotFoundError(MinisbertError, FileNotFoundError):
    """A data file that is neither on disk nor in the cache, and cannot be downloaded."""


class RecipeError(MinisbertError, ValueError):
    """A training recipe that cannot be used; the message names the file and the key."""


class CorpusError(MinisbertError, ValueError):
    """An input, output folder or setting that ``embed-corpus`` cannot work with; names the file."""
