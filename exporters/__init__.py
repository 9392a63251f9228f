"""Export back ends: ExecuTorch (.pte) and ONNX (.onnx) programs cached by slot signature, with the bank's own files as data."""
