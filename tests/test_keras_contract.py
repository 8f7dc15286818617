"""The Keras and TensorFlow internals keras_safe relies on, each pinned by one named test.

ARCHITECTURE.md ("Keras and TensorFlow internals") lists each internal, where keras_safe uses it
and why. Every use in the package carries a marker comment `# keras-internal: <name>` (one
comment may name several), and this module has one `test_<name>` per name (dashes as
underscores) that asserts the internal exists and behaves as keras_safe assumes, on public
Keras and TensorFlow calls only: after a Keras or TensorFlow upgrade, what broke fails here, by
name, instead of somewhere deep in a privacy test.

`test_internals_are_marked_listed_and_pinned` keeps the three in step: it scans the package
(with `ast`) for what reads or writes a Keras or TensorFlow internal (an underscore attribute
keras_safe does not define itself, `sys._getframe`, `__subclasses__`, a `__class__` assignment,
`object.__setattr__`/`__delattr__`, `vars()`, `train_function`, a per-instance `call`) and
fails on a use without a marker, a marker whose name ARCHITECTURE.md does not list, and a
listed name without a test here or without a use.
"""

import ast
import collections
import inspect
import pathlib
import re
import sys

import keras
import numpy as np
import tensorflow as tf

ROOT = pathlib.Path(__file__).resolve().parent.parent
MARKER = re.compile(r"#\s*keras-internal:\s*([\w-]+(?:\s*,\s*[\w-]+)*)")
SELF = {"self", "cls", "super()", "type(self)"}

# Uses in modules whose marker comments are still to be written, as (file, use, internal): a
# use of None stands for an assumption no scan can see (a behaviour, not an attribute). Every
# other use must carry its marker; a new use in these files that is not listed here fails too.
ALLOWED_UNMARKED = []


# -- the scan ----------------------------------------------------------------------------------


def _sources(root):
    for path in sorted((root / "keras_safe").rglob("*.py")):
        yield path.relative_to(root).as_posix(), path.read_text()


def _is_dunder(name):
    return name.startswith("__") and name.endswith("__")


def _definitions(trees):
    """What keras_safe defines: module-level names, and each class's members (by class name,
    with the names of its bases)."""
    module_names, classes = set(), collections.defaultdict(list)
    for tree in trees:
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                module_names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                module_names.update(t.id for t in targets if isinstance(t, ast.Name))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                module_names.update((a.asname or a.name).split(".")[0] for a in node.names)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases = [ast.unparse(b).rpartition(".")[2] for b in node.bases]
                classes[node.name].append((bases, _members(node)))
    return module_names, classes


def _members(cls):
    found = set()
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            found.update(t.id for t in targets if isinstance(t, ast.Name))
    for node in ast.walk(cls):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for target in targets:
            for t in ast.walk(target):
                if isinstance(t, ast.Attribute) and ast.unparse(t.value) in SELF:
                    found.add(t.attr)
        if isinstance(node, ast.Call) and ast.unparse(node.func) in (
            "setattr",
            "object.__setattr__",
        ):
            if len(node.args) > 1 and ast.unparse(node.args[0]) in SELF:
                if isinstance(node.args[1], ast.Constant):
                    found.add(node.args[1].value)
    return found


def _class_defines(classes, name, attribute, seen=None):
    seen = set() if seen is None else seen
    if name in seen or name not in classes:
        return False
    seen.add(name)
    return any(
        attribute in members or any(_class_defines(classes, b, attribute, seen) for b in bases)
        for bases, members in classes[name]
    )


def _parents(tree):
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    return parents


def _enclosing(node, parents, kind):
    while node in parents:
        node = parents[node]
        if isinstance(node, kind):
            return node
    return None


