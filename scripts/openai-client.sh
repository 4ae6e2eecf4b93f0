#!/usr/bin/env bash
# The official `openai` Python package against `huginn serve` (not part of CI).
#
#   scripts/openai-client.sh [MODEL]
#
# MODEL is a model folder with a tokenizer and a chat template (default: the text demo's,
# runs/demo-text/recurrent/final, from `cargo xtask demo --text`). The package comes from PyPI
# into a venv outside the repository ($OPENAI_VENV, default ~/.cache/huginn-openai/venv; once).
# It runs completions and chat, streamed and not, log probabilities in both formats (streamed
# too), the depth
# in the model name, and a refused request, and checks what the client parsed.
set -euo pipefail
cd "$(dirname "$0")/.."

model=$(realpath "${1:-runs/demo-text/recurrent/final}")
venv=${OPENAI_VENV:-$HOME/.cache/huginn-openai/venv}
port=${PORT:-18091}

if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import openai' 2>/dev/null; then
  echo "== installing openai into $venv (once)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q openai
fi

# A folder without a chat template (the text demo's) is served from a copy with a plain one.
if [ ! -f "$model/chat_template.jinja" ] && ! grep -q '"chat_template"' "$model/tokenizer_config.json" 2>/dev/null; then
  copy=$(mktemp -d)
  cp -r "$model/." "$copy/"
  printf '%s' "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}" > "$copy/chat_template.jinja"
  echo "== $model has no chat template: serving a copy with a plain one" >&2
  model=$copy
fi

cargo build -q -p infer --bin huginn
huginn=${CARGO_TARGET_DIR:-target}/debug/huginn
"$huginn" serve --model "$model" --addr "127.0.0.1:$port" --model-name m 2>/dev/null &
server=$!
trap 'kill "$server" 2>/dev/null; [ -n "${copy:-}" ] && rm -rf "$copy"' EXIT
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  sleep 0.2
done

"$venv/bin/python" - "$port" <<'PY'
import sys

import openai

client = openai.OpenAI(base_url=f"http://127.0.0.1:{sys.argv[1]}/v1", api_key="unused")
print("openai", openai.__version__)

models = client.models.list()
assert [m.id for m in models.data] == ["m"], models

done = client.completions.create(model="m@r=8", prompt="ROMEO.", max_tokens=12, temperature=0)
text = done.choices[0].text
assert done.usage.completion_tokens >= 1 and text, done
print("completion:", repr(text))

streamed = "".join(
    c.choices[0].text for c in client.completions.create(model="m@r=8", prompt="ROMEO.", max_tokens=12, temperature=0, stream=True)
)
assert streamed == text, (streamed, text)

scored = client.completions.create(model="m@r=8", prompt="ROMEO. What", max_tokens=0, echo=True, logprobs=2)
lp = scored.choices[0].logprobs
assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:]), lp
assert len(lp.tokens) == len(lp.text_offset) == len(lp.top_logprobs) == scored.usage.prompt_tokens
print("echo logprobs:", [round(x, 3) for x in lp.token_logprobs[1:]])

chat = client.chat.completions.create(
    model="m@r=8@exit=kl:0.001",
    messages=[{"role": "user", "content": "Speak."}],
    max_tokens=8,
    temperature=0,
    logprobs=True,
    top_logprobs=3,
)
content = chat.choices[0].logprobs.content
assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content), content
assert all(t.top_logprobs[0].logprob == t.logprob for t in content), "greedy: each token the most likely"
print("chat:", repr(chat.choices[0].message.content))

chunks = list(client.chat.completions.create(
    model="m@r=8@exit=kl:0.001", messages=[{"role": "user", "content": "Speak."}], max_tokens=8, temperature=0,
    stream=True, logprobs=True, top_logprobs=3,
))
assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
streamed_content = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
assert [(t.token, t.logprob) for t in streamed_content] == [(t.token, t.logprob) for t in content], streamed_content

pieces = list(client.completions.create(
    model="m@r=8", prompt="ROMEO. What", max_tokens=4, temperature=0, echo=True, logprobs=2, stream=True,
))
offsets = [o for p in pieces if p.choices and p.choices[0].logprobs for o in p.choices[0].logprobs.text_offset]
assert offsets == sorted(offsets) and len(offsets) == scored.usage.prompt_tokens + 4, offsets
assert pieces[0].choices[0].text == "ROMEO. What", pieces[0]
print("streamed with logprobs:", repr("".join(p.choices[0].text for p in pieces if p.choices)))

try:
    client.completions.create(model="m", prompt="x", max_tokens=1, logprobs=21)
    raise SystemExit("logprobs 21 was accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "logprobs", e.body
print("all checks passed")
PY
