"""Data pipeline: tokenizers, corpus readers, Megatron indexed-dataset writing, preprocessing, Pile blends.

Modules (each imports its heavy dependencies lazily, and none imports torch):
- tokenizers.py: build_tokenizer / add_tokenizer_args with Megatron-LM's tokenizer type names.
- readers.py: .jsonl, .jsonl.zst, .jsonl.gz, directories and globs of them.
- indexed_writer.py: the .bin/.idx format written with numpy, atomically.
- indexed_reader.py: the .bin/.idx format read and validated with numpy (every dataset, before use).
- splits.py: --split and --data-path blends parsed strictly; split ranges as megatron-core computes them.
- blends.py: the run's data sources (--data-path / --data-args-path, or one blend per split), files read as data.
- index_cache.py: megatron-core's dataset index caches checked to be plain arrays before it opens them.
- sentences.py: offline Punkt sentence splitting (load a punkt_tab model or train one on the corpus).
- preprocess.py: the preprocessing pipeline behind tools/preprocess_data.py; preprocess_report.py its
  progress and summary lines; worker_pool.py its worker processes (which never outlive it).
- merge.py: concatenating datasets (tools/merge_datasets.py).
- pile.py: Pile domain sampling weights and --data-path blends (tools/pile_blend.py).
- tokenizer_training.py: byte-level BPE training (tools/train_tokenizer.py).
- cli.py: the command lines of the tools.
"""