def internal_uses(root):
    """`(file, line, use, statement)` for every read or write of a Keras or TensorFlow
    internal in the package (see the module docstring); `statement` is the line range of the
    statement holding it."""
    sources = dict(_sources(root))
    trees = {rel: ast.parse(text) for rel, text in sources.items()}
    module_names, classes = _definitions(trees.values())
    every_member = set().union(*(m for entries in classes.values() for _, m in entries))

    def foreign(attribute, owner, node, parents):
        if not attribute.startswith("_") or _is_dunder(attribute):
            return False
        if ast.unparse(owner) in SELF:
            cls = _enclosing(node, parents, ast.ClassDef)
            if cls is not None:
                return not _class_defines(classes, cls.name, attribute)
        return attribute not in module_names and attribute not in every_member

    found = []
    for rel, tree in trees.items():
        parents = _parents(tree)
        for node in ast.walk(tree):
            use = None
            if isinstance(node, ast.Attribute):
                if node.attr in ("__subclasses__", "train_function"):
                    use = node.attr
                elif foreign(node.attr, node.value, node, parents):
                    use = node.attr
                storing = isinstance(node.ctx, ast.Store)
                if storing and node.attr == "__class__":
                    use = "__class__ ="
                if storing and node.attr == "call" and ast.unparse(node.value) not in SELF:
                    use = ".call ="
            elif isinstance(node, ast.Call):
                func = ast.unparse(node.func)
                if func in ("object.__setattr__", "object.__delattr__"):
                    use = func
                elif func == "vars" and node.args:
                    use = "vars()"
                elif func in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) > 1:
                    name = node.args[1]
                    if isinstance(name, ast.Constant) and isinstance(name.value, str):
                        if name.value == "train_function" or foreign(
                            name.value, node.args[0], node, parents
                        ):
                            use = name.value
                    elif isinstance(name, ast.JoinedStr) and name.values:
                        head = name.values[0]
                        if isinstance(head, ast.Constant) and str(head.value).startswith("_"):
                            use = "".join(
                                v.value if isinstance(v, ast.Constant) else "{}"
                                for v in name.values
                            )
            if use is not None:
                statement = _enclosing(node, parents, ast.stmt) or node
                found.append((rel, node.lineno, use, (statement.lineno, node.end_lineno)))
    return found


def markers(root):
    """`{(file, line): [names]}` of the marker comments in the package."""
    found = {}
    for rel, text in _sources(root):
        for number, line in enumerate(text.splitlines(), 1):
            match = MARKER.search(line)
            if match:
                found[(rel, number)] = [n.strip() for n in match.group(1).split(",")]
    return found


def _marker_for(lines, found, rel, statement):
    """The marker names of a use: on a line of its statement, or in the comment lines right
    above it."""
    first, last = statement
    names = []
    for number in range(first, last + 1):
        names += found.get((rel, number), [])
    number = first - 1
    while number >= 1 and lines[number - 1].strip().startswith("#"):
        names += found.get((rel, number), [])
        number -= 1
    return names


def listed_internals(root):
    """The names in ARCHITECTURE.md's table of internals (rows starting "| `name` |")."""
    text = (root / "ARCHITECTURE.md").read_text()
    section = re.search(r"^## Keras and TensorFlow internals.*?(?=^## |\Z)", text, re.M | re.S)
    return re.findall(r"^\| `([\w-]+)` \|", section.group(0) if section else "", re.M)


def contract_problems(root, pinned, allowed=None):
    """Everything out of step between the code's uses and markers, ARCHITECTURE.md's list,
    the allow-list (`(file, use, internal)` triples) and the pins (`pinned`: the names that
    have a test)."""
    allowed = ALLOWED_UNMARKED if allowed is None else allowed
    allowed_uses = {(rel, use) for rel, use, _ in allowed}
    allowed_names = {name for _, _, name in allowed}
    texts = dict(_sources(root))
    found = markers(root)
    listed = listed_internals(root)
    problems = []
    for rel, line, use, statement in internal_uses(root):
        names = _marker_for(texts[rel].splitlines(), found, rel, statement)
        if not names and (rel, use) not in allowed_uses:
            problems.append(f"{rel}:{line} uses {use} without a `# keras-internal:` marker")
    for (rel, line), names in sorted(found.items()):
        problems += [
            f"{rel}:{line} marks {n}, which ARCHITECTURE.md does not list"
            for n in names
            if n not in listed
        ]
    problems += [f"{n} (allow-list) is not listed" for n in sorted(allowed_names - set(listed))]
    used = {name for names in found.values() for name in names} | allowed_names
    for n in listed:
        if n.replace("-", "_") not in pinned:
            problems.append(f"{n} is listed but has no test_{n.replace('-', '_')}")
        if n not in used:
            problems.append(f"{n} is listed but used nowhere")
    problems += [f"{n} is listed twice" for n in sorted({n for n in listed if listed.count(n) > 1})]
    return problems


