"""Tools of the ReAct QA example: ``search`` over ``examples/data/qa_corpus.jsonl`` (BM25).

The example script uses the built-in ``search`` with ``agent.tool_configs.search.corpus``;
this module shows the same tool as user code: ``agent.tools=[examples/qa_tools.py:search,answer]``
(a file path) or ``agent.tools=[examples.qa_tools:search,answer]`` (a module under the working
directory); no ``PYTHONPATH`` needed.
``QA_CORPUS`` points the search at another JSONL corpus of ``{"id", "title", "text"}`` rows.
"""

import os
from pathlib import Path

from envs.tools import make_search

CORPUS = os.environ.get("QA_CORPUS", str(Path(__file__).resolve().parent / "data" / "qa_corpus.jsonl"))

search = make_search(corpus=CORPUS, top_k=2)
