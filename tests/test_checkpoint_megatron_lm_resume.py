"""Resuming (--load, no --finetune) a checkpoint Megatron-LM wrote, and Megatron-LM's rng_state in this project's.

The Megatron-LM checkpoint is built here, independently of the code under test: a run of this project trains 2
of 4 iterations and saves; its state at iteration 2 (weights and optimizer loaded from that checkpoint, the RNG
states read from its per-rank files) is written again with megatron-core's public dist_checkpointing.save in
Megatron-LM's shape: the model under 'model', the optimizer's sharded state, the common items of Megatron-LM's
save_checkpoint (an argparse ``args`` with its documented fields and the enums its parser puts there,
``checkpoint_version`` 3.0, ``iteration``, ``opt_param_scheduler``, ``num_floating_point_operations_so_far``)
and its ``rng_state`` ShardedObject, and no mile_checkpoint.json nor RNG files. Resuming that checkpoint must
give the uninterrupted run's iterations 3 and 4: training and validation losses bit for bit at the saved
layout (dropout on: the RNG states matter), and within float rounding at another TP/PP layout (dropout off:
the model-parallel split sums the matmuls in another order, and as in Megatron-LM the RNG states are not
carried across TP/PP sizes).

Workers run pretrain() in spawned gloo processes (tests/conftest.py: dist_pool).
"""

from __future__ import annotations

import argparse
import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoint_cases import LOOP_ARGS, common_layout_of, save_as_megatron_core

from megatron_mile import checkpointing

EVAL_ARGS = ["--eval-iters", "2", "--eval-interval", "1"]  # validation after every iteration, new samples each time
# Dropout off, and 100 tokens padded to 128 rows at TP 1 and TP 2 alike (the layouts can exchange checkpoints).
NO_DROPOUT = ["--hidden-dropout", "0", "--attention-dropout", "0", "--make-vocab-size-divisible-by", "64"]
GLOBAL_BATCH, SAVED_AT, FLOPS_BEFORE = 4, 2, 10**15
CONSUMED_TRAIN = SAVED_AT * GLOBAL_BATCH  # LOOP_ARGS: --global-batch-size 4
CONSUMED_VALID = SAVED_AT * 2 * GLOBAL_BATCH  # one validation of --eval-iters 2 global batches per iteration


def worker_pretrain(extra, world_size):
    """(train losses, validation, final iteration, consumed samples) of LOOP_ARGS + EVAL_ARGS + extra, or the
    CheckpointError's line."""
    from megatron_mile.arguments import parse_args
    from megatron_mile.training.loop import pretrain

    try:
        result = pretrain(parse_args(LOOP_ARGS + EVAL_ARGS + extra, world_size=world_size))
    except checkpointing.CheckpointError as error:
        return str(error)
    return [h.loss for h in result.history], list(result.validation), result.final_iteration, result.consumed_samples


def _rng_from_project_file(path):
    """A per-rank RNG file of this project, under Megatron-LM's rng_state names."""
    saved = torch.load(path, weights_only=True)
    name, keys, pos, has_gauss, cached = saved["numpy"]
    return {"random_rng_state": saved["python"], "np_rng_state": (name, keys.numpy().astype(np.uint32), pos,
                                                                   has_gauss, cached),
            "torch_rng_state": saved["torch_cpu"], "cuda_rng_state": None, "rng_tracker_states": saved["tracker"]}


