"""Turn every kind of bad configuration into one ConfigError naming the key and the fix.

``parse_config(argv)`` wraps torchtitan's ConfigManager: a missing or malformed TOML file,
unknown TOML keys or sections (torchtitan's ValueError) and unknown / unparsable command-line
options (tyro's boxed help, which exits) become ConfigError. ``check_types`` catches what both
let through (a TOML string where an int is expected is kept as a string), and ``check_ranges``
rejects values that cannot train (negative LR, zero steps, ...). Used by neollm.preflight
(before torchrun) and by the trainer itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import io
import math
import os
import re
import types
import typing
from typing import Any

from neollm.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib


def _config_file(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        for name in ("--job.config_file", "--job.config-file"):
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def _section_fields(section: str) -> list[str]:
    """Valid keys of a [section]: torchtitan's and NeoLLM's (neollm.config)."""
    from torchtitan.config import JobConfig

    import neollm.config as extra

    names: list[str] = []
    for cls in (JobConfig, extra.JobConfig):
        for f in dataclasses.fields(cls):
            if f.name == section:
                sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
                if dataclasses.is_dataclass(sub):
                    names += [g.name for g in dataclasses.fields(sub)]
    return names


def _sections() -> list[str]:
    from torchtitan.config import JobConfig

    import neollm.config as extra

    return sorted({f.name for cls in (JobConfig, extra.JobConfig) for f in dataclasses.fields(cls)})


def _section_of_class(class_name: str) -> str | None:
    """'MergedOptimizer' / 'Optimizer' -> 'optimizer' (by the JobConfig field of that type)."""
    from torchtitan.config import JobConfig

    bare = class_name.removeprefix("Merged")
    for f in dataclasses.fields(JobConfig):
        t = f.type if isinstance(f.type, type) else None
        if t is not None and t.__name__ == bare:
            return f.name
        if isinstance(f.type, str) and f.type == bare:
            return f.name
    return re.sub(r"(?<!^)(?=[A-Z])", "_", bare).lower()


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(sorted(options))}"


def _command_line_keys(argv: list[str]) -> dict[str, str | None]:
    """``--section.key value`` / ``--section.key=value`` options of ``argv`` (dashes in the key
    read as underscores) -> value (None for a flag)."""
    out: dict[str, str | None] = {}
    for i, arg in enumerate(argv):
        if not arg.startswith("--") or "." not in arg:
            continue
        name, eq, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        if eq:
            out[name] = value
        else:
            out[name] = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
    return out


def apply_dataset_default_paths(job_config, argv: list[str]) -> list[str]:
    """A ``[training]`` / ``[validation] dataset`` changed on the command line takes that
    dataset's own default path (its registered ``path``, e.g. data/wiki_vital_en), not the TOML's
    ``dataset_path``, which belonged to the TOML's dataset; ``--<section>.dataset_path`` given too
    wins. Returns the sections changed. Called by parse_config (preflight) and by the trainer."""
    given = _command_line_keys(argv)
    path = _config_file(argv)
    toml: dict = {}
    if path and os.path.isfile(path):
        with open(path, "rb") as f:
            toml = tomllib.load(f)
    changed = []
    for section in ("training", "validation"):
        if f"{section}.dataset" not in given or f"{section}.dataset_path" in given:
            continue
        in_file = toml.get(section, {})
        if "dataset_path" not in in_file:
            continue
        if str(in_file.get("dataset", "")).lower() == str(getattr(job_config, section).dataset).lower():
            continue  # the TOML's own dataset: its path stays
        getattr(job_config, section).dataset_path = None
        changed.append(section)
    return changed


def parse_config(argv: list[str]):
    """torchtitan's ConfigManager().parse_args(argv), with every failure as one ConfigError, and
    a dataset changed on the command line reading its own default path
    (:func:`apply_dataset_default_paths`)."""
    job_config = _parse_config(argv)
    apply_dataset_default_paths(job_config, argv)
    return job_config


def _parse_config(argv: list[str]):
    from torchtitan.config import ConfigManager

    path = _config_file(argv)
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"--job.config_file {path}: no such file; give the path of a TOML file "
                              "(e.g. train_configs/debug.toml)")
        try:
            with open(path, "rb") as f:
                tomllib.load(f)
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path} is not valid TOML: {error}; fix the syntax there") from None

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
            return ConfigManager().parse_args(argv)
    except ValueError as error:
        text = str(error)
        match = re.search(r"Invalid field names in <class '[\w.]*?(\w+)'> data: \{(.*?)\}", text)
        if not match:
            raise ConfigError(f"{path or 'configuration'}: {text.splitlines()[0]}") from None
        keys = [k.strip(" '\"") for k in match.group(2).split(",")]
        if match.group(1) in ("MergedJobConfig", "JobConfig"):
            key = keys[0]
            raise ConfigError(f"{path}: unknown section [{key}]: {_suggest(key, _sections())}") from None
        section = _section_of_class(match.group(1)) or "?"
        key = keys[0]
        raise ConfigError(
            f"{path}: unknown key [{section}] {key}: {_suggest(key, _section_fields(section))}"
        ) from None
    except SystemExit as exit_:
        text = _unbox(captured.getvalue())
        if exit_.code in (0, None):  # --help
            print(captured.getvalue(), end="")
            raise
        raise ConfigError(_reword_tyro(text)) from None


def _unbox(text: str) -> str:
    """tyro's rich box as plain lines."""
    lines = []
    for line in text.splitlines():
        line = line.strip(" │╭╮╰╯─")
        if any(ch.isalnum() for ch in line):
            lines.append(line)
    return "\n".join(lines)


