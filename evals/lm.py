"""A batched view of a causal LM for the tasks: greedy/sampled generation with stop strings,
continuation log-likelihoods and next-token log-probabilities.

Scoring is batch-size independent. Batches for scoring are RIGHT padded: every example's tokens sit
at columns 0..len-1 with positions 0..len-1 whatever else is in the batch, so nothing about an
example (its positions, which keys it attends to, where blocked reductions start) depends on the
padded width. Why left padding was not enough (measured on a tiny LLaMA, CPU): with the example
shifted right by its padding, (1) a batch of one has no padding, so transformers drops the mask and
runs one attention kernel (qtulu's varlen kernel or SDPA's causal path) while padded batches take
SDPA's masked path; (2) SDPA's CPU kernel splits keys into blocks whose size depends on the padded
length and whose boundaries move with the padding, so the softmax sums are rounded differently.
Log-probabilities then moved by up to 1e-6 in fp32 and 8e-3 in bf16 between batch 1 and 8.

For models on qtulu's ``qtulu_varlen`` attention (every model ``qtulu.adapters.store.load_model``
loads) the padding of a row gets positions of its own (0, 1, ... after the example), so the kernel
sees the pad run as a separate packed sequence and computes each example's attention over exactly
its own tokens, with no mask. Measured on the CPU (tests/evals/test_lm.py): bf16 and NF4 scores are
bit-identical at batch 1, 3 and 8; fp32 ones agree within 1e-5 (MKL's fp32 matmuls may round a row
differently for another row count, 5e-7). Other models get right padding plus an attention mask:
within 1e-5 in fp32; in bf16 eager attention is bit-identical, SDPA differs by up to ~1e-2 (its CPU
kernel's blocking depends on the padded width). GPU kernels were not measured (no GPU here).

Generation needs the prompt to end where generation starts, so generation batches are LEFT padded
with explicit ``position_ids`` (cumulative sum of the mask); greedy outputs agree at batch 1 and 8.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from qtulu.data.chat import bos_token_id


def tulu_prompt(user_text: str) -> str:
    """One user turn in the Tulu chat format, ready for the assistant's answer.

    Written here (not via qtulu.data.chat) because the eval prompt must match open-instruct's
    ``create_prompt_with_tulu_chat_format(messages, add_bos=False)`` byte for byte (eval/templates.py
    at 171c3f163), generation prompt included; the BOS comes from tokenization, as there.
    """
    return "<|user|>\n" + user_text + "\n<|assistant|>\n"


@dataclass
class LM:
    """Wraps ``model`` (a transformers causal LM or a peft model) and its tokenizer.

    ``chat_format``: "tulu" (tuned models), "tokenizer" (the tokenizer's own chat template) or None
    (plain prompts, for base models). ``progress`` shows tqdm bars over batches. ``max_length``:
    the longest input fed to the model (None: no limit); a longer one keeps its BOS and its last
    ``max_length - 1`` tokens (tasks that can drop few-shot examples do so before that happens).
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

    def chat_then(self, user_text: str, answer_prefix: str) -> str:
        """open-instruct's chat prompt followed by ``answer_prefix``: ``chat(user) + prefix`` when the
        chat prompt ends in a newline or space, else ``chat(user) + " " + prefix``."""
        prompt = self.chat(user_text)
        return prompt + (answer_prefix if prompt[-1:] in ("\n", " ") else " " + answer_prefix)

    @property
    def context_length(self) -> int | None:
        """The longest input the model takes: ``max_length``, else the config's
        ``max_position_embeddings``, else None."""
        if self.max_length:
            return self.max_length
        n = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        return n if isinstance(n, int) else None

    @property
    def device(self):
        if self._device is None:
            import torch

            try:
                self._device = next(self.model.parameters()).device
            except StopIteration:
                self._device = torch.device("cpu")
        return self._device

    def tokens(self, text: str) -> list[int]:
        """``text``'s token ids, no special tokens added."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, text: str) -> list[int]:
        """BOS + tokens (no EOS: the prompt is to be continued), as open-instruct's
        ``tokenizer(prompt)`` gives for LLaMA."""
        bos = bos_token_id(self.tokenizer)  # none where the tokenizer's config says so (SmolLM2)
        return ([bos] if bos is not None else []) + self.tokens(text)

    def _truncate_left(self, ids: list[int]) -> list[int]:
        """At most ``max_length`` tokens: the BOS (if first) is kept, the oldest others dropped."""
        if not self.max_length or len(ids) <= self.max_length:
            return ids
        bos = bos_token_id(self.tokenizer)
        if bos is not None and ids and ids[0] == bos and self.max_length > 1:
            return [bos] + ids[len(ids) - self.max_length + 1:]
        return ids[-self.max_length:]

    def _order(self, lengths: Sequence[int]) -> list[int]:
        # longest first: similar lengths share a batch (less padding); results are put back in order
        return sorted(range(len(lengths)), key=lambda i: -lengths[i])

    def _chunks(self, order: list[int], desc: str):
        chunks = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.progress:
            from tqdm.auto import tqdm

            return tqdm(chunks, desc=desc, leave=False)
        return chunks

    # --- scoring -----------------------------------------------------------------------------

    def _uses_varlen(self) -> bool:
        cfg = getattr(self.model, "config", None)
        return getattr(cfg, "_attn_implementation", None) == "qtulu_varlen"

    def _score_logits(self, seqs: Sequence[Sequence[int]]):
        """Right-padded forward pass: (B, W, V) logits, row i's tokens at 0..len-1."""
        import torch

        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        pos = torch.zeros((len(seqs), width), dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            n = len(s)
            ids[i, :n] = torch.tensor(list(s), dtype=torch.long)
            pos[i, :n] = torch.arange(n)
            pos[i, n:] = torch.arange(width - n)  # the pad run restarts at 0: a packed sequence of its own
            mask[i, :n] = 1
        dev = self.device
        kwargs = dict(input_ids=ids.to(dev), position_ids=pos.to(dev), use_cache=False)
        if not self._uses_varlen():
            kwargs["attention_mask"] = mask.to(dev)
        with torch.no_grad():
            return self.model(**kwargs).logits  # (B, W, V)

    def next_token_logprobs(self, prompts: Sequence[str], candidate_ids: Sequence[int]) -> list[list[float]]:
        """Log-probabilities of ``candidate_ids`` as the token after each prompt: (N, len(candidates))."""
        import torch

        encoded = [self._truncate_left(self.encode(p)) for p in prompts]
        results: list[list[float]] = [None] * len(prompts)  # type: ignore[list-item]
        cand = torch.tensor(list(candidate_ids), dtype=torch.long)
        for chunk in self._chunks(self._order([len(e) for e in encoded]), "scoring"):
            logits = self._score_logits([encoded[i] for i in chunk])  # (B, W, V)
            rows = torch.arange(len(chunk), device=logits.device)
            last = torch.tensor([len(encoded[i]) - 1 for i in chunk], device=logits.device)
            logp = logits[rows, last].float().log_softmax(-1).cpu()  # (B, V): only the positions needed
            for row, i in enumerate(chunk):
                results[i] = logp[row, cand].tolist()
        return results

    def token_logprobs(self, requests: Sequence[tuple[Sequence[int], int]]) -> list[tuple[float, bool]]:
        """For each (token ids, start): (sum of log p(ids[t] | ids[:t]) for t >= start, all greedy).

        ``start`` <= 0 is read as 1 (the first token has no context); a start at or past the end
        scores nothing (0.0, True), as summing an empty slice does in open-instruct's scorer.
        """
        import torch

        results: list[tuple[float, bool]] = [None] * len(requests)  # type: ignore[list-item]
        for ids, _ in requests:
            if self.max_length and len(ids) > self.max_length:
                raise ValueError(f"a scored sequence of {len(ids)} tokens exceeds max_length={self.max_length}")
        for chunk in self._chunks(self._order([len(ids) for ids, _ in requests]), "loglikelihood"):
            seqs = [list(requests[i][0]) for i in chunk]
            logits = self._score_logits(seqs)  # (B, W, V)
            for row, i in enumerate(chunk):
                ids, start = seqs[row], max(1, requests[i][1])
                if start >= len(ids):
                    results[i] = (0.0, True)
                    continue
                target = torch.tensor(ids[start:], device=logits.device)  # (n,)
                pred = logits[row, start - 1: len(ids) - 1].float().log_softmax(-1)  # (n, V): the predicting positions
                tok_lp = pred.gather(-1, target[:, None]).squeeze(-1)
                results[i] = (float(tok_lp.sum()), bool((pred.argmax(-1) == target).all()))
        return results

    def masked_nll(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, int]]:
        """For each (input_ids, labels) as training encodes them (labels -100 where nothing is
        supervised, else the token itself): (sum over t >= 1 with labels[t] != -100 of
        -log p(labels[t] | ids[:t]), the number of such t): the training loss's terms, summed."""
        import torch
        import torch.nn.functional as F

        from qtulu.data.chat import IGNORE_INDEX

        results: list[tuple[float, int]] = [None] * len(requests)  # type: ignore[list-item]
        for ids, labels in requests:
            if len(ids) != len(labels):
                raise ValueError(f"input_ids ({len(ids)}) and labels ({len(labels)}) differ in length")
            if self.max_length and len(ids) > self.max_length:
                raise ValueError(f"a scored sequence of {len(ids)} tokens exceeds max_length={self.max_length}")
        for chunk in self._chunks(self._order([len(ids) for ids, _ in requests]), "reply loss"):
            seqs = [[int(t) for t in requests[i][0]] for i in chunk]
            logits = self._score_logits(seqs)  # (B, W, V)
            for row, i in enumerate(chunk):
                n = len(seqs[row])
                target = torch.tensor([int(t) for t in requests[i][1][1:n]], dtype=torch.long, device=logits.device)
                count = int((target != IGNORE_INDEX).sum())
                if count == 0:
                    results[i] = (0.0, 0)
                    continue
                nll = F.cross_entropy(logits[row, : n - 1].float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
                results[i] = (float(nll), count)
        return results

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        ctx = self.encode(context)
        whole = self.encode(context + continuation)
        if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
            return ctx, whole[len(ctx):]
        return ctx, self.tokens(continuation)

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """For each (context, continuation): (sum of log p(continuation tokens | context), is_greedy)."""
        pairs = [self._split(c, x) for c, x in requests]
        for (ctx, cont), (c, x) in zip(pairs, requests):
            if not cont:
                raise ValueError(f"empty continuation for context {c[-60:]!r}")
        seqs = []
        for ctx, cont in pairs:
            whole = self._truncate_left(ctx + cont)
            seqs.append((whole, len(whole) - len(cont)))
        return self.token_logprobs(seqs)

    # --- generation --------------------------------------------------------------------------

    def _left_batch(self, seqs: Sequence[Sequence[int]]):
        """Left-pad ``seqs``: input_ids, attention_mask, each (B, T)."""
        import torch

        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            if len(s):
                ids[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
                mask[i, width - len(s):] = 1
        dev = self.device
        return ids.to(dev), mask.to(dev)

    def decode_continuation(self, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
        """The text the new tokens add to the prompt: decode(prompt + new) minus decode(prompt), both
        without special tokens, as open-instruct's ``generate_completions`` does. Decoding the new
        tokens alone would lose a leading space with SentencePiece tokenizers (HumanEval's
        indentation, TyDi QA's first word)."""
        tok = self.tokenizer
        eos = {t for t in (tok.eos_token_id, self.model_config_eos()) if t is not None}
        new = list(new_ids)
        for j, t in enumerate(new):
            if t in eos:
                new = new[:j]
                break
        prompt = tok.decode(list(prompt_ids), skip_special_tokens=True)
        whole = tok.decode(list(prompt_ids) + new, skip_special_tokens=True)
        return whole[len(prompt):]

    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 256,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        num_samples: int = 1,
        seed: int = 0,
    ) -> list[list[str]]:
        """Completions for each prompt: ``num_samples`` strings each, cut before the first stop string.

        temperature 0 = greedy (then num_samples must be 1); otherwise nucleus sampling with
        ``top_p`` and ``top_k`` (0: off). Sampling is seeded per batch, so it is reproducible for a
        given batch size (greedy output does not depend on the batch size).
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
            ids, mask = self._left_batch([flat[i] for i in chunk])
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
                kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            with torch.no_grad():
                gen = self.model.generate(**kwargs)  # (B, T + new); generate derives positions from the mask
            new = gen[:, ids.shape[1]:].tolist()
            for row, i in enumerate(chunk):
                outputs[i] = cut_at_stop(self.decode_continuation(flat[i], new[row]), stop)
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
