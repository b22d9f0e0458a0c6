"""One loader for both services' TOML files: typed sections, defaults, environment overrides, one error.

A service describes its file as a :class:`ServiceConfig` subclass whose fields are
section dataclasses (``cfg.sip.flow_idle_timeout``); each section field has a
default and a docstring, and ``config/<service>.toml`` documents the same keys
(a test per service compares the two). :func:`load` layers, lowest first:

1. the defaults of the section dataclasses;
2. the TOML file;
3. environment variables ``<PREFIX><SECTION>_<KEY>`` (``PBX_RELAY_SIP_UDP``), read as
   the key's type: secrets stay out of files this way;
4. ``overrides`` (``{"section.key": value}``, the command line's flags).

Every problem is one :class:`~pbxcore.errors.ConfigError` whose message names the
file (or the variable) and the key: an unknown key, a wrong type, a float that is
NaN or infinite, a file that is missing, a directory, unreadable or not UTF-8.

Relative paths (fields declared with :func:`path_field`) are made absolute at load
time: against the configuration file's directory when the file or the defaults set
them, against the working directory when a variable or a flag did. Without a file,
defaults are read against the source checkout (the directory holding ``dev.sh``),
so that ``pbx-relay run`` and ``pbx-relay pbx add`` find the same ``./state``
whatever directory they are started from.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import tomllib
import typing
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pbxcore.errors import ConfigError

__all__ = ["ConfigError", "Listen", "ServiceConfig", "changed_keys", "checkout_root", "load",
           "parse_listen", "path_field", "read_toml"]

DEFAULTS = "<defaults>"  # the source of a configuration read from no file
_PATH = "pbx_path"  # field metadata marking a filesystem path


def path_field(default: str) -> Any:
    """A ``str`` field holding a filesystem path, made absolute when loaded (see the module)."""
    return field(default=default, metadata={_PATH: True})


def checkout_root() -> Path | None:
    """The source checkout these modules run from (``dev.sh`` beside ``pyproject.toml``),
    or None for an installed copy."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "dev.sh").is_file() and (root / "pyproject.toml").is_file() else None


# ------------------------------------------------------------------ addresses


@dataclass(frozen=True)
class Listen:
    """An ``IP:port`` listen address (IPv6 as ``[::1]:5060``)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def client_address(self) -> str:
        """How a client on this host reaches it: a wildcard bind becomes loopback."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return str(Listen(host, self.port))


def parse_listen(value: str, where: str) -> Listen:
    """``value`` as a :class:`Listen`; ``where`` ("<file>: section.key") starts the error."""
    host, sep, port = str(value).rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        p = int(port)
        if not sep or not 0 <= p < 65536:
            raise ValueError
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not IP:port (IPv6 as [::1]:5060)") from None
    return Listen(host, p)


# ------------------------------------------------------------------ the configuration


@dataclass(kw_only=True)
class ServiceConfig:
    """Base of a service's configuration: every field typed with a section dataclass is
    a ``[section]`` of its file. Subclasses add properties and :meth:`validate`."""

    ENV_PREFIX: ClassVar[str] = ""
    """``PBX_RELAY_`` / ``PBX_PUSH_``: the prefix of the overriding variables."""
    ENV_NOT_KEYS: ClassVar[frozenset[str]] = frozenset()
    """Variables with the prefix that are no key (the config file's own variable, ...)."""

    source: str = DEFAULTS
    """The file it was read from, or ``<defaults>``."""
    from_env: dict[str, str] = field(default_factory=dict)
    """"section.key" → the variable that set it."""

    @classmethod
    def sections(cls) -> dict[str, type[Any]]:
        """Section name → its dataclass, in declaration order."""
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)
                if dataclasses.is_dataclass(hints[f.name])}

    def section(self, name: str) -> Any:
        """The section dataclass instance called ``name``."""
        return getattr(self, name)

    def where(self, dotted: str) -> str:
        """``<file>: section.key``, plus the variable when the environment set it: how
        every message about one key starts."""
        var = self.from_env.get(dotted)
        return f"{self.source}: {dotted}" + (f" (from ${var})" if var else "")

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """``{section: {key: value}}``, as the file would spell it."""
        return {name: dataclasses.asdict(self.section(name)) for name in self.sections()}

    def validate(self) -> None:
        """Checks across keys, after loading; raise :class:`ConfigError` naming the key."""


C = TypeVar("C", bound=ServiceConfig)


class SectionView(MutableMapping[str, Any]):
    """A section dataclass seen as ``{key: value}``: what ``cfg.values[section]`` used to be
    (a shim for code not yet moved to attribute access)."""

    def __init__(self, section: Any):
        self._section = section

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys():
            raise KeyError(key)
        return getattr(self._section, key)

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self._keys():
            raise KeyError(key)
        setattr(self._section, key, value)

    def __delitem__(self, key: str) -> None:
        raise TypeError("configuration keys cannot be deleted")

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def _keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self._section)]


