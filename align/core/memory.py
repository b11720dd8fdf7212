"""Memory: gradient checkpointing chosen by memory (on only when the activations would not fit), and a
stage's peak memory.

`train.gradient_checkpointing: auto` estimates the activation memory of one micro-batch from
its longest possible size (batch x rows per example x max_length tokens), the model's shape and
the compute precision, and compares it with the memory free on the device once the model is
loaded. Checkpointing (recompute each layer in the backward pass, ~20-30% slower) is turned on
only when the estimate without it exceeds a share of the free memory.

The per-token, per-layer figure of a Llama-style decoder (attention + gated MLP) trained with
LoRA is taken as (6 hidden + 2 kv + 3 intermediate) values in the compute precision: 76 KB at
the 1B shape in bf16 (hidden 2048, kv 512, intermediate 8192). Counting every tensor autograd
could save gives up to (10 hidden + 2 kv + 4 intermediate), 108 KB there; the first GPU run's
peak memory (variants b and c at batch 8, minus weights and the head tile, over padded token
counts estimated from the data's lengths, not logged by that run) works out to roughly 65-75 KB. With checkpointing, each layer keeps only its
input, and one layer's full activations live at a time. The LM head runs through TRL's chunked log-prob kernel: a
float32 tile of (tokens x min(vocab, 32768)) values and its gradient.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("align")

FREE_SHARE = 0.85  # of the free memory the estimate may use (allocator slack, fragmentation, optimizer)
HEAD_TILE = 32768  # vocabulary tile of TRL's chunked log-prob kernel
GIB = 2**30


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a model: its decoder shape and compute precision."""

    layers: int
    hidden: int
    intermediate: int
    kv_dim: int  # key (= value) width: kv heads x head dim
    vocab: int
    bytes_per_value: int  # 2 for bf16/fp16, 4 for fp32

    @classmethod
    def of(cls, config, bytes_per_value: int) -> "Shape":
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden = text.hidden_size
        heads = getattr(text, "num_attention_heads", 1)
        head_dim = getattr(text, "head_dim", None) or hidden // heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        return cls(
            layers=text.num_hidden_layers,
            hidden=hidden,
            intermediate=getattr(text, "intermediate_size", None) or 4 * hidden,
            kv_dim=kv_heads * head_dim,
            vocab=text.vocab_size,
            bytes_per_value=bytes_per_value,
        )


@dataclass(frozen=True)
class Decision:
    on: bool
    tokens: int  # per micro-batch, at most
    without_bytes: int  # activation estimate without checkpointing
    with_bytes: int  # ... with checkpointing
    free_bytes: int | None
    reason: str

    def describe(self) -> str:
        return f"gradient checkpointing auto -> {'on' if self.on else 'off'}: {self.reason}"


def activation_bytes(shape: Shape, tokens: int, checkpointing: bool) -> int:
    """Estimated activation memory of one forward + backward over `tokens` tokens."""
    per_layer = (6 * shape.hidden + 2 * shape.kv_dim + 3 * shape.intermediate) * shape.bytes_per_value
    if checkpointing:
        body = tokens * (shape.layers * shape.hidden * shape.bytes_per_value + per_layer)
    else:
        body = tokens * shape.layers * per_layer
    head = tokens * min(shape.vocab, HEAD_TILE) * 4 * 2
    return body + head


def decide(shape: Shape, tokens: int, free_bytes: int | None, extra_bytes: int = 0, share: float = FREE_SHARE) -> Decision:
    """Checkpointing on iff the activations (plus `extra_bytes`, e.g. full fine-tuning's optimizer state)
    would not fit in `share` of the free memory. Unknown free memory: off."""
    without = activation_bytes(shape, tokens, False) + extra_bytes
    with_ = activation_bytes(shape, tokens, True) + extra_bytes
    numbers = (
        f"~{without / GIB:.1f} GiB of activations without it, ~{with_ / GIB:.1f} GiB with it, for at most {tokens} "
        f"tokens per micro-batch ({shape.layers} layers, hidden {shape.hidden})"
    )
    if free_bytes is None:
        return Decision(False, tokens, without, with_, None, f"free memory unknown; {numbers}")
    budget = share * free_bytes
    free = f"{share:.0%} of the {free_bytes / GIB:.1f} GiB free"
    if without <= budget:
        return Decision(False, tokens, without, with_, free_bytes, f"{numbers}; fits in {free}")
    note = "" if with_ <= budget else "; even that exceeds it: lower train.batch_size or train.max_length"
    return Decision(True, tokens, without, with_, free_bytes, f"{numbers}; over {free}{note}")


def free_memory_bytes(device: str) -> int | None:
    """Free memory of the device the model sits on: CUDA free memory, or the host's MemAvailable."""
    import torch

    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def decide_for(cfg, model, device: str, rows_per_example: int) -> Decision:
    """The decision for a stage config and its loaded model (tokens: batch x rows x max_length)."""
    import torch

    t = cfg.train
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        dtype = getattr(model.config.quantization_config, "bnb_4bit_compute_dtype", None) or torch.bfloat16
    shape = Shape.of(model.config, torch.finfo(dtype).bits // 8)
    tokens = t.batch_size * rows_per_example * t.max_length
    extra = 0
    if cfg.peft.method == "full":  # every weight gets a gradient and two Adam moments (fp32)
        extra = sum(p.numel() for p in model.parameters()) * (shape.bytes_per_value + 8)
    return decide(shape, tokens, free_memory_bytes(device), extra)


# --------------------------------------------------------------------------- a stage's peak memory


def reset_peak_memory() -> None:
    """Start a stage's peak-memory count afresh: a pipeline runs every stage in one process."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:  # Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # elsewhere the figure stays the process's peak so far

def peak_memory_mb() -> float:
    """Peak memory since reset_peak_memory: CUDA max allocated on a GPU, else peak resident set size."""
    import resource

    import torch

    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB
