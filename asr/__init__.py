"""Streaming speech recognition with a causal Mamba CTC encoder."""

import os
from pathlib import Path

__version__ = "0.1.0"

# The bundled model. ASR_MODEL_DIR points elsewhere (an installed copy, a newer model).
DEFAULT_MODEL_DIR = Path(os.environ.get("ASR_MODEL_DIR", Path(__file__).resolve().parent.parent / "models" / "default"))