def _reword_tyro(text: str) -> str:
    match = re.search(r"Unrecognized options?: ([^\n]*)", text)
    if match:
        option = match.group(1).split(",")[0].strip()
        if not option.startswith("-"):
            return (f"unexpected value {option!r} on the command line: true/false options are flags "
                    "(--section.key turns one on, --section.no-key off), other options take one value "
                    "(a list is one comma-separated value: --model.overrides gpas=false,layer_pattern=A)")
        hint = re.search(r"Perhaps you meant:\s*\n\s*(--[\w.-]+)", text)
        fix = f"did you mean {hint.group(1)}?" if hint else "run ./run_train.sh --help for the valid options"
        return f"unknown option {option}: {fix}"
    match = re.search(r"Error parsing (--[\w.-]+): (.*?)(?:\nArgument helptext:|\Z)", text, re.S)
    if match:
        option, why = match.group(1), " ".join(match.group(2).split())
        meta = re.search(re.escape(option) + r" (\S+)", text[match.end():])
        want = f": give a value of type {meta.group(1)}" if meta else ""
        return f"{option}: {why}{want}"
    first = next((line for line in text.splitlines() if line), "bad command line")
    return f"{first} (run ./run_train.sh --help for the valid options)"


# ---------------------------------------------------------------- types and ranges


def _type_ok(value: Any, annotation: Any) -> tuple[bool, str]:
    """(ok, expected type in words); unknown annotations pass."""
    if isinstance(annotation, str):
        ann = annotation.replace(" ", "")
        if ann.endswith("|None") or ann.startswith("Optional["):
            if value is None:
                return True, ann
            ann = ann.removesuffix("|None").removeprefix("Optional[").removesuffix("]")
        simple = {"int": int, "float": float, "bool": bool, "str": str}
        if ann in simple:
            annotation = simple[ann]
        elif ann.startswith("list["):
            return isinstance(value, list), "a list"
        else:
            return True, ann
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        results = [_type_ok(value, a) for a in args]
        return any(ok for ok, _ in results), " or ".join(w for _, w in results)
    if annotation is type(None):
        return value is None, "none"
    if origin is typing.Literal:
        options = typing.get_args(annotation)
        return value in options, "one of " + ", ".join(repr(o) for o in options)
    if origin is list:
        return isinstance(value, list), "a list"
    if annotation is bool:
        return isinstance(value, bool), "true or false"
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), "an integer"
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    if annotation is str:
        return isinstance(value, str), "a string"
    return True, str(annotation)


