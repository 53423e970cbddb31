"""``minisbert.integrations`` with the real frameworks (each test skips where its package is missing):
LangChain, LlamaIndex, Chroma, Haystack and MTEB get what ``SentenceEncoder.encode_query`` /
``encode_document`` give, and MTEB's STS evaluation on KorSTS gives ``minisbert.sts``'s Spearman."""

from __future__ import annotations

import asyncio
import json
import shutil

import numpy as np
import pytest
from conftest import require_shared_data

QUERY, DOCS = "Where does the cat sleep?", ["The cat sleeps on the sofa.", "Stocks fell on Monday.", "비가 온다."]


@pytest.fixture(scope="module")
def encoder(minilm_path, tmp_path_factory):
    """all-MiniLM-L6-v2 with query and document prompts, so the adapters' prompt choice shows."""
    from minisbert import SentenceEncoder

    folder = tmp_path_factory.mktemp("minilm_prompts") / "minilm"
    shutil.copytree(minilm_path, folder)
    settings = json.loads((folder / "config_sentence_transformers.json").read_text())
    settings["prompts"] = {"query": "query: ", "document": "document: "}
    (folder / "config_sentence_transformers.json").write_text(json.dumps(settings))
    return SentenceEncoder(folder)


@pytest.fixture(scope="module")
def want(encoder):
    return {"query": encoder.encode(QUERY, prompt_name="query"), "docs": encoder.encode(DOCS, prompt_name="document"),
            "plain": encoder.encode(DOCS)}


def test_the_prompts_make_a_difference(want):
    assert np.abs(want["docs"] - want["plain"]).max() > 1e-3  # else the tests below could not tell


def test_langchain(encoder, want):
    pytest.importorskip("langchain_core")
    from langchain_core.embeddings import Embeddings

    from minisbert.integrations.langchain import MinisbertEmbeddings

    embeddings = MinisbertEmbeddings(encoder)
    assert isinstance(embeddings, Embeddings)
    assert embeddings.embed_query(QUERY) == want["query"].tolist()
    assert embeddings.embed_documents(DOCS) == want["docs"].tolist()
    assert asyncio.run(embeddings.aembed_query(QUERY)) == want["query"].tolist()
    assert asyncio.run(embeddings.aembed_documents(DOCS)) == want["docs"].tolist()
    unit = MinisbertEmbeddings(encoder, normalize=True).embed_documents(DOCS)
    assert np.allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-6)


def test_llama_index(encoder, want):
    pytest.importorskip("llama_index.core")
    from llama_index.core.embeddings import BaseEmbedding

    from minisbert.integrations.llama_index import MinisbertEmbedding

    embedding = MinisbertEmbedding(encoder, embed_batch_size=2)
    assert isinstance(embedding, BaseEmbedding)
    assert embedding.get_query_embedding(QUERY) == want["query"].tolist()
    assert embedding.get_text_embedding_batch(DOCS) == want["docs"].tolist()
    assert embedding.get_text_embedding(DOCS[0]) == want["docs"][0].tolist()
    assert asyncio.run(embedding.aget_query_embedding(QUERY)) == want["query"].tolist()
    assert asyncio.run(embedding.aget_text_embedding(DOCS[1])) == want["docs"][1].tolist()
    got = embedding.similarity(embedding.get_query_embedding(QUERY), embedding.get_text_embedding(DOCS[0]))
    assert got > embedding.similarity(embedding.get_query_embedding(QUERY), embedding.get_text_embedding(DOCS[1]))


def test_chroma(encoder, want):
    chromadb = pytest.importorskip("chromadb")
    from chromadb.config import Settings

    from minisbert.integrations.chroma import MinisbertEmbeddingFunction

    function = MinisbertEmbeddingFunction(encoder.source, encoder=encoder)
    assert MinisbertEmbeddingFunction.name() == "minisbert"
    assert np.array_equal(np.array(function(DOCS)), want["docs"])
    assert np.array_equal(np.array(function.embed_query([QUERY]))[0], want["query"])
    rebuilt = MinisbertEmbeddingFunction.build_from_config(function.get_config())
    assert rebuilt.get_config() == function.get_config() == {"model_name": encoder.source,
                                                             "normalize_embeddings": False, "batch_size": 32}
    assert np.array_equal(np.array(rebuilt(DOCS)), want["docs"])
    client = chromadb.EphemeralClient(Settings(anonymized_telemetry=False))
    collection = client.create_collection("docs", embedding_function=function)
    collection.add(ids=["cat", "stocks", "rain"], documents=DOCS)
    found = collection.query(query_texts=[QUERY], n_results=1)
    assert found["ids"] == [["cat"]]


