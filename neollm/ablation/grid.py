"""Variants of one base config: what each changes, as model overrides and torchtitan CLI keys.

Every variant is the base TOML plus (a) ``[model] overrides`` entries (NeoLLMModelArgs fields:
mixers through ``layer_pattern``, ``mlp_type``, technique switches...) and (b) dotted torchtitan
keys (``training.steps``, ``optimizer.lr``) passed on the command line. Nothing else differs: same
file, data, steps, batch and LR recipe, and the same ``[debug] seed`` unless seeds are repeated.

Modes: a cartesian ``--vary`` grid, a TOML list of named variants, leave-one-out (each technique
switch of the base model turned off in turn, "-<switch>") and add-one (every switch off,
"plain", then each of the base's switches turned on alone, "+<switch>"). The switches come from
neollm.model.params.technique_switches, so a technique added to NeoLLMModelArgs joins these
modes by itself.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

from neollm.errors import ConfigError
from neollm.model.args import NeoLLMModelArgs
from neollm.model.overrides import field_types, format_value, parse_overrides
from neollm.model.params import DEPENDENT_FIELDS

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

# Fields that only mean something while another field is on: turned off with it, on with it.
NEEDS: dict[str, tuple[str, ...]] = {
    "fan_on_gdn": ("fan_ratio",),
    "polynorm_exclusive": ("mlp_type",),
    "routing_directions": ("directional_routing",),
    "simplegpt_scope": ("simplegpt",),
    "momentum_first": ("momentum_gamma",),
    "polynorm_exclusive_init": ("polynorm_exclusive",),
}


@dataclass
class Variant:
    """One run of the grid: its changes relative to the base config."""

    name: str
    what: str = "base config"
    model: dict[str, object] = field(default_factory=dict)  # NeoLLMModelArgs field -> value
    cli: dict[str, str] = field(default_factory=dict)  # "section.key" -> value text
    seed: int | None = None
    group: str = ""  # the variant's name without the seed (seed repeats share it)
    reference: bool = False  # the run deltas are measured against

    def __post_init__(self) -> None:
        self.group = self.group or self.name

    @property
    def dirname(self) -> str:
        # a leading "-" would read as an option in shell commands: "-gpas" -> "minus_gpas"
        name = re.sub(r"^-", "minus_", re.sub(r"^\+", "plus_", self.name))
        return re.sub(r"[^A-Za-z0-9._+=,-]", "_", name)


def split_key(key: str) -> tuple[str, str]:
    """("model", field) for a NeoLLMModelArgs field (bare or "model.<field>"), else ("cli", key)."""
    fields = field_types(NeoLLMModelArgs)
    bare = key.removeprefix("model.")
    if bare in fields and (key == bare or not _is_titan_model_key(bare)):
        return "model", bare
    if "." not in key:
        import difflib

        close = difflib.get_close_matches(key, list(fields), n=3)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise ConfigError(f"{key!r} is neither a model field{hint} (NeoLLMModelArgs in "
                          "neollm/model/args.py) nor a dotted torchtitan key such as training.steps")
    return "cli", key


def _is_titan_model_key(name: str) -> bool:
    from torchtitan.config import JobConfig

    import neollm.config as extra

    model_keys = {f.name for cls in (JobConfig().model.__class__, extra.Model) for f in dataclasses.fields(cls)}
    return name in model_keys


def _typed(field_name: str, text: str) -> object:
    return parse_overrides([f"{field_name}={text}"], NeoLLMModelArgs)[field_name]


def parse_assignment(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"{text!r} is not KEY=VALUE (e.g. training.steps=200 or gpas=false)")
    key, value = (part.strip() for part in text.split("=", 1))
    return key, value


def apply_assignments(assignments: list[str], model: dict, cli: dict) -> None:
    """KEY=VALUE texts into the model-override dict or the CLI dict (in place)."""
    for text in assignments:
        key, value = parse_assignment(text)
        kind, name = split_key(key)
        if kind == "model":
            model[name] = _typed(name, value)
        else:
            cli[name] = value


def vary_grid(specs: list[str]) -> list[Variant]:
    """``--vary KEY=V1,V2`` (repeatable): the cartesian product, one Variant per combination (none without
    ``--vary``: the product of no axes would be one unnamed variant, the base config itself)."""
    if not specs:
        return []
    axes = []
    for spec in specs:
        key, values = parse_assignment(spec)
        options = [v.strip() for v in values.split(",") if v.strip()]
        if not options:
            raise ConfigError(f"--vary {spec!r}: give at least one value after '=' (comma-separated)")
        axes.append([(key, v) for v in options])
    variants = []
    for combo in itertools.product(*axes):
        model, cli = {}, {}
        apply_assignments([f"{k}={v}" for k, v in combo], model, cli)
        label = " ".join(f"{k}={v}" for k, v in combo)
        variants.append(Variant(name=",".join(f"{k.removeprefix('model.')}={v}" for k, v in combo),
                                what=label, model=model, cli=cli))
    return variants


def variants_from_toml(path: str | Path) -> list[Variant]:
    """A TOML of named variants::

        [variants.attention_only]
        overrides = ["layer_pattern=A"]          # model fields
        set = ["optimizer.lr=1e-3"]              # optional: dotted torchtitan keys
        description = "no Gated DeltaNet"        # optional
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--variants {path}: no such file")
    with open(path, "rb") as f:
        table = tomllib.load(f).get("variants")
    if not isinstance(table, dict) or not table:
        raise ConfigError(f"{path}: no [variants.<name>] tables (see docs/ablations.md)")
    variants = []
    for name, spec in table.items():
        unknown = set(spec) - {"overrides", "set", "description"}
        if unknown:
            raise ConfigError(f"{path}: [variants.{name}] has unknown keys {sorted(unknown)}: "
                              "use overrides, set, description")
        model, cli = {}, {}
        apply_assignments(list(spec.get("overrides", [])), model, cli)
        apply_assignments(list(spec.get("set", [])), model, cli)
        what = spec.get("description") or " ".join(
            [*spec.get("overrides", []), *spec.get("set", [])]) or "base config"
        variants.append(Variant(name=name, what=what, model=model, cli=cli))
    return variants


