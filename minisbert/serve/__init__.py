"""``minisbert serve``: an embeddings server on Starlette + uvicorn (the optional ``serve`` extra).

Read in this order: ``config`` (every limit, one dataclass, the flags' defaults), ``protocol`` (the
OpenAI and text-embeddings-inference request bodies checked, the responses written), ``batcher`` (the
bounded queue and the one task that merges concurrent requests into batches), ``metrics`` (Prometheus
text), ``app`` (the routes, auth, body limit, the model in a worker thread), ``command`` (the flags and
uvicorn). docs/serving.md describes the API and every limit.
"""