def check_types(job_config) -> None:
    """Every [section] key holds a value of its declared type."""
    for section in dataclasses.fields(job_config):
        sub = getattr(job_config, section.name)
        if not dataclasses.is_dataclass(sub):
            continue
        for f in dataclasses.fields(sub):
            value = getattr(sub, f.name)
            ok, expected = _type_ok(value, f.type)
            if not ok:
                raise ConfigError(
                    f"[{section.name}] {f.name} = {value!r} has the wrong type: it must be {expected}"
                )


def check_ranges(job_config) -> None:
    """Values that cannot train, rejected before anything starts."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    def finite(x) -> bool:
        return isinstance(x, (int, float)) and math.isfinite(x)

    o, t, s = job_config.optimizer, job_config.training, job_config.lr_scheduler
    need(finite(o.lr) and o.lr > 0, f"[optimizer] lr must be a positive number, got {o.lr} (e.g. lr = 3e-4)")
    need(finite(o.eps) and o.eps > 0, f"[optimizer] eps must be positive, got {o.eps} (e.g. eps = 1e-8)")
    need(finite(o.weight_decay) and o.weight_decay >= 0,
         f"[optimizer] weight_decay must be >= 0, got {o.weight_decay} (0 = off)")
    for key in ("beta1", "beta2"):
        value = getattr(o, key)
        need(finite(value) and 0 <= value < 1, f"[optimizer] {key} must be in [0, 1), got {value}")
    from neollm.optim.builder import CONDA_SETTINGS, conda_setting

    for key in CONDA_SETTINGS:
        conda_setting(o, key)
    need(t.steps > 0, f"[training] steps must be positive, got {t.steps}")
    need(t.seq_len > 0, f"[training] seq_len must be positive, got {t.seq_len}")
    cp = job_config.parallelism.context_parallel_degree
    if cp > 1:
        need(t.seq_len % (2 * cp) == 0,
             f"[training] seq_len {t.seq_len} must be divisible by 2 x context_parallel_degree = {2 * cp} "
             f"(context parallelism's load balancing): choose e.g. {t.seq_len - t.seq_len % (2 * cp) or 2 * cp}")
    need(finite(t.max_norm) and t.max_norm > 0,
         f"[training] max_norm must be positive, got {t.max_norm} (gradient clipping; e.g. 1.0)")
    need(s.warmup_steps >= 0, f"[lr_scheduler] warmup_steps must be >= 0, got {s.warmup_steps}")
    need(0 <= s.min_lr_factor <= 1, f"[lr_scheduler] min_lr_factor must be in [0, 1], got {s.min_lr_factor}")
    if s.decay_ratio is not None:
        need(0 <= s.decay_ratio <= 1, f"[lr_scheduler] decay_ratio must be in [0, 1] or unset, got {s.decay_ratio}")
    start = getattr(s, "start_lr_factor", None)
    if start is not None:
        need(0 <= start <= 1, f"[lr_scheduler] start_lr_factor must be in [0, 1] or unset, got {start}")
    c = job_config.checkpoint
    need(c.interval > 0, f"[checkpoint] interval must be positive, got {c.interval}")
    need(c.keep_latest_k == 0 or c.keep_latest_k >= 2,
         f"[checkpoint] keep_latest_k must be 0 (keep all) or >= 2, got {c.keep_latest_k}")
    if c.initial_load_path and not os.path.isdir(c.initial_load_path):
        need(False, f"[checkpoint] initial_load_path {c.initial_load_path}: no such folder; "
                    "give a checkpoint step-N folder or unset it")
    need(job_config.metrics.log_freq > 0, f"[metrics] log_freq must be positive, got {job_config.metrics.log_freq}")
    wait = getattr(getattr(job_config, "monitor", None), "data_wait_warn", 0.0)
    need(finite(wait) and 0 <= wait <= 1,
         f"[monitor] data_wait_warn must be a share in [0, 1], got {wait} (0.05 = warn above 5%; 0 = off)")
    v = job_config.validation
    if v.enable:
        need(v.freq > 0, f"[validation] freq must be positive, got {v.freq}")
