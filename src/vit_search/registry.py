"""The block registry: every ViT building block, registered by kind and name.

Built-in blocks live in :mod:`vit_search.blocks`; plugins add more, three ways:

* a module name or a ``.py`` file listed under ``plugins:`` in a spec (:meth:`Registry.load_plugin`);
* an installed distribution declaring the entry-point group ``vit_search.plugins``, imported on
  first use of the registry (set ``VIT_SEARCH_DISABLE_PLUGIN_AUTOLOAD=1`` to turn that off);
* a direct call to :func:`register` in the user's own code.

Nothing here imports torch: the registry is read by the command line before any model exists.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple

from .errors import UserError



@dataclass(frozen=True)
class Kind:
    """A kind of block: what the model passes to each block of it, the type a spec gets when it names
    none, and the block's job in the model."""

    name: str
    convention: tuple[str, ...]  # arguments the model passes; everything else is the block's own (YAML keys)
    default: str
    role: str


KINDS: dict[str, Kind] = {kind.name: kind for kind in (
    Kind("patch_embed", ("in_channels", "dim", "image_size"), "conv", "images (B, C, H, W) -> tokens (B, N, D)"),
    Kind("position", ("dim", "num_patches", "grid", "num_prefix_tokens"), "learned", "tokens -> tokens"),
    Kind("attention", ("dim",), "sdpa", "tokens -> tokens"),
    Kind("ffn", ("dim",), "mlp", "tokens -> tokens"),
    Kind("pooling", ("dim",), "cls", "may prepend tokens before the encoder; tokens (B, N, D) -> (B, D) after it"),
    Kind("head", ("dim", "num_classes"), "linear", "(B, D) -> logits"),
)}
"""Every block kind: the one table the spec schema, the model, the CLI and the docs read."""

CONVENTION_ARGS: dict[str, tuple[str, ...]] = {name: kind.convention for name, kind in KINDS.items()}

ENTRY_POINT_GROUP = "vit_search.plugins"
AUTOLOAD_ENV = "VIT_SEARCH_DISABLE_PLUGIN_AUTOLOAD"
BUILTIN_MODULE = "vit_search.blocks"
PLUGIN_FILE_PREFIX = "vit_search_plugin_"  # the module name a spec's .py plugin is imported under


_NAME = re.compile(r"[\w-]+")


class RegistryError(UserError):
    """A registry lookup, registration or plugin failed; ``path`` names the spec field if known."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.message = message
        self.path = path


class PluginError(RegistryError):
    """A plugin could not be found or imported."""


def did_you_mean(word: str, candidates: Iterator[str] | list[str]) -> str:
    """Return "; did you mean 'x'?" for the closest candidate, or "" when none is close."""
    close = difflib.get_close_matches(str(word), list(candidates), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


@dataclass(frozen=True)
class BlockArg:
    """One of a block's own keyword arguments, as read from its signature."""

    name: str
    annotation: Any
    default: Any

    @property
    def required(self) -> bool:
        """True when the signature gives no default."""
        return self.default is inspect.Parameter.empty

    @property
    def type_name(self) -> str:
        """The annotation as a reader would write it."""
        if self.annotation is inspect.Parameter.empty:
            return "any"
        if isinstance(self.annotation, type):
            return self.annotation.__name__
        return str(self.annotation).replace("typing.", "")


