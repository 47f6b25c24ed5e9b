"""Document-aware masking (--eod-mask-loss, --reset-position-ids, --reset-attention-mask) on a small real
dataset written with the project's indexed writer: short documents, each ending with EOD, several per
32-token sample.

References are built by hand from the token ids: the masked loss positions, the restarted positions and the
block-diagonal causal mask; the model's per-token losses with the block-diagonal mask equal those of running
each document alone; the training step's loss and weight sum, through the schedules at several layouts,
equal that per-document reference, EOD positions left out of the MiLe weights' sum.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_mile.arguments import parse_args
from megatron_mile.config import ConfigError
from megatron_mile.data.indexed_writer import IndexedDatasetWriter
from tiny_model import LOSS_FLAGS, TINY_LLAMA

VOCAB = 300  # NullTokenizer: ids 0..299, EOD = 300
EOD = VOCAB
SEQ = 32
# The tiny LLaMA of the training tests on files instead of megatron's mock data.
BASE = [flag for flag in TINY_LLAMA if flag != "--mock-data"]


@pytest.fixture(scope="module")
def documents_prefix(tmp_path_factory):
    """~400 documents of 2 to 12 tokens, each ending with EOD: several documents in every sample."""
    directory = tmp_path_factory.mktemp("documents")
    prefix = str(directory / "docs")
    rng = np.random.default_rng(5)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for _ in range(400):
            body = rng.integers(0, VOCAB, size=int(rng.integers(1, 12))).tolist()
            writer.add_document(body + [EOD])
        writer.finalize()
    return prefix


def data_flags(prefix, cache):
    return ["--data-path", prefix, "--data-cache-path", cache, "--split", "100,0,0", "--tokenizer-type",
            "NullTokenizer", "--vocab-size", str(VOCAB)]


def reference_masks(tokens: np.ndarray):
    """By hand: loss mask (0 where the input token is EOD), position within the document, and the
    [s, s] attention mask (True = masked) letting a token see the earlier tokens of its own document. The
    EOD ends its document: the token after it starts a new one."""
    document = np.concatenate([[0], np.cumsum(tokens[:-1] == EOD)])
    starts = {d: int(np.argmax(document == d)) for d in np.unique(document)}
    positions = np.array([i - starts[d] for i, d in enumerate(document)])
    i, j = np.meshgrid(np.arange(len(tokens)), np.arange(len(tokens)), indexing="ij")
    allowed = (j <= i) & (document[i] == document[j])
    return (tokens != EOD).astype(np.float32), positions, ~allowed, document


def build_samples(argv, count):
    """Worker body (no parallel state needed): the first `count` training samples of the run's dataset."""
    from megatron_mile.training import data as run_data

    config = parse_args(argv, world_size=1)
    train, _ = run_data.build_datasets(config, run_data.build_run_tokenizer(config), 0)
    return [{key: np.asarray(value) for key, value in train[i].items()} for i in range(count)]


def test_dataset_masks_positions_and_attention_follow_the_documents(dist_pool, documents_prefix, tmp_path):
    flags = BASE + data_flags(documents_prefix, str(tmp_path)) + [
        "--eod-mask-loss", "--reset-position-ids", "--reset-attention-mask", "--position-embedding-type",
        "learned_absolute"]
    samples = dist_pool(1).run(build_samples, flags, 6)[0]
    for sample in samples:
        tokens = sample["tokens"]
        loss_mask, positions, attention_mask, document = reference_masks(tokens)
        assert document[-1] >= 2, "every sample must hold several documents"
        np.testing.assert_array_equal(sample["loss_mask"], loss_mask)
        np.testing.assert_array_equal(sample["position_ids"], positions)
        np.testing.assert_array_equal(sample["attention_mask"][0], attention_mask)
        np.testing.assert_array_equal(sample["labels"][:-1], tokens[1:])
    # Without the flags: every position takes part, positions run on, the mask is the plain causal one.
    plain = dist_pool(1).run(build_samples, BASE + data_flags(documents_prefix, str(tmp_path)), 1)[0][0]
    assert plain["loss_mask"].min() == 1 and (plain["position_ids"] == np.arange(SEQ)).all()
    np.testing.assert_array_equal(plain["attention_mask"][0], np.triu(np.ones((SEQ, SEQ), bool), k=1))
    no_mask = dist_pool(1).run(build_samples, BASE + data_flags(documents_prefix, str(tmp_path))
                               + ["--no-create-attention-mask-in-dataloader"], 1)[0][0]
    assert "attention_mask" not in no_mask


def per_document_token_losses(model, tokens, labels, document, learned_positions):
    """ce of every position, each document run alone through the model (positions from 0)."""
    ce = torch.empty(len(tokens))
    for d in np.unique(document):
        where = np.flatnonzero(document == d)
        part = torch.as_tensor(tokens[where]).unsqueeze(0)
        positions = torch.arange(len(where)).unsqueeze(0) if learned_positions else None
        out = model(part, positions, None, labels=torch.as_tensor(labels[where]).unsqueeze(0))
        ce[where] = out[0, :, 0].detach()
    return ce


