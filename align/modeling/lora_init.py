"""`lora.init` on a fresh LoRA adapter, with the base weights and the implicit reference kept exact.

PEFT's PiSSA and OLoRA move the starting factors out of the base (W_res = W - s*B0A0) so that the
model starts at W; "adapters disabled" would then give W_res, not the model training started from,
and reward adapters loaded on the same base would see the wrong weights. Here the base keeps W:
PEFT computes A0, B0 on each layer (its own pissa_init / olora_init), the layer's weight is put
back, and the adapter's forward subtracts the frozen start, s*(BA - B0A0), a PEFT LoRA variant
(`StartOffset`). At step 0 that difference is exactly zero, so policy == reference bitwise, and the
gradients are PiSSA's. The trained adapter is saved converted to a standard LoRA of rank 2r with
PEFT's own conversion (`save_pretrained(path_initial_model_for_weight_conversion=...)`), which
loads onto the unchanged base with plain PEFT.

LoftQ starts A and B at the SVD of the 4-bit quantization error (W - Q), so the model starts at
Q + s*B0A0, closer to W than the 4-bit base. The reference must be that model: while adapters are
disabled, a forward hook adds s*B0A0 back (`ReferenceStart`), computed as PEFT computes the
adapter's own term, so policy == reference at step 0 bitwise. PEFT's LoftQ functions run on CUDA
only (their compute device is fixed), so the one-step LoftQ of `replace_lora_weights_loftq` is
computed here on the model's own device, divided by the LoRA scaling (PEFT's assumes alpha == r).
A LoftQ adapter is a standard LoRA of the 4-bit base; nothing is converted.

EVA (PEFT's `initialize_lora_eva_weights`) reads the activations of the stage's training rows; B
starts at 0, as with the default and gaussian inits, which PEFT applies itself.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import LoraLayer, LoraVariant

from align.core.errors import ConfigError, DataError
from align.modeling.methods import LORA_FAMILY, lora_init

if TYPE_CHECKING:
    from align.core.config import StageConfig

log = logging.getLogger("align")

SIDECAR = "align_adapter.json"  # what align knows about a saved adapter that its adapter_config.json cannot say
_START_A, _START_B = "align_start_A_", "align_start_B_"  # buffer name prefixes (+ adapter name) of the frozen start


def peft_init_value(init: str) -> bool | str:
    """What PEFT's `init_lora_weights` gets for a `lora.init`: PiSSA, OLoRA and LoftQ are applied by align."""
    return {"default": True, "gaussian": "gaussian", "eva": "eva"}.get(init, True)


# --------------------------------------------------------------------------- the frozen start, per layer


