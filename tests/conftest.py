"""Shared test setup.

Triton kernels are tested on the CPU through the interpreter: TRITON_INTERPRET must be set
before triton is first imported, so it is set here, at collection time, unless a GPU is present.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("QTULU_SHARED_DATA", REPO.parent / "shared" / "data"))


# CI sets QTULU_NO_SKIP=1: then a missing ../shared/data, or a root that cannot create the sandbox's
# namespaces, fails the test instead of skipping it, so that a run which silently lost its parity
# oracles or its sandbox tests cannot look like one that passed them.
NO_SKIP = os.environ.get("QTULU_NO_SKIP") == "1"


def skip_unless_required(reason: str, *, module: bool = False) -> None:
    """Skip with ``reason``, or fail with it under ``QTULU_NO_SKIP=1``."""
    if NO_SKIP:
        pytest.fail(f"{reason} (QTULU_NO_SKIP=1: this run requires it)", pytrace=False)
    pytest.skip(reason, allow_module_level=module)


def skip_without_namespaces(probe_result: dict, *, module: bool = False) -> None:
    """Skip when the sandbox's namespaces cannot be made; as root under ``QTULU_NO_SKIP=1``, fail."""
    if probe_result["namespaces"]:
        return
    reason = f"this machine cannot create the sandbox's namespaces: {probe_result['reason']}"
    if os.geteuid() == 0:
        skip_unless_required(reason, module=module)
    pytest.skip(reason, allow_module_level=module)


@pytest.fixture
def skip_or_fail():
    """:func:`skip_unless_required`, for a test whose requirement is checked inside it."""
    return skip_unless_required


@pytest.fixture
def require_namespaces():
    """Skip unless the sandbox's namespaces can be made (as root under QTULU_NO_SKIP=1: fail)."""
    from qtulu.evals.sandbox import probe

    skip_without_namespaces(probe())


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test naming what is missing (fail under QTULU_NO_SKIP=1)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        skip_unless_required(f"real data not found: {path} (../shared/data is absent on this machine)")
    return path


@pytest.fixture
def shared_data():
    return shared_path


@pytest.fixture
def llama_tokenizer_path() -> Path:
    return shared_path("tokenizers", "llama", "tokenizer.model")


@pytest.fixture
def char_tokenizer():
    from qtulu.model.tiny import build_char_tokenizer

    return build_char_tokenizer()


class _Launcher:
    """Run a training script in one process, or in several under torchrun (gloo on the CPU)."""

    env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}

    def _run(self, cmd: list[str]) -> None:
        import subprocess

        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **self.env}, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    def python(self, script, *args: str) -> None:
        import sys

        self._run([sys.executable, str(script), *map(str, args)])

    def torchrun(self, script, *args: str, nproc: int = 2) -> None:
        import socket
        import sys

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self._run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_addr", "127.0.0.1", "--master_port", str(port), str(script), *map(str, args)])


@pytest.fixture(scope="session")
def launch() -> _Launcher:
    return _Launcher()


# --- bitsandbytes as the reference, the same on every CPU ----------------------------------------
# bitsandbytes' CPU backend takes other paths on CPUs with AVX-512 (seen with 0.50.1 and 0.50.2 on
# an AMD EPYC with AVX512-BF16; a CPU without it takes the portable paths):
#  * its native dequantizer, which its CPU matmul uses too, mis-reads blocks that straddle rows:
#    a (64, 96) weight at blocksize 64 comes back with max error 0.10 against 0.023 from bnb's own
#    portable dequantizer, and a Linear4bit(48, 48) computes outputs off by up to 0.09;
#  * Linear4bit's first eval-mode forward without grad repacks the layer in place for its CPU GEMM
#    (asserting out_features % 32 == 0, which the tiny test models do not meet; absmax rounded to
#    bf16). qtulu reads such layers (tests/kernels/test_nf4.py, tests/model/test_quant.py).
# The format is defined by the bits; these fixtures give bnb's portable answer on every machine.


def _bnb_portable_dequantizer():
    """bnb's portable 4-bit dequantizer, ``f(flat_codes, absmax, code, blocksize, shape, dtype)``."""
    from bitsandbytes.backends.default import ops as default_ops

    compute = default_ops._dequantize_4bit_compute
    return getattr(compute, "__wrapped__", compute)  # skip its torch.compile: new shapes in every test


