"""Evaluation harnesses that work on any frozen checkpoint (``tcjepa eval TASK``).

``tasks`` dispatches a task and parses its ``--set`` section; ``probe`` (linear) and
``attentive`` (cross-attention pooling) probes; ``zeroshot`` and ``retrieval`` score images
against texts through ``scoring`` (TC-JEPA: the text-conditioned predictor's error); ``vqa``
trains a question-answering head on the frozen encoder; ``report`` compares runs, drawing with
``plots`` (PIL only); ``health`` holds RankMe and the target std used during training;
``common`` the shared reading, tie-aware top-k and result writing.
"""