def _start(layer: LoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    return getattr(layer, _START_A + adapter), getattr(layer, _START_B + adapter)


def _keep_start(layer: LoraLayer, adapter: str) -> None:
    """Copy the adapter's current A and B into the layer as frozen buffers (they move with the model)."""
    layer.register_buffer(_START_A + adapter, layer.lora_A[adapter].weight.detach().clone(), persistent=False)
    layer.register_buffer(_START_B + adapter, layer.lora_B[adapter].weight.detach().clone(), persistent=False)


def _start_delta_weight(layer: LoraLayer, adapter: str) -> torch.Tensor:
    a0, b0 = _start(layer, adapter)
    return b0 @ a0 * layer.scaling[adapter]


class StartOffset(LoraVariant):
    """A LoRA whose update is s*(BA - B0A0): the base keeps W, and the frozen start is taken off.

    PEFT calls a variant only while its adapter is active (not disabled, not merged), so the
    reference (adapters disabled) and every other adapter see the unchanged base.
    """

    def __init__(self, init: str):
        self.init_name = init  # the lora.init it came from (pissa, pissa_niter_<n>, olora)

    @staticmethod
    def init(module, adapter_name, **kwargs) -> None:  # the start is recorded by initialize(), not by PEFT
        pass

    @staticmethod
    def forward(module, active_adapter, x, result, **kwargs):
        lora_a, lora_b = module.lora_A[active_adapter], module.lora_B[active_adapter]
        a0, b0 = _start(module, active_adapter)
        trained = lora_b(lora_a(module.lora_dropout[active_adapter](x)))
        start = F.linear(F.linear(x, a0), b0)
        return result + (trained - start) * module.scaling[active_adapter]  # exactly result at the start

    @staticmethod
    def _delta(module, adapter) -> torch.Tensor:
        return module.get_delta_weight(adapter) - _start_delta_weight(module, adapter)

    @staticmethod
    def merge_safe(module, active_adapter, orig_weight):
        return orig_weight + StartOffset._delta(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter, orig_weight) -> None:
        orig_weight.data += StartOffset._delta(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module, active_adapter, orig_weight):
        return orig_weight - StartOffset._delta(module, active_adapter).to(orig_weight.dtype)


class ReferenceStart:
    """Forward hook of a LoftQ layer: with adapters disabled, add the adapter's start s*B0A0 as PEFT adds the
    adapter's own term (input cast to the adapter's dtype, result cast back), so the reference is the model
    training started from, bitwise."""

    def __init__(self, adapter: str):
        self.adapter = adapter

    def __call__(self, module, args, output):
        if not module.disable_adapters:
            return output
        a0, b0 = _start(module, self.adapter)
        x = args[0]
        cast = not torch.is_autocast_enabled()
        if cast:
            x = module._cast_input_dtype(x, a0.dtype)
        start = F.linear(F.linear(x, a0), b0) * module.scaling[self.adapter]
        return output + (start.to(output.dtype) if cast else start)


# --------------------------------------------------------------------------- the inits align applies


def _lora_layers(model, adapter: str):
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            yield name, module


def _offset_init(model, adapter: str, init: str) -> int:
    """PiSSA / OLoRA factors from PEFT's own layer code; the base weight put back; the start offset installed."""
    n = 0
    for _, layer in _lora_layers(model, adapter):
        base = layer.get_base_layer()
        weight = base.weight
        original = weight.data
        if weight.dtype in (torch.float32, torch.float16, torch.bfloat16):
            weight.data = original.clone()  # PEFT rewrites this one (OLoRA in place): a scratch copy, one layer at a time
        dtypes = layer.lora_A[adapter].weight.dtype, layer.lora_B[adapter].weight.dtype
        if init.startswith("pissa"):
            layer.pissa_init(adapter, init)
        else:
            layer.olora_init(adapter)
        base.weight = weight  # PEFT replaces a quantized weight object: the original is the base
        weight.data = original  # the untouched original values (the loaded storage, not a copy)
        layer.lora_A[adapter].weight.data = layer.lora_A[adapter].weight.data.to(dtypes[0]).contiguous()
        layer.lora_B[adapter].weight.data = layer.lora_B[adapter].weight.data.to(dtypes[1]).contiguous()
        _keep_start(layer, adapter)
        layer.lora_variant[adapter] = StartOffset(init)
        n += 1
    return n


def _original_weights(model) -> dict[str, Path]:
    """Each full-precision weight's safetensors file in the base model's folder (LoftQ reads W from it)."""
    from safetensors import safe_open

    location = Path(getattr(model.get_base_model(), "name_or_path", "") or "")
    if not location.is_dir():
        from huggingface_hub import snapshot_download

        location = Path(snapshot_download(str(location), local_files_only=True))
    files = sorted(location.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"lora.init: loftq reads the full-precision weights from the base's safetensors files; {location} has none")
    index = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            index.update({key: file for key in f.keys()})
    return index


def _loftq_init(model, adapter: str, reference: bool) -> int:
    """A0, B0 = the rank-r SVD of (W - Q) / s on every 4-bit layer; a reference hook when this adapter defines it."""
    import bitsandbytes as bnb
    from safetensors import safe_open

    files = _original_weights(model)
    n = 0
    for name, layer in _lora_layers(model, adapter):
        base = layer.get_base_layer()
        if not isinstance(base, bnb.nn.Linear4bit):
            continue
        key = name.removeprefix("base_model.model.") + ".weight"
        if key not in files:
            raise ConfigError(f"lora.init: loftq: the base's safetensors files have no {key}")
        with safe_open(str(files[key]), framework="pt") as f:
            original = f.get_tensor(key).to(device=base.weight.device, dtype=torch.float32)
        quantized = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).to(torch.float32)
        u, s, vh = torch.linalg.svd(original - quantized, full_matrices=False)
        r = layer.r[adapter]
        root = torch.sqrt(s[:r] / layer.scaling[adapter])
        lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        lora_a.data = (root[:, None] * vh[:r]).to(lora_a.dtype).contiguous()
        lora_b.data = (u[:, :r] * root[None, :]).to(lora_b.dtype).contiguous()
        if reference:
            _keep_start(layer, adapter)
            layer.register_forward_hook(ReferenceStart(adapter))
        n += 1
    return n


