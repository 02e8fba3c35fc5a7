"""``[model] overrides``: change single NeoLLMModelArgs fields of a flavor from the TOML or CLI.

    [model]
    flavor = "neollm_135m"
    overrides = ["layer_pattern=DA", "gpas=false", "fan_ratio=0.25"]

    ./run_train.sh --model.overrides layer_pattern=A gpas=false

Each entry is ``field=value`` over a field of ``NeoLLMModelArgs`` (neollm/model/args.py). The
value is read by the field's declared type: bool as true/false, int, float, str as written. This
is what makes an ablation one config file plus a few overrides: a new mixer code, MLP type or
technique switch added to NeoLLMModelArgs is reachable here without new TOML keys.

The model's shape is fully given by flavor + vocab_size + overrides, so a checkpoint resumes
with the same three settings (they are in the run's config).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing

from neollm.errors import ConfigError

WHERE = "the fields of NeoLLMModelArgs in neollm/model/args.py"
# Set by other keys: overriding them here would be silently replaced or would hide the real key.
OWN_KEYS = {"vocab_size": "[model] vocab_size", "max_seq_len": "[training] seq_len"}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def field_types(args_class: type) -> dict[str, type]:
    """Field name -> declared type (annotations resolved) of ``args_class`` (NeoLLMModelArgs: this
    module does not import it, so that args.py can import this one without a circle)."""
    hints = typing.get_type_hints(args_class)
    return {f.name: hints[f.name] for f in dataclasses.fields(args_class) if f.init}


def _convert(name: str, text: str, kind: type, entry: str):
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"[model] overrides: {entry!r}: {name} takes {expected}, got {text!r}")

    if kind is bool:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise bad("true or false")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise bad("an integer") from None
    if kind is float:
        try:
            value = float(text)
        except ValueError:
            raise bad("a number") from None
        if not math.isfinite(value):
            raise bad("a finite number")
        return value
    if kind is str:
        text = text.strip()
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            text = text[1:-1]
        return text
    raise bad(f"a value of type {kind}, which overrides cannot parse")  # no such field today


def parse_overrides(entries: list[str] | None, args_class: type) -> dict[str, object]:
    """["field=value", ...] -> {field: typed value} over the fields of ``args_class``
    (NeoLLMModelArgs); ConfigError naming the entry and the fix."""
    if not entries:
        return {}
    if isinstance(entries, str):
        raise ConfigError(f"[model] overrides must be a list of \"field=value\" strings, got {entries!r}: "
                          f"write overrides = [{entries!r}]")
    types = field_types(args_class)
    out: dict[str, object] = {}
    for entry in entries:
        if not isinstance(entry, str) or "=" not in entry:
            raise ConfigError(f"[model] overrides: {entry!r} is not \"field=value\" (e.g. \"gpas=false\")")
        name, text = (part.strip() for part in entry.split("=", 1))
        if name in OWN_KEYS:
            raise ConfigError(f"[model] overrides: {name} is set by {OWN_KEYS[name]}, not by overrides")
        if name not in types:
            close = difflib.get_close_matches(name, list(types), n=3)
            hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
            raise ConfigError(f"[model] overrides: unknown model field {name!r} in {entry!r}: {hint}"
                              f"the valid names are {WHERE}")
        if name in out:
            raise ConfigError(f"[model] overrides: {name} is given twice; keep one entry")
        out[name] = _convert(name, text, types[name], entry)
    return out


def apply_overrides(args, entries: list[str] | None) -> None:
    """Set the overridden fields on ``args`` in place (validation is the caller's: update_from_config)."""
    for name, value in parse_overrides(entries, type(args)).items():
        setattr(args, name, value)


def format_value(value: object) -> str:
    """The override text of a value (inverse of parsing): bools as true/false."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
