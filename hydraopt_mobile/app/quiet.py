"""Keep the command line's output ours: third-party warnings and log chatter are hidden unless
``--verbose`` (torchao's optional-kernel load failures, torch pytree deprecations, ONNX exporter
notices, transformers' advice). Errors still show. Called once, at the CLI boundary only: the
library never changes global warning or logging state."""

from __future__ import annotations

import logging
import os
import warnings

THIRD_PARTY = ("torch", "torchao", "transformers", "onnxscript", "onnx_ir", "onnxruntime", "executorch", "peft", "accelerate", "coremltools")


def silence_third_party() -> None:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
