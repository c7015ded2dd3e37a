"""Interop with artefacts made by the libraries themselves, not by qtulu (issue 14, point 7).

Two chains, on tiny random models built in-process (nothing downloaded):

* a plain PEFT adapter (``peft.get_peft_model`` + ``save_pretrained`` on a tiny LlamaForCausalLM,
  no ``qtulu.json``), and
* a transformers + bitsandbytes 4-bit model (NF4, quantized on the CPU) with a PEFT adapter
  trained on it (the QLoRA user's artefacts),

each through load -> eval (the eval runner's log-likelihood) -> merge (``qtulu merge``, a
combination) -> ``qtulu merge --full`` -> ``transformers.AutoModelForCausalLM.from_pretrained``,
the logits compared at every hand-off against what the adapter's author gets, or against an
independent reconstruction (base weights + the LoRA deltas computed from the factors here).
"""

from __future__ import annotations

import json

import pytest
import torch

IDS = torch.tensor([[1, 40, 41, 42, 17, 60, 61, 5, 9, 33, 70, 71], [1, 80, 81, 9, 9, 10, 22, 23, 24, 25, 26, 2]])
ROWS = [("<|user|>\nWhat is 2+2?\n<|assistant|>\n", "4"), ("Copy: abc\n", "abc"), ("The sky is", " blue.")]


def _lora_config(seed_r=4):
    from peft import LoraConfig

    return LoraConfig(r=seed_r, lora_alpha=2 * seed_r, target_modules="all-linear", lora_dropout=0.0,
                      init_lora_weights=False)


def _deltas(peft_model, name="default"):
    """{base module name: scale * B @ A} from the factors (independent of qtulu's export)."""
    out = {}
    for mod_name, m in peft_model.named_modules():
        if hasattr(m, "lora_A") and name in m.lora_A:
            a, b = m.lora_A[name].weight.float(), m.lora_B[name].weight.float()
            out[mod_name.replace("base_model.model.", "", 1)] = (b @ a) * m.scaling[name]
    return out


def _model_with(weights: dict, deltas: list[tuple[float, dict]]):
    """A tiny llama holding ``weights`` (fp32 state dict) plus sum_i w_i * delta_i on its Linears."""
    from qtulu.model.tiny import build_tiny_llama

    model = build_tiny_llama(seed=0, dtype=torch.float32)
    sd = {k: v.clone() for k, v in weights.items()}
    for w, d in deltas:
        for name, delta in d.items():
            sd[name + ".weight"] += w * delta
    model.load_state_dict(sd)
    return model.eval()


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _close(got, want, rel=1e-5):
    scale = want.abs().max()
    err = (got - want).abs().max()
    assert err <= rel * scale, f"max |diff| {err:.3e} > {rel:g} x logit scale {scale:.3f}"