def _pinned():
    return {
        name[len("test_") :]
        for name, value in globals().items()
        if name.startswith("test_") and callable(value)
    }


def test_internals_are_marked_listed_and_pinned():
    assert len(listed_internals(ROOT)) >= 15
    assert contract_problems(ROOT, _pinned()) == []


def test_the_scan_finds_each_kind_of_use(tmp_path):
    package = tmp_path / "keras_safe"
    package.mkdir()
    (package / "user.py").write_text(
        "import sys\n"
        "class Mine(Base):\n"
        "    _own = 1\n"
        "    def f(self, model, layer, op, i):\n"
        "        self._state = 2\n"
        "        a = self._state + self._own + self._inherited + self._from_keras\n"
        "        b = model._keras_mask\n"
        "        c = getattr(op, f'_branch_{i}', None)\n"
        "        d = getattr(model, '_remat_mode', None)\n"
        "        model.__class__ = Mine\n"
        "        layer.call = len\n"
        "        object.__setattr__(model, 'x', 1)\n"
        "        model.train_function = None\n"
        "        e = sys._getframe(1), Mine.__subclasses__(), vars(layer)\n"
        "        # keras-internal: known\n"
        "        g = model._other\n"
    )
    (package / "base.py").write_text("class Base:\n    def g(self):\n        self._inherited = 1\n")
    (tmp_path / "ARCHITECTURE.md").write_text(
        "## Keras and TensorFlow internals\n\n| `known` | x |\n| `unused` | y |\n"
    )
    uses = [(line, use) for _, line, use, _ in internal_uses(tmp_path)]
    assert sorted(uses) == [
        (6, "_from_keras"),
        (7, "_keras_mask"),
        (8, "_branch_{}"),
        (9, "_remat_mode"),
        (10, "__class__ ="),
        (11, ".call ="),
        (12, "object.__setattr__"),
        (13, "train_function"),
        (14, "__subclasses__"),
        (14, "_getframe"),
        (14, "vars()"),
        (16, "_other"),
    ]
    problems = contract_problems(tmp_path, pinned={"known"}, allowed=[])
    assert len([p for p in problems if "without a" in p]) == 11
    assert "unused is listed but has no test_unused" in problems
    assert "unused is listed but used nowhere" in problems
    assert not any(":16 " in p for p in problems)  # marked by the comment above


# -- the pins ----------------------------------------------------------------------------------


def _sequential():
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.Dense(1)])


def _data(n=8):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 3)).astype("float32"), rng.normal(size=(n, 1)).astype("float32")


def test_functional_class():
    # training/private_model.py finds Functional by name among Model's direct subclasses (it
    # is no public name) to recognise a functional model and give it SafeFunctional.
    found = [c for c in keras.Model.__subclasses__() if c.__name__ == "Functional"]
    assert len(found) == 1
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    assert type(model) is found[0]
    assert type(keras.Sequential([keras.Input((3,))])) is not found[0]


def test_class_swap():
    # make_private assigns `model.__class__` a keras_safe subclass of the model's own class:
    # the instance keeps its layers, weights and config, and the new class's train_step runs.
    class User(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(1)

        def call(self, x):
            return self.dense(x)

    steps = []
    inputs = keras.Input((3,))
    functional = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    x, y = _data()
    for model in (_sequential(), functional, User()):
        model(x)
        before = (model.predict(x, verbose=0), model.get_weights(), len(model.layers))
        base = type(model)

        def train_step(self, data, _base=base):
            steps.append(type(self))
            return _base.train_step(self, data)

        swapped = type(base.__name__, (base,), {"train_step": train_step})
        model.__class__ = swapped
        assert isinstance(model, base) and type(model) is swapped
        np.testing.assert_array_equal(model.predict(x, verbose=0), before[0])
        assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), before[1]))
        assert len(model.layers) == before[2]
        model.compile(optimizer="sgd", loss="mse")
        model.fit(x, y, batch_size=4, epochs=1, verbose=0)
        assert steps[-1] is swapped


