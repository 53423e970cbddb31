"""Model folders in and out: bounded file reads, the folder reader, the hub, weights files (safetensors
and the legacy ``.bin`` scanner), the checkpoint-name mapping, and ``save``."""
