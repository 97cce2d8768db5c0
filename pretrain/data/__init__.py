"""Training data: documents -> tokens -> sequences in one global order, each process reading only its share.

- sources: where documents come from (files, globs, directories, Hub datasets), mixed by weight, an epoch at a time.
- text: raw text tokenized on the fly in data.partitions canonical partitions (piece or shard mode), packed.
- shards, datatrove_folders, token_stream: pre-tokenized data (the template's token shards, datatrove's tokenized
  folders), read by memory map as one token stream.
- stream: this process's micro-batches from either, dealt out to processes and DataLoader workers; the tokenizer.
- position: where the stream stands after a step, saved in checkpoints for an exact resume on any process count.
- masking: document masking's position ids in packed windows.
- passes: how many times a run reads its data.
"""