def _default(name: str) -> object:
    from neollm.model.args import NeoLLMModelArgs

    return getattr(NeoLLMModelArgs(), name)


def _checked(base, changes: dict[str, object], label: str) -> dict[str, object]:
    """``changes`` if base + changes is a valid model, else a ConfigError naming the variant."""
    try:
        dataclasses.replace(base, **changes)  # __post_init__ validates
    except ConfigError as error:
        raise ConfigError(f"variant {label}: {error}") from None
    return changes


def switch_off(base, name: str) -> dict[str, object]:
    """The overrides turning technique ``name`` off, with the fields that need it (NEEDS)."""
    changes = {name: _default(name)}
    for dependent, needs in NEEDS.items():
        if name in needs and getattr(base, dependent) != _default(dependent):
            changes[dependent] = _default(dependent)
    return _checked(base, changes, f"-{name}")


def all_switches_off(base) -> dict[str, object]:
    """Overrides turning every technique switch of ``base`` off (with the fields that need one)."""
    from neollm.model.params import technique_switches

    changes = {name: _default(name) for name in technique_switches(base)}
    for dependent, needs in NEEDS.items():
        if set(needs) & set(changes) and getattr(base, dependent) != _default(dependent):
            changes[dependent] = _default(dependent)
    return _checked(base, changes, "plain")


def leave_one_out(base, skipped: list[str] | None = None) -> list[Variant]:
    """One variant per technique switch of ``base`` (its model args), that switch off.

    A switch that cannot be turned off alone (a setting another switch needs, not in NEEDS) is
    left out, its reason appended to ``skipped``."""
    from neollm.model.params import technique_switches

    switches = technique_switches(base)
    if not switches:
        raise ConfigError("--leave-one-out: the base model has no technique switched on (flavor with "
                          "every switch off): choose a flavor such as neollm_135m, or use --vary")
    variants = []
    for name in switches:
        try:
            changes = switch_off(base, name)
        except ConfigError as error:
            (skipped if skipped is not None else []).append(str(error))
            continue
        variants.append(Variant(name=f"-{name}", model=changes, what=(
            f"{name} = {format_value(_default(name))} (base: {format_value(getattr(base, name))})")))
    return variants


def add_one(base, skipped: list[str] | None = None) -> list[Variant]:
    """The reference "plain" (every switch of ``base`` off) and one variant per switch on alone
    (a switch that cannot be on alone is left out, its reason appended to ``skipped``)."""
    from neollm.model.params import technique_switches

    switches = technique_switches(base)
    if not switches:
        raise ConfigError("--add-one: the base model has no technique switched on: nothing to add")
    off = all_switches_off(base)
    plain = dataclasses.replace(base, **off)
    variants = [Variant(name="plain", what="every technique switch off", model=off, reference=True)]
    for name in switches:
        on = {name: getattr(base, name)}
        for needed in NEEDS.get(name, ()):  # e.g. +polynorm_exclusive needs mlp_type = polynorm
            on[needed] = getattr(base, needed)
        for dependent in DEPENDENT_FIELDS:  # settings of this switch (not switches): base values
            if name in NEEDS.get(dependent, ()) and getattr(base, dependent) != _default(dependent):
                on[dependent] = getattr(base, dependent)
        try:
            _checked(plain, on, f"+{name}")
        except ConfigError as error:
            (skipped if skipped is not None else []).append(str(error))
            continue
        variants.append(Variant(name=f"+{name}", what=f"{name} = {format_value(getattr(base, name))} on plain",
                                model={**off, **on}))
    return variants


