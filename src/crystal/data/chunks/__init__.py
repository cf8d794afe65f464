"""LLM360's data chunks: the rows trained between two release checkpoints, as files.

`numbering` says which steps make data chunk k of a stage and how chunks are numbered
across the run; `files` is the released format (JSON lines rows + `chunks.json`);
`export` writes chunks from a prepared workdir and the loader's replay;
`python -m crystal.data.chunks` is the export's command line. Reading released chunks back
into a prepared workdir is `crystal.data.prepare --input=DIR` (crystal.data.sources reads
the rows).
"""
