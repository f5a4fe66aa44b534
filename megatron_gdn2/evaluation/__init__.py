"""Evaluation of GDN-2 language models: perplexity on a text file and LAMBADA (`gdn2-eval`)."""
