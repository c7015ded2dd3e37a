"""The data pipeline: recipe -> rows -> conversations -> tokens with assistant-only labels -> packed rows.

- `qtulu.data.sources`: read a source (local json / jsonl / parquet, or a hub dataset)
- `qtulu.data.formats`: open-instruct's converter per source family -> ``[{"role", "content"}, ...]``
- `qtulu.data.chat`: Tulu rendering, validation, tokenization with labels from character offsets
- `qtulu.data.packing`: best-fit-decreasing packing, ``position_ids``, ``cu_seqlens``, collator
- `qtulu.data.build`: `build_dataset` / `load_built` and the manifest; `qtulu.data.cli`: ``qtulu data``
- `qtulu.data.tokenizer`: `load_tokenizer` (SentencePiece ``.model`` file, folder or hub id)

Submodules are imported on use; ``import qtulu.data`` stays cheap.
"""