@pytest.fixture
def bnb_dequantize():
    """bitsandbytes' portable NF4 dequantizer: ``f(packed, quant_state) -> weight``."""
    bnbF = pytest.importorskip("bitsandbytes.functional")
    from bitsandbytes.backends.utils import _get_4bit_code

    compute = _bnb_portable_dequantizer()

    def dequantize(packed: torch.Tensor, qs) -> torch.Tensor:
        absmax = qs.absmax
        if qs.nested:
            absmax = bnbF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
        flat = (packed if packed.dtype == torch.uint8 else packed.view(torch.uint8)).reshape(-1)
        return compute(flat, absmax.float(), _get_4bit_code("nf4", packed.device), qs.blocksize, qs.shape, qs.dtype)

    return dequantize


@pytest.fixture
def bnb_portable(monkeypatch):
    """For the test's duration, bitsandbytes computes on the CPU as it does on a CPU without
    AVX-512: Linear4bit layers built during the test are never repacked, and its 4-bit
    dequantization (behind its CPU matmul too) is its portable implementation."""
    import warnings

    modules = pytest.importorskip("bitsandbytes.nn.modules")
    from bitsandbytes.backends.utils import _get_4bit_code

    monkeypatch.setattr(modules, "has_avx512bf16", lambda: False, raising=False)
    compute = _bnb_portable_dequantizer()

    def kernel(A, absmax, blocksize, quant_type, shape, dtype):
        flat = (A if A.dtype == torch.uint8 else A.view(torch.uint8)).reshape(-1)
        return compute(flat, absmax, _get_4bit_code(quant_type, A.device), blocksize, shape, dtype)

    lib = torch.library.Library("bitsandbytes", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel": on purpose, undone below
        lib.impl("dequantize_4bit", kernel, "CPU")
    yield
    lib._destroy()


@pytest.fixture
def bnb_4bit_model(bnb_portable):
    """``f(directory, double_quant=True) -> model``: transformers + bitsandbytes NF4 from a local
    checkpoint, quantized on the CPU (fp32 compute, eval mode, bnb's portable CPU paths); skips
    where this transformers/bitsandbytes pair cannot quantize on the CPU."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    def load(directory, double_quant: bool = True):
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                 bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32)
        try:
            return AutoModelForCausalLM.from_pretrained(str(directory), quantization_config=cfg,
                                                        device_map={"": "cpu"}, dtype=torch.float32).eval()
        except Exception as e:  # noqa: BLE001 - environment capability, reported as the skip reason
            pytest.skip(f"transformers cannot quantize with bitsandbytes on this machine: {type(e).__name__}: {e}")

    return load


def _base_with_two_adapters(root: Path):
    """A tiny fp32 base saved under ``root/base`` and two LoRA adapters for it (``root/first``,
    ``root/second``); returns ``(base_dir, {name: adapter_dir})``."""
    from peft import LoraConfig, get_peft_model

    from qtulu.adapters.store import save_adapter
    from qtulu.model.load import base_info, load_base
    from qtulu.model.tiny import build_char_tokenizer, build_tiny_llama

    base_dir = root / "base"
    build_tiny_llama(seed=0, dtype=torch.float32).save_pretrained(base_dir)
    build_char_tokenizer().save_pretrained(base_dir)
    model, _ = load_base(str(base_dir), compute_dtype=torch.float32, device="cpu", attn_implementation="sdpa")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", exclude_modules=["lm_head"],
                     lora_dropout=0.0, init_lora_weights=False)
    torch.manual_seed(5)
    pm = get_peft_model(model, cfg, adapter_name="first")
    pm.add_adapter("second", cfg)
    info = base_info(pm)
    recipe = {"name": "t", "model": {"compute_dtype": "float32"}}
    dirs = {n: save_adapter(pm, root / n, adapter_name=n, base_info=info, recipe=recipe) for n in ("first", "second")}
    return base_dir, dirs


@pytest.fixture(scope="session")
def base_with_two_adapters():
    """Builds a tiny base and two adapters in a folder given by the caller (each module its own)."""
    return _base_with_two_adapters
