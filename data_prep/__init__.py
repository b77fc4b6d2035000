"""Text source -> tiktoken tokenizer -> uint16 token shards on disk. Imports neither model nor kernels."""
