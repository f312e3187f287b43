"""wandb sweep files, read and expanded into runs for the local runner.

A sweep file is a wandb sweep configuration (https://docs.wandb.ai/guides/sweeps/define-sweep-configuration)
so that the same file serves ``landmarks sweep`` offline and ``wandb sweep`` + ``wandb agent``
online. What the local runner understands:

* ``method``: ``grid`` (the Cartesian product of every parameter's ``values``, in file order,
  the last parameter varying fastest) or ``random`` (``count`` draws from a seeded generator, so
  the same file and seed give the same runs). ``bayes`` needs the wandb server.
* ``parameters``: ``{value: x}``, ``{values: [...]}`` (optionally ``probabilities``), or a
  distribution (``distribution: uniform | int_uniform | q_uniform | log_uniform |
  log_uniform_values | q_log_uniform_values | normal | q_normal | log_normal`` with
  ``min``/``max``/``q``/``mu``/``sigma`` as in wandb; ``min``/``max`` alone infer
  ``int_uniform`` or ``uniform`` as wandb does). Keys are command-line option names, for
  LightningCLI its dotted keys (``model.loss.class_path``, ``seed_everything``); a key
  ``config.<slot>`` selects configuration files (see :mod:`cli.lightning_cli`).
* ``program`` and ``command`` (default ``[${env}, ${interpreter}, ${program}, ${args}]``, as in
  wandb). Whole-element macros are replaced as the wandb agent does: ``${env}`` → ``/usr/bin/env``,
  ``${interpreter}`` → this Python (the agent: ``python``), ``${program}``, ``${args}`` →
  ``--key=value`` per parameter, ``${args_no_hyphens}`` → ``key=value``, ``${args_no_equals}``,
  ``${args_no_boolean_flags}``, ``${args_json}``, ``${args_json_file}``,
  ``${args_append_hydra}``, ``${args_override_hydra}``. Values are printed with Python's
  ``str`` like the agent does. An element that merely contains ``${...}`` (an OmegaConf
  interpolation such as ``--data.seed=${seed_everything}``) is passed on unchanged, as by the agent.
  The command must use one of the ``${args...}`` macros: they are the only way the local runner
  passes the parameters.
* ``count`` (local; the agent's ``--count``) or ``run_cap`` (wandb's cap on a sweep's runs):
  how many runs ``random`` draws, or a cap on a grid.
* ``name``, ``description``, ``metric``, ``project``, ``entity`` are accepted (for wandb) and
  otherwise unused; ``early_terminate`` is unsupported locally.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from core.errors import UserError

__all__ = ["Parameter", "RunSpec", "SweepError", "SweepSpec", "is_seed_key", "load_sweep", "parse_sweep"]

WANDB_DEFAULT_COMMAND = ("${env}", "${interpreter}", "${program}", "${args}")
TOP_LEVEL_KEYS = {
    "program", "command", "method", "parameters", "count", "run_cap",
    "name", "description", "metric", "project", "entity", "early_terminate", "controller", "settings", "job", "image",
}
ARGS_MACROS = (
    "args", "args_no_hyphens", "args_no_equals", "args_no_boolean_flags", "args_json", "args_json_file",
    "args_append_hydra", "args_override_hydra",
)
MACROS = ("env", "interpreter", "program", *ARGS_MACROS)
# distribution -> (required keys, optional keys)
DISTRIBUTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "constant": (("value",), ()),
    "categorical": (("values",), ("probabilities",)),
    "int_uniform": (("min", "max"), ()),
    "uniform": (("min", "max"), ()),
    "q_uniform": (("min", "max"), ("q",)),
    "log_uniform": (("min", "max"), ()),
    "log_uniform_values": (("min", "max"), ()),
    "q_log_uniform_values": (("min", "max"), ("q",)),
    "normal": ((), ("mu", "sigma")),
    "q_normal": ((), ("mu", "sigma", "q")),
    "log_normal": ((), ("mu", "sigma")),
}
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.@:-]*$")


class SweepError(UserError):
    """A sweep file that cannot be run; the message names the file and the key."""


def is_seed_key(name: str) -> bool:
    """Parameters that only replicate a configuration: ``seed_everything`` or any ``*.seed``."""
    last = name.rsplit(".", 1)[-1]
    return last in ("seed", "seed_everything")


def _plain(value: Any, where: str) -> Any:
    """The value as JSON-able Python data (what the agent would receive), or a SweepError."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        raise SweepError(f"{where}: value {value!r} is not plain data (numbers, strings, booleans, null, lists)") from None


