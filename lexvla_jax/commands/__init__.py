"""Thin `lexvla` commands over a trained model's lexical vectors: explain, export, index, search."""
