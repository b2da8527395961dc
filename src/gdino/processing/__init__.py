"""Everything between user input and tensors: ``prompts`` (every prompt and label-list rule),
``classes`` (label lists as prompts that fit the model), ``text`` (tokenizer, phrases), ``image``
(loading, resizing) and ``processor`` (the transformers-compatible processor).

This ``__init__`` imports nothing: ``text``, ``classes``, ``image`` and ``prompts`` are torch-free
(the ONNX runtime uses them)."""
