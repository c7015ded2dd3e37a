"""lm-evaluation-harness model type ``qtulu``: a base (NF4 by default) plus a qtulu adapter, so any
lm-eval task runs on qtulu models::

    pip install "qtulu[lmeval]"
    python -c "import qtulu.evals.lm_eval_adapter" && lm_eval ...   # or, in Python:
    import qtulu.evals.lm_eval_adapter, lm_eval
    lm_eval.simple_evaluate(model="qtulu",
        model_args="pretrained=BASE_DIR,adapter=ADAPTER_DIR,quantize=nf4", tasks=["hellaswag"])

Importing this module registers the type (lm_eval's ``register_model``). Loading goes through
``qtulu.adapters.store.load_model`` (safetensors only, adapter verified against the base), and the
loaded model is handed to lm-eval's ``HFLM`` as a pre-initialized model, so batching, caching and
every request type are lm-eval's own.
"""

from __future__ import annotations

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # optional extra
    raise ImportError(
        "qtulu.evals.lm_eval_adapter needs the lm-eval package: pip install 'qtulu[lmeval]' (or pip install lm-eval)"
    ) from e

MODEL_TYPE = "qtulu"


@register_model(MODEL_TYPE)
class QtuluLM(HFLM):
    """``pretrained``: base dir/hub id or an in-memory model; ``adapter``: a qtulu adapter dir
    (``NAME=DIR`` accepted; several separated by ``+``, the first active); ``quantize``: "nf4"
    or "none"; ``compute_dtype``: the base's compute dtype; other keyword arguments go to
    ``HFLM`` (batch_size, max_length, ...)."""

    def __init__(self, pretrained, adapter: str | None = None, quantize: str | None = "nf4",
                 tokenizer=None, force: bool = False, compute_dtype: str = "bfloat16", **kwargs):
        from qtulu.adapters.store import load_model

        quantize = None if quantize in (None, "none", "None", "") else quantize
        adapters = [a for a in str(adapter).split("+") if a] if adapter else []
        model, tok = load_model(pretrained, adapters, quantize=quantize, force=force, compute_dtype=compute_dtype,
                                **({"tokenizer": tokenizer} if tokenizer is not None else {}))
        model.eval()
        kwargs.pop("device", None)  # the model is already placed by load_model
        super().__init__(pretrained=model, tokenizer=tok, **kwargs)
        self.qtulu_adapters = adapters
