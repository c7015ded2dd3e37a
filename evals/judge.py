"""A client for any OpenAI-compatible endpoint (a local vLLM or llama.cpp server, or a hosted API),
used as the judge of AlpacaEval (chat completions) and TruthfulQA generation (completions with
log-probabilities, the GPT-judge protocol).

Standard library only (urllib): a judge must not pull an SDK into the eval path. The API key, if
any, is read from an environment variable (never from the command line, never written anywhere).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from qtulu.errors import QtuluError

HOW_TO_CONFIGURE = (
    "give a judge: --judge-url URL --judge-model NAME (any OpenAI-compatible endpoint, e.g. a local "
    "vLLM server `--judge-url http://localhost:8000/v1 --judge-model Qwen/Qwen2.5-72B-Instruct`, or "
    "`--judge-url https://api.openai.com/v1 --judge-model gpt-4o` with the key in $OPENAI_API_KEY); "
    "in Python: evaluate(..., judge=Judge(url, model))"
)


class JudgeNotConfigured(QtuluError, RuntimeError):
    """A task needs a judge and none was given."""

    def __init__(self, task: str):
        super().__init__(f"task {task!r} needs a judge model; {HOW_TO_CONFIGURE}")


class JudgeError(QtuluError, RuntimeError):
    """The judge endpoint failed or answered something unusable."""


@dataclass
class Judge:
    """``url``: the API base (``http://host:8000/v1``), or a full ``.../chat/completions`` URL."""

    url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 120.0
    max_retries: int = 4
    max_tokens: int = 16

    @property
    def base(self) -> str:
        url = self.url.rstrip("/")
        for suffix in ("/chat/completions", "/completions"):
            if url.endswith(suffix):
                return url[: -len(suffix)]
        return url

    @property
    def endpoint(self) -> str:
        return self.base + "/chat/completions"

    def _post(self, url: str, body: dict) -> dict:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        delay = 1.0
        for attempt in range(self.max_retries + 1):
            req = urllib.request.Request(url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                if e.code in (429, 500, 502, 503, 504) and attempt < self.max_retries:
                    time.sleep(delay)
                    delay *= 2
                    continue
                raise JudgeError(f"judge {url} answered HTTP {e.code}: {e.read()[:300]!r}") from e
            except urllib.error.URLError as e:
                if attempt < self.max_retries:
                    time.sleep(delay)
                    delay *= 2
                    continue
                raise JudgeError(f"judge {url} unreachable: {e.reason}") from e
            except json.JSONDecodeError as e:
                raise JudgeError(f"judge {url} answered something that is not JSON: {e}") from e
        raise JudgeError(f"judge {url}: retries exhausted")  # pragma: no cover (loop returns/raises)

    def complete(self, messages: list[dict], *, max_tokens: int | None = None, temperature: float = 0.0,
                 model: str | None = None) -> str:
        """The judge's reply (first choice's message content) to ``messages``; retries 429/5xx."""
        payload = self._post(self.endpoint, {
            "model": model or self.model, "messages": messages, "temperature": temperature,
            "max_tokens": max_tokens or self.max_tokens,
        })
        try:
            return payload["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError) as e:
            raise JudgeError(f"judge {self.endpoint} gave no chat completion: {e}") from e

    def top_logprobs(self, prompt: str, *, model: str | None = None, top: int = 2) -> dict[str, float]:
        """The ``top`` most likely first tokens after ``prompt`` and their log-probabilities, from the
        completions endpoint (``max_tokens=1, logprobs=top, temperature=0``), as TruthfulQA's judges
        are read."""
        url = self.base + "/completions"
        payload = self._post(url, {"model": model or self.model, "prompt": prompt, "max_tokens": 1,
                                   "temperature": 0, "logprobs": top, "echo": False})
        try:
            top_lp = payload["choices"][0]["logprobs"]["top_logprobs"][0]
            return {str(k): float(v) for k, v in top_lp.items()}
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
            raise JudgeError(f"judge {url} ({model or self.model}) gave no top log-probabilities: {e}; "
                             "TruthfulQA's judges need a completions endpoint with logprobs") from e


def require_judge(judge: Judge | None, task: str) -> Judge:
    if judge is None:
        raise JudgeNotConfigured(task)
    return judge
