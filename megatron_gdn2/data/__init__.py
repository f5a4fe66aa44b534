"""Data pipeline: tokenizers, raw text -> Megatron indexed datasets, GPT datasets and loaders.

See each module's docstring: ``tokenizers`` (load_tokenizer), ``preprocess`` (gdn2-preprocess),
``datasets`` (DataConfig, build_datasets, build_data_loader) and ``dali`` (the optional DALI
loader backend).
"""
from megatron_gdn2.data.datasets import DataConfig, build_data_loader, build_datasets
from megatron_gdn2.data.preprocess import PreprocessConfig, PreprocessResult, preprocess
from megatron_gdn2.data.tokenizers import Tokenizer, TokenizerError, load_tokenizer

__all__ = [
    "DataConfig",
    "PreprocessConfig",
    "PreprocessResult",
    "Tokenizer",
    "TokenizerError",
    "build_data_loader",
    "build_datasets",
    "load_tokenizer",
    "preprocess",
]
