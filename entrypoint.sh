#!/usr/bin/env bash
# Container entrypoint for a ComfyUI pod: idempotent, works on an empty and on a resumed volume.
#
#   POD_AGENT_WORKSPACE   the persistent volume (default /workspace)
#   POD_AGENT_CONFIG      a config file replacing the built-in default (optional)
#   POD_AGENT_SOURCE      what to pip-install when the image has no pod-agent: a checkout
#                         path, a git URL (git+https://github.com/OWNER/comfy-pod-agent) or a
#                         wheel (the package is not on PyPI). Default: the checkout this script
#                         sits in, when it is one; else the script stops with one line.
#                         Installed into $POD_AGENT_VENV on the volume. (POD_AGENT_SPEC: old name)
#   POD_AGENT_VENV        default $WORKSPACE/.pod-agent/agent-venv
#   POD_AGENT_TEMPLATE_REPO / POD_AGENT_TEMPLATE_DIR
#                         a template or config repository to clone or `git pull` on every start
#                         (what the original template did with its own repo); a pod-agent.yaml
#                         at its top becomes the config unless POD_AGENT_CONFIG is set
# Extra arguments are passed to `pod-agent run` (e.g. --poll 5).
set -euo pipefail

WS="${POD_AGENT_WORKSPACE:-/workspace}"
export POD_AGENT_WORKSPACE="$WS"
mkdir -p "$WS/logs" "$WS/.install_markers" "$WS/.pod-agent"

log() { printf '%s entrypoint: %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$*" >&2; }

# 1. An optional template/config repository, updated on every start. A failure is a warning:
#    the pod must still come up with what it has.
if [ -n "${POD_AGENT_TEMPLATE_REPO:-}" ]; then
  dir="${POD_AGENT_TEMPLATE_DIR:-$WS/pod-template}"
  export GIT_TERMINAL_PROMPT=0
  if [ -d "$dir/.git" ]; then
    timeout 120 git -C "$dir" pull --ff-only </dev/null >&2 || log "warning: git pull of $dir failed; using what is there"
  else
    timeout 300 git clone --depth 1 "$POD_AGENT_TEMPLATE_REPO" "$dir" </dev/null >&2 || log "warning: clone of the template repository failed"
  fi
  if [ -z "${POD_AGENT_CONFIG:-}" ] && [ -f "$dir/pod-agent.yaml" ]; then
    export POD_AGENT_CONFIG="$dir/pod-agent.yaml"
  fi
fi

# 2. The agent: from the image, else from a venv on the volume (installed once, reused).
if command -v pod-agent >/dev/null 2>&1; then
  AGENT="$(command -v pod-agent)"
else
  venv="${POD_AGENT_VENV:-$WS/.pod-agent/agent-venv}"
  if [ ! -x "$venv/bin/pod-agent" ]; then
    src="${POD_AGENT_SOURCE:-${POD_AGENT_SPEC:-}}"
    if [ -z "$src" ]; then
      here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
      if grep -qs '^name = "comfy-pod-agent"' "$here/pyproject.toml"; then
        src="$here"
      else
        log "error: pod-agent is not installed and $here is not a comfy-pod-agent checkout: set POD_AGENT_SOURCE to a checkout path, a git URL (git+https://...) or a wheel"
        exit 1
      fi
    fi
    log "installing the agent from $src into $venv"
    python3 -m venv "$venv"
    if ! "$venv/bin/python" -m pip install --quiet "$src"; then
      log "error: pip install of $src into $venv failed (output above): fix POD_AGENT_SOURCE or the network and restart"
      exit 1
    fi
  fi
  AGENT="$venv/bin/pod-agent"
fi

# 3. Run it. As PID 1 prefer tini (reaps zombies, forwards signals); pod-agent also copes alone.
if [ "$$" = 1 ] && command -v tini >/dev/null 2>&1; then
  exec tini -s -g -- "$AGENT" run "$@"
fi
exec "$AGENT" run "$@"
