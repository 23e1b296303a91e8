"""Layer plans: which attention kind (and options) each decoder layer gets.

A plan is a list of rules (a layer range and a kind) plus a default kind for unlisted layers
(softmax: keep the original attention). It is resolved against a model's layer count, which
checks indices, kinds and options; the resolved per-layer list is what a converted model's
config stores. String form: ``"0-1:softmax,2-27:lolcats(window=64),28-:softmax"``; ``"*:kind"``
sets the default; a step after a range takes every n-th layer of it (``"0-/2:mamba2"``: 0, 2, 4, ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import PlanError

SOFTMAX = "softmax"


@dataclass(frozen=True)
class LayerSpec:
    """One layer's kind and its options."""

    kind: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def to_string(self) -> str:
        if not self.options:
            return self.kind
        return f"{self.kind}({', '.join(f'{k}={_fmt(v)}' for k, v in sorted(self.options.items()))})"

    def __post_init__(self) -> None:  # lists (YAML, JSON) become tuples: specs are hashed
        object.__setattr__(self, "options", {k: tuple(v) if isinstance(v, list) else v for k, v in dict(self.options).items()})

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **{k: list(v) if isinstance(v, tuple) else v for k, v in self.options.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LayerSpec":
        d = dict(d)
        if "kind" not in d:
            raise PlanError(f"layer spec {d!r} has no 'kind' key")
        return cls(d.pop("kind"), d)

    def __hash__(self) -> int:
        return hash((self.kind, tuple(sorted(self.options.items()))))


@dataclass(frozen=True)
class Rule:
    """Layers start, start+step, ... up to stop (inclusive; None: the last layer) get `spec`."""

    start: int
    stop: int | None
    spec: LayerSpec
    step: int = 1

    def label(self) -> str:
        if self.stop == self.start:
            return str(self.start)
        base = f"{self.start}-{'' if self.stop is None else self.stop}"
        return base if self.step == 1 else f"{base} step {self.step}"


def _fmt(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    return str(v).lower() if isinstance(v, bool) else str(v)


def _parse_value(text: str) -> Any:
    t = text.strip()
    if t.startswith("[") and t.endswith("]"):  # a list: softmax_heads=[0,2]
        return tuple(_parse_value(x) for x in t[1:-1].split(",") if x.strip())
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    for cast in (int, float):
        try:
            return cast(t)
        except ValueError:
            pass
    return t.strip("'\"")


_ENTRY = re.compile(r"^\s*(?P<sel>\*|\d+(?:\s*-\s*\d*)?(?:\s*/\s*\d+)?)\s*:\s*(?P<kind>[A-Za-z_][\w]*)\s*(?:\((?P<opts>[^()]*)\))?\s*$")


def parse_spec(text: str) -> LayerSpec:
    """Parse ``kind`` or ``kind(key=value, ...)``."""
    m = re.match(r"^\s*(?P<kind>[A-Za-z_]\w*)\s*(?:\((?P<opts>[^()]*)\))?\s*$", text)
    if not m:
        raise PlanError(f"cannot parse layer kind {text!r}: expected 'kind' or 'kind(key=value, ...)'")
    return LayerSpec(m["kind"], _parse_options(m["opts"], text))


def _parse_options(opts: str | None, context: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in split_top_level(opts or ""):
        if "=" not in item:
            raise PlanError(f"option {item.strip()!r} in {context!r} is not of the form key=value")
        key, value = item.split("=", 1)
        options[key.strip()] = _parse_value(value)
    return options


def split_top_level(text: str) -> list[str]:
    """`text` split at the commas outside () and []."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "(["
        depth -= ch in ")]"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p for p in parts if p.strip()]


def read_plan_file(path: str | Path) -> str | dict:
    """The ``plan`` value of a YAML file (a plan file `linearize plan --out` writes, or a recipe)."""
    from .recipes import read_yaml

    p = Path(path)
    if not p.is_file():
        raise PlanError(f"plan file {str(p)!r} does not exist")
    data = read_yaml(p, "plan file", PlanError)
    if "plan" not in data:
        raise PlanError(f"{str(p)!r} has no 'plan' key")
    return data["plan"]


class LayerPlan:
    """Per-layer attention kinds for a model; build with `from_string`, `from_dict` or the helpers."""

    def __init__(self, rules: Iterable[Rule] = (), default: LayerSpec | str = SOFTMAX):
        self.rules = tuple(rules)
        self.default = parse_spec(default) if isinstance(default, str) else default

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_string(cls, text: str) -> "LayerPlan":
        """Parse ``"0-1:softmax,2-27:lolcats(window=64),28-:softmax"`` (open ranges, ``*`` default)."""
        if not isinstance(text, str) or not text.strip():
            raise PlanError("empty layer plan: give entries like '2-27:lolcats' or '*:hedgehog'")
        rules, default, defaults = [], LayerSpec(SOFTMAX), 0
        for entry in split_top_level(text):
            m = _ENTRY.match(entry)
            if not m:
                raise PlanError(
                    f"cannot parse plan entry {entry.strip()!r}: expected LAYERS:KIND[(key=value,...)] "
                    "with LAYERS like 5, 2-27, 28-, 0-/2 (every other layer) or *"
                )
            spec = LayerSpec(m["kind"], _parse_options(m["opts"], entry.strip()))
            sel = m["sel"].replace(" ", "")
            sel, _, step = sel.partition("/")
            if step and (int(step) < 1 or "-" not in sel):
                raise PlanError(f"layer selector {m['sel']!r}: a step follows a range (e.g. 0-/2: every other layer) and is >= 1")
            if sel == "*":
                defaults += 1
                if defaults > 1:
                    raise PlanError(f"the default '*' is given twice (the second: {entry.strip()!r}): give it once")
                default = spec
            elif "-" in sel:
                a, b = sel.split("-")
                start, stop = int(a), (int(b) if b else None)
                if stop is not None and stop < start:
                    raise PlanError(f"layer range {sel!r} is empty: write it low-high, e.g. {stop}-{start}")
                rules.append(Rule(start, stop, spec, step=int(step or 1)))
            else:
                rules.append(Rule(int(sel), int(sel), spec))
        return cls(rules, default)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LayerPlan":
        """From ``{"default": "lolcats", "layers": {"0-1": "softmax", "28-": {"kind": "softmax"}}}``,
        or a flat mapping of layer selectors (``"*"`` for the default) to kinds."""
        d = dict(d)
        default = d.pop("default", None)
        layers = d.pop("layers", None)
        if layers is None:
            layers, d = d, {}
        if d:
            raise PlanError(f"unknown plan keys {sorted(d)}: use 'default' and 'layers'")
        entries = []
        if default is not None:
            entries.append(("*", default))
        entries += list(dict(layers).items())
        parts = []
        for sel, spec in entries:
            spec = LayerSpec.from_dict(spec) if isinstance(spec, Mapping) else parse_spec(str(spec))
            parts.append(f"{sel}:{spec.to_string()}")
        return cls.from_string(",".join(parts))

    @classmethod
    def from_file(cls, path: str | Path) -> "LayerPlan":
        """Read the ``plan`` key (a string or a mapping) of a YAML recipe."""
        return cls.coerce(read_plan_file(path))

    @classmethod
    def coerce(cls, plan: "LayerPlan | str | Mapping[str, Any]") -> "LayerPlan":
        """Accept a LayerPlan, its string form or its dict form."""
        if isinstance(plan, LayerPlan):
            return plan
        if isinstance(plan, str):
            return cls.from_string(plan)
        if isinstance(plan, Mapping):
            return cls.from_dict(plan)
        raise PlanError(f"a plan must be a LayerPlan, a string or a dict, not {type(plan).__name__}")

    # -- resolution ---------------------------------------------------------------------------
    def check_kinds(self) -> "LayerPlan":
        """Check every kind and option now, before a model is at hand (indices need `resolve`)."""
        from .kinds import validate_spec

        for spec in (self.default, *(r.spec for r in self.rules)):
            validate_spec(spec)
        return self

    def resolve(self, num_layers: int) -> list[LayerSpec]:
        """The spec of every layer of a `num_layers` model; checks indices, kinds and options."""
        from .kinds import validate_spec

        owner: dict[int, Rule] = {}
        for rule in self.rules:
            last = num_layers - 1
            stop = last if rule.stop is None else rule.stop
            if rule.step > 1 and rule.stop is None and rule.start > last:
                continue  # a repeating pattern that starts past a short model's last layer
            for i in (rule.start, stop):
                if not 0 <= i <= last:
                    raise PlanError(
                        f"layer {i} (in '{rule.label()}') is out of range: this model has {num_layers} "
                        f"layers, indices 0-{last}"
                    )
            for i in range(rule.start, stop + 1, rule.step):
                if i in owner:
                    raise PlanError(f"layer {i} is assigned twice, by '{owner[i].label()}' and '{rule.label()}'")
                owner[i] = rule
        specs = [owner[i].spec if i in owner else self.default for i in range(num_layers)]
        return [validate_spec(s) for s in specs]

    def to_string(self, num_layers: int) -> str:
        """Canonical string of the resolved plan: consecutive equal layers merged into ranges."""
        return specs_to_string(self.resolve(num_layers))

    def to_dict(self, num_layers: int) -> dict[str, Any]:
        """Dict form of the resolved plan (``from_dict`` reads it back)."""
        out: dict[str, Any] = {}
        for (a, b), spec in _runs(self.resolve(num_layers)):
            out[str(a) if a == b else f"{a}-{b}"] = spec.to_dict() if spec.options else spec.kind
        return {"layers": out}

    def __repr__(self) -> str:
        parts = [f"{r.label()}:{r.spec.to_string()}" for r in self.rules]
        return f"LayerPlan({', '.join(parts)}; default {self.default.to_string()})"


def _runs(specs: list[LayerSpec]) -> list[tuple[tuple[int, int], LayerSpec]]:
    runs: list[tuple[tuple[int, int], LayerSpec]] = []
    for i, s in enumerate(specs):
        if runs and runs[-1][1] == s and runs[-1][0][1] == i - 1:
            runs[-1] = ((runs[-1][0][0], i), s)
        else:
            runs.append(((i, i), s))
    return runs


def specs_to_string(specs: list[LayerSpec]) -> str:
    """``"0-1:softmax,2-27:lolcats(window=64),28-29:softmax"`` for a resolved list of specs."""
    return ",".join(f"{a if a == b else f'{a}-{b}'}:{s.to_string()}" for (a, b), s in _runs(specs))


def every(n: int, kind: str, *, start: int = 0, **options: Any) -> LayerPlan:
    """Layers start, start+n, start+2n, ... become `kind`; the others keep softmax."""
    if n < 1:
        raise PlanError(f"every(n={n}): n must be >= 1")
    return LayerPlan([Rule(start, None, LayerSpec(kind, options), step=n)])


def keep_softmax(layers: Iterable[int], kind: str = "lolcats", **options: Any) -> LayerPlan:
    """Every layer becomes `kind` except the listed ones, which keep softmax attention."""
    return LayerPlan([Rule(i, i, LayerSpec(SOFTMAX)) for i in layers], default=LayerSpec(kind, options))


def ratio(linear_to_full: int = 3, kind: str = "lolcats", **options: Any) -> LayerPlan:
    """Repeating groups of `linear_to_full` converted layers followed by one softmax layer."""
    if linear_to_full < 1:
        raise PlanError(f"ratio(linear_to_full={linear_to_full}): must be >= 1")
    step = linear_to_full + 1
    return LayerPlan([Rule(linear_to_full, None, LayerSpec(SOFTMAX), step=step)], default=LayerSpec(kind, options))