def _eva_init(model, adapter: str, batches: list[dict]) -> None:
    """PEFT's EVA on the given batches (it runs them in eval mode and restores the mode); every process of a
    multi-process run computes the same from the same rows, so nothing is gathered."""
    from peft import initialize_lora_eva_weights

    initialize_lora_eva_weights(model, batches, adapter_name=adapter, gather_distributed_inputs=False, show_progress_bar=False)


def initialize(model, cfg: "StageConfig", adapter: str, *, rows=None, tokenizer=None, reference: bool = True) -> None:
    """Apply `cfg.lora.init` to the fresh adapter `adapter` of PEFT model `model` (a no-op for PEFT's own inits).

    `rows`/`tokenizer`: the stage's training rows (EVA reads their activations); `reference`: this adapter
    defines the DPO reference (LoftQ adds its start back while adapters are disabled); a second trained
    adapter of the same model (PPO's value) passes False.
    """
    if cfg.peft.method not in LORA_FAMILY:
        return
    import time

    init = cfg.lora.init
    kind = lora_init(init)
    started = time.perf_counter()
    with torch.no_grad():
        if kind.start == "offset":
            layers = _offset_init(model, adapter, init)
        elif kind.name == "loftq":
            layers = _loftq_init(model, adapter, reference)
        elif kind.name == "eva":
            _eva_init(model, adapter, eva_batches(rows or [], tokenizer, cfg))
            ranks = model.peft_config[adapter].rank_pattern
            log.info("lora.init eva: %d of the targets' ranks moved away from r=%d (%.1f s)", len(ranks), cfg.lora.r,
                     time.perf_counter() - started)
            return
        else:
            return
    log.info("lora.init %s: %d layers of adapter '%s' start from their %s (%.1f s)", init, layers, adapter,
             "quantization error" if kind.name == "loftq" else "base weights (the base is kept; the start is subtracted)",
             time.perf_counter() - started)
    if cfg.lora.dropout > 0:
        log.warning(
            "lora.init %s with lora.dropout %g: in training, dropout acts on the adapter's whole input, its start "
            "(not small, unlike B = 0) included, as in PEFT; lora.dropout 0 keeps the start's output exact while "
            "training", init, cfg.lora.dropout,
        )


def reference_start_key(cfg: "StageConfig") -> dict:
    """What the reference depends on besides the base: LoftQ's start (its factors follow r, alpha and the targets)."""
    if cfg.peft.method not in LORA_FAMILY or lora_init(cfg.lora.init).start != "restore":
        return {}
    lora = cfg.lora
    return {"lora_start": {"init": lora.init, "r": lora.r, "alpha": lora.alpha, "rslora": lora.rslora, "targets": lora.target_modules}}


# --------------------------------------------------------------------------- EVA's data


def conversation(row: dict) -> tuple[list[dict], bool] | None:
    """The messages of a training row EVA reads (a prompt with its first response), or None for a prompt alone."""
    if row.get("messages"):
        return row["messages"], False
    for key in ("chosen", "completion"):
        if row.get(key):
            return list(row.get("prompt") or []) + list(row[key]), False
    return None


def has_responses(rows) -> bool:
    return any(conversation(r) is not None for r in rows)


def eva_batches(rows, tokenizer, cfg: "StageConfig", max_rows: int = 256) -> list[dict]:
    """Batches of the first training rows (each rendered with the chat template), every batch at least
    r * rho tokens (EVA's incremental SVD skips smaller ones); DataError naming lora.init when there are none."""
    from align.modeling.templates import chat_ids

    needed = math.ceil(cfg.lora.r * 2.0)  # PEFT's EvaConfig rho (default 2.0): up to 2r components per layer
    ids = []
    for row in rows:
        conv = conversation(row)
        if conv is not None:
            ids.append(chat_ids(tokenizer, conv[0])[: cfg.train.max_length])
        if len(ids) >= max_rows:
            break
    batches, current = [], []
    for seq in ids:
        current.append(seq)
        if len(current) >= cfg.train.batch_size and sum(map(len, current)) >= needed:
            batches.append(_padded(current, tokenizer.pad_token_id))
            current = []
    if current and sum(map(len, current)) >= needed:
        batches.append(_padded(current, tokenizer.pad_token_id))
    elif current and batches:
        batches[-1] = _padded([*_unpadded(batches[-1]), *current], tokenizer.pad_token_id)
    if not batches:
        raise DataError(
            f"lora.init: eva needs training rows with responses of at least {needed} tokens in all (r * rho, "
            f"rho = 2); the data has {sum(map(len, ids))}"
        )
    return batches


