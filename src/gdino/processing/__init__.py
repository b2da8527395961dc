"""Everything between user input and tensors, and back: ``prompts`` (every prompt and label-list
rule), ``classes`` (label lists as prompts that fit the model), ``text`` (tokenizer, phrases),
``image`` (loading, resizing) and ``processor`` (the transformers-compatible processor).

``gdino.processing`` itself re-exports the processor's names: it was that module before the
processing layer became a package.
"""

from gdino.processing.processor import *  # noqa: F403 (the processor's names, under the old module path)
