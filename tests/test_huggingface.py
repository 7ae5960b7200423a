"""Hugging Face models as they come: dict batches, ``outputs.loss``, padding, GPT-2's Conv1D.

Tiny randomly initialised configs only: nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from lightning_fls import prunable_layers, prune_one_shot
from lightning_fls.batches import make_batch
from lightning_fls.calibration import GradientCollector, InputCollector
from lightning_fls.layers.adapters import TransposedLinearAdapter

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402


def tiny_bert() -> Any:
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=32, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


def tiny_gpt2() -> Any:
    config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def bert_batches(count: int = 4, size: int = 8, pad: int = 3) -> list[dict[str, Tensor]]:
    """Sequences of 10 tokens whose last ``pad`` positions are padding."""
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(count):
        ids = torch.randint(1, 50, (size, 10), generator=generator)
        mask = torch.ones(size, 10, dtype=torch.long)
        mask[:, 10 - pad :] = 0
        labels = torch.randint(0, 3, (size,), generator=generator)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def test_bert_prunes_from_dict_batches_with_the_models_own_loss() -> None:
    model = tiny_bert()
    report = prune_one_shot(model, bert_batches(), sparsity=0.5, steps=2, samples_per_step=16,
                            progress=False)  # fmt: skip
    layers = list(prunable_layers(model))
    assert set(report.layer_sparsity) == set(layers)
    assert all(".layer." in key for key in layers)  # embeddings, pooler and head stay dense
    assert any("attention.self.query" in key for key in layers)
    assert report.sparsity == pytest.approx(0.5, abs=1e-3)
    assert float(model.bert.pooler.dense.weight.eq(0).float().mean()) == 0.0


@pytest.mark.parametrize("method", ["sparsegpt", "obert", "magnitude"])
def test_other_methods_take_dict_batches_too(method: str) -> None:
    report = prune_one_shot(tiny_bert(), bert_batches(), sparsity=0.5, method=method,
                            samples_per_step=16, progress=False)  # fmt: skip
    assert report.sparsity == pytest.approx(0.5, abs=1e-3)


def test_a_user_loss_receives_the_dict_batch() -> None:
    seen: list[set[str]] = []

    def loss_fn(outputs: Any, batch: dict[str, Tensor]) -> Tensor:
        seen.append(set(batch))
        return torch.nn.functional.cross_entropy(outputs.logits, batch["labels"])

    prune_one_shot(tiny_bert(), bert_batches(), loss_fn, sparsity=0.3, steps=1,
                   samples_per_step=8, progress=False)  # fmt: skip
    assert seen
    assert seen[0] == {"input_ids", "attention_mask", "labels"}


def test_missing_loss_is_a_clear_error_and_leaves_the_model_alone() -> None:
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in bert_batches()]
    with pytest.raises(ValueError, match="no `loss`"):
        prune_one_shot(model, batches, sparsity=0.5, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="`loss_fn` is None but the batches are"):
        prune_one_shot(model, [(torch.zeros(2, 3), torch.zeros(2))], sparsity=0.5, progress=False)
    bad = [{"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(3)}]
    with pytest.raises(ValueError, match="`attention_mask` must be a \\[batch, tokens\\]"):
        prune_one_shot(model, bad, sparsity=0.5, progress=False)


def _with_other_padding(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The same batch with different token ids at the padded positions."""
    ids = batch["input_ids"].clone()
    ids[batch["attention_mask"] == 0] = 7
    return {**batch, "input_ids": ids}


def test_padding_contributes_nothing_to_gradient_and_input_statistics() -> None:
    model = tiny_bert()
    layers = prunable_layers(model)
    for p in model.parameters():
        p.requires_grad_(True)
    batch = bert_batches(1)[0]
    other = _with_other_padding(batch)
    device = torch.device("cpu")

    def block(b: dict[str, Tensor]) -> dict[str, Tensor]:
        collector = GradientCollector(model, None, layers)
        collector.observe(make_batch(b, device, loss_fn=None))
        grads = collector.result().batches[0]
        return {k: g.block_fisher(8) for k, g in grads.items()}

    def hessians(b: dict[str, Tensor], *, keep_mask: bool = True) -> dict[str, Tensor]:
        made = make_batch(b, device, loss_fn=None)
        if not keep_mask:
            made.token_mask = None
        collector = InputCollector(model, None, layers)
        collector.observe(made)
        result = collector.result().input_hessians
        assert result is not None
        return result

    for first, second in [(block(batch), block(other)), (hessians(batch), hessians(other))]:
        for key in layers:
            torch.testing.assert_close(first[key], second[key], rtol=1e-4, atol=1e-6)
    # Control: without the mask the padded positions' inputs do count.
    unmasked, unmasked_other = hessians(batch, keep_mask=False), hessians(other, keep_mask=False)
    assert any(not torch.allclose(unmasked[k], unmasked_other[k]) for k in layers)


def test_gpt2_conv1d_is_pruned_like_linear_with_exact_per_example_gradients() -> None:
    model = tiny_gpt2()
    layers = prunable_layers(model)
    assert any(isinstance(a, TransposedLinearAdapter) for a in layers.values())
    assert "lm_head.weight" not in layers  # tied to the embedding, outside the blocks
    key = next(k for k, a in layers.items() if isinstance(a, TransposedLinearAdapter))
    adapter = layers[key]
    conv = adapter.module
    assert isinstance(conv, Conv1D)
    assert adapter.canonical_shape == (conv.weight.shape[1], conv.weight.shape[0] + 1)
    # Canonical round trip and per-example gradients against explicit autograd.
    parts = adapter.from_canonical(adapter.canonical_weight())
    assert torch.equal(parts["weight"], conv.weight.detach())
    ids = torch.randint(0, 40, (3, 6), generator=torch.Generator().manual_seed(2))
    for p in model.parameters():
        p.requires_grad_(True)
    collector = GradientCollector(model, None, {key: adapter})
    collector.observe(make_batch({"input_ids": ids, "labels": ids}, torch.device("cpu"),
                                 loss_fn=None))  # fmt: skip
    grads = collector.result().batches[0][key]
    for b in range(3):
        model.zero_grad()
        # The model's loss is the mean over all tokens; example b's share, times the batch size.
        out = model(input_ids=ids, labels=ids)
        per_token = torch.nn.functional.cross_entropy(
            out.logits[:, :-1].reshape(-1, 40), ids[:, 1:].reshape(-1), reduction="none"
        ).reshape(3, 5)
        (per_token[b].sum() / per_token.numel() * 3).backward()
        expected = adapter.to_canonical({"weight": conv.weight.grad, "bias": conv.bias.grad})
        torch.testing.assert_close(grads.materialise(b, b + 1)[0], expected, rtol=1e-4, atol=1e-6)


def test_gpt2_prunes_and_save_pretrained_keeps_the_zeros(tmp_path: Any) -> None:
    model = tiny_gpt2()
    ids = torch.randint(0, 40, (8, 12), generator=torch.Generator().manual_seed(3))
    batches = [{"input_ids": ids, "labels": ids}]
    report = prune_one_shot(model, batches, sparsity=0.5, steps=2, samples_per_step=8,
                            progress=False)  # fmt: skip
    assert report.sparsity == pytest.approx(0.5, abs=1e-3)
    model.save_pretrained(tmp_path)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    state = dict(loaded.named_parameters())
    for key, mask in report.masks.items():
        assert torch.equal(state[key].detach() != 0, mask)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
