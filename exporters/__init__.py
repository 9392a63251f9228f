"""Export back ends: ExecuTorch (.pte + per-task data) and ONNX (graph + .onnx_adapter files)."""