def _direct_loglik(model, tok, rows):
    """sum log p(continuation | context), one unpadded sequence at a time (the runner's oracle)."""
    out = []
    for ctx, cont in rows:
        c = [tok.bos_token_id] + tok(ctx, add_special_tokens=False)["input_ids"]
        x = tok(cont, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([c + x])
        logp = _logits(model, ids).log_softmax(-1)[0]
        out.append(float(sum(logp[len(c) - 1 + i, t] for i, t in enumerate(x))))
    return out


def _runner_loglik(model, tok, rows):
    from qtulu.evals.lm import LM

    return [lp for lp, _ in LM(model, tok, batch_size=3, chat_format=None).loglikelihood(rows)]


def _from_pretrained(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from qtulu.model.tiny import build_char_tokenizer, build_tiny_llama

    d = tmp_path_factory.mktemp("interop") / "base"
    build_tiny_llama(seed=0, dtype=torch.float32).save_pretrained(d)
    build_char_tokenizer().save_pretrained(d)
    return d


def _run_cli(args, capsys):
    from qtulu.cli import main

    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# ---------------------------------------------------------------------------- a plain PEFT adapter


def test_peft_adapter_load_eval_merge_full_from_pretrained(base_dir, tmp_path, capsys):
    from peft import get_peft_model

    from qtulu.adapters.store import load_model
    from qtulu.model.tiny import build_char_tokenizer, build_tiny_llama

    tok = build_char_tokenizer()
    weights = build_tiny_llama(seed=0, dtype=torch.float32).state_dict()
    made = {}
    for name, seed in (("alpha", 1), ("beta", 2)):  # two adapters made by peft alone
        torch.manual_seed(seed)
        pm = get_peft_model(build_tiny_llama(seed=0, dtype=torch.float32), _lora_config()).eval()
        pm.save_pretrained(tmp_path / name)
        assert not (tmp_path / name / "qtulu.json").exists()
        made[name] = (pm, _deltas(pm))
    author = _logits(made["alpha"][0])  # what the adapter's author gets
    assert (author - _logits(build_tiny_llama(seed=0, dtype=torch.float32))).abs().max() > 1e-2

    # without --trained-on: one line, exit 2, naming the flag (no silent NF4 base)
    rc, _, err = _run_cli(["chat", "--model", str(base_dir), "--adapter", str(tmp_path / "alpha"), "--device", "cpu"], capsys)
    assert rc == 2 and "--trained-on" in err and len(err.strip().splitlines()) == 1, err

    # 1. load
    model, _ = load_model(str(base_dir), [f"alpha={tmp_path / 'alpha'}"], trained_on="fp32", device="cpu",
                          attn_implementation="sdpa")
    _close(_logits(model), author)
    # 2. eval: the runner's batched, left-padded log-likelihood == the author's model, row by row
    got = _runner_loglik(model, tok, ROWS)
    want = _direct_loglik(made["alpha"][0], tok, ROWS)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-4)

    # 3. merge: a linear combination of the two peft adapters -> a qtulu adapter
    rc, out, err = _run_cli(["merge", "--model", str(base_dir), "--adapter", str(tmp_path / "alpha"), "--adapter",
                             str(tmp_path / "beta"), "--weights", "0.6", "0.4", "--trained-on", "fp32",
                             "--out", str(tmp_path / "mix")], capsys)
    assert rc == 0, err
    combo = _logits(_model_with(weights, [(0.6, made["alpha"][1]), (0.4, made["beta"][1])]))
    ab, _ = load_model(str(base_dir), [tmp_path / "mix"], device="cpu", attn_implementation="sdpa")
    _close(_logits(ab), combo)  # qtulu.json recorded what it trained against: no flag needed now

    # 4. merge --full (fp32) -> 5. transformers from_pretrained
    rc, out, err = _run_cli(["merge", "--model", str(base_dir), "--adapter", str(tmp_path / "alpha"), "--full",
                             "--trained-on", "fp32", "--dtype", "float32", "--out", str(tmp_path / "full")], capsys)
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["adapter"]["trained_on"] == "fp32"
    _close(_logits(_from_pretrained(tmp_path / "full")), author)
    rc, out, err = _run_cli(["merge", "--model", str(base_dir), "--adapter", str(tmp_path / "mix"), "--full",
                             "--dtype", "float32", "--out", str(tmp_path / "mix_full")], capsys)
    assert rc == 0, err
    _close(_logits(_from_pretrained(tmp_path / "mix_full")), combo)


# ------------------------------------------------------------ a bitsandbytes 4-bit model + its adapter


def _bnb_dequantized_weights(bnb_model, dequantize) -> dict:
    """fp32 state dict with every NF4 Linear weight dequantized by bitsandbytes itself."""
    sd = {}
    for mod_name, m in bnb_model.named_modules():
        for p_name, p in m.named_parameters(recurse=False):
            qs = getattr(p, "quant_state", None)
            key = f"{mod_name}.{p_name}" if mod_name else p_name
            sd[key] = dequantize(p.data, qs).float() if qs is not None else p.detach().float()
    return sd


def test_bnb_model_and_its_peft_adapter_through_load_eval_merge_full(base_dir, tmp_path, capsys, bnb_4bit_model,
                                                                      bnb_dequantize):
    from peft import get_peft_model

    from qtulu.adapters.store import attach_adapters, load_model
    from qtulu.model.load import base_info, load_base
    from qtulu.model.tiny import build_char_tokenizer

    tok = build_char_tokenizer()
    made = {}
    for name, seed in (("alpha", 3), ("beta", 4)):  # QLoRA adapters made with peft on the bnb model
        torch.manual_seed(seed)
        pm = get_peft_model(bnb_4bit_model(base_dir), _lora_config()).eval()
        pm.save_pretrained(tmp_path / name)
        made[name] = (pm, _deltas(pm))
    author = _logits(made["alpha"][0])  # the QLoRA author's logits (bnb NF4 base + LoRA, fp32 compute)
    nf4_weights = _bnb_dequantized_weights(bnb_4bit_model(base_dir), bnb_dequantize)
    assert len([k for k in nf4_weights if "proj" in k]) == 14

    # 1. load: the in-memory bnb model taken over by load_base (its bits), and qtulu's own NF4
    #    quantization of the fp32 checkpoint: the same base, and the author's logits on both
    mem, _ = load_base(bnb_4bit_model(base_dir), compute_dtype=torch.float32, device="cpu", attn_implementation="sdpa")
    on_mem = attach_adapters(mem, [f"alpha={tmp_path / 'alpha'}"], base_info=base_info(mem), trained_on="nf4")
    _close(_logits(on_mem), author)
    model, _ = load_model(str(base_dir), [f"alpha={tmp_path / 'alpha'}"], trained_on="nf4", compute_dtype="float32",
                          device="cpu", attn_implementation="sdpa")
    assert base_info(model)["weights_sha256"] == base_info(mem)["weights_sha256"]
    _close(_logits(model), author)
    # 2. eval
    assert _runner_loglik(model, tok, ROWS) == pytest.approx(_direct_loglik(made["alpha"][0], tok, ROWS), rel=1e-5,
                                                             abs=1e-4)
    # 3. merge: combination of the two QLoRA adapters, checked against bnb's dequantized weights + deltas
    rc, _, err = _run_cli(["merge", "--model", str(base_dir), "--adapter", str(tmp_path / "alpha"), "--adapter",
                           str(tmp_path / "beta"), "--weights", "0.6", "0.4", "--trained-on", "nf4",
                           "--compute-dtype", "float32", "--out", str(tmp_path / "mix")], capsys)
    assert rc == 0, err
    combo = _logits(_model_with(nf4_weights, [(0.6, made["alpha"][1]), (0.4, made["beta"][1])]))
    ab = attach_adapters(load_base(bnb_4bit_model(base_dir), compute_dtype=torch.float32, device="cpu",
                                   attn_implementation="sdpa")[0], [tmp_path / "mix"])
    _close(_logits(ab), combo)  # the saved combination binds to the bnb model's bits

    # 4. merge --full from the fp32 checkpoint, and from a bitsandbytes checkpoint of the same bits
    bnb_dir = tmp_path / "bnb_ckpt"
    bnb_4bit_model(base_dir).save_pretrained(bnb_dir)
    tok.save_pretrained(bnb_dir)
    for src, out in ((base_dir, "full"), (bnb_dir, "full_from_bnb")):
        rc, _, err = _run_cli(["merge", "--model", str(src), "--adapter", str(tmp_path / "alpha"), "--full",
                               "--trained-on", "nf4", "--compute-dtype", "float32", "--dtype", "float32",
                               "--out", str(tmp_path / out)], capsys)
        assert rc == 0, err
        # 5. transformers from_pretrained: dequant(NF4(W)) + BA gives the QLoRA author's logits
        _close(_logits(_from_pretrained(tmp_path / out)), author)
    want = _model_with(nf4_weights, [(1.0, made["alpha"][1])]).state_dict()
    got = _from_pretrained(tmp_path / "full").state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6, msg=k)


