"""CogVLM v1 (chat and base-490), implemented natively with the official checkpoints' parameter names:
configuration.py (config.json layout), modeling.py (the model and its backbone), processing.py (templates, images,
tokenizer), tiny.py (the offline tiny checkpoint)."""
