"""Lexical vectors outside the model: sparse export (JSONL / TSV / scipy `.npz`) and inverted-index search."""
