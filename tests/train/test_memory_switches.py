"""The recipe's memory switches through ``qtulu train``: same losses and gradients as without them.

``lora.dropout_impl: recompute`` draws the same CPU masks as peft's dropout (bit for bit, see
tests/train/test_lora_dropout.py);
``train.loss_chunk_size`` only changes how TRL's fused LM head tiles the vocabulary (the same sums
in another order); ``train.activation_offload`` moves nothing on a CPU (it offloads CUDA tensors),
so on this machine it must be exactly neutral; ``train.master_weights: host`` keeps fp32 copies on
a CPU (no autocast to mirror) and moves the gradient sums and the optimizer to host tensors. Each run: two optimizer steps of a tiny NF4 model
with gradient checkpointing, so the second step also sees the first update.
"""

from __future__ import annotations

import pytest
from transformers import TrainerCallback

from qtulu.demo.synthetic import packed_toy_dataset, toy_recipe
from qtulu.model.tiny import build_char_tokenizer, build_tiny_llama


class Grads(TrainerCallback):
    """The gradients an optimizer step is about to apply (the host masters' with train.master_weights=host)."""

    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        host = getattr(getattr(optimizer, "optimizer", optimizer), "qtulu_host_master", None)
        named = zip(host.names, host.masters) if host is not None else model.named_parameters()
        self.grads.append({n: p.grad.detach().clone() for n, p in named if p.grad is not None})


def _run(tmp_path, name, data, *, lora=None, train=None):
    from qtulu.train.run import train as run_train

    grab = Grads()
    t = {"max_steps": 2, "micro_batch_size": 2, "gradient_accumulation_steps": 2, "gradient_checkpointing": True,
         "max_grad_norm": 0.0}
    t.update(train or {})
    lo = {"dropout": 0.2}
    lo.update(lora or {})
    recipe = toy_recipe(train=t, lora=lo, model={"quantize": "nf4"})
    res = run_train(recipe, output_dir=tmp_path / name, model=build_tiny_llama(0), tokenizer=build_char_tokenizer(),
                    data=data, resume="never", progress=False, callbacks=[grab])
    return [s["loss"] for s in res.steps], grab.grads


def test_switches_keep_losses_and_gradients(tmp_path):
    data = packed_toy_dataset(16, 2, seed=5)
    losses, grads = _run(tmp_path, "ref", data)
    got_losses, got_grads = _run(tmp_path, "all", data, lora={"dropout_impl": "recompute"},
                                 train={"loss_chunk_size": 24, "activation_offload": True, "master_weights": "host",
                                        "save_steps": 2})
    assert got_losses == pytest.approx(losses, rel=1e-6)
    # first step: the same sums in another order (fp32 rounding); second step: after an Adam update,
    # which divides by sqrt(v) and so magnifies last-bit differences of near-zero first gradients.
    # With host master weights the gradients the guard (and this callback) see are the masters'.
    assert len(grads) == len(got_grads) == 2
    for ref, got, tol in zip(grads, got_grads, (1e-5, 1e-3)):
        assert len(ref) == len(got)
        for (k, r), g in zip(ref.items(), got.values()):
            assert r.shape == g.shape, k
            scale = r.abs().max().clamp(min=1e-12)
            assert float((r - g).abs().max() / scale) < tol, k
    from qtulu.train.master_weights import MASTER_FILE

    assert (tmp_path / "all" / "checkpoints" / "checkpoint-2" / MASTER_FILE).is_file()


def test_offload_needs_checkpointing(tmp_path):
    from qtulu.train.run import TrainError, train as run_train

    recipe = toy_recipe(train={"activation_offload": True, "gradient_checkpointing": False})
    with pytest.raises(TrainError, match="gradient_checkpointing"):
        run_train(recipe, output_dir=tmp_path, model=build_tiny_llama(0), tokenizer=build_char_tokenizer(),
                  data=packed_toy_dataset(4, 2, seed=1), resume="never", progress=False)


def _head_errors(device: str, chunk: int | None) -> tuple[float, float]:
    """|loss - float64 loss| and max |grad_hidden - float64 grad| / max |float64 grad| of TRL's fused
    LM head (what ``qtulu train`` computes the loss with) in bf16, ``chunk`` vocabulary columns per tile."""
    import torch
    import trl.trainer.utils as tu
    from trl.kernels import ChunkedLogProbFunction

    from qtulu.train.loss import loss_chunking

    g = torch.Generator().manual_seed(0)
    n, h, v = 300, 128, 1000  # 1000 columns: the tiles 24, 96 and 300 do not divide it
    hidden = torch.randn(n, h, generator=g).to(torch.bfloat16)
    weight = (torch.randn(v, h, generator=g) * 3 / h ** 0.5).to(torch.bfloat16)  # logits of a few units
    labels = torch.randint(0, v, (n,), generator=g)
    h64 = hidden.double().requires_grad_()
    ref = -torch.log_softmax(h64 @ weight.double().T, -1).gather(1, labels[:, None]).sum() / n
    ref.backward()
    x = hidden.to(device).requires_grad_()
    with loss_chunking(chunk):
        out = ChunkedLogProbFunction.apply(x, weight.to(device), None, labels.to(device), 1.0,
                                           tu._CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs",))
    loss = -out[0].sum() / n
    loss.backward()
    grad_err = float((x.grad.double().cpu() - h64.grad).abs().max() / h64.grad.abs().max())
    return abs(float(loss) - float(ref)), grad_err


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_chunked_loss_within_bf16_error_of_unchunked(device):
    """The bound: ``train.loss_chunk_size`` may move the bf16 loss and hidden-state gradient away from
    the float64 answer by at most twice what TRL's unchunked head (its own 32768-column tile, the whole
    vocabulary here) is away from it in bf16. On the CPU the tiles are folded in torch; on CUDA by TRL's
    Triton kernels with fp32 accumulation (GPU check owed where no CUDA device is present)."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (TRL's Triton fold kernels run only there)")
    base_loss, base_grad = _head_errors(device, None)
    assert base_grad > 1e-4  # bf16 logits: a real error to compare with, not a vacuous bound
    for chunk in (7, 24, 96, 300, 8192):
        loss_err, grad_err = _head_errors(device, chunk)
        assert loss_err <= 2 * base_loss + 1e-7, (chunk, loss_err, base_loss)
        assert grad_err <= 2 * base_grad, (chunk, grad_err, base_grad)


def test_loss_chunk_size_must_be_positive():
    from qtulu.train.loss import LossConfigError, loss_chunking

    with pytest.raises(LossConfigError, match="loss_chunk_size"):
        with loss_chunking(0):
            pass