def with_seeds(variants: list[Variant], seeds: list[int], every_variant: bool,
               repeated: list[str] | None = None) -> list[Variant]:
    """Each variant at seeds[0]; the reference, the variants named in ``repeated`` (or, with
    every_variant, all) also at seeds[1:], so a delta near the noise threshold can be settled
    without rerunning the whole grid at every seed."""
    names = {v.name for v in variants}
    # a name may hold commas (a variant of several --vary axes): whole names first, then the parts
    repeated = {part for item in repeated or () for part in ([item] if item in names else item.split(",")) if part}
    if repeated and len(seeds) < 2:
        raise ConfigError("--seeds-for repeats variants at the other --seeds: give two or more (e.g. --seeds 0,1,2)")
    unknown = sorted(repeated - names)
    if unknown:
        raise ConfigError(f"--seeds-for names {unknown}, not variants of this grid; choose from "
                          f"{[v.name for v in variants if not v.reference]}")
    out = []
    for v in variants:
        for i, seed in enumerate(seeds):
            if i and not (v.reference or every_variant or v.name in repeated):
                continue
            name = v.name if i == 0 else f"{v.name}@seed{seed}"
            out.append(dataclasses.replace(v, name=name, seed=seed, group=v.name))
    return out


def merged_overrides(base_overrides: list[str], variant: Variant) -> list[str]:
    """The base TOML's overrides with the variant's on top (one entry per field, base order first)."""
    merged = dict(parse_overrides(base_overrides, NeoLLMModelArgs))
    merged.update(variant.model)
    return [f"{k}={format_value(v)}" for k, v in merged.items()]


def config_overrides(config: str | Path) -> list[str]:
    """``[model] overrides`` of a TOML file (empty when absent)."""
    with open(config, "rb") as f:
        return list(tomllib.load(f).get("model", {}).get("overrides", []))


def cli_args(cli: dict[str, str]) -> list[str]:
    """{"training.steps": "200", "validation.enable": "true"} -> torchtitan/tyro arguments."""
    out: list[str] = []
    for key, value in cli.items():
        if value.lower() in ("true", "false"):
            section, _, name = key.rpartition(".")
            flag = name if value.lower() == "true" else f"no-{name}"
            out.append(f"--{section}.{flag}" if section else f"--{flag}")
        else:
            out += [f"--{key}", value]
    return out


def same_as(variant: Variant, base_args, base_job) -> bool:
    """Whether a variant changes nothing relative to the base (its values equal the base's)."""
    for name, value in variant.model.items():
        if getattr(base_args, name) != value:
            return False
    for key, text in variant.cli.items():
        section, _, name = key.partition(".")
        current = getattr(getattr(base_job, section, None), name, object())
        try:  # "3e-3" equals 0.003: compare as the key's type where it has one
            same = type(current)(text) == current if isinstance(current, (int, float)) \
                and not isinstance(current, bool) else format_value(current) == text
        except ValueError:
            same = False
        if not same:
            return False
    return True


def model_args_for(job_config):
    """The model args a run of ``job_config`` builds (flavor + vocab + overrides), as the trainer does."""
    from neollm.model.args import FLAVORS

    args = copy.deepcopy(FLAVORS[job_config.model.flavor])
    args.update_from_config(job_config)
    return args


def same_network(a, b, tokens: int = 16) -> bool:
    """True when model args ``a`` and ``b`` build the same network: the same parameters and, from
    one seed, the same logits (e.g. a switch that has no effect while another is on). Such a
    variant is a free noise control, not an ablation. Parameters are compared on the meta device
    first; only then are both models built on the CPU."""
    import torch

    from neollm.model.model import NeoLLM

    def shapes(args) -> dict:
        with torch.device("meta"):
            return {k: tuple(v.shape) for k, v in NeoLLM(args).state_dict().items()}

    if shapes(a) != shapes(b):
        return False
    logits = []
    for args in (a, b):
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(0)
            model = NeoLLM(args)
            model.init_weights()
            model.eval()
            ids = (torch.arange(min(tokens, args.max_seq_len)) * 7919 % args.vocab_size)[None]
            with torch.no_grad():
                logits.append(model(ids))
        finally:
            torch.random.set_rng_state(state)
    return torch.equal(logits[0], logits[1])
