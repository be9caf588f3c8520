"""Using a trained CEPE model: loading its directory, encoding documents once, generating.

- `loading.py`: a saved model directory (weights, tokenizer, training geometry), checked;
- `documents.py`: encoder states of documents, cached by content hash (LRU in bytes, optional
  safetensors files);
- `engine.py`: one generation step for a batch of requests (streamed per row) and the worker
  that queues requests for it;
- `app.py`: the OpenAI-compatible HTTP server (`cepe serve`) around the engine.
"""
