"""Data shipped with the package (host-side files; see each folder's SOURCE.md).

``sentiment/``: "Sentiment Labelled Sentences" (Kotzias et al., KDD 2015; UCI Machine
Learning Repository; CC BY 4.0), the Yelp and Amazon files, 1,000 sentences each, and the
split lowrank trains and validates on (``train.tsv``, ``val.tsv``: ``text<TAB>label`` with
the labels named ``negative`` / ``positive``).
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent
SENTIMENT_FILES = (ROOT / "sentiment" / "yelp_labelled.txt",
                   ROOT / "sentiment" / "amazon_cells_labelled.txt")
SENTIMENT_LABELS = ("negative", "positive")          # the original files' 0 and 1
SENTIMENT_SPLITS = {"train": ROOT / "sentiment" / "train.tsv",
                    "val": ROOT / "sentiment" / "val.tsv"}
