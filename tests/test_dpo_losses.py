"""Every loss option of TRL 1.16's DPOConfig in our DPO stage.

- our list of loss types is TRL's;
- each loss type gives the loss and rewards of its formula on hand-set log-ratios (the reference
  log-probs are written into the reference cache as the policy's minus chosen offsets);
- each option runs on the fast path (prefix sharing + cache) with the loss, rewards and gradients
  of TRL's plain path;
- invalid values and combinations are refused before anything is written, naming the key; every
  key is in `--keys` with its range.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from conftest import REPO
from test_dpo_fast import BATCH, first_batch, load_tiny, step, variable_rows

from align.core.config_loader import describe, load_config
from align.core.errors import ConfigError
from align.preference import dpo_options
from align.preference.ref_cache import RefLogpCache
from align.preference.dpo_trainer import AlignDPOTrainer, FastPath
from align.stages.dpo import DPOConfig, DPOOptions


def test_our_loss_types_are_trls():
    from trl import DPOConfig as TRLDPOConfig

    help_text = TRLDPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    listed = help_text.split("Possible values are:")[1].split("If multiple")[0]
    assert set(re.findall(r"`'(\w+)'`", listed)) == set(dpo_options.DPO_LOSS_TYPES)


def options(**kw) -> DPOOptions:
    return DPOOptions(**kw)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def trainer_for(opts: DPOOptions, model, tokenizer, rows, tmp_path, *, fast: FastPath | None, cache=None, max_length=60):
    """A DPO trainer with the TRL arguments our stage derives from `opts` (fast=None: TRL's plain trainer)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    args = TRLDPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH, max_length=max_length, gradient_checkpointing=False,
        bf16=False, use_cpu=True, report_to=[], learning_rate=1e-3, dataset_num_proc=None, seed=0,
        **dpo_options.trl_loss_args(opts),
    )
    kwargs = dict(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                  peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    torch.manual_seed(0)
    if fast is None:
        return DPOTrainer(**kwargs)
    return AlignDPOTrainer(**kwargs, fast_path=fast, cache=cache)


# --------------------------------------------------------------------------- formulas


def nls(x: float) -> float:
    """-log sigmoid(x), in float64."""
    return math.log1p(math.exp(-x)) if x > -30 else -x


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def formula(loss_type: str, o: DPOOptions, d: dict) -> list[float]:
    """Per-pair loss of `loss_type` from the papers' formulas (TRL's choices where it makes one)."""
    b, eps = o.beta, o.label_smoothing
    lc, lr = d["chosen_logratios"], d["rejected_logratios"]
    sc, sr = d["chosen_scores"], d["rejected_scores"]
    delta = [c - r for c, r in zip(sc, sr)]
    if loss_type == "sigmoid":
        return [nls(b * x) for x in delta]
    if loss_type == "hinge":
        return [max(0.0, 1 - b * x) for x in delta]
    if loss_type in ("ipo", "sigmoid_norm"):  # on per-token means of the scores
        per_token = [c / nc - r / nr for c, r, nc, nr in zip(sc, sr, d["chosen_len"], d["rejected_len"])]
        return [(x - 1 / (2 * b)) ** 2 for x in per_token] if loss_type == "ipo" else [nls(b * x) for x in per_token]
    if loss_type == "exo_pair":  # KL(softmax(b * scores) || (1 - eps, eps)) over {chosen, rejected}
        return [sig(b * x) * (math.log(sig(b * x)) - math.log1p(-eps)) + sig(-b * x) * (math.log(sig(-b * x)) - math.log(eps))
                for x in delta]
    if loss_type == "nca_pair":
        return [nls(b * c) + 0.5 * nls(-b * c) + 0.5 * nls(-b * r) for c, r in zip(lc, lr)]
    if loss_type == "robust":
        return [((1 - eps) * nls(b * x) - eps * nls(-b * x)) / (1 - 2 * eps) for x in delta]
    if loss_type == "bco_pair":
        return [nls(b * c) + nls(-b * r) for c, r in zip(lc, lr)]
    if loss_type == "sppo_hard":
        return [(c - 0.5 / b) ** 2 + (r + 0.5 / b) ** 2 for c, r in zip(lc, lr)]
    if loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":  # sorted policy margins against sorted reference margins
            a = sorted(c - r for c, r in zip(d["chosen_logps"], d["rejected_logps"]))
            z = sorted(c - r for c, r in zip(d["ref_chosen"], d["ref_rejected"]))
        else:  # sorted chosen log-ratios against sorted rejected log-ratios
            a, z = sorted(lc), sorted(lr)
        return [(1 - eps) * nls(b * (x - y)) + eps * nls(-b * (x - y)) for x, y in zip(a, z)]
    if loss_type == "apo_zero":
        return [(1 - sig(b * c)) + sig(b * r) for c, r in zip(lc, lr)]
    if loss_type == "apo_down":
        return [sig(b * c) + (1 - sig(b * (c - r))) for c, r in zip(lc, lr)]
    if loss_type == "discopop":
        out = []
        for x in delta:
            m = sig(b * x / o.discopop_tau)
            out.append(nls(b * x) * (1 - m) + math.exp(-b * x) * m)
        return out
    if loss_type == "sft":  # mean NLL over every chosen token of the batch
        return [-sum(d["chosen_logps"]) / sum(d["chosen_len"])] * len(lc)
    raise AssertionError(loss_type)


def scores(o: DPOOptions, logratios: list[float]) -> list[float]:
    """f-DPO: the f'-transform of each log-ratio."""
    f = o.f_divergence_type
    if f == "reverse_kl":
        return list(logratios)
    if f == "forward_kl":
        return [1 - math.exp(-x) for x in logratios]
    if f == "js_divergence":
        return [math.log(2) - nls(x) for x in logratios]
    a = o.f_alpha_divergence_coef
    return [(math.exp((a - 1) * x) - 1) / (a - 1) for x in logratios]


CHOSEN_OFFSETS = [0.5, -1.0, 2.0, 0.3]  # designed chosen log-ratios log p - log p_ref
REJECTED_OFFSETS = [-0.5, 0.7, 1.0, 0.3]

FORMULA_CASES = [
    *[(t, {}) for t in dpo_options.DPO_LOSS_TYPES if t not in ("exo_pair", "robust")],
    ("exo_pair", {"label_smoothing": 1e-3}),
    ("robust", {"label_smoothing": 0.2}),
    ("aot", {"label_smoothing": 0.1}),
    ("discopop", {"discopop_tau": 0.2}),
    ("sigmoid", {"f_divergence_type": "forward_kl"}),
    ("sigmoid", {"f_divergence_type": "js_divergence"}),
    ("hinge", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}),
    (["sigmoid", "bco_pair", "sft"], {"loss_weights": [0.8, 0.2, 1.0]}),  # MPO
    ("ipo", {"rpo_alpha": 0.7}),  # RPO on top of IPO
]


