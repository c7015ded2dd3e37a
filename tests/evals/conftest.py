"""Fixtures for the eval tests: tiny models with LoRA adapters, a TyDi QA fixture, a fake judge, a
model-less LM that records what a task asks, the LLaMA tokenizer."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

EVAL_DATA_PARTS = ("eval",)


@pytest.fixture
def eval_data(shared_data):
    """The shared eval data root (skips when absent)."""
    return shared_data(*EVAL_DATA_PARTS)


@pytest.fixture(scope="session")
def stub_lm():
    """A class: an ``LM`` without a model that records every request (``.calls``) and answers
    generations with ``reply(prompt)`` and next-token scores with ``choice(prompt)``."""
    from qtulu.evals.lm import LM

    class _Stub(LM):
        def __init__(self, tokenizer, chat_format="tulu", reply=None, choice=None):
            super().__init__(model=None, tokenizer=tokenizer, batch_size=8, chat_format=chat_format)
            self.reply = reply or (lambda prompt: "")
            self.choice = choice or (lambda prompt: [0.0, -1.0, -2.0, -3.0])
            self.calls = []

        def generate(self, prompts, **kwargs):
            self.calls.append(("generate", list(prompts), kwargs))
            return [[self.reply(p) for _ in range(kwargs.get("num_samples", 1))] for p in prompts]

        def next_token_logprobs(self, prompts, candidate_ids):
            self.calls.append(("next_token", list(prompts), list(candidate_ids)))
            return [list(self.choice(p)) for p in prompts]

        def token_logprobs(self, requests):
            self.calls.append(("token_logprobs", list(requests), None))
            return [(-float(len(ids) - start), False) for ids, start in requests]

        def loglikelihood(self, requests):
            self.calls.append(("loglikelihood", list(requests), None))
            return [(-float(len(c)), False) for _, c in requests]

    return _Stub


@pytest.fixture
def llama_tok(llama_tokenizer_path):
    """The LLaMA SentencePiece tokenizer of ../shared (loaded once per process, then cached)."""
    from qtulu.data.tokenizer import load_tokenizer

    return load_tokenizer(llama_tokenizer_path)


@pytest.fixture
def llama_tok_bos(llama_tok):
    """A copy whose ``encode``/``__call__`` add the BOS, as transformers' LLaMA tokenizer does (what
    open-instruct's ``tokenizer.encode(context)`` relied on); ``decode`` then shows it as "<s>"."""
    import copy

    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(llama_tok)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.bos_token_id)])
    return tok


@pytest.fixture(scope="session")
def tiny():
    from qtulu.model.tiny import build_char_tokenizer, build_tiny_llama

    return build_tiny_llama(seed=0, dtype=torch.float32), build_char_tokenizer()


def add_lora(model, names=("alpha", "beta"), seed=0, r=4):
    """LoRA adapters with random non-zero B, so every adapter changes the logits differently."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=4 * r, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    peft_model = get_peft_model(model, cfg, adapter_name=names[0])
    for n in names[1:]:
        peft_model.add_adapter(n, cfg)
    return peft_model.eval()


@pytest.fixture(scope="session")
def make_lora():
    """``add_lora`` as a fixture, for module-scoped fixtures in other files."""
    return add_lora


@pytest.fixture(scope="session")
def lora_pair():
    """(peft model with adapters 'alpha' and 'beta' on a tiny llama loaded by load_base, tokenizer)."""
    from qtulu.model.load import load_base
    from qtulu.model.tiny import build_char_tokenizer, build_tiny_llama

    tok = build_char_tokenizer()
    base, _ = load_base(build_tiny_llama(seed=0, dtype=torch.float32), quantize=None, compute_dtype=torch.float32,
                        device="cpu", attn_implementation=None, tokenizer=tok)
    return add_lora(base), tok


TYDI_DEV = {"data": [
    {"title": "t1", "paragraphs": [{"context": "Paris is the capital of France. It lies on the Seine.", "qas": [
        {"id": "english-1", "question": "What is the capital of France?",
         "answers": [{"text": "Paris", "answer_start": 0}]},
        {"id": "english-2", "question": "Which river runs through Paris?",
         "answers": [{"text": "the Seine", "answer_start": 42}, {"text": "Seine", "answer_start": 46}]}]}]},
    {"title": "t2", "paragraphs": [{"context": "Helsinki on Suomen pääkaupunki.", "qas": [
        {"id": "finnish-7", "question": "Mikä on Suomen pääkaupunki?",
         "answers": [{"text": "Helsinki", "answer_start": 0}]}]}]},
]}
TYDI_TRAIN = {"data": [
    {"title": "x", "paragraphs": [{"context": "Rome is in Italy.", "qas": [
        {"id": "english-100", "question": "Where is Rome?", "answers": [{"text": "Italy", "answer_start": 11}]}]}]},
    {"title": "y", "paragraphs": [{"context": "Oulu on kaupunki.", "qas": [
        {"id": "finnish-100", "question": "Mikä Oulu on?", "answers": [{"text": "kaupunki", "answer_start": 8}]}]}]},
]}


@pytest.fixture
def tydiqa_dir(tmp_path):
    """A data root holding tydiqa/ files in the official TyDi QA GoldP (SQuAD-like) schema."""
    d = tmp_path / "tydiqa"
    d.mkdir()
    (d / "tydiqa-goldp-v1.1-dev.json").write_text(json.dumps(TYDI_DEV, ensure_ascii=False), encoding="utf-8")
    (d / "tydiqa-goldp-v1.1-train.json").write_text(json.dumps(TYDI_TRAIN, ensure_ascii=False), encoding="utf-8")
    return tmp_path


@pytest.fixture
def fake_judge():
    """A local OpenAI-compatible endpoint. Chat completions: ``reply(messages) -> str``; completions:
    ``top(prompt) -> {token: logprob}`` (the first token's top log-probabilities)."""
    state = {"reply": lambda messages: "a", "top": lambda prompt: {" yes": 0.0}, "requests": []}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["requests"].append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            if self.path.endswith("/chat/completions"):
                payload = {"choices": [{"message": {"role": "assistant", "content": state["reply"](body["messages"])}}]}
            else:
                top = state["top"](body["prompt"])
                first = max(top, key=top.get) if top else ""
                payload = {"choices": [{"text": first, "logprobs": {"tokens": [first], "token_logprobs": [top.get(first)],
                                                                     "top_logprobs": [top]}}]}
            out = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield state
    server.shutdown()
    server.server_close()