def _megatron_lm_args(config, padded_vocab_size: int, distributed_optimizer: bool, per_dp_rng: bool):
    """Megatron-LM's args for this run: the fields its loader and check_checkpoint_args read, and the enums
    its argument parser and get_model put there (core_r0.16.0)."""
    from megatron.core import parallel_state
    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend

    m, o = config.model, config.optimizer
    return argparse.Namespace(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads, group_query_attention=False, num_query_groups=1,
        seq_length=m.seq_length, max_position_embeddings=m.max_position_embeddings,
        padded_vocab_size=padded_vocab_size, make_vocab_size_divisible_by=m.make_vocab_size_divisible_by, tokenizer_type="NullTokenizer", add_bias_linear=True,
        add_position_embedding=True, swiglu=False, normalization="LayerNorm",
        untie_embeddings_and_output_weights=False, params_dtype=torch.float32, bf16=False, fp16=False,
        optimizer="adam", adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
        use_distributed_optimizer=distributed_optimizer, data_parallel_random_init=per_dp_rng,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=None,
        data_parallel_size=parallel_state.get_data_parallel_world_size(),
        world_size=torch.distributed.get_world_size(), iteration=SAVED_AT, consumed_train_samples=CONSUMED_TRAIN,
        consumed_valid_samples=CONSUMED_VALID, skipped_train_samples=0, train_iters=4, global_batch_size=GLOBAL_BATCH,
        model_type=ModelType.encoder_or_decoder, attention_backend=AttnBackend.auto, exit_signal=signal.SIGTERM,
        no_save_optim=None, no_save_rng=None, ckpt_format="torch_dist",
    )


def worker_rewrite_as_megatron_lm(source, target, flags, world_size, per_dp_rng, common_layout):
    """Write iteration SAVED_AT of this project's checkpoint in `source` as Megatron-LM would into `target`, its
    common items in `common_layout` (checkpoint_cases.save_as_megatron_core)."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.utils import unwrap_model

    from megatron_mile.arguments import parse_args
    from megatron_mile.training.setup import setup_training

    config = parse_args(LOOP_ARGS + EVAL_ARGS + flags + ["--load", source, "--ckpt-step", str(SAVED_AT)],
                        world_size=world_size)
    setup = setup_training(config)  # the weights, optimizer and scheduler of iteration SAVED_AT
    distributed = config.parallel.use_distributed_optimizer
    rank = torch.distributed.get_rank()
    rng = _rng_from_project_file(Path(source) / f"iter_{SAVED_AT:07d}" / "rng" / f"rank_{rank:05d}.pt")
    rng_list = [rng]
    if per_dp_rng:  # Megatron-LM's --data-parallel-random-init: one entry per DP rank, gathered over DP
        rng_list = [None] * parallel_state.get_data_parallel_world_size()
        torch.distributed.all_gather_object(rng_list, rng, group=parallel_state.get_data_parallel_group())
    content_metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if distributed:
        content_metadata["distrib_optim_sharding_type"] = "dp_reshardable"
    model_state = {"model": unwrap_model(setup.model[0]).sharded_state_dict(metadata=dict(content_metadata))}
    state = dict(model_state)
    state["optimizer"] = setup.optimizer.sharded_state_dict(model_state, is_loading=False,
                                                            metadata=dict(content_metadata))
    # The saving run's padded vocabulary, as its description records it.
    padded = json.loads((Path(source) / f"iter_{SAVED_AT:07d}" / "mile_checkpoint.json").read_text())["vocab"]["padded"]
    state.update(
        args=_megatron_lm_args(config, padded, distributed, per_dp_rng), checkpoint_version=3.0, iteration=SAVED_AT,
        opt_param_scheduler=setup.scheduler.state_dict(), num_floating_point_operations_so_far=FLOPS_BEFORE,
        rng_state=ShardedObject("rng_state", rng_list,
                                (parallel_state.get_pipeline_model_parallel_world_size(),
                                 parallel_state.get_tensor_model_parallel_world_size()),
                                (parallel_state.get_pipeline_model_parallel_rank(),
                                 parallel_state.get_tensor_model_parallel_rank()),
                                replica_id=parallel_state.get_data_parallel_rank()),
    )
    path = Path(target) / f"iter_{SAVED_AT:07d}"
    if rank == 0:
        path.mkdir(parents=True)
    torch.distributed.barrier()
    save_as_megatron_core(state, path, content_metadata, common_layout)
    if rank == 0:
        (Path(target) / "latest_checkpointed_iteration.txt").write_text(f"{SAVED_AT}\n")
    torch.distributed.barrier()
    return sorted(p.name for p in path.iterdir()), common_layout_of(path)


def _uninterrupted(dist_pool, directory, flags):
    """4 iterations saved at SAVED_AT: the run's outcome and its save directory."""
    save = str(directory / "run")
    outcome = dist_pool(2).run(worker_pretrain, flags + ["--save", save, "--save-interval", str(SAVED_AT)], 2)[-1]
    return outcome, save