def test_registration_replaces():
    # Every private subclass is registered under `keras_safe>PrivateModel`, then the loader
    # again: a class keeps the name it was registered under, and the name the last class.
    register = keras.saving.register_keras_serializable(package="contract_probe", name="Probe")

    class First:
        def get_config(self):
            return {}

    class Second(First):
        pass

    register(First)
    register(Second)
    assert keras.saving.get_registered_name(First) == "contract_probe>Probe"
    assert keras.saving.get_registered_name(Second) == "contract_probe>Probe"
    assert keras.saving.get_registered_object("contract_probe>Probe") is Second
    register(First)
    assert keras.saving.get_registered_object("contract_probe>Probe") is First


class _Store(keras.layers.Layer):
    """A layer with one variable, held by a model as a plain attribute (as the ledger is)."""

    def build(self, input_shape=None):
        self.value = self.add_weight(shape=(), initializer="zeros", trainable=False)


def _store():
    store = _Store()
    store.build()
    return store


def test_untracked_attribute():
    # keras_safe keeps its state on a model, and Poisson facts on a dataset, with
    # object.__setattr__: past Keras's tracking, so the model's layers, weights, config and
    # saving do not change, and the attribute reads back as set.
    model = _sequential()
    weights, config = len(model.weights), model.get_config()
    state, store = {"private": True}, _store()
    object.__setattr__(model, "_probe_state", state)
    object.__setattr__(model, "_probe_store", store)
    assert model._probe_state is state and model._probe_store is store
    assert len(model.weights) == weights and store not in model.layers
    assert model.get_config() == config
    tracked, untracked = keras.layers.Layer(), keras.layers.Layer()
    tracked.store = _store()  # Keras's own __setattr__, by contrast, tracks a layer
    object.__setattr__(untracked, "store", _store())
    assert len(tracked.weights) == 1 and untracked.weights == []
    dataset = tf.data.Dataset.range(4).batch(2)
    object.__setattr__(dataset, "_probe_info", state)
    assert getattr(dataset, "_probe_info", None) is state
    assert [b.numpy().tolist() for b in dataset] == [[0, 1], [2, 3]]


def test_saved_attribute(tmp_path):
    # The ledger, a layer set on the model past tracking, is saved and restored by Keras's
    # weights saving, which walks the model's attributes (saving_lib's `_walk_saveable`).
    model = _sequential()
    store = _store()
    store.value.assign(7.0)
    object.__setattr__(model, "_probe_store", store)
    path = str(tmp_path / "probe.weights.h5")
    model.save_weights(path)
    fresh = _sequential()
    object.__setattr__(fresh, "_probe_store", _store())
    fresh.load_weights(path)
    assert float(fresh._probe_store.value.numpy()) == 7.0
    np.testing.assert_array_equal(fresh.get_weights()[0], model.get_weights()[0])