@dataclass(frozen=True)
class Parameter:
    """One swept parameter: a constant, a list of values, or a distribution."""

    name: str
    distribution: str
    value: Any = None
    values: tuple = ()
    probabilities: tuple[float, ...] | None = None
    min: float | None = None
    max: float | None = None
    q: float | None = None
    mu: float = 0.0
    sigma: float = 1.0

    @property
    def discrete(self) -> bool:
        return self.distribution in ("constant", "categorical")

    def grid_values(self) -> list:
        if self.distribution == "constant":
            return [self.value]
        if self.distribution == "categorical":
            return list(self.values)
        raise AssertionError("grid needs discrete parameters")  # checked when parsing

    def sample(self, rng: np.random.Generator) -> Any:
        d = self.distribution
        if d == "constant":
            return copy.deepcopy(self.value)
        if d == "categorical":
            i = int(rng.choice(len(self.values), p=self.probabilities))
            return copy.deepcopy(self.values[i])
        if d == "int_uniform":
            return int(rng.integers(int(self.min), int(self.max), endpoint=True))
        if d in ("uniform", "q_uniform"):
            x = float(rng.uniform(self.min, self.max))
        elif d == "log_uniform":  # wandb: min/max are natural-log exponents
            x = math.exp(rng.uniform(self.min, self.max))
        elif d in ("log_uniform_values", "q_log_uniform_values"):
            x = math.exp(rng.uniform(math.log(self.min), math.log(self.max)))
        elif d in ("normal", "q_normal"):
            x = float(rng.normal(self.mu, self.sigma))
        elif d == "log_normal":
            x = math.exp(rng.normal(self.mu, self.sigma))
        else:  # pragma: no cover - parse_parameter rejects the rest
            raise AssertionError(d)
        if d.startswith("q_"):
            q = self.q if self.q is not None else 1.0
            x = round(x / q) * q
            if float(q).is_integer():
                x = int(x)
        return x