@pytest.fixture(scope="module")
def dropout_dp2(dist_pool, tmp_path_factory):
    """DP 2, dropout 0.1 (LOOP_ARGS), plain optimizer."""
    return _uninterrupted(dist_pool, tmp_path_factory.mktemp("dp2"), [])


@pytest.fixture(scope="module")
def no_dropout_tp2(dist_pool, tmp_path_factory):
    """TP 2, no dropout, plain optimizer (its state is stored per parameter: it loads at any TP/PP)."""
    return _uninterrupted(dist_pool, tmp_path_factory.mktemp("tp2"), NO_DROPOUT + ["--tensor-model-parallel-size", "2"])


def _rewrite(dist_pool, tmp_path, source, flags, per_dp_rng=False, common_layout="common_state"):
    """The Megatron-LM checkpoint; by default with the common items where Megatron-LM on megatron-core 0.17+
    keeps them (a common_state object among the shards)."""
    target = str(tmp_path / "megatron_lm")
    files, layout = dist_pool(2).run(worker_rewrite_as_megatron_lm, source, target, flags, 2, per_dp_rng,
                                     common_layout)[0]
    assert "mile_checkpoint.json" not in files and "rng" not in files and layout == common_layout
    return target


def _assert_resumed_exactly(resumed, uninterrupted):
    losses, validation, final, consumed = uninterrupted
    assert not isinstance(resumed, str), resumed
    assert resumed[0] == losses[SAVED_AT:]  # bit for bit
    assert resumed[1] == validation[SAVED_AT:]  # the validation continued on the same samples
    assert (resumed[2], resumed[3]) == (final, consumed) == (4, 16)


@pytest.mark.parametrize("per_dp_rng,common_layout", [(False, "common.pt"), (True, "common_state")],
                         ids=["rng_shared_over_dp-common.pt", "rng_per_dp_rank-common_state"])
def test_megatron_lm_checkpoint_resumes_exactly_at_its_layout(dist_pool, tmp_path, dropout_dp2, per_dp_rng,
                                                              common_layout):
    """Megatron-LM's checkpoints of both ages: common items in common.pt (megatron-core <= 0.16) and in a
    common_state object (0.17+), each read under whichever release is installed."""
    uninterrupted, source = dropout_dp2
    target = _rewrite(dist_pool, tmp_path, source, [], per_dp_rng, common_layout)
    save = str(tmp_path / "resumed")
    resumed = dist_pool(2).run(worker_pretrain, ["--load", target, "--save", save], 2)[-1]
    _assert_resumed_exactly(resumed, uninterrupted)
    # The counters continue: FLOPs from Megatron-LM's count, plus this run's 2 iterations (as the uninterrupted
    # run counts them from 0: its checkpoint at iteration 4 minus its checkpoint at SAVED_AT).
    from megatron_mile.checkpointing import safe_load

    def flops(directory, iteration):
        return safe_load.load_weights_only(Path(directory) / f"iter_{iteration:07d}" / "common.pt")[
            "num_floating_point_operations_so_far"]

    per_two_iterations = flops(source, 4) - flops(source, SAVED_AT)
    assert per_two_iterations > 0
    assert flops(save, 4) == FLOPS_BEFORE + per_two_iterations


def test_without_its_rng_states_the_resume_differs(dist_pool, tmp_path, dropout_dp2):
    """The exactness above rests on the rng_state object: --no-load-rng keeps freshly seeded dropout masks."""
    uninterrupted, source = dropout_dp2
    target = _rewrite(dist_pool, tmp_path, source, [])
    resumed = dist_pool(2).run(worker_pretrain, ["--load", target, "--no-load-rng"], 2)[-1]
    assert resumed[0] != uninterrupted[0][SAVED_AT:]
    assert (resumed[2], resumed[3]) == (4, 16)


@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2"], [], ["--pipeline-model-parallel-size", "2"]],
                         ids=["same_tp2", "other_tp1_dp2", "other_pp2"])
