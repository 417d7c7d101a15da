"""Data shipped with the package (host-side files; see each folder's SOURCE.md).

``sentiment/``: "Sentiment Labelled Sentences" (Kotzias et al., KDD 2015; UCI Machine
Learning Repository; CC BY 4.0), the Yelp and Amazon files, 1,000 sentences each.
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent
SENTIMENT_FILES = (ROOT / "sentiment" / "yelp_labelled.txt",
                   ROOT / "sentiment" / "amazon_cells_labelled.txt")