@dataclass(frozen=True)
class BlockInfo:
    """Everything the registry knows of one block: what builds it, its arguments, its origin."""

    kind: str
    name: str
    builder: Callable[..., Any]
    distribution: str | None

    @property
    def summary(self) -> str:
        """The first line of the builder's own docstring (not one it inherits: nn.Module's says nothing of it)."""
        doc = inspect.cleandoc(self.builder.__doc__ or "")
        return doc.strip().splitlines()[0] if doc.strip() else ""

    @property
    def module(self) -> str:
        """The module the builder is defined in."""
        return getattr(self.builder, "__module__", "?")

    @property
    def origin(self) -> str:
        """Where the block comes from, for a message: a spec's ``.py`` plugin is imported under a module
        name of ours (``vit_search_plugin_...``) that says nothing to its author, so its file; else the module."""
        module = sys.modules.get(self.module)
        if self.module.startswith(PLUGIN_FILE_PREFIX) and getattr(module, "__file__", None):
            return module.__file__
        return self.module

    @property
    def source_file(self) -> str | None:
        """The file the builder is defined in, for a block not of ours (None for a built-in, or when unknown)."""
        if self.module.startswith("vit_search."):
            return None
        try:
            return inspect.getsourcefile(self.builder)
        except TypeError:  # a callable instance, a builtin: no file to name
            return None

    @property
    def accepts_any(self) -> bool:
        """True when the builder takes ``**kwargs`` (unknown arguments are then passed through)."""
        return any(p.kind is p.VAR_KEYWORD for p in _signature(self.builder).parameters.values())

    @property
    def args(self) -> tuple[BlockArg, ...]:
        """The block's own keyword arguments (its YAML keys), in signature order."""
        convention = CONVENTION_ARGS[self.kind]
        return tuple(
            BlockArg(p.name, p.annotation, p.default)
            for p in _signature(self.builder).parameters.values()
            if p.name not in convention and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        )


class _Registration(NamedTuple):
    """One ``add()`` a plugin file made: undone when the file fails to import or is read again."""

    kind: str
    name: str
    replaced: BlockInfo | None  # what the name held before, put back on undo
    registered: BlockInfo


