"""minisbert: hand-written BERT, RoBERTa and DeBERTa-v2 sentence encoders equal to sentence-transformers."""

from minisbert import util
from minisbert.encoder import SentenceEncoder
from minisbert.errors import CheckpointError, ConfigError, MinisbertError, ModelNotFoundError, UnsupportedModuleError

__all__ = ["SentenceEncoder", "util", "MinisbertError", "CheckpointError", "ConfigError", "ModelNotFoundError",
           "UnsupportedModuleError"]
__version__ = "0.1.0"