def parse_parameter(name: Any, spec: Any, where: str) -> Parameter:
    """One entry of ``parameters:``; ``where`` is ``FILE: parameters.NAME`` for messages."""
    if not isinstance(name, str) or not _KEY.match(name):
        raise SweepError(f"{where}: parameter name {name!r} must be an option name such as model.loss.class_path "
                         "(letters, digits, _ . @ : -)")
    if not isinstance(spec, dict):
        raise SweepError(f"{where}: expected a mapping such as {{values: [...]}} or {{value: x}}, got {spec!r}")
    if "parameters" in spec:
        raise SweepError(f"{where}: nested parameters are not supported; use dotted keys (e.g. {name}.sub_key)")
    distribution = spec.get("distribution")
    if distribution is None:
        if "value" in spec:
            distribution = "constant"
        elif "values" in spec:
            distribution = "categorical"
        elif "min" in spec and "max" in spec:
            both_int = all(isinstance(spec[k], int) and not isinstance(spec[k], bool) for k in ("min", "max"))
            distribution = "int_uniform" if both_int else "uniform"
        else:
            raise SweepError(f"{where}: needs 'value', 'values', 'min'+'max' or a 'distribution' (keys given: "
                             f"{sorted(spec) or 'none'})")
    if distribution not in DISTRIBUTIONS:
        raise SweepError(f"{where}: distribution {distribution!r} is not supported locally; use one of "
                         f"{', '.join(DISTRIBUTIONS)}")
    required, optional = DISTRIBUTIONS[distribution]
    missing = [k for k in required if k not in spec]
    if missing:
        raise SweepError(f"{where}: distribution {distribution} needs {', '.join(missing)}")
    unknown = sorted(set(spec) - set(required) - set(optional) - {"distribution"})
    if unknown:
        raise SweepError(f"{where}: unknown or unused key(s) {', '.join(unknown)} for distribution {distribution}")

    kwargs: dict[str, Any] = {}
    if distribution == "constant":
        kwargs["value"] = _plain(spec["value"], where)
    elif distribution == "categorical":
        values = spec["values"]
        if not isinstance(values, list) or not values:
            raise SweepError(f"{where}: 'values' must be a non-empty list, got {values!r}")
        kwargs["values"] = tuple(_plain(v, where) for v in values)
        if "probabilities" in spec:
            p = spec["probabilities"]
            if (not isinstance(p, list) or len(p) != len(values)
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in p)
                    or not math.isclose(sum(p), 1.0, abs_tol=1e-6)):
                raise SweepError(f"{where}: 'probabilities' must be {len(values)} non-negative numbers summing to 1, got {p!r}")
            kwargs["probabilities"] = tuple(float(x) / sum(p) for x in p)
    else:
        for key in (*required, *optional):
            if key in spec:
                v = spec[key]
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                    raise SweepError(f"{where}: '{key}' must be a finite number, got {v!r}")
                kwargs[key] = v
        if "min" in kwargs and kwargs["min"] > kwargs["max"]:
            raise SweepError(f"{where}: min {kwargs['min']} > max {kwargs['max']}")
        if distribution == "int_uniform" and not all(float(kwargs[k]).is_integer() for k in ("min", "max")):
            raise SweepError(f"{where}: int_uniform needs integer min and max")
        if distribution in ("log_uniform_values", "q_log_uniform_values") and kwargs["min"] <= 0:
            raise SweepError(f"{where}: {distribution} needs min > 0")
        if kwargs.get("q") is not None and kwargs["q"] <= 0:
            raise SweepError(f"{where}: q must be > 0")
        if kwargs.get("sigma") is not None and kwargs["sigma"] < 0:
            raise SweepError(f"{where}: sigma must be >= 0")
    return Parameter(name=name, distribution=distribution, **kwargs)


_FILE_SUFFIXES = (".yaml", ".yml", ".json", ".csv", ".tsv", ".parquet", ".txt", ".npy", ".ckpt", ".pt", ".pth")


