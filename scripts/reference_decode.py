#!/usr/bin/env python3
"""Cached decoding speed of the authors' model (../shared/anchor/recpre, unmodified) built at any
shape in this process, with its own random init: no checkpoint on disk, so Huginn-0125's shape
(3.5 B parameters, 7 GB in bf16) needs only the memory of its weights.

Run through scripts/reference-decode.sh, which provides the Python environment. Prints one JSON
line: milliseconds per new token after the first (greedy, batch 1, HuginnDynamicCache through the
model's own `generate_minimal`), and per core iteration (the token's time over its steps).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
from transformers import GenerationConfig


def anchor_path():
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "shared", "anchor"))


sys.path.insert(0, os.environ.get("ANCHOR_DIR", anchor_path()))
from recpre.raven_config_minimal import RavenConfig  # noqa: E402
from recpre.raven_modeling_minimal import RavenForCausalLM  # noqa: E402


class Stamps:
    """Times each generated token as the model hands it to its streamer."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--huginn-0125", action="store_true",
                   help="Huginn-0125's shape: h 5280, 55 heads, (2, 4, 2), MLP 17920, vocabulary 65536")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", default="2,4,2", help="prelude,core,coda")
    p.add_argument("--mlp", type=int, default=704)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--steps", type=int, default=4, help="recurrence steps per token")
    p.add_argument("--prompt-len", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=3, help="at least 2: the first is the prompt's")
    p.add_argument("--runs", type=int, default=2, help="timed runs after one untimed; the median")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.new_tokens < 2 or a.steps < 1 or a.prompt_len < 1 or a.runs < 1:
        sys.exit("error: --new-tokens must be at least 2, --steps, --prompt-len and --runs at least 1")
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    prelude, core, coda = (int(x) for x in a.layers.split(","))
    if a.huginn_0125:
        cfg = RavenConfig()
    else:
        cfg = RavenConfig(n_embd=a.width, n_heads=a.heads, n_layers=prelude + core + coda,
                          intermediate_size=a.mlp, vocab_size=a.vocab, n_layers_in_prelude=prelude,
                          n_layers_in_recurrent_block=core, n_layers_in_coda=coda,
                          block_size=max(4096, a.prompt_len + a.new_tokens))
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    # Parameters are made (and initialised) in the target type directly: an f32 copy of
    # Huginn-0125 alone would take 14 GB.
    torch.set_default_dtype(dtype)
    started = time.perf_counter()
    model = RavenForCausalLM(cfg).eval()
    built_s = time.perf_counter() - started
    params = sum(t.numel() for t in model.parameters())
    ids = torch.randint(0, cfg.vocab_size, (1, a.prompt_len))
    config = GenerationConfig(do_sample=False, max_new_tokens=a.new_tokens)

    def decode():
        stamps = Stamps()
        with torch.no_grad():
            model.generate_minimal(ids, generation_config=config, max_new_tokens=a.new_tokens,
                                   num_steps=a.steps, init_scale=0.0, streamer=stamps)
        # One stamp per new token (fewer if a random token is a stop token); the first token's
        # time is the prompt's, so the rate is taken from the first stamp on.
        new = stamps.times
        if len(new) < 2:
            sys.exit("error: generation stopped after its first token (a stop token); try another --seed")
        return (new[-1] - new[0]) / (len(new) - 1)

    decode()
    per_token = sorted(decode() for _ in range(a.runs))
    ms = statistics.median(per_token) * 1e3
    print(json.dumps({
        "shape": {"width": cfg.n_embd, "heads": cfg.n_heads, "layers": [cfg.n_layers_in_prelude,
                  cfg.n_layers_in_recurrent_block, cfg.n_layers_in_coda], "mlp": cfg.intermediate_size,
                  "vocab": cfg.vocab_size},
        "parameters": params, "dtype": a.dtype, "threads": a.threads, "torch": torch.__version__,
        "steps": a.steps, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "build_s": built_s,
        "ms_per_token": ms, "ms_per_token_runs": [t * 1e3 for t in per_token],
        "ms_per_core_iteration": ms / a.steps,
    }))


if __name__ == "__main__":
    main()