def test_megatron_lm_checkpoint_resumes_at_another_layout(dist_pool, tmp_path, no_dropout_tp2, layout):
    uninterrupted, source = no_dropout_tp2
    target = _rewrite(dist_pool, tmp_path, source, NO_DROPOUT + ["--tensor-model-parallel-size", "2"])
    resumed = dist_pool(2).run(worker_pretrain, NO_DROPOUT + layout + ["--load", target], 2)[-1]
    if layout == ["--tensor-model-parallel-size", "2"]:
        _assert_resumed_exactly(resumed, uninterrupted)
        return
    losses, validation, _, _ = uninterrupted
    assert not isinstance(resumed, str), resumed
    # Another TP/PP split sums the same products in another order: equal up to float32 rounding.
    assert resumed[0] == pytest.approx(losses[SAVED_AT:], rel=1e-5)
    assert [v[1] for v in resumed[1]] == pytest.approx([v[1] for v in validation[SAVED_AT:]], rel=1e-5)
    assert (resumed[2], resumed[3]) == (4, 16)


def test_megatron_lm_optimizer_state_that_does_not_fit_is_refused(dist_pool, tmp_path, no_dropout_tp2):
    _, source = no_dropout_tp2
    target = _rewrite(dist_pool, tmp_path, source, NO_DROPOUT + ["--tensor-model-parallel-size", "2"])
    flags = NO_DROPOUT + ["--tensor-model-parallel-size", "2", "--load", target]
    refused = dist_pool(2).run(worker_pretrain, flags + ["--use-distributed-optimizer"], 2)[-1]
    assert isinstance(refused, str), refused
    assert "written by Megatron-LM, iteration 2, TP 2, PP 1" in refused
    assert "--use-distributed-optimizer: checkpoint False, this run True" in refused and "--no-load-optim" in refused
    refused = dist_pool(2).run(worker_pretrain, flags + ["--optimizer", "sgd"], 2)[-1]
    assert isinstance(refused, str) and "optimizer (--optimizer): checkpoint 'adam', this run 'sgd'" in refused
    # The schedule is checked as for this project's checkpoints; --override-opt_param-scheduler takes the flags'.
    refused = dist_pool(2).run(worker_pretrain, flags + ["--lr", "5e-4"], 2)[-1]
    assert isinstance(refused, str) and "peak learning rate (--lr): checkpoint 0.001, this run 0.0005" in refused
    assert "written by Megatron-LM" in refused
    resumed = dist_pool(2).run(worker_pretrain, flags + ["--lr", "5e-4", "--override-opt_param-scheduler"], 2)[-1]
    assert not isinstance(resumed, str) and (resumed[2], resumed[3]) == (4, 16)
    without_optimizer = dist_pool(2).run(worker_pretrain, flags + ["--use-distributed-optimizer", "--no-load-optim"],
                                         2)[-1]
    assert not isinstance(without_optimizer, str) and (without_optimizer[2], without_optimizer[3]) == (4, 16)


def test_megatron_lm_distributed_optimizer_state_resumes_at_its_layout(dist_pool, tmp_path_factory):
    # 100 tokens pad to 128 rows at TP 1 and TP 2 alike: the refusal below is the optimizer's, not the vocabulary's.
    flags = ["--use-distributed-optimizer", "--make-vocab-size-divisible-by", "64"]
    uninterrupted, source = _uninterrupted(dist_pool, tmp_path_factory.mktemp("distopt"), flags)
    tmp_path = tmp_path_factory.mktemp("distopt_rewritten")
    target = _rewrite(dist_pool, tmp_path, source, flags)
    resumed = dist_pool(2).run(worker_pretrain, flags + ["--load", target], 2)[-1]
    _assert_resumed_exactly(resumed, uninterrupted)
    refused = dist_pool(2).run(worker_pretrain, flags + ["--load", target, "--tensor-model-parallel-size", "2"], 2)[-1]
    assert isinstance(refused, str) and "written by Megatron-LM, iteration 2, TP 1, PP 1" in refused, refused
    assert "distributed-optimizer state saved at TP=1" in refused