# ----------------------------------------------------------------------------- one-line CLI errors


def test_cli_errors_are_one_line_naming_the_problem(base_dir, tmp_path, capsys, shared_data):
    from peft import get_peft_model

    from qtulu.model.tiny import build_tiny_llama

    get_peft_model(build_tiny_llama(seed=0), _lora_config()).save_pretrained(tmp_path / "plain")
    cases = [
        (["merge", "--model", str(base_dir), "--adapter", str(tmp_path / "plain"), "--full", "--out",
          str(tmp_path / "o")], "--trained-on"),
        (["merge", "--model", str(base_dir), "--adapter", str(tmp_path / "nope"), "--full", "--out",
          str(tmp_path / "o")], "not found"),
        (["merge", "--model", "./no/such/base", "--adapter", str(tmp_path / "plain"), "--full", "--trained-on",
          "fp32", "--out", str(tmp_path / "o")], "not found"),
        (["merge", "--model", str(base_dir), "--adapter", str(tmp_path / "plain"), "--full", "--trained-on",
          "fp32", "--max-shard-size", "5GiB", "--out", str(tmp_path / "o")], "max_shard_size"),
        (["chat", "--model", "./no/such/base", "--device", "cpu"], "not found"),
        (["eval", "--model", str(base_dir), "--adapter", str(tmp_path / "plain"), "--tasks", "gsm8k",
          "--data-dir", str(shared_data("eval")), "--out", str(tmp_path / "ev")], "--trained-on"),
    ]
    for args, needle in cases:
        rc, _, err = _run_cli(args, capsys)
        assert rc == 2, (args, err)
        assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (args, err)
    assert not (tmp_path / "o").exists()
