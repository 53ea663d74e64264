"""Training data: read a corpus, tokenize it into memory-mapped shards, read the shards back.

`text` reads sources and cuts them into units; `tokenize` turns one unit into its shards;
`prepare` runs every unit on an engine (`local`, or Ray Data in `ray_engine`) and writes the
manifest; `store` is the read side the job and the evaluator use (numpy only); `mixture`
resolves weighted mixtures for `data show` and `run submit`. See the README next to this file.
"""

from controlplane.data.prepare import FORMAT_VERSION, PrepareOptions, prepare
from controlplane.data.store import TokenStore, heldout_by_source, load_tokens, read_meta
from controlplane.data.text import DEFAULT_SOURCE, DEFAULT_TEXT_FIELD, DataSourceError, roff_to_text
from controlplane.data.tokenize import BOS, EOS

__all__ = [
    "BOS",
    "DEFAULT_SOURCE",
    "DEFAULT_TEXT_FIELD",
    "EOS",
    "FORMAT_VERSION",
    "DataSourceError",
    "PrepareOptions",
    "TokenStore",
    "heldout_by_source",
    "load_tokens",
    "prepare",
    "read_meta",
    "roff_to_text",
]