def test_haystack(encoder, want):
    haystack = pytest.importorskip("haystack")
    from minisbert.integrations.haystack import MinisbertDocumentEmbedder, MinisbertTextEmbedder

    text = MinisbertTextEmbedder(encoder.source)
    text.encoder = encoder  # share the loaded model (warm_up would load the same folder)
    pipeline = haystack.Pipeline()
    pipeline.add_component("embedder", text)
    assert pipeline.run({"embedder": {"text": QUERY}})["embedder"]["embedding"] == want["query"].tolist()
    documents = MinisbertDocumentEmbedder(encoder.source, batch_size=2)
    documents.encoder = encoder
    out = documents.run([haystack.Document(content=d) for d in DOCS])["documents"]
    assert [d.embedding for d in out] == want["docs"].tolist() and [d.content for d in out] == DOCS
    again = MinisbertTextEmbedder.from_dict(text.to_dict())
    assert (again.model, again.batch_size, again.prompt_name) == (encoder.source, 32, None)
    with pytest.raises(TypeError, match="one string"):
        text.run(DOCS)


def test_mteb_protocol(encoder, want):
    pytest.importorskip("mteb")
    from mteb.models.models_protocols import EncoderProtocol
    from mteb.types import PromptType
    from torch.utils.data import DataLoader

    from minisbert.integrations.mteb import MinisbertMTEB

    model = MinisbertMTEB(encoder)
    assert isinstance(model, EncoderProtocol)
    meta = model.mteb_model_meta
    assert meta.embed_dim == 384 and meta.max_tokens == 256 and meta.n_parameters > 20_000_000
    batches = DataLoader([{"text": d} for d in DOCS], batch_size=2)
    task = pytest.importorskip("mteb").get_task("KorSTS").metadata
    got = model.encode(batches, task_metadata=task, hf_split="test", hf_subset="default",
                       prompt_type=PromptType.document)
    assert np.array_equal(got, want["docs"])  # the document prompt
    assert np.array_equal(model.encode(batches, task_metadata=task, hf_split="test", hf_subset="default"),
                          want["plain"])
    scores = model.similarity(want["docs"], want["docs"])
    assert np.allclose(np.diag(np.asarray(scores)), 1.0, atol=1e-6)
    pairwise = model.similarity_pairwise(want["docs"], want["plain"])
    assert np.allclose(np.asarray(pairwise), np.diag(np.asarray(encoder.similarity(want["docs"], want["plain"]))))


@pytest.mark.slow  # ~13 s on 2 shared cores
def test_mteb_sts_on_korsts_equals_eval_sts(encoder):
    """One MTEB STS evaluation (its KorSTS task on the local test file, first 200 pairs) gives the
    Spearman ``minisbert.sts`` computes."""
    mteb = pytest.importorskip("mteb")
    datasets = pytest.importorskip("datasets")
    from mteb.tasks.sts.kor.kor_sts import KorSTS

    from minisbert import sts
    from minisbert.integrations.mteb import MinisbertMTEB

    data = sts.read_sts(require_shared_data("korsts/sts-test.tsv"))
    n = 200
    first, second, gold = data.sentences1[:n], data.sentences2[:n], data.scores[:n]

    class LocalKorSTS(KorSTS):
        def load_data(self, num_proc=None, **kwargs):
            rows = {"sentence1": first, "sentence2": second, "score": [s * 5 for s in gold]}  # 0-5, as KorSTS
            self.dataset = {"default": datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)})}
            self.data_loaded = True

    result = mteb.evaluate(MinisbertMTEB(encoder), tasks=[LocalKorSTS()], cache=None, show_progress_bar=False)
    theirs = result.task_results[0].scores["test"][0]["cosine_spearman"]
    ours = sts.evaluate_sts(encoder, first, second, gold)["cosine_spearman"]
    assert abs(theirs - ours) <= 1e-9, f"mteb {theirs} vs eval-sts {ours}"
