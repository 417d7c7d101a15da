"""Text: tokenizers, the built-in corpora, the shipped data sets."""