@pytest.fixture(scope="module")
def policy_logps(tiny_model_dir, tokenizer, tmp_path_factory):
    """The step-0 policy's per-pair log-probs and response lengths on the first batch (LoRA B = 0: policy = base)."""
    rows = variable_rows(8)
    trainer = trainer_for(options(), load_tiny(tiny_model_dir), tokenizer, rows, tmp_path_factory.mktemp("p"),
                          fast=FastPath(True, False, {}))
    batch = first_batch(trainer)
    with torch.no_grad():
        chosen, rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    lengths = batch["completion_mask"].sum(1).tolist()
    return {"rows": rows, "chosen": chosen.tolist(), "rejected": rejected.tolist(),
            "chosen_len": lengths[:BATCH], "rejected_len": lengths[BATCH:]}


@pytest.mark.parametrize("loss_type, extra", FORMULA_CASES, ids=lambda x: str(x) if not isinstance(x, dict) else "-".join(x) or "plain")
def test_each_loss_gives_its_formula_on_hand_set_log_ratios(tiny_model_dir, tokenizer, tmp_path, policy_logps, loss_type, extra):
    o = options(beta=0.5, loss_type=loss_type, **extra)
    dpo_options.check(o)  # a valid config
    cache = RefLogpCache(tmp_path / "cache", {"base": "tiny"})
    trainer = trainer_for(o, load_tiny(tiny_model_dir), tokenizer, policy_logps["rows"], tmp_path / "t",
                          fast=FastPath(True, True, {}), cache=cache)
    batch = first_batch(trainer)
    from align.preference.ref_cache import pair_digests

    pc, pr = policy_logps["chosen"], policy_logps["rejected"]
    ref_c = [c - x for c, x in zip(pc, CHOSEN_OFFSETS)]
    ref_r = [r - x for r, x in zip(pr, REJECTED_OFFSETS)]
    cache.add(pair_digests(batch), torch.tensor(ref_c), torch.tensor(ref_r))
    trainer.model.train()
    loss_tensor = trainer.compute_loss(trainer.model, dict(batch))
    loss_tensor.backward()  # one training step's forward and backward, with this loss
    grads = [p.grad for p in trainer.model.parameters() if p.requires_grad]
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    loss = loss_tensor.item()
    assert cache.hits == BATCH and cache.misses == 0, "the reference came from the hand-set cache"
    d = {
        "chosen_logratios": CHOSEN_OFFSETS, "rejected_logratios": REJECTED_OFFSETS,
        "chosen_scores": scores(o, CHOSEN_OFFSETS), "rejected_scores": scores(o, REJECTED_OFFSETS),
        "chosen_logps": pc, "rejected_logps": pr, "ref_chosen": ref_c, "ref_rejected": ref_r,
        "chosen_len": policy_logps["chosen_len"], "rejected_len": policy_logps["rejected_len"],
    }
    args = dpo_options.trl_loss_args(o)
    want = sum(w * mean(formula(t, o, d)) for t, w in zip(args["loss_type"], args["loss_weights"]))
    assert loss == pytest.approx(want, rel=1e-5, abs=1e-6)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert metrics["rewards/chosen"] == pytest.approx(mean(0.5 * x for x in CHOSEN_OFFSETS), rel=1e-5)
    assert metrics["rewards/rejected"] == pytest.approx(mean(0.5 * x for x in REJECTED_OFFSETS), rel=1e-5)
    assert metrics["rewards/accuracies"] == pytest.approx(0.5)  # pairs 0 and 2 prefer chosen; 3 ties


