"""StoryLlama: train small Llama models that write bedtime stories.

How an import maps to a file: `storyllama.X` is `storyllama/X.py`; `storyllama.kernels.X` is
`kernels/X.py` and `storyllama.data_prep.X` is `data_prep/X.py` at the repository's top level.
`storyllama/kernels` and `storyllama/data_prep` are links to those folders, and the folders hold no
`__init__.py`: they are namespace packages reached only through `storyllama`. So nothing of ours is a
regular top-level `kernels` or `data_prep` package, from the repository root or anywhere else: a
regular package of that name (Hugging Face's `kernels`, which transformers imports) always wins over a
namespace folder on `sys.path`. A wheel (`pip install .`) holds the files themselves under
`storyllama/kernels/` and `storyllama/data_prep/`; an editable install and `bin/*` read them through the links.
"""