def changed_keys(old: ServiceConfig, new: ServiceConfig) -> list[str]:
    """The ``section.key`` names whose value differs between two loads (for reloads)."""
    before, after = old.as_dict(), new.as_dict()
    return [f"{s}.{k}" for s, keys in after.items() for k, v in keys.items() if before[s][k] != v]


# ------------------------------------------------------------------ loading


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed file; any reason it cannot be read is one ConfigError naming it."""
    source = str(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{source}: is a directory; --config takes a TOML file") from None
    except PermissionError:
        raise ConfigError(f"{source}: cannot read it: permission denied") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{source}: not UTF-8 text (byte {e.start}); TOML files are UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{source}: cannot read it: {e.strerror or e}") from None


def load(
    cls: type[C], path: str | os.PathLike[str] | None, overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> C:
    """Defaults, then the file, then ``<PREFIX><SECTION>_<KEY>`` variables, then ``overrides``
    ({"section.key": value}); then ``validate()``. See the module docstring."""
    schema = {name: _keys(section) for name, section in cls.sections().items()}
    source = str(path) if path else DEFAULTS
    values = {s: {k: spec.default for k, spec in keys.items()} for s, keys in schema.items()}
    origin: dict[str, Path] = {}  # "section.key" → the directory a relative path is read against
    file_dir = Path(os.path.abspath(path)).parent if path else checkout_root() or Path.cwd()
    for s, keys in schema.items():
        origin.update({f"{s}.{k}": file_dir for k in keys})
    for section, body in (read_toml(path) if path else {}).items():
        if section not in schema:
            raise ConfigError(f"{source}: unknown section [{section}]")
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
        for key, value in body.items():
            values[section][key] = _checked(schema, section, key, value, source)
    from_env = _from_environ(cls, schema, values, origin, os.environ if environ is None else environ)
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if section not in schema:
            raise ConfigError(f"{source}: unknown section [{section}]")
        values[section][key] = _checked(schema, section, key, value, source)
        origin[dotted] = Path.cwd()
        from_env.pop(dotted, None)
    for s, keys in schema.items():
        for k, spec in keys.items():
            if spec.is_path and values[s][k]:
                values[s][k] = os.path.normpath(origin[f"{s}.{k}"] / values[s][k])
    sections = {s: section_cls(**values[s]) for s, section_cls in cls.sections().items()}
    cfg = cls(source=source, from_env=from_env, **sections)
    cfg.validate()
    return cfg


@dataclass(frozen=True)
class _Key:
    kind: Any  # str, int, float, bool or list (of str)
    default: Any
    is_path: bool


def _keys(section: type[Any]) -> dict[str, _Key]:
    hints = typing.get_type_hints(section)
    out = {}
    for f in dataclasses.fields(section):
        kind = hints[f.name]
        kind = list if typing.get_origin(kind) is list else kind
        factory: Any = f.default_factory
        default = f.default if f.default is not dataclasses.MISSING else factory()
        out[f.name] = _Key(kind, default, bool(f.metadata.get(_PATH)))
    return out


_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list of strings"}


def _checked(schema: Mapping[str, Mapping[str, _Key]], section: str, key: str, value: Any, where: str) -> Any:
    spec = schema[section].get(key)
    if spec is None:
        raise ConfigError(f"{where}: unknown key {section}.{key}")
    kind = spec.kind
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if ok and kind is list:
        ok = all(isinstance(v, str) for v in value)
    if not ok:
        shown = "" if kind is str else f", got {_short(value)}"
        raise ConfigError(f"{where}: {section}.{key} must be {_KIND_NAMES[kind]}{shown}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{where}: {section}.{key} must be a finite number, got {value}")
    return list(value) if kind is list else value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _from_environ(
    cls: type[ServiceConfig], schema: Mapping[str, Mapping[str, _Key]], values: dict[str, dict[str, Any]],
    origin: dict[str, Path], environ: Mapping[str, str],
) -> dict[str, str]:
    prefix = cls.ENV_PREFIX
    known = {f"{prefix}{s.upper()}_{k.upper()}": (s, k) for s, keys in schema.items() for k in keys}
    used: dict[str, str] = {}
    for var in sorted(environ):
        if not var.startswith(prefix) or var in cls.ENV_NOT_KEYS:
            continue
        if var not in known:
            # A misspelt secret variable would otherwise be ignored in silence.
            raise ConfigError(f"${var}: no such configuration key")
        section, key = known[var]
        value = _from_text(schema[section][key].kind, environ[var])
        values[section][key] = _checked(schema, section, key, value, f"${var}")
        used[f"{section}.{key}"] = var
        origin[f"{section}.{key}"] = Path.cwd()
    return used


def _from_text(kind: Any, text: str) -> Any:
    """A variable's text as ``kind``; what does not convert is returned as text, so that
    the type check names the key."""
    if kind is str:
        return text
    if kind is bool:
        low = text.strip().lower()
        words = {"1": True, "true": True, "yes": True, "on": True,
                 "0": False, "false": False, "no": False, "off": False}
        return words.get(low, text)
    if kind is list:
        try:
            return tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            return text
    try:
        return kind(text.strip())
    except ValueError:
        return text
