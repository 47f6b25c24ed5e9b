"""Import of Hugging Face Llama models (and Llama-architecture Mistral, Qwen2) as checkpoints of this project
(tools/import_hf.py), the inverse of megatron_mile.export; both read the tensor layout of megatron_mile.llama_layout.

- `hf_config`: config.json -> the Llama's settings and the model flags, or a refusal naming the field;
- `safetensors_source`: the weights, read slice by slice from safetensors files (pickles refused);
- `tokenizer`: the tokenizer.json (and its companions) copied beside the checkpoint;
- `fill`: one rank's model stage and shard filled with the slices it owns;
- `checkpoint`: the whole import (`import_checkpoint`): checks, T x P processes, save, atomic rename;
- `cli`: the `tools/import_hf.py` command line.
"""
