#!/usr/bin/env bash
# Serve a distilled student (or a self-hosted teacher) with vLLM's OpenAI-compatible server.
#
#   bash deploy/vllm/serve.sh 7b                       # DeepSeek-R1-Distill-Qwen-7B on :8000
#   PORT=8001 bash deploy/vllm/serve.sh 1.5b
#   TP=2 MAX_MODEL_LEN=16384 bash deploy/vllm/serve.sh 32b
#   bash deploy/vllm/serve.sh 14b --max-num-seqs 64     # extra args go to `vllm serve`
#
# Keys: 1.5b 7b 14b 32b (students), teacher-r1 (DeepSeek-R1, 8 GPUs), teacher-qwen3 (4 GPUs).
# GPU sizing and the reasoning behind each flag: deploy/vllm/README.md.
# The served model name is the Hugging Face id, so Triage's `upstream_model` is that id.
set -euo pipefail

key="${1:-}"
[[ -n "$key" ]] || { sed -n '2,12p' "$0" >&2; exit 2; }
shift

# key -> model, default tensor-parallel size, default max context, reasoning parser
extra=()
parser=deepseek_r1
case "$key" in
    1.5b) model=deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B; tp=1; len=16384 ;;
    7b) model=deepseek-ai/DeepSeek-R1-Distill-Qwen-7B; tp=1; len=16384 ;;
    14b) model=deepseek-ai/DeepSeek-R1-Distill-Qwen-14B; tp=1; len=16384 ;;
    32b) model=deepseek-ai/DeepSeek-R1-Distill-Qwen-32B; tp=2; len=16384 ;;
    teacher-r1) model=deepseek-ai/DeepSeek-R1; tp=8; len=32768 ;;
    # MoE: shard experts across the 4 GPUs instead of splitting each expert.
    teacher-qwen3) model=Qwen/Qwen3-235B-A22B-FP8; tp=4; len=32768; parser=qwen3
        extra=(--enable-expert-parallel) ;;
    *) echo "unknown model key '$key' (1.5b 7b 14b 32b teacher-r1 teacher-qwen3)" >&2; exit 2 ;;
esac

command -v vllm >/dev/null || { echo "vllm not found: pip install vllm (needs an NVIDIA GPU)" >&2; exit 1; }

# --served-model-name: pin the name Triage sends as `model`, whatever path the weights load from.
# --enable-prefix-caching: chat requests share system prompts; reuse their KV blocks.
# --enable-prompt-tokens-details: report usage.prompt_tokens_details.cached_tokens, which
#   Triage's cost accounting can credit.
# --reasoning-parser: move <think>...</think> out of `content` into the reasoning field,
#   so apps get the answer only (every model here thinks before it answers).
exec vllm serve "$model" \
    --served-model-name "$model" \
    --host "${HOST:-0.0.0.0}" \
    --port "${PORT:-8000}" \
    --tensor-parallel-size "${TP:-$tp}" \
    --max-model-len "${MAX_MODEL_LEN:-$len}" \
    --gpu-memory-utilization "${GPU_MEMORY_UTILIZATION:-0.90}" \
    --enable-prefix-caching \
    --enable-prompt-tokens-details \
    --reasoning-parser "$parser" \
    "${extra[@]}" \
    "$@"
