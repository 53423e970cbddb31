"""minisbert: hand-written BERT, RoBERTa, DeBERTa-v2, XLM-RoBERTa and ModernBERT sentence encoders equal to
sentence-transformers."""

from minisbert import util
from minisbert.encoder import SentenceEncoder
from minisbert.errors import CheckpointError, ConfigError, MinisbertError, ModelNotFoundError, UnsupportedModuleError

__all__ = ["SentenceEncoder", "util", "MinisbertError", "CheckpointError", "ConfigError", "ModelNotFoundError",
           "UnsupportedModuleError"]
__version__ = "0.1.0"
