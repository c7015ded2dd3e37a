"""The Tulu benchmark suite (imported as ``qtulu.evals``).

- ``tasks/``: one module per benchmark (MMLU, GSM8K, BBH, TyDi QA, Codex-HumanEval, AlpacaEval,
  ToxiGen, TruthfulQA), each with a ``VERSION``; ``tasks.TASKS`` lists the variants.
- ``lm.LM``: batched, left-padded generation and log-likelihood scoring over a loaded model.
- ``runner.evaluate``: tasks x adapters on one loaded base -> predictions, metrics, report.
- ``sandbox``: OS-isolated execution of model-written code (opt-in).
- ``judge.Judge``: any OpenAI-compatible chat endpoint, for AlpacaEval / TruthfulQA generation.
- ``merge_search.merge_search``: pick the best adapter merge by the suite.
- ``lm_eval_adapter``: the ``qtulu`` model type for lm-evaluation-harness (optional extra).
"""
