"""The one shape of keras_safe's registries (per-example rules, accountants, evasion and membership
attacks): explicit defaults, then `register_*` / `unregister_*` / `get_*` / `*_names`.

- The built-in entries are an explicit, ordered tuple given once (`defaults`); they are always
  there and cannot be removed.
- `register` adds an entry under its name. A name already taken (built-in or registered) is
  refused unless `replace=True` is given: nothing is replaced silently. A built-in replaced that
  way comes back when the replacement is unregistered.
- `unregister` removes a registered entry (by name, or the entry itself); `get` returns the entry
  of a name; both refuse an unknown name, listing the known ones.
- `names()` lists the built-in names in their order, then the registered ones in the order they
  were registered. `lookup_order()` is the order in which entries are tried where the first
  match wins (per-example rules): registered entries, latest first, then the built-in ones.

Every error is an `ArgumentError` naming the argument and the fix. Keras-free, like `_validation`.
"""

from keras_safe._validation import fail

__all__ = ["Registry"]


class Registry:
    """A registry of named entries, built-in and registered.

    Args:
        kind: what an entry is, for messages (`"accountant"`, `"evasion attack"`, ...).
        defaults: the built-in entries, in order.
        name_of: `name_of(entry) -> str`, the name an entry is registered under.
        register_call: the public function that registers entries, named in messages.
        normalize: applied to every name given (for example `str.lower`).

    Example:
        >>> registry = Registry("colour", ("red", "green"), name_of=str, register_call="add")
        >>> registry.register("blue")
        'blue'
        >>> registry.names()
        ('red', 'green', 'blue')
        >>> try:
        ...     registry.register("red")
        ... except ValueError as error:
        ...     print(error)  # doctest: +ELLIPSIS, +NORMALIZE_WHITESPACE
        `name` must be a name that is not registered yet (a colour is registered under it),
        got 'red'. Fix: ...
        >>> registry.unregister("blue")
        >>> registry.names()
        ('red', 'green')
    """

    def __init__(self, kind, defaults, name_of, register_call, normalize=None):
        self.kind = kind
        self._a = f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"
        self.register_call = register_call
        self._name_of = name_of
        self._normalize = normalize or (lambda name: name)
        self._defaults = {}
        for entry in defaults:
            self._defaults[self._normalize(name_of(entry))] = entry
        self._registered = {}

    def _key(self, name, argument="name"):
        if not isinstance(name, str) or not name:
            fail(argument, name, f"the name of {self._a} (a non-empty string)")
        return self._normalize(name)

    def _known(self):
        return ", ".join(repr(name) for name in self.names()) or "none"

    def name_of(self, entry):
        """The name `entry` is (or would be) registered under."""
        return self._key(self._name_of(entry), "name")

    def register(self, entry, replace=False, name=None):
        """Adds `entry` (under `name`, by default its own name); returns `entry`."""
        key = self._key(name, "name") if name is not None else self.name_of(entry)
        taken = key in self._registered or key in self._defaults
        if taken and not replace:
            fail(
                "name",
                key,
                f"a name that is not registered yet ({self._a} is registered under it)",
                f"choose another name, or pass replace=True to replace the registered "
                f"{self.kind} on purpose.",
            )
        self._registered.pop(key, None)  # a replacement counts as the latest registration
        self._registered[key] = entry
        return entry

    def unregister(self, name):
        """Removes the registered entry `name` (or the entry itself)."""
        key = self._key(name) if isinstance(name, str) else self.name_of(name)
        if key not in self._registered:
            builtin = key in self._defaults
            fail(
                "name",
                key,
                f"{self._a} registered with {self.register_call}"
                + (" (built-in ones cannot be removed)" if builtin else ""),
                "pass the name of a registered one; registered: "
                + (", ".join(repr(n) for n in self._registered) or "none")
                + ".",
            )
        del self._registered[key]

    def get(self, name, argument="name"):
        """The entry registered under `name`."""
        key = self._key(name, argument)
        if key in self._registered:
            return self._registered[key]
        if key in self._defaults:
            return self._defaults[key]
        fail(
            argument,
            name,
            f"the name of {self._a}, one of {self._known()}",
            f"check the spelling, or register it with {self.register_call}.",
        )

    def __contains__(self, name):
        return isinstance(name, str) and self._normalize(name) in self.names()

    def names(self):
        """Built-in names in order, then registered ones in the order of registration."""
        return (*self._defaults, *(n for n in self._registered if n not in self._defaults))

    def entries(self):
        """The entries of `names()`, in that order (a replaced built-in as its replacement)."""
        return tuple(self.get(name) for name in self.names())

    def lookup_order(self):
        """Entries in the order a first-match lookup tries them: registered entries, latest
        first, then the built-in entries not replaced."""
        registered = tuple(reversed(self._registered.values()))
        return registered + tuple(
            entry for key, entry in self._defaults.items() if key not in self._registered
        )

    def is_default(self, entry):
        """True for a built-in entry that no registration replaced."""
        return any(
            entry is found and key not in self._registered for key, found in self._defaults.items()
        )
