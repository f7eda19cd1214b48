"""Tools of the ReAct QA example: ``search`` over ``examples/data/qa_corpus.jsonl`` (BM25).

Use as ``agent.tools=[examples.qa_tools:search,answer]`` (a dotted tool path, see
``envs.tools.registry``); run from the repository root so ``examples`` is importable.
``QA_CORPUS`` points the search at another JSONL corpus of ``{"id", "title", "text"}`` rows.
"""

import os
from pathlib import Path

from envs.tools import make_search

CORPUS = os.environ.get("QA_CORPUS", str(Path(__file__).resolve().parent / "data" / "qa_corpus.jsonl"))

search = make_search(corpus=CORPUS, top_k=2)