def test_load_order(tmp_path):
    # keras_safe>PrivateModel's from_config returns another object (the user's model, made
    # private, its ledger set): Keras builds, compiles and loads the weights of what
    # from_config returned, and finds the attribute set there.
    made = []

    @keras.saving.register_keras_serializable(package="contract_probe", name="Loaded")
    class Loaded(keras.Sequential):
        @classmethod
        def from_config(cls, config, custom_objects=None):
            model = keras.Sequential.from_config(config)
            object.__setattr__(model, "_probe_store", _store())
            made.append(model)
            return model

    model = Loaded([keras.Input((3,)), keras.layers.Dense(1)])
    store = _store()
    store.value.assign(3.0)
    object.__setattr__(model, "_probe_store", store)
    model.compile(optimizer="sgd", loss="mse")
    path = str(tmp_path / "probe.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded is made[-1] and type(loaded) is keras.Sequential
    assert loaded.built and loaded.optimizer is not None
    assert float(loaded._probe_store.value.numpy()) == 3.0
    np.testing.assert_array_equal(loaded.get_weights()[0], model.get_weights()[0])


def test_train_function():
    # keras_safe sets `model.train_function = None` to have the next fit trace the step again
    # (new settings, stages or class), and PrivacyGuard replaces it in on_train_begin: fit
    # calls `model.train_function(iterator)` once per execution, after make_train_function()
    # and on_train_begin.
    model = _sequential()
    model.compile(optimizer="sgd", loss="mse")
    model.make_train_function()
    first = model.train_function
    model.make_train_function()
    assert first is not None and model.train_function is first
    model.train_function = None
    model.make_train_function()
    assert model.train_function is not None and model.train_function is not first
    calls = []

    class Wrap(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            wrapped = self.model.train_function
            assert wrapped is not None

            def guarded(iterator):
                calls.append(iterator)
                return wrapped(iterator)

            self.model.train_function = guarded

    x, y = _data(12)
    history = model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[Wrap()])
    assert len(calls) == 6 and len(history.history["loss"]) == 2
    model.compile(optimizer="sgd", loss="mse", steps_per_execution=3)
    calls.clear()
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[Wrap()])
    assert len(calls) == 1


def test_fit_frame():
    # fit_plan.find_fit_arguments reads the arguments of the `fit` running on a model from its
    # frame (PrivacyBudget installs keras_safe from set_model, inside fit): a frame of a
    # function named `fit` whose locals hold `self` (the model) and fit's parameters, x being
    # the training part once validation_split took its share.
    names = ("x", "y", "sample_weight", "batch_size", "epochs", "initial_epoch", "shuffle")
    assert set(names + ("steps_per_epoch",)) <= set(inspect.signature(keras.Model.fit).parameters)
    seen = []

    class Probe(keras.callbacks.Callback):
        def set_model(self, model):
            super().set_model(model)
            frame = sys._getframe(1)
            while frame is not None and not (
                frame.f_code.co_name == "fit" and frame.f_locals.get("self") is model
            ):
                frame = frame.f_back
            seen.append(None if frame is None else {n: frame.f_locals.get(n) for n in names})

    model = _sequential()
    model.compile(optimizer="sgd", loss="mse")
    x, y = _data(8)
    model.fit(x, y, batch_size=2, epochs=2, validation_split=0.25, verbose=0, callbacks=[Probe()])
    found = seen[0]
    assert found is not None
    assert found["batch_size"] == 2 and found["epochs"] == 2 and found["initial_epoch"] == 0
    assert len(found["x"]) == 6 and len(found["y"]) == 6
    np.testing.assert_array_equal(np.asarray(found["x"]), x[:6])


def test_dataset_each_epoch():
    # fit on arrays gets Poisson batches as a tf.data.Dataset drawn afresh each epoch: Keras
    # iterates a dataset anew every epoch when steps_per_epoch is None.
    iterations = []

    def rows():
        iterations.append(1)
        x, y = _data(8)
        yield from zip(x, y)

    spec = (tf.TensorSpec((3,), tf.float32), tf.TensorSpec((1,), tf.float32))
    dataset = tf.data.Dataset.from_generator(rows, output_signature=spec).batch(4)
    model = _sequential()
    model.compile(optimizer="sgd", loss="mse")
    model.fit(dataset, epochs=3, shuffle=False, verbose=0)
    assert len(iterations) == 3


