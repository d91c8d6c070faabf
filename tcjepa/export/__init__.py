"""Checkpoints in and out of tcjepa: our encoders as Hugging Face ``IJepaModel`` and as the vision
tower of a ``LlavaForConditionalGeneration`` (``hf.py``), contrastive runs as open_clip models
(``open_clip.py``), and official facebookresearch/ijepa training checkpoints as tcjepa run
directories (``ijepa_import.py``).

Each public function takes and returns paths, so the command line (``tcjepa export ...``,
``tcjepa import ijepa ...``) is a thin call; nothing here imports ``transformers`` until used.
"""
