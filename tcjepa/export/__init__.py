"""Checkpoints in and out of tcjepa: our encoders as Hugging Face ``IJepaModel`` and as the vision
tower of a ``LlavaForConditionalGeneration`` (``hf.py``), contrastive runs as open_clip models
(``open_clip.py``), and official facebookresearch/ijepa training checkpoints as tcjepa run
directories (``ijepa_import.py``).

Each public function takes and returns paths, so the command line (``tcjepa export ...``,
``tcjepa import ijepa ...``) is a thin call; nothing here imports ``transformers`` until used.
"""

from __future__ import annotations

from pathlib import Path


def make_out_dir(out_dir: str | Path) -> Path:
    """``--out``, created (with parents) or a :class:`~tcjepa.config.ConfigError` saying why not."""
    from tcjepa.config import ConfigError

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create it ({e.strerror or e})") from e
    return out