def _once_per_key(read: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``read``, remembered per (hashable) argument: a block's signature and its arguments' type adapters
    are asked for by every spec a search checks (one per choice of each searched key)."""
    remembered = functools.lru_cache(maxsize=1024)(read)

    def once(key: Any) -> Any:
        try:
            hash(key)
        except TypeError:  # a callable instance, an annotation, that is not hashable: read each time
            return read(key)
        return remembered(key)

    return once


def _read_signature(builder: Callable[..., Any]) -> inspect.Signature:
    try:
        return inspect.signature(builder, eval_str=True)
    except (NameError, TypeError):  # an annotation that cannot be evaluated: keep it as text
        return inspect.signature(builder)


def _new_adapter(annotation: Any) -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(annotation)


_signature = _once_per_key(_read_signature)
_adapter = _once_per_key(_new_adapter)


class Registry:
    """Blocks by kind and name; built-ins and entry-point plugins are imported on first use."""

    def __init__(self, builtin_module: str | None = BUILTIN_MODULE, entry_point_group: str = ENTRY_POINT_GROUP):
        self._blocks: dict[str, dict[str, BlockInfo]] = {kind: {} for kind in KINDS}
        self._builtin_module = builtin_module
        self._entry_point_group = entry_point_group
        self._loaded = False
        self._loading_distribution: str | None = None
        self._file_stamps: dict[str, tuple[int, int]] = {}  # module name of a .py plugin -> (mtime_ns, size) read
        # Module name of a .py plugin -> its registrations in order: undone, newest first, when the file fails to
        # import or is read again (overrides included).
        self._file_blocks: dict[str, list[_Registration]] = {}
        self._journal: list[_Registration] | None = None  # the file importing now, if any

    # -- registration -------------------------------------------------------------------------
    def register(self, kind: str, name: str | None = None, *, override: bool = False) -> Callable:
        """Decorator registering a block class or factory as ``kind``/``name``."""
        self._check_kind(kind)

        def decorator(builder: Callable[..., Any]) -> Callable[..., Any]:
            self.add(kind, name or builder.__name__, builder, override=override)
            return builder

        return decorator

    def add(self, kind: str, name: str, builder: Callable[..., Any], *, override: bool = False) -> None:
        """Register ``builder`` as ``kind``/``name``; an existing name needs ``override=True``."""
        self._check_kind(kind)
        self._ensure_loaded()
        if not callable(builder):
            raise RegistryError(f"cannot register {kind} '{name}': {builder!r} is not a class or function")
        if not isinstance(name, str) or not _NAME.fullmatch(name):  # model.ffn[NAME].arg must be able to name it
            raise RegistryError(f"cannot register {kind} {name!r}: a block name is letters, digits, '_' and '-' "
                                f"(as in model.{kind}[NAME].argument in a search space)")
        existing = self._blocks[kind].get(name)
        if existing is not None and not override and existing.builder is not builder:
            raise RegistryError(
                f"{kind} '{name}' is already registered by {existing.origin}; "
                f"pick another name or pass override=True to replace it"
            )
        info = BlockInfo(kind, name, builder, self._loading_distribution)
        if self._journal is not None:
            self._journal.append(_Registration(kind, name, existing, info))
        self._blocks[kind][name] = info

    # -- lookup -------------------------------------------------------------------------------
    def get(self, kind: str, name: str) -> Callable[..., Any]:
        """The builder registered as ``kind``/``name``; unknown names get a did-you-mean error."""
        return self.describe(kind, name).builder

    def describe(self, kind: str, name: str) -> BlockInfo:
        """A block's :class:`BlockInfo`: arguments with types and defaults, summary and origin."""
        self._check_kind(kind)
        self._ensure_loaded()
        blocks = self._blocks[kind]
        if name not in blocks:
            names = sorted(blocks)
            off = f" (installed plugins are not loaded: {AUTOLOAD_ENV} is set)" if _autoload_off() else ""
            raise RegistryError(
                f"unknown {kind} '{name}'{did_you_mean(name, names) or ';'} registered: {', '.join(names) or 'none'}{off}"
            )
        return blocks[name]

    def list(self, kind: str | None = None) -> dict[str, list[str]]:
        """Registered names by kind (all kinds, or only ``kind``)."""
        if kind is not None:
            self._check_kind(kind)
        self._ensure_loaded()
        kinds = tuple(KINDS) if kind is None else (kind,)
        return {k: sorted(self._blocks[k]) for k in kinds}

    def distribution_of(self, info: BlockInfo) -> str | None:
        """The installed distribution a block comes from, if any."""
        if info.distribution:
            return info.distribution
        top = info.module.split(".")[0]
        dists = importlib.metadata.packages_distributions().get(top)
        return dists[0] if dists else None

    # -- arguments ----------------------------------------------------------------------------
    def check_args(self, kind: str, name: str, kwargs: Mapping[str, Any], path: str) -> dict[str, Any]:
        """Validate a block's own arguments against its signature; return them type-converted.

        Raises :class:`RegistryError` naming ``path`` and the block for an unknown, missing or
        mistyped argument, so that a spec fails before any constructor runs.
        """
        from pydantic import ValidationError
        from pydantic.errors import PydanticUndefinedAnnotation, PydanticUserError

        info = self.describe(kind, name)
        own = {a.name: a for a in info.args}
        where = f"{path} ({name})"
        for key in kwargs:
            if key in CONVENTION_ARGS[kind]:
                raise RegistryError(f"{where}: '{key}' is set by the model, not by the spec; remove it", path)
            if key not in own and not info.accepts_any:
                hint = did_you_mean(key, own) or f"; arguments: {', '.join(own) or 'none'}"
                raise RegistryError(f"{where}: unknown argument '{key}'{hint}", f"{path}.{key}")
        missing = [a.name for a in own.values() if a.required and a.name not in kwargs]
        if missing:
            raise RegistryError(f"{where}: missing required argument '{missing[0]}'", path)
        checked = dict(kwargs)
        for key, value in kwargs.items():
            arg = own.get(key)
            if arg is None or arg.annotation is inspect.Parameter.empty or isinstance(arg.annotation, str):
                continue
            try:
                adapter = _adapter(arg.annotation)
            except (PydanticUserError, PydanticUndefinedAnnotation):  # torch.Tensor, ...: as if unannotated
                continue
            try:
                # Strict for yes/no values: the lax mode would read `heads: true` as 1.
                checked[key] = adapter.validate_python(value, strict=isinstance(value, bool))
            except ValidationError as err:
                reason = err.errors()[0]["msg"]
                raise RegistryError(
                    f"{where}: argument '{key}' must be {arg.type_name}, got {value!r} ({reason})", f"{path}.{key}"
                ) from None
        return checked

    def build(self, kind: str, name: str, kwargs: Mapping[str, Any], context: Mapping[str, Any], path: str) -> Any:
        """Check ``kwargs`` and call the block's builder with them plus the kind's ``context``.

        A ``ValueError`` from the builder (an impossible combination such as dim not divisible by
        heads), or any other exception of its own (a bug, a missing optional dependency...), becomes a
        :class:`RegistryError` naming ``path``, the block and, for a plugin's block, its file.
        Allocation failures and sizes that overflow are raised as they are.
        """
        checked = self.check_args(kind, name, kwargs, path)
        info = self.describe(kind, name)
        try:
            return info.builder(**context, **checked)
        except RegistryError:
            raise
        except ValueError as err:
            raise RegistryError(f"{path} ({name}): {err}", path) from err
        except Exception as err:
            # A builder that fails in its own way: named, not blamed on the whole model. Allocation failures
            # go on to the trainer's out-of-memory line, and sizes past any integer (torch's "Overflow when
            # unpacking") to the build check's.
            first = (str(err).strip().splitlines() or [""])[0][:200]
            if _out_of_memory(err) or isinstance(err, OverflowError) or "overflow" in first.lower():
                raise
            file = info.source_file
            raise RegistryError(f"{path} ({name}): building it failed: {type(err).__name__}: {first}"
                                + (f" (in {file})" if file else ""), path) from err

    # -- plugins ------------------------------------------------------------------------------
    def load_plugin(self, ref: str, base_dir: str | os.PathLike[str] | None = None) -> None:
        """Import a plugin given as a module name or a ``.py`` path (relative to ``base_dir``)."""
        self._ensure_loaded()
        if ref.endswith(".py") or os.sep in ref or "/" in ref:
            candidates = [Path(ref)] if Path(ref).is_absolute() else [Path(base_dir or ".") / ref, Path(ref)]
            found = next((p for p in candidates if p.is_file() or _is_package(p)), None)
            if found is None:
                tried = ", ".join(str(p) for p in dict.fromkeys(candidates))
                raise PluginError(f"plugin file '{ref}' not found (looked at {tried}); check the path")
            if found.is_dir():  # a package's folder (a spec exported from beside it): imported by its name from there
                self.load_plugin(found.name, found.resolve().parent)
                return
            self._import_file(found.resolve())
            return
        top = ref.split(".")[0]
        if top in sys.stdlib_module_names:
            # Python's own module would be imported, silently, whatever lies beside the spec.
            raise PluginError(
                f"plugin '{ref}' names a module of Python's standard library, which is imported instead of yours; "
                f"rename your module (e.g. '{top}_blocks') or list its file ('{top}.py')")
        # A module name is looked up on sys.path, then beside the spec and in the working directory.
        extra = [str(Path(d).resolve()) for d in (base_dir, ".") if d is not None]
        sys.path.extend(p for p in extra if p not in sys.path)
        try:
            importlib.import_module(ref)
        except ModuleNotFoundError as err:
            # Missing only if the plugin itself or a package above it is: a module the plugin
            # imports (whose name may well be a prefix of the plugin's) is the plugin failing.
            if err.name and (ref == err.name or ref.startswith(err.name + ".")):
                raise PluginError(
                    f"plugin '{ref}' not found: no module named '{err.name}'; "
                    f"install its package or list a .py file path instead"
                ) from None
            raise PluginError(f"plugin '{ref}' failed to import: {type(err).__name__}: {err}") from err
        except (Exception, SystemExit) as err:  # a plugin calling sys.exit() is a plugin failing
            raise PluginError(f"plugin '{ref}' failed to import: {type(err).__name__}: {err}") from err
        finally:
            for path in extra:
                if path in sys.path:
                    sys.path.remove(path)

    def _import_file(self, path: Path) -> None:
        module_name = PLUGIN_FILE_PREFIX + "".join(c if c.isalnum() else "_" for c in str(path))
        stat = path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        if module_name in sys.modules:
            if self._file_stamps.get(module_name, stamp) == stamp:  # loading a spec twice must not register twice
                return
            # The file was edited since (a notebook's next cell): its blocks are read again, and what its old
            # version replaced is put back first (the new one may no longer override it).
            self._undo(self._file_blocks.pop(module_name, []))
            del sys.modules[module_name]
        elif any(getattr(m, "__file__", None) == str(path) for m in list(sys.modules.values())):
            return  # imported by its module name already (a spec naming it so, the user's own import)
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise PluginError(f"plugin file '{path}' is not a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        # Its folder on sys.path while it runs, as `python plugin.py` has it: a helper file beside it imports.
        folder = str(path.parent)
        added = folder not in sys.path
        if added:
            sys.path.insert(0, folder)
        outer, journal = self._journal, []
        self._journal = journal  # add() records each registration the file makes
        try:
            spec.loader.exec_module(module)
        except BaseException as err:
            # Ctrl-C too: a half-run module left in sys.modules would pass as loaded next time.
            sys.modules.pop(module_name, None)
            # What it registered before it failed goes too, overrides put back: the file, fixed, would
            # collide with itself, and a half-loaded plugin must not replace a block.
            self._undo(journal)
            if not isinstance(err, (Exception, SystemExit)):  # a plugin calling sys.exit() is a plugin failing
                raise
            raise PluginError(f"plugin file '{path}' failed to import: {type(err).__name__}: {err}") from err
        finally:
            self._journal = outer
            if added and folder in sys.path:
                sys.path.remove(folder)
        self._file_stamps[module_name] = stamp
        self._file_blocks[module_name] = journal

    def _undo(self, journal: list[_Registration]) -> None:
        """Take back the registrations in ``journal``, newest first: each name gets what it had before, unless
        another file replaced it since: that one stays, and is the one to put back what this one replaced."""
        for entry in reversed(journal):
            blocks = self._blocks[entry.kind]
            if blocks.get(entry.name) is entry.registered:
                if entry.replaced is None:
                    blocks.pop(entry.name, None)
                else:
                    blocks[entry.name] = entry.replaced
                continue
            for later in [*self._file_blocks.values(), self._journal or []]:
                for i, other in enumerate(later):
                    if other.replaced is entry.registered:
                        later[i] = other._replace(replaced=entry.replaced)

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # set first: the modules imported below call register()
        if self._builtin_module:
            importlib.import_module(self._builtin_module)
        if _autoload_off():
            return
        for entry_point in importlib.metadata.entry_points(group=self._entry_point_group):
            dist = entry_point.dist.name if entry_point.dist else "unknown distribution"
            self._loading_distribution = dist
            try:
                loaded = entry_point.load()
                if callable(loaded) and not inspect.ismodule(loaded):
                    loaded(self)  # an entry point may name a function that registers into us
            except (Exception, SystemExit) as err:
                self._loaded = False  # fail the same way next time, not with a half-loaded registry
                raise PluginError(
                    f"plugin '{entry_point.name}' ({entry_point.value}) from distribution '{dist}' failed to "
                    f"load: {type(err).__name__}: {err}; fix or uninstall '{dist}', or set {AUTOLOAD_ENV}=1"
                ) from err
            finally:
                self._loading_distribution = None

    @staticmethod
    def _check_kind(kind: str) -> None:
        if kind not in KINDS:
            raise RegistryError(f"unknown block kind '{kind}'{did_you_mean(kind, KINDS) or ';'} kinds: {', '.join(KINDS)}")


REGISTRY = Registry()
"""The registry that specs and :func:`vit_search.build_model` use unless given another."""


def register(kind: str, name: str | None = None, *, override: bool = False) -> Callable:
    """Decorator registering a block in the default registry: ``@register("attention", "mine")``."""
    return REGISTRY.register(kind, name, override=override)


def get(kind: str, name: str) -> Callable[..., Any]:
    """The builder of ``kind``/``name`` in the default registry."""
    return REGISTRY.get(kind, name)


def _out_of_memory(err: Exception) -> bool:
    """Whether ``err`` is a failed allocation, as the trainer's out-of-memory line reads one (torch's
    OutOfMemoryError, Python's MemoryError, or the CPU allocator's RuntimeError); torch is not imported here."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    said = str(err)
    return isinstance(err, RuntimeError) and ("can't allocate memory" in said or "out of memory" in said.lower())


def _is_package(path: Path) -> bool:
    """A folder Python imports as a package of that name."""
    return path.name.isidentifier() and (path / "__init__.py").is_file()


def _autoload_off() -> bool:
    return os.environ.get(AUTOLOAD_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def describe(kind: str, name: str) -> BlockInfo:
    """Describe ``kind``/``name`` in the default registry."""
    return REGISTRY.describe(kind, name)


def list_blocks(kind: str | None = None) -> dict[str, list[str]]:
    """Registered names by kind in the default registry."""
    return REGISTRY.list(kind)


def load_plugin(ref: str, base_dir: str | os.PathLike[str] | None = None) -> None:
    """Import a plugin (module name or ``.py`` path) into the default registry."""
    REGISTRY.load_plugin(ref, base_dir)
