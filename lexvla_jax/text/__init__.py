"""Text side: tokenizers, the in-context prompt, the vocabulary filter rules, content words, bag of words."""
