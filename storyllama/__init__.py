"""StoryLlama: train small Llama models that write bedtime stories.

`storyllama.kernels` and `storyllama.data_prep` live in the repository's top-level `kernels/` and
`data_prep/` folders; the installation (pyproject's package-dir) maps them into this namespace.
"""
