"""The training loop, one module per concern (checkpoints live in megatron_mile.checkpointing).

- initialize: seeds and the logging ranks (process groups: megatron_mile.parallel);
- setup: setup_training(), everything built before the first step, as the TrainingSetup the step takes;
- optimizer: DDP wrapping, megatron's optimizer and scheduler, the update that skips non-finite gradients;
- batch_size: each step's global batch and micro-batch count (megatron-core's calculator, --rampup-batch-size);
- data: the run's tokenizer, dataset checks and builds, the micro-batch iterators;
- step: one optimizer step and one evaluation pass on megatron's schedules (the loss collector);
- loop: pretrain(); train_log: what each step reports (log line every --log-interval, TensorBoard every
  --tensorboard-log-interval); reporting: log-line formats, the TensorBoard / W&B writer; flops: the step's
  FLOPs (--log-throughput); diagnostics: parameter norm, memory; timing: --timing-log-level's timers;
  summary: {save}/summary.json; profiling: --profile's torch.profiler / nsys range; token_histograms: the
  entropy / weight histograms; cli: the entry point's
  flags and exit codes.
"""
