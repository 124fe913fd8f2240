"""The edge device: record store, learning, unlearning and ONNX inference."""