def test_keras_mask():
    # keras_safe reads an output's mask from `_keras_mask` (losses.py, audit/features.py) and
    # writes one there (train_step.py masks padding rows; features.py keeps it through a cast):
    # Keras's losses and metrics read it from that attribute, in a graph and eagerly.
    y_true = tf.constant([[1.0], [2.0], [3.0], [4.0]])
    raw = tf.constant([[1.0], [0.0], [3.0], [0.0]])
    mask = tf.constant([True, False, True, False])

    metric = keras.metrics.MeanSquaredError()

    @tf.function(autograph=False)
    def masked_loss_and_metric(y_pred):
        y_pred = tf.identity(y_pred)
        y_pred._keras_mask = mask
        assert getattr(y_pred, "_keras_mask", None) is mask
        metric.update_state(y_true, y_pred)
        return keras.losses.MeanSquaredError()(y_true, y_pred), metric.result()

    loss, metric = masked_loss_and_metric(raw)
    assert float(loss) == 0.0 and float(metric) == 0.0  # the masked rows are the wrong ones
    assert float(keras.losses.MeanSquaredError()(y_true, raw)) > 0
    eager = tf.identity(raw)
    eager._keras_mask = mask
    assert float(keras.losses.MeanSquaredError()(y_true, eager)) == 0.0

    @tf.function(autograph=False)
    def masking_layer(x):
        return getattr(keras.layers.Masking(0.0)(x), "_keras_mask", None)

    found = masking_layer(tf.constant([[[1.0], [0.0]]]))
    assert found is not None and found.numpy().tolist() == [[True, False]]


def test_remat_mode():
    # Per-example rules leave out a layer with rematerialisation on (it runs its call under
    # Keras's remat wrapper, not the plain call a rule records): the layer's `_remat_mode`,
    # None unless it was created under keras.RematScope.
    assert keras.layers.Dense(2)._remat_mode is None
    assert keras.layers.Embedding(4, 2)._remat_mode is None
    with keras.RematScope(mode="full"):
        layer = keras.layers.Dense(2)
    assert layer._remat_mode and layer._remat_mode.mode == "full"


def test_layer_call_patch():
    # install.py sets a recording `call` on each supported layer instance while a step traces,
    # and deletes it after: Layer.__call__ runs the instance's `call`, handing it `training`.
    layer = keras.layers.Dense(2)
    model = keras.Sequential([keras.Input((3,)), layer])
    seen = []
    original = layer.call

    def recording(*args, **kwargs):
        seen.append(kwargs.get("training"))
        return original(*args, **kwargs) * 0.0

    x = np.ones((2, 3), "float32")
    before = model(x, training=True)
    object.__setattr__(layer, "call", recording)
    assert float(tf.reduce_sum(tf.abs(model(x, training=True)))) == 0.0
    assert float(tf.reduce_sum(tf.abs(tf.function(lambda v: layer(v, training=True))(x)))) == 0
    assert seen and all(t is True for t in seen)
    object.__delattr__(layer, "call")
    np.testing.assert_array_equal(model(x, training=True), before)


def test_rnn_unroll():
    # install.py unrolls recurrent layers whose cells have rules by setting `unroll` on the
    # built layer while a step traces: the RNN reads `unroll` at call time.
    layer = keras.layers.LSTM(2)
    layer(np.ones((1, 4, 3), "float32"))

    def loop_ops():
        graph = (
            tf.function(lambda v: layer(v)).get_concrete_function(tf.TensorSpec((None, 4, 3))).graph
        )
        return [op.type for op in graph.get_operations() if op.type in ("While", "StatelessWhile")]

    assert loop_ops()
    object.__setattr__(layer, "unroll", True)
    assert loop_ops() == []
    object.__setattr__(layer, "unroll", False)
    assert loop_ops()


