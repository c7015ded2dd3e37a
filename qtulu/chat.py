"""``qtulu chat``: an interactive prompt over one base with several adapters, swapped live.

    qtulu chat --model BASE --adapter lima=adapters/lima --adapter adapters/code_alpaca

Lines typed are user turns (Tulu chat format, multi-turn history kept); commands:
``/adapter NAME`` switches adapter (the base stays loaded), ``/base`` disables adapters,
``/adapters`` lists them, ``/reset`` clears the history, ``/quit`` (or end of input) leaves.
Ctrl-C during a reply stops it (the turn is dropped) and the session stays open; Ctrl-C at the
prompt says how to leave, and a second one in a row leaves. Works with piped stdin (no tty),
which is how it is tested.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from qtulu.errors import QtuluError

HELP = "commands: /adapter NAME, /base, /adapters, /reset, /quit"


def _prompt_ids(tokenizer, messages, chat_format: str):
    import torch

    if chat_format == "tulu":
        from qtulu.data.chat import bos_token_id, render_tulu

        text = render_tulu(messages, eos_token=tokenizer.eos_token or "</s>", add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if bos_token_id(tokenizer) is not None:  # as training saw it (none for SmolLM2)
            ids = [bos_token_id(tokenizer)] + ids
    else:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
    return torch.tensor([ids])  # (1, T)


def reply(model, tokenizer, messages, *, chat_format: str = "tulu", max_new_tokens: int = 128,
          temperature: float = 0.0, max_context: int | None = None) -> str:
    """Generate the assistant's next turn for ``messages`` with the model's active adapter."""
    import torch

    ids = _prompt_ids(tokenizer, messages, chat_format)
    if max_context is not None and ids.shape[1] > max_context:
        ids = ids[:, -max_context:]  # keep the most recent context
    gen = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    if temperature > 0:
        gen.update(do_sample=True, temperature=temperature)
    else:
        gen.update(do_sample=False)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **gen)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def run_chat(model, tokenizer, stdin: TextIO, stdout: TextIO, *, chat_format: str = "tulu",
             max_new_tokens: int = 128, temperature: float = 0.0, max_context: int | None = None) -> int:
    """The read-eval-print loop; returns the number of replies generated."""
    from qtulu.adapters.store import BASE_NAME, AdapterError, adapter_names_of, adapters_disabled, set_active

    names = adapter_names_of(model)
    interactive = stdin.isatty()

    def active() -> str:
        return BASE_NAME if not names or adapters_disabled(model) else model.active_adapter

    def say(text: str) -> None:
        print(text, file=stdout, flush=True)

    say(f"qtulu chat: adapters {names or '(none)'}; active: {active()}. {HELP}")
    messages: list[dict[str, str]] = []
    n = 0
    interrupted_at_prompt = False
    while True:
        if interactive:
            stdout.write(f"[{active()}] > ")
            stdout.flush()
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            if interrupted_at_prompt:  # a second Ctrl-C in a row: leave
                say("")
                break
            interrupted_at_prompt = True
            say("\n(Ctrl-C again, /quit or Ctrl-D leaves)")
            continue
        interrupted_at_prompt = False
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            arg = arg.strip()
            if cmd == "/quit" or cmd == "/exit":
                break
            if cmd == "/adapter":
                try:
                    set_active(model, arg)
                    say(f"[active: {active()}]")
                except AdapterError as e:
                    say(f"error: {e}")
            elif cmd == "/base":
                set_active(model, BASE_NAME)
                say(f"[active: {BASE_NAME}]")
            elif cmd == "/adapters":
                say(f"adapters: {names}; active: {active()}")
            elif cmd == "/reset":
                messages = []
                say("[history cleared]")
            else:
                say(f"unknown command {cmd!r}; {HELP}")
            continue
        messages.append({"role": "user", "content": line})
        try:
            text = reply(model, tokenizer, messages, chat_format=chat_format, max_new_tokens=max_new_tokens,
                         temperature=temperature, max_context=max_context)
        except KeyboardInterrupt:  # stop this reply, keep the session (and the history before it)
            messages.pop()
            say(f"[{active()}] (reply stopped)")
            continue
        messages.append({"role": "assistant", "content": text or "..."})
        say(f"[{active()}] {text}")
        n += 1
    return n


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "chat",
        help="interactive chat over a base with adapters (/adapter NAME switches, /base, /quit)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("--model", required=True, help="base model dir or hub id (safetensors)")
    p.add_argument("--adapter", action="append", default=[], help="adapter dir or NAME=DIR (repeatable)")
    p.add_argument("--trained-on", choices=("nf4", "bf16", "fp16", "fp32"), default=None,
                   help="what the adapters were trained against (required for plain PEFT adapters, no qtulu.json)")
    p.add_argument("--no-quantize", action="store_true",
                   help="load the base unquantized (default: as the adapters were trained; NF4 without adapters)")
    p.add_argument("--compute-dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="default: the one the first adapter was trained with, else bfloat16")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--chat-format", choices=("tulu", "tokenizer"), default=None,
                   help="prompt format (default: the one the adapters were trained with, else tulu)")
    p.add_argument("--device", default=None)
    p.add_argument("--force", action="store_true", help="load adapters recorded for another base/quantization")
    p.set_defaults(func=_main)


class ChatError(QtuluError, ValueError):
    """``qtulu chat`` cannot start (e.g. the model has no tokenizer)."""


def _main(args: argparse.Namespace) -> int:
    # errors are qtulu errors (AdapterError, ModelLoadError, ...): qtulu.cli prints them as one line
    from qtulu.adapters.store import AUTO, load_model
    from qtulu.preflight import check_before_load

    check_before_load(args.model, args.adapter, args.trained_on)  # a typo costs seconds, not a base load
    if args.chat_format is None:  # prompt the adapters as their training rendered the rows
        from qtulu.adapters.store import prompt_format_of

        args.chat_format = prompt_format_of(args.adapter)
        print(f"prompt format: {args.chat_format} (--chat-format to choose)", file=sys.stderr)
    model, tok = load_model(
        args.model, args.adapter, quantize=None if args.no_quantize else AUTO, force=args.force,
        compute_dtype=args.compute_dtype, device=args.device, trained_on=args.trained_on,
    )
    if tok is None:
        raise ChatError(f"{args.model}: the model has no tokenizer (tokenizer.json / tokenizer.model)")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    max_context = max(1, max_pos - args.max_new_tokens) if max_pos else None
    from qtulu.model.dense_cache import dense_weights

    with dense_weights(model):  # CPU: the NF4 base dequantized once, not at every matmul of every token
        run_chat(model, tok, sys.stdin, sys.stdout, chat_format=args.chat_format, max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature, max_context=max_context)
    return 0
