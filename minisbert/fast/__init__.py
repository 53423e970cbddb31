"""The packed fast path beside the reference models: linear backends and int8, packing, the packed
forwards (BERT/RoBERTa, DeBERTa-v2), the runner over them, and the CPU facts they depend on."""
