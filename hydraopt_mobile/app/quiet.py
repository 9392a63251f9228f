"""Keep the command line's output ours: third-party warnings and log chatter are hidden unless
``--verbose`` (torchao's optional-kernel load failures, torch pytree deprecations, ONNX exporter
notices, transformers' advice). Errors still show. Called once, at the CLI boundary only: the
library never changes global warning or logging state."""

from __future__ import annotations

import logging
import os
import sys
import warnings

THIRD_PARTY = ("torch", "torchao", "transformers", "onnxscript", "onnx_ir", "onnxruntime", "executorch", "peft", "accelerate", "coremltools")


_silenced = False


def silenced() -> bool:
    """Whether this process hides third-party output: a process the app spawns does the same."""
    return _silenced


def silence_third_party() -> None:
    global _silenced
    _silenced = True
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.ERROR)
    # importing torch resets the "torch" logger to WARNING (torch._logging), and the commands import
    # torch after this runs: its own setting keeps it at ERROR ("-all"), unless the user set one
    os.environ.setdefault("TORCH_LOGS", "-all")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # transformers' and huggingface_hub's own progress bars ("Loading weights", "Writing model
    # shards"): read when they are imported, so set first, and switched off if already imported
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