# --------------------------------------------------------------------------- fast path == plain TRL

# A representative set runs by default (what reads per-token values: sft, WPO, LD-DPO; sorting: aot;
# length-normalized: ipo; mixtures; an f-divergence); every other loss type under -m slow.
REPRESENTATIVE = ("sigmoid", "ipo", "aot", "sft", "mpo-mixed", "rpo", "wpo", "ld-dpo", "f-alpha")
FAST_CASES = [
    *[({"loss_type": t}, t) for t in dpo_options.DPO_LOSS_TYPES if t not in ("exo_pair",)],
    ({"loss_type": "exo_pair", "label_smoothing": 1e-3}, "exo_pair"),
    ({"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}, "mpo-mixed"),
    ({"rpo_alpha": 0.5}, "rpo"),
    ({"use_weighting": True}, "wpo"),
    ({"use_weighting": True, "loss_type": "ipo"}, "wpo-ipo"),
    ({"ld_alpha": 0.5}, "ld-dpo"),
    ({"ld_alpha": 0.0, "loss_type": "hinge"}, "ld-dpo-0-hinge"),
    ({"f_divergence_type": "js_divergence"}, "f-js"),
    ({"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}, "f-alpha"),
]


@pytest.mark.parametrize(
    "extra", [pytest.param(c, id=name, marks=() if name in REPRESENTATIVE else pytest.mark.slow) for c, name in FAST_CASES]
)
def test_every_option_runs_on_the_fast_path_with_trls_results(tiny_model_dir, tokenizer, tmp_path, extra):
    """Prefix sharing + cache against TRL's plain trainer, one forward/backward with the option on."""
    o = options(beta=0.3, **extra)
    dpo_options.check(o)
    rows = variable_rows(8)
    base = load_tiny(tiny_model_dir)
    plain = trainer_for(o, copy.deepcopy(base), tokenizer, rows, tmp_path / "plain", fast=None)
    cache = RefLogpCache(tmp_path / "cache", {"base": "tiny", "ld_alpha": o.ld_alpha})
    fast = trainer_for(o, copy.deepcopy(base), tokenizer, rows, tmp_path / "fast", fast=FastPath(True, True, {}), cache=cache)
    params_plain = {n: p for n, p in plain.model.named_parameters() if p.requires_grad}
    params_fast = {n: p for n, p in fast.model.named_parameters() if p.requires_grad}
    with torch.no_grad():  # move the adapters off zero so the rewards are not trivially 0
        for name, p in params_plain.items():
            noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05
            p.add_(noise)
            params_fast[name].add_(noise)
    loss_a, metrics_a, grads_a = step(plain)
    loss_c, metrics_c, grads_c = step(fast)
    assert cache.misses == BATCH, "the fast trainer computed and cached its reference"
    assert loss_a.item() == pytest.approx(loss_c.item(), rel=1e-5, abs=1e-6)
    assert metrics_a.keys() == metrics_c.keys() and metrics_a
    for key in metrics_a:
        assert metrics_c[key] == pytest.approx(metrics_a[key], rel=1e-4, abs=1e-5), key
    assert abs(metrics_a["rewards/margins"]) > 1e-3, "the adapters move the policy away from the reference"
    for name in grads_a:
        torch.testing.assert_close(grads_c[name], grads_a[name], atol=1e-5, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in grads_c.values()), "the loss has a gradient"


def test_ld_alpha_changes_the_reference_values_so_the_cache_key_names_it(tiny_model_dir, tmp_path):
    from align.preference.dpo_setup import reference_cache

    def key(**extra):
        cfg = load_config(DPOConfig, None, {"model.name_or_path": str(tiny_model_dir), "output_dir": str(tmp_path / "o"),
                                            "dpo.ref_cache_dir": str(tmp_path / "c"), "data.path": "x.jsonl", **extra})
        return reference_cache(cfg, load_tiny(tiny_model_dir), "cpu")

    plain, ld = key(), key(**{"dpo.ld_alpha": 0.5})
    assert "ld_alpha" not in plain.key, "plain DPO keeps the cache files it always had"
    assert ld.key["ld_alpha"] == 0.5 and ld.name != plain.name


# --------------------------------------------------------------------------- config


BASE = {"output_dir": "out/dpo", "model.name_or_path": "m", "data.path": "d.jsonl"}


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"dpo.beta": 0.0}, "dpo.beta: must be positive"),
        ({"dpo.loss_type": ["sigmoid", "sigmoid"]}, "dpo.loss_type: sigmoid listed twice"),
        ({"dpo.loss_type": ["sigmoid", "sigmoud"]}, "dpo.loss_type[1]: expected one of"),
        ({"dpo.loss_weights": [1.0, 2.0]}, "dpo.loss_weights: 2 weights for 1 loss types"),
        ({"dpo.loss_type": ["sigmoid", "sft"], "dpo.loss_weights": [1.0, -1.0]}, "dpo.loss_weights: every weight must be >= 0"),
        ({"dpo.rpo_alpha": 0.0}, "dpo.rpo_alpha: must be positive"),
        ({"dpo.loss_type": ["sigmoid", "sft"], "dpo.rpo_alpha": 1.0}, "dpo.rpo_alpha: the loss types already include 'sft'"),
        ({"dpo.label_smoothing": 0.5, "dpo.loss_type": "robust"}, "dpo.label_smoothing: must be in [0, 0.5)"),
        ({"dpo.label_smoothing": 0.1}, "dpo.label_smoothing: 0.1 has no effect on sigmoid"),
        ({"dpo.loss_type": "exo_pair"}, "dpo.label_smoothing: exo_pair needs"),
        ({"dpo.ld_alpha": 1.5}, "dpo.ld_alpha: must be in [0, 1]"),
        ({"dpo.use_weighting": True, "dpo.loss_type": "aot_unpaired"}, "dpo.use_weighting: WPO weights are per pair"),
        ({"dpo.use_weighting": True, "dpo.rpo_alpha": 1.0}, "dpo.use_weighting: TRL 1.16 cannot apply WPO weights"),
        ({"dpo.f_divergence_type": "forward_kl", "dpo.loss_type": "bco_pair"}, "dpo.f_divergence_type: forward_kl works only"),
        ({"dpo.f_alpha_divergence_coef": 0.3}, "dpo.f_alpha_divergence_coef: used only with f_divergence_type"),
        ({"dpo.f_divergence_type": "alpha_divergence", "dpo.f_alpha_divergence_coef": 0.0}, "must be in (0, 1]"),
        ({"dpo.discopop_tau": 0.1}, "dpo.discopop_tau: used only by loss_type discopop"),
        ({"dpo.loss_type": "discopop", "dpo.discopop_tau": -1.0}, "dpo.discopop_tau: must be positive"),
    ],
)
def test_invalid_values_and_combinations_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(DPOConfig, None, {**BASE, **overrides})
    assert needle in str(err.value)