def _short(value: Any) -> str:
    """A short readable form of a value for folder names and labels (paths → file stems)."""
    if isinstance(value, list):
        return "+".join(_short(v) for v in value) or "none"
    if value is None:
        return "none"
    if isinstance(value, str):
        if value.endswith(_FILE_SUFFIXES):  # a config or data file: its name says what it is
            return Path(value).stem
        if "." in value and "/" not in value and " " not in value and not _is_number(value):
            return value.rsplit(".", 1)[-1]  # a class path
        return value
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def short_key(name: str) -> str:
    return name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: its parameters (in file order) and its folder name."""

    index: int
    parameters: dict[str, Any]
    name: str


@dataclass
class SweepSpec:
    """A parsed sweep file."""

    path: Path
    method: str
    parameters: dict[str, Parameter]
    command: tuple[str, ...]
    program: str | None = None
    count: int | None = None
    name: str | None = None
    raw: dict = field(default_factory=dict)

    @property
    def varying(self) -> list[str]:
        """Parameters that take more than one value (these name the runs)."""
        return [n for n, p in self.parameters.items()
                if not (p.distribution == "constant" or (p.distribution == "categorical" and len(set(map(json.dumps, p.values))) == 1))]

    def expand(self, sample_seed: int = 0, count: int | None = None) -> list[RunSpec]:
        """The runs: the grid (capped by ``count``) or ``count`` seeded random draws."""
        count = count if count is not None else self.count
        if count is not None and count < 1:
            raise SweepError(f"{self.path}: count must be >= 1, got {count}")
        if self.method == "grid":
            grids = [p.grid_values() for p in self.parameters.values()]
            combos = itertools.product(*grids) if grids else iter([()])
            if count is not None:
                combos = itertools.islice(combos, count)
            param_sets = [dict(zip(self.parameters, combo)) for combo in combos]
        else:
            if count is None:
                raise SweepError(f"{self.path}: method random needs a run count: 'count: N' in the file or --count N")
            rng = np.random.default_rng(sample_seed)
            param_sets = [{n: p.sample(rng) for n, p in self.parameters.items()} for _ in range(count)]
        runs, seen = [], {}
        for i, params in enumerate(param_sets):
            name = self._run_name(params)
            seen[name] = seen.get(name, 0) + 1
            if seen[name] > 1:  # a random search may draw the same point twice: keep both runs
                name = f"{name}-r{seen[name]}"
            runs.append(RunSpec(index=i, parameters=copy.deepcopy(params), name=name))
        return runs

    def _run_name(self, params: dict[str, Any]) -> str:
        # The hash covers the command too: the same parameters under another command are another run.
        identity = json.dumps({"parameters": params, "command": list(self.command), "program": self.program},
                              sort_keys=True)
        digest = hashlib.sha1(identity.encode()).hexdigest()[:8]
        parts = [f"{short_key(k)}={_short(params[k])}" for k in self.varying]
        slug = re.sub(r"[^A-Za-z0-9_.=+-]+", "_", "-".join(parts))[:100].strip("-_")
        return f"{slug}-{digest}" if slug else digest

    def command_for(self, run: RunSpec, args_json_file: str | None = None) -> list[str]:
        """The run's command line, with the wandb agent's macros replaced."""
        values = _macro_values(run.parameters)
        values["env"] = ["/usr/bin/env"] if sys.platform != "win32" else []
        values["interpreter"] = [sys.executable]
        values["program"] = [self.program] if self.program else None
        values["args_json_file"] = [args_json_file or "<run folder>/args.json"]
        out: list[str] = []
        for element in self.command:
            if element.startswith("${") and element.endswith("}"):
                replacement = values[element[2:-1]]
                if replacement is None:
                    raise SweepError(f"{self.path}: command uses ${{program}} but the file has no 'program'")
                out += replacement
            else:
                out.append(element)
        return out

    def uses_macro(self, macro: str) -> bool:
        return "${" + macro + "}" in self.command

    def runs_landmarks(self) -> bool:
        """Whether the command starts ``landmarks`` (by name, or ``python -m cli.main``): only then
        do its parameters mean LightningCLI keys and ``config.<slot>`` configuration files."""
        head = []
        for element in self.command:  # the program part: what comes before the first option or ${args}
            if element.startswith("--") or (element.startswith("${") and element[2:-1] in ARGS_MACROS):
                break
            head.append(self.program if element == "${program}" and self.program else element)
        return (any(Path(e).name == "landmarks" for e in head)
                or any(a == "-m" and b == "cli.main" for a, b in zip(head, head[1:])))


def _macro_values(params: dict[str, Any]) -> dict[str, list[str]]:
    """The agent's argument formats (wandb.sdk.launch.sweeps.utils.create_sweep_command_args)."""
    flags = [f"--{k}={v}" for k, v in params.items()]
    no_bool = [(f"--{k}" if v else None) if isinstance(v, bool) else f"--{k}={v}" for k, v in params.items()]
    return {
        "args": flags,
        "args_no_hyphens": [f"{k}={v}" for k, v in params.items()],
        "args_no_equals": [x for k, v in params.items() for x in (f"--{k}", str(v))],
        "args_no_boolean_flags": [x for x in no_bool if x is not None],
        "args_json": [json.dumps(params)],
        "args_append_hydra": [f"+{k}={v}" for k, v in params.items()],
        "args_override_hydra": [f"++{k}={v}" for k, v in params.items()],
    }


