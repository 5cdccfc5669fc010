"""Data: shard formats, safe decoding, the per-rank shard stream, collators and the DataModule."""
