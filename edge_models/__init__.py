"""Model definitions and life cycle: corpus, tokenizer, default model, loading, ONNX export."""
