"""Secret redaction: one registry and one `redact()` for everything the agent writes or prints.

Three sources of secrets, all applied by `redact()`:

- **Registered values** (`register`, `register_config`): the values the configuration declares
  secret. `agent.config.load` registers them, so the CLI and the agent know them from the moment
  the config is read:
  - in `installer_env`, `comfyui.env` and every component's `env`: the value of each key whose
    name looks secret (`secret_name`);
  - in `comfyui.args` and `installer_args`: the value after a flag whose name looks secret
    (`--hf-token X`, `--api-key=X`);
  - anywhere in those places and in every component's fields: credentials in URLs
    (`scheme://user:password@host`, the password also on its own and percent-decoded) and
    tokens that the patterns below recognise;
  - `http.token`.
  Values shorter than 4 characters are not registered (masking them would garble ordinary text).
- **The process environment**: values of variables whose name looks secret, 6 characters or
  longer (read at each call, so it follows the environment).
- **Patterns** for secrets whose value nobody declared: `hf_...`, `ghp_...`/`github_pat_...`,
  `sk-...`, credentials in URLs (they end at the *last* `@` of the authority, so a password may
  contain `@`), `Authorization:`/`Bearer` values, `token=`-like query values, the value after a
  secret-looking flag (`--api-key X`), `SECRET_NAME=value` assignments and `"password": "value"`
  pairs.

Every match becomes `***`. Masking a value that was not really secret costs nothing but a few
characters of log; missing one is the failure this module exists to prevent, so the name rule
errs on the side of masking.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from typing import Any, Iterable, Mapping
from urllib.parse import quote, unquote

MASK = "***"
MIN_REGISTERED = 4  # shorter values are not registered
MIN_ENV = 6  # process environment values shorter than this are not masked

# A name (env key, flag, JSON key) that holds a secret, matched on the lower-cased name with
# '-' and '.' read as '_'. Substrings: token (not tokenizer/tokens), secret, passw(ord)/passwd,
# passphrase, credential, api_key/apikey, access_key, private_key, auth (not author), cookie,
# signature. Whole words between '_': key, pass, pwd, pw, pat, sig. PWD/OLDPWD are directories.
_SECRET_NAME = re.compile(
    r"token(?!iz|s(?:$|_))|secret|passw|passphrase|credential|api_?key|access_?key|private_?key"
    r"|auth(?!ors?(?:$|_))|cookie|signature|(?:^|_)(?:key|pass|pwd|pw|pat|sig)(?:$|_)")
_NOT_SECRET_NAMES = frozenset({"pwd", "oldpwd"})


@functools.lru_cache(maxsize=4096)
def secret_name(name: str) -> bool:
    """Whether an environment key, a flag or a JSON key names a secret."""
    norm = re.sub(r"[-.]", "_", name.strip().lstrip("-").lower())
    return bool(norm) and norm not in _NOT_SECRET_NAMES and bool(_SECRET_NAME.search(norm))


# Each pattern keeps what is around the named group `s` (the secret) and masks `s`. A pattern
# with a group `n` (a name) masks `s` only when `n` is a secret name.
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://(?P<s>[^/?#\s\"'<>]*)@")
_PATTERNS: list[re.Pattern[str]] = [
    re.compile(r"\bhf_(?P<s>[A-Za-z0-9]{8,})"),
    re.compile(r"\bgh[pousr]_(?P<s>[A-Za-z0-9]{16,})"),
    re.compile(r"\bgithub_pat_(?P<s>[A-Za-z0-9_]{16,})"),
    re.compile(r"\bsk-(?:proj-|ant-)?(?P<s>[A-Za-z0-9_-]{20,})"),
    _URL,
    re.compile(r"(?i)authorization[ \t]*[:=][ \t]*(?:bearer[ \t]+|basic[ \t]+|token[ \t]+)?"
               r"(?P<s>[^\s'\"]+)"),
    re.compile(r"(?i)\bbearer[ \t]+(?P<s>[A-Za-z0-9._~+/=-]{6,})"),
    re.compile(r"(?i)[?&](?:token|access_token|api_key|apikey|key|password|secret|sig)="
               r"(?P<s>[^&\s'\"]+)"),
    # --api-key X, --api-key=X, -p X is left alone (a one-letter flag says nothing)
    re.compile(r"(?<![\w-])--?(?P<n>[A-Za-z][\w.-]+)(?:=|[ \t]+(?!-))(?P<s>[^\s'\"]+)"),
    # HF_TOKEN=X (shell assignments, env dumps)
    re.compile(r"(?<![\w-])(?P<n>[A-Za-z_][A-Za-z0-9_]*)=(?P<s>[^\s'\"&;]+)"),
    # "password": "X" and 'password': 'X' (JSON, Python reprs)
    re.compile(r"[\"'](?P<n>[\w.-]{1,64})[\"'][ \t]*:[ \t]*[\"'](?P<s>[^\"'\n]+)[\"']"),
]

_lock = threading.Lock()
_registered: set[str] = set()
_ordered: tuple[str, ...] = ()  # longest first, so a secret containing another is masked whole


def _mask(match: re.Match[str]) -> str:
    groups = match.groupdict()
    if "n" in groups and not secret_name(groups["n"]):
        return match.group(0)
    if not match.group("s"):
        return match.group(0)
    start, end = match.span("s")
    base = match.start()
    text = match.group(0)
    return text[:start - base] + MASK + text[end - base:]


def _env_secrets(env: Mapping[str, str] | None = None) -> list[str]:
    env = os.environ if env is None else env
    return [v for k, v in env.items() if len(v) >= MIN_ENV and secret_name(k)]


def redact(text: str, extra: Iterable[str] = ()) -> str:
    """Return text with registered secrets, secret environment values, `extra` values and
    pattern-recognised secrets masked."""
    if not text:
        return text
    values = [v for v in extra if v and len(v) >= MIN_REGISTERED]
    values += _env_secrets()
    if values:
        values = sorted(set(values) | set(_ordered), key=len, reverse=True)
    else:
        values = _ordered
    for value in values:
        if value in text:
            text = text.replace(value, MASK)
    for pattern in _PATTERNS:
        text = pattern.sub(_mask, text)
    return text


def redact_argv(argv: Iterable[str]) -> list[str]:
    """A command line with secrets masked, argument by argument: the argument after a
    secret-looking flag (`--hf-token X`) is masked whatever it looks like."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        arg = str(arg)
        if hide_next and not arg.startswith("-"):
            out.append(MASK)
            hide_next = False
            continue
        hide_next = arg.startswith("-") and "=" not in arg and len(arg) > 2 and secret_name(arg)
        out.append(redact(arg))
    return out


