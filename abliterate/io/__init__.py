"""File input and output: safetensors headers and shards, the chunked reader, atomic output
directories, signals."""