def parse_sweep(raw: Any, path: str | Path = "<sweep>") -> SweepSpec:
    """A sweep configuration (the YAML's content) → :class:`SweepSpec`, or a clear SweepError."""
    path = Path(path)
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: a sweep file is a YAML mapping with 'method' and 'parameters', got {type(raw).__name__}")
    unknown = sorted(set(raw) - TOP_LEVEL_KEYS)
    if unknown:
        raise SweepError(f"{path}: unknown top-level key(s) {', '.join(map(str, unknown))}; known: "
                         f"{', '.join(sorted(TOP_LEVEL_KEYS))}")
    method = raw.get("method")
    if method not in ("grid", "random"):
        hint = " (bayes needs the wandb server: `wandb sweep` + `wandb agent`)" if method == "bayes" else ""
        raise SweepError(f"{path}: method must be grid or random, got {method!r}{hint}")
    if "early_terminate" in raw:
        raise SweepError(f"{path}: early_terminate needs the wandb server; the local runner runs every run to the end")
    params_raw = raw.get("parameters")
    if not isinstance(params_raw, dict) or not params_raw:
        raise SweepError(f"{path}: 'parameters' must be a non-empty mapping of option name → {{values: [...]}}")
    parameters = {name: parse_parameter(name, spec, f"{path}: parameters.{name}") for name, spec in params_raw.items()}
    if method == "grid":
        continuous = [n for n, p in parameters.items() if not p.discrete]
        if continuous:
            raise SweepError(f"{path}: grid search needs 'values' or 'value' for every parameter; "
                             f"{', '.join(f'parameters.{n} ({parameters[n].distribution})' for n in continuous)} "
                             "is a distribution (use method: random)")
        for name, parameter in parameters.items():
            # A grid runs each value once; a repeated one would run the same configuration twice
            # (under a second name). In a random search a repeat weights the draw, which is allowed.
            seen: set[str] = set()
            for value in parameter.grid_values():
                key = json.dumps(value, sort_keys=True)
                if key in seen:
                    raise SweepError(f"{path}: parameters.{name}: the value {value!r} is listed twice; a grid runs "
                                     "each value once")
                seen.add(key)
    command = raw.get("command", list(WANDB_DEFAULT_COMMAND))
    if not isinstance(command, list) or not command or not all(isinstance(c, (str, int, float)) for c in command):
        raise SweepError(f"{path}: 'command' must be a non-empty list of strings, got {command!r}")
    command = tuple(str(c) for c in command)
    for element in command:
        if element.startswith("${") and element.endswith("}") and element[2:-1] not in MACROS:
            raise SweepError(f"{path}: command: unknown macro {element}; known: "
                             f"{', '.join('${' + m + '}' for m in MACROS)}")
    program = raw.get("program")
    if program is not None and not isinstance(program, str):
        raise SweepError(f"{path}: 'program' must be a path, got {program!r}")
    if "${program}" in command and not program:
        raise SweepError(f"{path}: command uses ${{program}} (the wandb default command does) but 'program' is missing")
    count = raw.get("count")
    run_cap = raw.get("run_cap")
    for key, value in (("count", count), ("run_cap", run_cap)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise SweepError(f"{path}: '{key}' must be a positive integer, got {value!r}")
    if count is not None and run_cap is not None and count != run_cap:
        raise SweepError(f"{path}: count ({count}) and run_cap ({run_cap}) disagree; give one")
    if not any(f"${{{m}}}" in command for m in ARGS_MACROS):
        # The local runner hands parameters to a run only through these macros (it has no wandb
        # server for wandb.config), so without one every run would be the same command under
        # different labels, and compare would report them as different configurations.
        raise SweepError(f"{path}: command passes no parameters: it uses none of "
                         f"{', '.join('${' + m + '}' for m in ARGS_MACROS)} (wandb's default command ends with "
                         "${args}), so every run would run the same command")
    return SweepSpec(path=path, method=method, parameters=parameters, command=command, program=program,
                     count=count if count is not None else run_cap, name=raw.get("name"), raw=raw)


def load_sweep(path: str | Path) -> SweepSpec:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise SweepError(f"{path}: cannot read the sweep file: {err.strerror or err}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SweepError(f"{path}: not valid YAML: {err}") from None
    return parse_sweep(raw, path)