# ---------------------------------------------------------------------- finding secrets
def secrets_in_text(text: str) -> list[str]:
    """The secret parts of `text` that the patterns recognise (URL credentials also as the
    password alone and percent-decoded)."""
    found: list[str] = []
    for pattern in _PATTERNS:
        for match in pattern.finditer(text):
            groups = match.groupdict()
            if "n" in groups and not secret_name(groups["n"]):
                continue
            value = match.group("s")
            if not value:
                continue
            found.append(value)
            if pattern is _URL:
                found.append(unquote(value))
                user, sep, password = value.partition(":")
                if sep and password:
                    found += [password, unquote(password)]
    return found


def secrets_in_env(env: Mapping[str, Any] | None) -> list[str]:
    """Values of secret-looking keys, and secrets the patterns find in any value."""
    found: list[str] = []
    for key, value in (env or {}).items():
        if value is None:
            continue
        value = str(value)
        if secret_name(str(key)):
            found.append(value)
        found += secrets_in_text(value)
    return found


def secrets_in_args(args: Iterable[Any]) -> list[str]:
    """Values after secret-looking flags (`--hf-token X`, `--api-key=X`), and secrets the
    patterns find in any argument."""
    found: list[str] = []
    hide_next = False
    for arg in (str(a) for a in args):
        if hide_next and not arg.startswith("-"):
            found.append(arg)
        hide_next = False
        if arg.startswith("-") and len(arg) > 2:
            flag, eq, value = arg.partition("=")
            if secret_name(flag):
                if eq:
                    found.append(value)
                else:
                    hide_next = True
        found += secrets_in_text(arg)
    return found


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            yield from _strings(v)


# ---------------------------------------------------------------------- the registry
def register(*values: str | None) -> None:
    """Treat each value (and its percent-encoded form) as a secret wherever it appears."""
    global _ordered
    new = set()
    for value in values:
        if not isinstance(value, str) or len(value) < MIN_REGISTERED:
            continue
        new.add(value)
        encoded = quote(value, safe="")
        if encoded != value:
            new.add(encoded)
    with _lock:
        if new <= _registered:
            return
        _registered.update(new)
        _ordered = tuple(sorted(_registered, key=len, reverse=True))


def registered() -> list[str]:
    """The registered values (handed to the ComfyUI log pipe)."""
    return list(_ordered)


def forget_all() -> None:
    """Tests only: an empty registry."""
    global _ordered
    with _lock:
        _registered.clear()
        _ordered = ()


def config_secrets(config: Any) -> list[str]:
    """Every secret a loaded Config declares (see the module docstring)."""
    found: list[str] = []
    http = getattr(config, "http", None) or {}
    found.append(http.get("token") if isinstance(http, Mapping) else None)
    found += secrets_in_env(getattr(config, "installer_env", None))
    found += secrets_in_args(getattr(config, "installer_args", None) or ())
    cui = getattr(config, "comfyui", None)
    if cui is not None:
        found += secrets_in_env(getattr(cui, "env", None))
        found += secrets_in_args(getattr(cui, "args", None) or ())
    for comp in (getattr(config, "components", None) or {}).values():
        spec = getattr(comp, "spec", None) or {}
        env = spec.get("env") if isinstance(spec, Mapping) else None
        if isinstance(env, Mapping):
            found += secrets_in_env(env)
        for text in _strings(spec):
            found += secrets_in_text(text)
    return [v for v in found if isinstance(v, str)]


def register_config(config: Any) -> Any:
    """Register every secret the configuration declares (agent.config.load calls it on every
    Config it builds); returns the config."""
    register(*config_secrets(config))
    return config
