"""A batched view of a causal LM for the tasks: greedy/sampled generation with stop strings,
continuation log-likelihoods and next-token log-probabilities.

All batches are LEFT padded with explicit ``position_ids`` (cumulative sum of the attention mask),
so a prompt gets the same positions and the same attended keys at any batch size: predictions at
batch size 1 and 8 are identical (open-instruct once reported MMLU 0.259 at batch 8 vs 0.459 at
batch 1 from getting this wrong).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


def tulu_prompt(user_text: str) -> str:
    """One user turn in the Tulu chat format, ready for the assistant's answer.

    Written here (not via qtulu.data.chat) because the eval prompt must match open-instruct's
    ``create_prompt_with_tulu_chat_format`` byte for byte, generation prompt included.
    """
    return "<|user|>\n" + user_text + "\n<|assistant|>\n"


@dataclass
class LM:
    """Wraps ``model`` (a transformers causal LM or a peft model) and its tokenizer.

    ``chat_format``: "tulu" (tuned models), "tokenizer" (the tokenizer's own chat template) or None
    (plain prompts, for base models). ``progress`` shows tqdm bars over batches.
    """

    model: object
    tokenizer: object
    batch_size: int = 8
    chat_format: str | None = "tulu"
    progress: bool = False
    max_length: int | None = None
    _device: object = field(default=None, repr=False)

    def __post_init__(self):
        if self.chat_format not in ("tulu", "tokenizer", None):
            raise ValueError(f"chat_format must be 'tulu', 'tokenizer' or None, got {self.chat_format!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if self.pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token")

    # --- prompts -----------------------------------------------------------------------------

    def chat(self, user_text: str, answer_prefix: str = "") -> str:
        """The prompt for one user turn followed by ``answer_prefix`` (e.g. "Answer:").

        Plain mode (no chat format) returns ``user_text + answer_prefix``; in chat modes the prefix
        starts the assistant's turn, as open-instruct does.
        """
        if self.chat_format is None:
            return user_text + answer_prefix
        if self.chat_format == "tulu":
            prompt = tulu_prompt(user_text)
        else:
            prompt = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
            )
        return prompt + answer_prefix

    @property
    def device(self):
        if self._device is None:
            import torch

            try:
                self._device = next(self.model.parameters()).device
            except StopIteration:
                self._device = torch.device("cpu")
        return self._device

    def encode(self, text: str) -> list[int]:
        # BOS only (no EOS): the prompt must be continued
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        return ([bos] if bos is not None else []) + list(ids)

    def _batch(self, seqs: Sequence[Sequence[int]]):
        """Left-pad ``seqs``: input_ids, attention_mask, position_ids, each (B, T)."""
        import torch

        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            if len(s):
                ids[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
                mask[i, width - len(s):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): real tokens at 0..len-1 whatever the padding
        dev = self.device
        return ids.to(dev), mask.to(dev), pos.to(dev)

    def _order(self, lengths: Sequence[int]) -> list[int]:
        # longest first: similar lengths share a batch (less padding); results are put back in order
        return sorted(range(len(lengths)), key=lambda i: -lengths[i])

    def _chunks(self, order: list[int], desc: str):
        chunks = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.progress:
            from tqdm.auto import tqdm

            return tqdm(chunks, desc=desc, leave=False)
        return chunks

    def _logits(self, ids, mask, pos):
        import torch

        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
        return out.logits.float()  # (B, T, V)

    # --- scoring -----------------------------------------------------------------------------

    def next_token_logprobs(self, prompts: Sequence[str], candidate_ids: Sequence[int]) -> list[list[float]]:
        """Log-probabilities of ``candidate_ids`` as the token after each prompt: (N, len(candidates))."""
        import torch

        encoded = [self._truncate_left(self.encode(p)) for p in prompts]
        results: list[list[float]] = [None] * len(prompts)  # type: ignore[list-item]
        cand = torch.tensor(list(candidate_ids), dtype=torch.long)
        for chunk in self._chunks(self._order([len(e) for e in encoded]), "scoring"):
            ids, mask, pos = self._batch([encoded[i] for i in chunk])
            logp = self._logits(ids, mask, pos)[:, -1].log_softmax(-1).cpu()  # (B, V): last slot is real (left pad)
            for row, i in enumerate(chunk):
                results[i] = logp[row, cand].tolist()
        return results

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        ctx = self.encode(context)
        whole = self.encode(context + continuation)
        if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
            return ctx, whole[len(ctx):]
        return ctx, list(self.tokenizer(continuation, add_special_tokens=False)["input_ids"])

    def _truncate_left(self, ids: list[int]) -> list[int]:
        if self.max_length and len(ids) > self.max_length:
            return ids[-self.max_length:]
        return ids

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """For each (context, continuation): (sum of log p(continuation tokens | context), is_greedy)."""
        pairs = [self._split(c, x) for c, x in requests]
        for (ctx, cont), (c, x) in zip(pairs, requests):
            if not cont:
                raise ValueError(f"empty continuation for context {c[-60:]!r}")
        seqs = [self._truncate_left(ctx + cont) for ctx, cont in pairs]
        results: list[tuple[float, bool]] = [None] * len(seqs)  # type: ignore[list-item]
        for chunk in self._chunks(self._order([len(s) for s in seqs]), "loglikelihood"):
            ids, mask, pos = self._batch([seqs[i] for i in chunk])
            logp = self._logits(ids, mask, pos).log_softmax(-1)  # (B, T, V)
            width = ids.shape[1]
            for row, i in enumerate(chunk):
                n = len(pairs[i][1])
                target = ids[row, width - n:]  # (n,) the continuation, right-aligned
                pred = logp[row, width - n - 1: width - 1]  # (n, V) logits that predict it
                tok_lp = pred.gather(-1, target[:, None]).squeeze(-1)
                greedy = bool((pred.argmax(-1) == target).all())
                results[i] = (float(tok_lp.sum()), greedy)
        return results

    # --- generation --------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 256,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        num_samples: int = 1,
        seed: int = 0,
    ) -> list[list[str]]:
        """Completions for each prompt: ``num_samples`` strings each, cut at the first stop string.

        temperature 0 = greedy (then num_samples must be 1). Sampling is seeded per batch, so it is
        reproducible for a given batch size (greedy output does not depend on the batch size).
        """
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        if temperature == 0 and num_samples != 1:
            raise ValueError("greedy decoding gives one sample per prompt; use temperature > 0 for more")
        tok = self.tokenizer
        encoded = [self._truncate_left(self.encode(p)) for p in prompts]
        # each prompt repeated num_samples times, consecutively
        flat = [e for e in encoded for _ in range(num_samples)]
        outputs: list[str] = [None] * len(flat)  # type: ignore[list-item]
        stop = [s for s in stop if s]

        class _StopStrings(StoppingCriteria):
            def __init__(self, start: int):
                self.start = start

            def __call__(self, input_ids, scores, **kwargs):
                texts = tok.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
                done = [any(s in t for s in stop) for t in texts]
                return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

        eos = [t for t in {tok.eos_token_id, self.model_config_eos()} if t is not None]
        for bi, chunk in enumerate(self._chunks(self._order([len(e) for e in flat]), "generating")):
            ids, mask, _pos = self._batch([flat[i] for i in chunk])
            kwargs = dict(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                pad_token_id=self.pad_id,
                eos_token_id=eos or None,
            )
            if stop:
                kwargs["stopping_criteria"] = StoppingCriteriaList([_StopStrings(ids.shape[1])])
            if temperature > 0:
                torch.manual_seed(seed + bi)
                kwargs.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            with torch.no_grad():
                gen = self.model.generate(**kwargs)  # (B, T + new); generate derives positions from the mask
            texts = tok.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
            for i, text in zip(chunk, texts):
                outputs[i] = cut_at_stop(text, stop)
        return [outputs[i * num_samples:(i + 1) * num_samples] for i in range(len(prompts))]

    def model_config_eos(self):
        cfg = getattr(self.model, "config", None)
        eos = getattr(cfg, "eos_token_id", None)
        return eos[0] if isinstance(eos, list) and eos else (eos if isinstance(eos, int) else None)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        j = text.find(s)
        if j != -1:
            cut = min(cut, j)
    return text[:cut]