def test_valid_mixtures_map_to_trls_arguments():
    cfg = load_config(DPOConfig, None, {**BASE, "dpo.loss_type": ["sigmoid", "bco_pair"], "dpo.loss_weights": [0.8, 0.2],
                                        "dpo.rpo_alpha": 1.0, "dpo.ld_alpha": 0.4})
    args = dpo_options.trl_loss_args(cfg.dpo)
    assert args["loss_type"] == ["sigmoid", "bco_pair", "sft"] and args["loss_weights"] == [0.8, 0.2, 1.0]
    assert args["ld_alpha"] == 0.4 and args["f_divergence_type"] == "reverse_kl"
    assert dpo_options.describe_loss(cfg.dpo) == "0.8 sigmoid + 0.2 bco_pair + 1 sft, LD-DPO ld_alpha=0.4"
    from trl import DPOConfig as TRLDPOConfig

    TRLDPOConfig(output_dir="unused", use_cpu=True, bf16=False, report_to=[], **args)  # TRL accepts them


NEW_KEYS = {
    "dpo.loss_type": "list", "dpo.loss_weights": ">= 0", "dpo.rpo_alpha": "positive", "dpo.label_smoothing": "[0, 0.5)",
    "dpo.use_weighting": "WPO", "dpo.ld_alpha": "[0, 1]", "dpo.f_divergence_type": "alpha_divergence",
    "dpo.f_alpha_divergence_coef": "(0, 1]", "dpo.discopop_tau": "positive", "dpo.beta": "positive",
}


def test_every_new_key_is_listed_with_its_range():
    lines = {line.split(" (")[0].strip(): line for line in describe(DPOConfig)}
    for key, needle in NEW_KEYS.items():
        assert key in lines, key
        assert needle in lines[key], (key, lines[key])


def test_recipe_refuses_a_bad_combination_before_writing(tmp_path, tiny_model_dir):
    from test_cli import run_recipe

    cfg = tmp_path / "dpo.yaml"
    cfg.write_text(
        f"output_dir: out/dpo\nmodel:\n  name_or_path: {tiny_model_dir}\ndata:\n  path: bundled:demo-prefs\n"
        "dpo:\n  loss_type: [sigmoid, bco_pair]\n  loss_weights: [1.0]\ntracking: none\n"
    )
    proc = run_recipe("dpo", "--config", str(cfg), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "dpo.loss_weights: 1 weights for 2 loss types" in errors[0] and str(cfg) in errors[0]
    assert not (tmp_path / "out").exists(), "nothing is written"
    keys = run_recipe("dpo", "--keys", cwd=tmp_path)
    assert keys.returncode == 0 and all(k in keys.stdout for k in NEW_KEYS)
    assert str(REPO)  # recipes run from the repository
