"""Export of trained checkpoints to other formats (Hugging Face LlamaForCausalLM).

- `checkpoint`: load a checkpoint saved at any TP/PP layout into one process, as full (TP=1) tensors;
- `hf_llama`: map those tensors and the run's settings to a LlamaForCausalLM state dict and config (where each
  tensor goes is megatron_mile.llama_layout's, shared with the import, megatron_mile.hf_import);
- `hf_tokenizer`: the tokenizer files of that directory, from the tokenizer the run used;
- `hf_directory`: the whole export (`export_checkpoint`), written into a temp directory and renamed;
- `cli`: the `tools/export_hf.py` command line.

Nothing here imports transformers: the directory is written with safetensors and plain JSON, so any
transformers release that knows Llama reads it.
"""