def _padded(seqs: list[list[int]], pad: int) -> dict:
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def _unpadded(batch: dict) -> list[list[int]]:
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


# --------------------------------------------------------------------------- saving


def _offset_layers(model, adapter: str) -> list[tuple[str, LoraLayer]]:
    return [(n, m) for n, m in _lora_layers(model, adapter) if isinstance(m.lora_variant.get(adapter), StartOffset)]


def _is_loftq(model, adapter: str) -> bool:
    return any(isinstance(h, ReferenceStart) for _, m in _lora_layers(model, adapter) for h in m._forward_hooks.values())


def finish_saved_adapter(model, folder: Path, adapter: str | None = None) -> None:
    """Make the adapter PEFT saved in `folder` a standard one of the unchanged base, and say how it started.

    PiSSA / OLoRA (trained as s*(BA - B0A0) on W): PEFT's conversion, the trained factors with the
    negated start appended (rank 2r, alpha scaled to keep s); LoftQ: as saved (a LoRA of the 4-bit base).
    Other adapters are left as they are. Writes align_adapter.json beside a converted or LoftQ adapter.
    """
    import tempfile

    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return
    adapter = adapter or model.active_adapter
    folder = Path(folder)
    offsets = _offset_layers(model, adapter)
    if offsets:
        config = model.peft_config[adapter]
        with tempfile.TemporaryDirectory(prefix="align-start-") as tmp:
            start_dir = Path(tmp) / "align_start"  # its name becomes the temporary adapter's name
            _save_start(offsets, adapter, start_dir, others=_other_weights(folder))
            converted = Path(tmp) / "converted"
            model.save_pretrained(str(converted), selected_adapters=[adapter], path_initial_model_for_weight_conversion=str(start_dir))
            saved = converted if adapter == "default" else converted / adapter
            _merge_other_weights(saved, folder)
        _write_sidecar(folder, {"lora_init": offsets[0][1].lora_variant[adapter].init_name, "trained_rank": config.r,
                                "saved_as": "a standard LoRA of the unchanged base: PEFT's PiSSA/OLoRA conversion, "
                                "[A; A0] and [B, -B0] (rank 2r, alpha scaled to keep the scaling)"})
    elif _is_loftq(model, adapter):
        _write_sidecar(folder, {"lora_init": "loftq", "saved_as": "a standard LoRA of the 4-bit base; its start is "
                                "that base's quantization error, so it belongs with that base"})


def _other_weights(folder: Path) -> dict:
    """The saved adapter's weights that are not LoRA factors (a reward model's score head)."""
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(folder / "adapter_model.safetensors")).items() if ".lora_A." not in k and ".lora_B." not in k}


def _save_start(offsets, adapter: str, folder: Path, others: dict) -> None:
    """The start A0, B0 as an adapter folder's weights (PEFT writes its config when it converts), with the
    adapter's other weights (PEFT loads the start as a whole adapter; only its factors are used)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    weights = dict(others)
    for name, layer in offsets:
        a0, b0 = _start(layer, adapter)
        weights[f"{name}.lora_A.weight"] = a0.detach().cpu().contiguous()
        weights[f"{name}.lora_B.weight"] = b0.detach().cpu().contiguous()
    save_file(weights, str(folder / "adapter_model.safetensors"))


def _merge_other_weights(converted: Path, folder: Path) -> None:
    """PEFT's conversion keeps only the LoRA factors: carry the adapter's other weights (a score head) over."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(converted / "adapter_model.safetensors"))
    weights.update(_other_weights(folder))
    save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text((converted / "adapter_config.json").read_text(encoding="utf-8"), encoding="utf-8")


def _write_sidecar(folder: Path, facts: dict) -> None:
    (folder / SIDECAR).write_text(json.dumps(facts, indent=2) + "\n", encoding="utf-8")


def saved_facts(adapter_dir: Path) -> dict:
    """What align_adapter.json beside a saved adapter says ({} when there is none or it is not a JSON object)."""
    try:
        facts = json.loads((Path(adapter_dir) / SIDECAR).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return facts if isinstance(facts, dict) else {}


def saved_init(adapter_dir: Path) -> str | None:
    """The `lora.init` recorded beside a saved adapter, if any."""
    value = saved_facts(adapter_dir).get("lora_init")
    return value if isinstance(value, str) else None
