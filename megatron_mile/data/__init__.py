"""Data pipeline: tokenizers, corpus readers, Megatron indexed-dataset writing, preprocessing, Pile blends.

Modules (each imports its heavy dependencies lazily, and none imports torch):
- tokenizers.py: build_tokenizer / add_tokenizer_args with Megatron-LM's tokenizer type names.
- readers.py: .jsonl, .jsonl.zst, .jsonl.gz, directories and globs of them.
- indexed_writer.py: the .bin/.idx format written with numpy, atomically.
- sentences.py: offline Punkt sentence splitting (load a punkt_tab model or train one on the corpus).
- preprocess.py: the preprocessing pipeline behind tools/preprocess_data.py.
- merge.py: concatenating datasets (tools/merge_datasets.py).
- pile.py: Pile domain sampling weights and --data-path blends (tools/pile_blend.py).
- tokenizer_training.py: byte-level BPE training (tools/train_tokenizer.py).
- cli.py: the command lines of the tools.
"""