def test_layer_attributes():
    # model_checks.all_layers finds the sublayers of a layer without `.layers` in its
    # attributes (`vars(layer)`): Bidirectional's two layers, an RNN's cell, a custom layer's
    # list of layers (Keras keeps a list as a list subclass).
    def held(layer):
        found = []
        for value in vars(layer).values():
            for item in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(item, keras.layers.Layer):
                    found.append(item)
        return found

    lstm = keras.layers.LSTM(2)
    wrapper = keras.layers.Bidirectional(lstm)
    assert {id(layer) for layer in held(wrapper)} == {
        id(wrapper.forward_layer),
        id(wrapper.backward_layer),
    }
    assert lstm.cell in held(lstm)

    class Block(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.parts = [keras.layers.Dense(1), keras.layers.Dense(2)]

    block = Block()
    assert {id(layer) for layer in held(block)} == {id(layer) for layer in block.parts}


def test_callback_model():
    # PrivacyBudget reads the model a callback was given from `_model` (None before
    # set_model), where reading `model` is not wanted before fit has set it.
    callback = keras.callbacks.Callback()
    assert callback._model is None
    model = _sequential()
    callback.set_model(model)
    assert callback._model is model and callback.model is model


def test_optimizer_variables():
    # GradientClip.apply without trainable_variables takes the variables its build saw, as
    # Keras's optimizers keep them: `_trainable_variables`, in build's order.
    optimizer = keras.optimizers.SGD(0.1)
    variables = [keras.Variable(1.0), keras.Variable([2.0, 3.0])]
    optimizer.build(variables)
    assert [id(v) for v in optimizer._trainable_variables] == [id(v) for v in variables]
    optimizer.apply([tf.constant(1.0), tf.constant([1.0, 1.0])])
    np.testing.assert_allclose(variables[1].numpy(), [1.9, 2.9])


def _graph_of(fn, *specs):
    return tf.function(fn, autograph=False).get_concrete_function(*specs).graph


def test_tf_function_library():
    # The independence proof reads a function a step calls (PartitionedCall's `f`) from the
    # calling graph's library, `_get_function(name)`, walking `outer_graph` upwards.
    inner = tf.function(lambda v: v * 2.0, autograph=False)

    def outer(v):
        return tf.cond(v[0] > 0, lambda: inner(v), lambda: v)

    graph = _graph_of(outer, tf.TensorSpec((2,)))
    branch = next(op for op in graph.get_operations() if op.type in ("If", "StatelessIf"))
    calls = [
        op
        for g in (branch._true_graph, branch._false_graph)
        for op in g.get_operations()
        if op.type in ("PartitionedCall", "StatefulPartitionedCall")
    ]
    assert len(calls) == 1
    op = calls[0]
    name, found, g = op.get_attr("f").name, None, op.graph
    while g is not None and found is None:
        function = g._get_function(name)
        found = getattr(function, "graph", None) if function is not None else None
        g = getattr(g, "outer_graph", None)
    assert found is not None
    assert [t.shape for t in found.inputs] == [t.shape for t in op.inputs]
    assert len(found.outputs) == len(op.outputs)
    assert any(o.type == "Mul" for o in found.get_operations())


def test_tf_control_flow_graphs():
    # The independence proof reads the branches and loop bodies of tf.cond, tf.switch_case and
    # tf.while_loop from the op (`_true_graph`/`_false_graph`, `_branch_graph_<i>`,
    # `_cond_graph`/`_body_graph`), whose inputs line up with the op's inputs (after the
    # predicate or index, for branches) and whose outputs with the op's outputs.
    def step(v, w):
        a = tf.cond(v[0] > 0, lambda: v * w[0], lambda: v + w[1])
        b = tf.switch_case(tf.cast(v[0] > 0, tf.int32), [lambda: a * 2.0, lambda: a - w[0]])
        _, c = tf.while_loop(lambda i, s: i < 3, lambda i, s: (i + 1, s * w[2]), (0, b))
        return c

    graph = _graph_of(step, tf.TensorSpec((2,)), tf.TensorSpec((3,)))
    ops = {op.type: op for op in graph.get_operations()}
    cond = ops.get("If", ops.get("StatelessIf"))
    case = ops.get("Case", ops.get("StatelessCase"))
    loop = ops.get("While", ops.get("StatelessWhile"))
    assert cond is not None and case is not None and loop is not None
    branches = [cond._true_graph, cond._false_graph]
    branches += [getattr(case, f"_branch_graph_{i}") for i in range(len(case.get_attr("branches")))]
    for op, graphs, skip in ((cond, branches[:2], 1), (case, branches[2:], 1)):
        for g in graphs:
            assert [t.shape for t in g.inputs] == [t.shape for t in op.inputs[skip:]]
            assert len(g.outputs) == len(op.outputs)
    for g in (loop._cond_graph, loop._body_graph):
        assert [t.dtype for t in g.inputs] == [t.dtype for t in loop.inputs]
    assert len(loop._body_graph.outputs) == len(loop.inputs)


def test_architecture_md_states_the_marker():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    assert "# keras-internal: <name>" in text and "tests/test_keras_contract.py" in text