def document_run(argv, world_size, with_reference):
    """Worker body: one step's statistics (compute_gradients: schedules, forward_step, loss collector) on the
    document dataset; with `with_reference` (one process) also the first sample's per-token ce with the
    block-diagonal mask and per document, and the step's lm loss / weight sum / token count rebuilt from
    per-document runs of every sample of the global batch."""
    from megatron.core.utils import unwrap_model

    from megatron_mile.model import WEIGHT, request_entropy
    from megatron_mile.training import data as run_data
    from megatron_mile.training.setup import setup_training
    from megatron_mile.training.step import compute_gradients

    config = parse_args(argv, world_size=world_size)
    setup = setup_training(config)
    result = {}
    if with_reference:
        model = unwrap_model(setup.model[0])
        learned = config.model.position_embedding_type == "learned_absolute"
        request_entropy(setup.model, True)
        train, _ = run_data.build_datasets(config, run_data.build_run_tokenizer(config), 0)
        ce_sum = mask_sum = weight_sum = 0.0
        with torch.no_grad():
            for index in range(config.training.global_batch_size):
                batch = run_data.collate([train[index]])
                tokens, labels = batch["tokens"][0].numpy(), batch["labels"][0].numpy()
                loss_mask, _, _, document = reference_masks(tokens)
                alone = per_document_token_losses(model, tokens, labels, document, learned)
                if index == 0:
                    together = model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                                      labels=batch["labels"])
                    result["together"], result["alone"] = together[0, :, 0].clone(), alone
                mask = torch.as_tensor(loss_mask)
                ce_sum += float((alone * mask).sum())
                mask_sum += float(mask.sum())
                out = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
                weight_sum += float((out[0, :, WEIGHT] * mask).sum())
        result["reference"] = {"lm_loss": ce_sum / mask_sum, "tokens": mask_sum, "weight_sum": weight_sum,
                               "all_positions": float(config.training.global_batch_size * SEQ)}
    stats = compute_gradients(setup)
    result["stats"] = {"lm_loss": stats.lm_loss, "tokens": stats.tokens, "weight_sum": stats.weight_sum}
    return result


DOCUMENT_FLAGS = ["--eod-mask-loss", "--reset-attention-mask"]


@pytest.mark.parametrize("positions", ["rope", "learned_absolute"])
def test_block_diagonal_attention_equals_running_each_document_alone(dist_pool, documents_prefix, tmp_path,
                                                                      positions):
    extra = [] if positions == "rope" else ["--position-embedding-type", "learned_absolute", "--reset-position-ids"]
    argv = BASE + LOSS_FLAGS["mile"] + data_flags(documents_prefix, str(tmp_path)) + DOCUMENT_FLAGS + extra
    out = dist_pool(1).run(document_run, argv, 1, True)[0]
    # rope depends on relative positions only, so documents need no position reset there.
    torch.testing.assert_close(out["together"], out["alone"], rtol=1e-5, atol=1e-5)
    reference, stats = out["reference"], out["stats"]
    # The training step (forward_step -> model with the batch's mask -> loss collector) gives the same loss.
    assert stats["lm_loss"] == pytest.approx(reference["lm_loss"], rel=1e-5)
    # EOD positions have loss mask 0: they count neither as tokens nor in the MiLe weights' sum.
    assert stats["tokens"] == reference["tokens"] < reference["all_positions"]
    assert stats["weight_sum"] == pytest.approx(reference["weight_sum"], rel=1e-5)


def test_without_the_reset_the_documents_see_each_other(dist_pool, documents_prefix, tmp_path):
    argv = BASE + LOSS_FLAGS["mile"] + data_flags(documents_prefix, str(tmp_path)) + ["--eod-mask-loss"]
    out = dist_pool(1).run(document_run, argv, 1, True)[0]
    # The per-document reference does not describe a plain causal run: the comparison above can fail.
    assert not torch.allclose(out["together"], out["alone"], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("layout, world_size", [(["--tensor-model-parallel-size", "2"], 2),
                                                (["--pipeline-model-parallel-size", "2"], 2),
                                                (["--pipeline-model-parallel-size", "2",
                                                  "--num-layers-per-virtual-pipeline-stage", "1"], 2)],
                         ids=["tp2", "pp2", "pp2_virtual"])
def test_the_document_mask_reaches_every_layer_at_every_layout(dist_pool, documents_prefix, tmp_path, layout, world_size):
    argv = BASE + LOSS_FLAGS["mile"] + data_flags(documents_prefix, str(tmp_path)) + DOCUMENT_FLAGS
    reference = dist_pool(1).run(document_run, argv, 1, True)[0]["reference"]
    for rank in dist_pool(world_size).run(document_run, argv + layout, world_size, False):
        assert rank["stats"]["lm_loss"] == pytest.approx(reference["lm_loss"], rel=1e-5)
        assert rank["stats"]["weight_sum"] == pytest.approx(reference["weight_sum"], rel=1e-5)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--reset-position-ids"], "--reset-position-ids needs --position-embedding-type learned_absolute"),
        (["--reset-attention-mask", "--no-create-attention-mask-in-dataloader"],
         "--no-create-attention-mask-in-dataloader builds none"),
    ],
)
def test_document_flags_that_would_do_nothing_are_refused(extra, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(TINY_LLAMA + extra, world_size=1)


def test_reset_attention_mask_is_refused_where_the_attention_ignores_masks():
    from megatron_mile.kernels import KernelSupport

    h100 = dict(world_size=1, gpu_available=True, kernel_support=KernelSupport.full((9, 0)))
    with pytest.raises(ConfigError, match="Transformer Engine's causal attention takes no explicit mask"):
        parse_args(TINY_LLAMA + ["--reset-attention-mask", "--transformer-impl", "transformer_engine"], **h100)
    # The local attention (given: on this GPU machine the default would be Transformer Engine's).
    local = ["--reset-attention-mask", "--transformer-impl", "local"]
    with pytest.raises(ConfigError, match="--masked-softmax-fusion does not apply to this model: its causal kernel"):
        parse_args(TINY_LLAMA + local + ["--masked-softmax-fusion"], **h100)
    # Left unset, the fused softmax is simply off for such a run.
    from megatron_mile.kernels import resolve_fusions

    config = parse_args(TINY_LLAMA + local, **h100)
    assert resolve_fusions(config, True, KernelSupport.full((9, 0)))["masked_softmax_fusion"] is False
