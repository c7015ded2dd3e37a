"""`qtulu chat`: adapters swapped live over one loaded base, driven through piped stdin."""

from __future__ import annotations

import io
import sys

import pytest
import torch


@pytest.fixture(scope="module")
def base_and_adapters(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    from qtulu.adapters.store import save_adapter
    from qtulu.model.load import base_info, load_base
    from qtulu.model.tiny import build_char_tokenizer, build_tiny_llama

    root = tmp_path_factory.mktemp("chat")
    base_dir = root / "base"
    build_tiny_llama(seed=0, dtype=torch.float32).save_pretrained(base_dir)
    build_char_tokenizer().save_pretrained(base_dir)
    model, _ = load_base(str(base_dir), compute_dtype=torch.float32, device="cpu")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", exclude_modules=["lm_head"],
                     lora_dropout=0.0, init_lora_weights=False)
    torch.manual_seed(11)
    pm = get_peft_model(model, cfg, adapter_name="alpha")
    pm.add_adapter("beta", cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(20.0)  # strong adapters: greedy replies differ between them
    info = base_info(pm)
    dirs = {n: save_adapter(pm, root / n, adapter_name=n, base_info=info) for n in ("alpha", "beta")}
    return base_dir, dirs


def _load(base_dir, adapters):
    from qtulu.adapters.store import load_model

    return load_model(str(base_dir), adapters, compute_dtype=torch.float32, device="cpu")


def test_chat_swaps_adapters_and_matches_single_adapter_runs(base_and_adapters):
    from qtulu.chat import reply, run_chat

    base_dir, dirs = base_and_adapters
    model, tok = _load(base_dir, [dirs["alpha"], dirs["beta"]])
    script = "hi there\n/reset\n/adapter beta\nhi there\n/reset\n/base\nhi there\n/adapter nope\n/adapters\n/quit\nnever read\n"
    out = io.StringIO()
    n = run_chat(model, tok, io.StringIO(script), out, max_new_tokens=8)
    text = out.getvalue()
    assert n == 3
    replies = {line.split("] ", 1)[0][1:]: line.split("] ", 1)[1] for line in text.splitlines()
               if line.startswith(("[alpha] ", "[beta] ", "[base] "))}
    assert set(replies) == {"alpha", "beta", "base"}, text
    assert "error: no adapter named 'nope'" in text and "[active: beta]" in text
    assert "adapters: ['alpha', 'beta']" in text
    assert "never read" not in text
    # each reply equals the one from a model holding only that adapter (or none)
    msgs = [{"role": "user", "content": "hi there"}]
    for name in ("alpha", "beta"):
        single, _ = _load(base_dir, [dirs[name]])
        assert reply(single, tok, msgs, max_new_tokens=8) == replies[name]
    base, _ = _load(base_dir, [])
    assert reply(base, tok, msgs, max_new_tokens=8) == replies["base"]
    assert len(set(replies.values())) >= 2


def test_chat_cli_with_piped_stdin(base_and_adapters, monkeypatch, capsys):
    """The CLI end to end, stdin a pipe-like stream (no tty): in-process, to spare a second import of torch."""
    from qtulu.cli import main

    base_dir, dirs = base_and_adapters
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/adapter bee\nhello\n/quit\n"))
    rc = main(["chat", "--model", str(base_dir), "--adapter", str(dirs["alpha"]), "--adapter", f"bee={dirs['beta']}",
               "--compute-dtype", "float32", "--device", "cpu", "--max-new-tokens", "4"])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("qtulu chat: adapters ['alpha', 'bee']; active: alpha")
    assert any(line.startswith("[alpha] ") for line in lines) and any(line.startswith("[bee] ") for line in lines)
    assert "[active: bee]" in lines


def test_chat_cli_refuses_adapter_of_other_base(base_and_adapters, tmp_path):
    from qtulu.cli import main
    from qtulu.model.tiny import build_tiny_llama

    _, dirs = base_and_adapters
    other = tmp_path / "other"
    build_tiny_llama(seed=5, dtype=torch.float32).save_pretrained(other)
    rc = main(["chat", "--model", str(other), "--adapter", str(dirs["alpha"]), "--device", "cpu"])
    assert rc == 2


def test_chat_cli_plain_peft_adapter_needs_and_takes_trained_on(base_and_adapters, tmp_path, monkeypatch, capsys):
    """A plain PEFT adapter (no qtulu.json): refused without --trained-on (one line, exit 2), loaded
    as said with it; a flag contradicting it (--no-quantize with nf4) is refused too."""
    import shutil

    from qtulu.cli import main

    base_dir, dirs = base_and_adapters
    plain = tmp_path / "plain"
    shutil.copytree(dirs["alpha"], plain)
    (plain / "qtulu.json").unlink()
    args = ["chat", "--model", str(base_dir), "--adapter", str(plain), "--device", "cpu", "--max-new-tokens", "2"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n/quit\n"))
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "--trained-on" in err and len(err.splitlines()) == 1
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n/quit\n"))
    assert main(args + ["--trained-on", "nf4", "--compute-dtype", "float32"]) == 0
    assert any(line.startswith("[plain] ") for line in capsys.readouterr().out.splitlines())
    assert main(args + ["--trained-on", "nf4", "--no-quantize"]) == 2
    assert "unquantized base" in capsys.readouterr().err
