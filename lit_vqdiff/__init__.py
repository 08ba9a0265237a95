"""lit_vqdiff: two-stage generative models (VQ tokenizers, then Diffusion Transformers over
their codes) across images, sounds, captions and classes, on Lightning.

``load_generator`` and ``load_tokenizer`` (see ``api.py``) are the Python API; they are
imported on first use, so that ``import lit_vqdiff.<module>`` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.2.0"
__all__ = ["__version__", "load_generator", "load_tokenizer"]


def __getattr__(name: str) -> Any:
    if name in ("load_generator", "load_tokenizer"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'lit_vqdiff' has no attribute {name!r}")
