#!/usr/bin/env python3
"""Records the authors' generate_diffusion_style on a fixture model for settings the shipped
fixtures do not cover, in the runs format of a fixture's generate.json, so that the checker
(`huginn check-fixture`, and infer/tests/diffusion.rs) compares every knob with the reference.

Usage (the venv that ../shared/anchor/compare.sh builds has torch and transformers):
  ~/.cache/huginn-anchor/venv/bin/python scripts/diffusion-reference-runs.py \
      fixtures/reference/tiny-d ../shared/anchor > infer/tests/data/diffusion-tiny-d.json

Each setting runs in float32 and again in float64; a run is marked robust when both give the
same tokens and core steps and no greedy choice had a top-2 logit gap under 1e-4.
"""
import json
import os
import sys

folder, anchor = sys.argv[1], sys.argv[2]
sys.path.insert(0, anchor)
import torch  # noqa: E402
from transformers import GenerationConfig  # noqa: E402

from bench_ref import load_model  # noqa: E402
from recpre.raven_modeling_minimal import RavenForCausalLM  # noqa: E402

SETTINGS = {
    "token_stability": dict(freeze_strategy="token-stability"),
    "latent_acceleration_1": dict(freeze_strategy="latent-acceleration-1"),
    "latent_acceleration_2": dict(freeze_strategy="latent-acceleration-2"),
    "sqrt_mixer": dict(sqrt_mixer=True),
    "constant_mixer": dict(dampened_state_mixer=False, state_noise_mixing=0.2),
    "standing_waves": dict(max_wavefront=3),
    "continuous_compute": dict(continuous_compute=True),
    "prompt_as_first_wave": dict(full_prefill=False),
    "fixed_compressed_cache": dict(freeze_strategy="fixed"),
    "inner2_exit0.1": dict(inner_recurrence=2, exit_t=0.1),
    "token_stability_full_cache_no_ema": dict(
        freeze_strategy="token-stability", cache_lookup_strategy="full", ema_embeds=0.0
    ),
    "latest_m4_uncompressed": dict(cache_lookup_strategy="latest-m4"),
    "inner8_steps32": dict(num_steps=32, inner_recurrence=8),
}

fixture = json.load(open(os.path.join(folder, "generate.json")))
prompt = torch.tensor(fixture["prompt_ids"])
max_new = 12

log = []
original = RavenForCausalLM._sample_next_token


def recording(self, logits, ids, config):
    token = original(self, logits, ids, config)
    rows = logits.float()
    top2 = rows.topk(2, dim=-1).values
    log.append(
        dict(
            logit=rows[0, token[0, 0]].item(),
            lse=torch.logsumexp(rows[0], -1).item(),
            gap=(top2[:, 0] - top2[:, 1]).min().item(),
        )
    )
    return token


RavenForCausalLM._sample_next_token = recording


def run(model, extra):
    log.clear()
    kwargs = {"init_scale": 0.0, "num_steps": 8, "max_new_tokens": max_new, **extra}
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new, return_dict_in_generate=True)
    out = model.generate_diffusion_style(prompt, generation_config=config, **kwargs)
    return kwargs, out.sequences[0].tolist(), list(log), out.scores


model32, _ = load_model(folder)
model64, _ = load_model(folder)
model64 = model64.double()
runs = []
for name, extra in SETTINGS.items():
    kwargs, output, samples, scores = run(model32, extra)
    _, output64, samples64, _ = run(model64, extra)
    # Upstream can freeze back into the prompt and resample it (prompt as the first wave); this
    # build never edits the prompt, so such a run is recorded but not comparable.
    edited = output[: prompt.shape[1]] != prompt[0].tolist()
    tokens, tokens64 = output[prompt.shape[1] :], output64[prompt.shape[1] :]
    # Core steps between samplings: the prompt's pass, then one wave each.
    between = [kwargs["num_steps"]] if kwargs.get("full_prefill", True) else []
    between += [kwargs.get("inner_recurrence", 4)] * (len(samples) - len(between))
    gap = min(s["gap"] for s in samples)
    robust = tokens == tokens64 and len(samples) == len(samples64) and gap >= 1e-4 and not edited
    runs.append(
        dict(
            name=f"diffusion_style_{name}_zero_init",
            function="RavenForCausalLM.generate_diffusion_style",
            kwargs=kwargs,
            batch_size=1,
            prompt="prompt_ids",
            new_token_ids=[tokens],
            output_ids=[output],
            reference_edited_the_prompt=edited,
            core_steps_between_sampled_tokens=between,
            sampled_logit=[s["logit"] for s in samples],
            sampled_logsumexp=[s["lse"] for s in samples],
            min_top2_logit_gap=gap,
            reference_scores={k: v for k, v in scores.items() if not torch.is_tensor(v)},
            fp64_shadow_agrees=tokens == tokens64,
            reliable_prefix_tokens=len(tokens) if robust else 0,
            robust=robust,
        )
    )

json.dump(
    dict(
        case=fixture["case"],
        reference="recpre/raven_modeling_minimal.py (the authors' code, unmodified), generate_diffusion_style",
        torch_version=torch.__version__,
        note="recorded by scripts/diffusion-reference-runs.py on this fixture's model and prompt",
        prompt_ids=fixture["prompt_ids"],
        max_new_tokens=max_new,
        runs=runs,
    ),
    sys.stdout,
    indent=1,
)
