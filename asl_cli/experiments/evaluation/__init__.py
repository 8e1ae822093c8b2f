"""A trained model at work: accuracy and latency (`eval`), classification of images (`predict`),
and the same in ONNX Runtime (`deploy`)."""
