"""A pickle reader whose work is bounded by the bytes it is given: what a hostile file can make it do.

The standard unpickler runs in time and memory out of proportion to its input in a few places, and a checkpoint
is a file from the internet. A 1.4 KB pickle can describe, through shared references (memo GET), a tuple of
2^60 leaves: hashing it as a dict key, or formatting it into a message, never ends; a 200 KB pickle of a
200,000-deep nested tuple used as a dict key overflows the C stack in `hash()` (a segfault, no message); a
REDUCE of `list` on a large list copies it, once per 5-byte opcode; `LONG_BINPUT 2^32 - 1` makes the C
unpickler allocate a 32 GB memo array. torch's `weights_only` loader answers these with its own pure-Python
opcode loop (torch/_weights_only_unpickler.py), and safetensors with a bounded header. We do the same: this
class is the standard library's pure-Python unpickler (`pickle._Unpickler`, the reference implementation of
the same opcodes) with every operation whose cost is not proportional to the bytes that asked for it
checked first:

- input: the caller reads at most `max_bytes` for the pickle (`load_bounded`); a longer one is refused;
- hashing (dict keys, set members, frozensets, and the hashing builtins a subclass lets REDUCE call): each
  object is measured before it is hashed, iteratively and each distinct tuple once, against MAX_DEPTH and
  a total HASH_BUDGET of visited objects;
- copies (REDUCE/NEWOBJ of list, tuple, set, dict, ... on an existing container): charged against an element
  budget proportional to the pickle's length (`spend`);
- memo: at most MAX_MEMO entries; MARK nesting at most MAX_DEPTH;
- nesting: the finished object is walked iteratively and refused when deeper than MAX_DEPTH, so no later
  recursive walk (repr, ==, deepcopy, json) can overflow the C stack;
- opcodes: only those a data pickle needs (protocols 0-5 minus out-of-band buffers and copyreg extensions);
  REDUCE, NEWOBJ, BUILD and the filling opcodes go through hooks (`call`, `new`, `check_build`,
  `fillable`) that a subclass answers from its allowlist; here they refuse everything;
- messages: objects from the file are formatted only through `brief` (reprlib, bounded).

Anything refused raises pickle.UnpicklingError with a one-line reason.
"""

from __future__ import annotations

import io
import pickle
import reprlib

MAX_DEPTH = 256  # real checkpoints nest < 30 levels (Lightning dicts, omegaconf configs); C recursion is safe far beyond
MAX_MEMO = 1 << 20  # memo entries; a full SDXL training checkpoint with optimizer state needs ~90,000
HASH_BUDGET = 1 << 22  # objects visited by hash() over a whole load; real keys are strings (1 each)
PICKLE_FLOOR = 4 << 20  # bytes a pickle may span whatever the file holds; real data.pkl: 0.2-1 MB
PICKLE_PER_DATA_BYTE = 1 / 1024  # ... plus this much per byte of tensor data the file holds

_brief = reprlib.Repr()
_brief.maxlevel, _brief.maxtuple, _brief.maxlist, _brief.maxdict, _brief.maxset = 2, 4, 4, 4, 4
_brief.maxfrozenset, _brief.maxstring, _brief.maxother, _brief.maxlong = 4, 60, 60, 40


def brief(obj) -> str:
    """A short repr of an object from a file: bounded in length and in the work it takes (reprlib)."""
    return _brief.repr(obj)


def pickle_byte_limit(data_bytes: int) -> int:
    """How many bytes the pickle of a file holding `data_bytes` of tensor data may span."""
    return PICKLE_FLOOR + int(max(data_bytes, 0) * PICKLE_PER_DATA_BYTE)


class _Dispatch(dict):
    def __missing__(self, key):
        raise pickle.UnpicklingError(f"unsupported pickle opcode {bytes([key])!r}")


_BASE = pickle._Unpickler.dispatch
_REFUSED = (pickle.NEXT_BUFFER, pickle.READONLY_BUFFER, pickle.EXT1, pickle.EXT2, pickle.EXT4)


class BoundedUnpickler(pickle._Unpickler):
    """pickle._Unpickler with its work bounded (module docstring). Subclasses supply find_class,
    persistent_load and the hooks `call`, `new`, `check_build` and `fillable`."""

    dispatch = _Dispatch({k: v for k, v in _BASE.items() if bytes([k]) not in _REFUSED})

    def __init__(self, file, n_bytes: int):
        super().__init__(file)
        self._elements = 4 * n_bytes + (1 << 16)  # what copies may allocate, in container elements
        self._hash_left = HASH_BUDGET
        self._measured = {}  # id -> (object, (hash cost, depth)); holding the object keeps the id valid

    # ---------------------------------------------------------------------------------- hooks (subclass)
    def call(self, func, args: tuple):
        """REDUCE, INST and OBJ: the result of func(*args)."""
        raise pickle.UnpicklingError(f"the pickle calls {brief(func)}")

    def new(self, cls, args: tuple, kwargs: dict):
        """NEWOBJ and NEWOBJ_EX: cls.__new__(cls, *args, **kwargs)."""
        raise pickle.UnpicklingError(f"the pickle instantiates {brief(cls)}")

    def check_build(self, inst, state) -> None:
        """BUILD: raise unless `inst` may take `state`."""
        raise pickle.UnpicklingError(f"the pickle sets the state of a {type(inst).__name__}")

    def fillable(self, obj, kind: type) -> bool:
        """May APPEND(S) (kind list), SETITEM(S) (dict) or ADDITEMS (set) fill `obj`?"""
        return isinstance(obj, kind)

    # ----------------------------------------------------------------------------------------- budgets
    def spend(self, elements: int) -> None:
        """Charge a copy of `elements` container elements against the pickle's element budget."""
        self._elements -= elements
        if self._elements < 0:
            raise pickle.UnpicklingError("the pickle copies more data than its size allows")

    def check_hashable(self, obj) -> None:
        """Raise unless hashing `obj` is cheap: hash() recurses through tuples and frozensets (a tuple of
        shared references costs its expanded size, a deep one overflows the C stack)."""
        cost, depth = self._measure(obj)
        if depth > MAX_DEPTH:
            raise pickle.UnpicklingError(f"the pickle hashes an object nested more than {MAX_DEPTH} deep")
        self._hash_left -= cost
        if self._hash_left < 0:
            raise pickle.UnpicklingError("the pickle's dict keys and set members take too long to hash "
                                         "(shared references expand exponentially)")

    def _measure(self, obj) -> tuple[int, int]:
        # iterative post-order over the tuples/frozensets below obj, each distinct one measured once
        if not isinstance(obj, (tuple, frozenset)):
            return 1, 0
        if id(obj) in self._measured:
            return self._measured[id(obj)][1]
        cap = HASH_BUDGET + 1  # costs saturate here: only "too expensive" matters beyond it
        todo = [(obj, False)]
        while todo:
            node, children_done = todo.pop()
            if id(node) in self._measured:
                continue
            inner = [c for c in node if isinstance(c, (tuple, frozenset))]
            if not children_done:
                todo.append((node, True))
                todo.extend((c, False) for c in inner if id(c) not in self._measured)
                continue
            cost, depth = 1 + len(node) - len(inner), 0
            for child in inner:
                child_cost, child_depth = self._measured[id(child)][1]
                cost, depth = min(cost + child_cost, cap), max(depth, child_depth)
            self._measured[id(node)] = (node, (cost, depth + 1))
        return self._measured[id(obj)][1]

    # -------------------------------------------------------------------------------------- opcodes
    def load(self):
        obj = super().load()
        check_nesting(obj, self.contents)
        return obj

    def contents(self, obj):
        """The objects `obj` holds, for the nesting check (None for a leaf)."""
        if isinstance(obj, (list, tuple, set, frozenset)):
            return obj
        if isinstance(obj, dict):
            return [*obj.keys(), *obj.values()]
        return None

    def _memo_check(self):
        if len(self.memo) > MAX_MEMO:
            raise pickle.UnpicklingError(f"the pickle memoizes more than {MAX_MEMO} objects")

    def _wrap_memo(put):
        def bounded(self):
            put(self)
            self._memo_check()
        return bounded

    for _op in (pickle.PUT, pickle.BINPUT, pickle.LONG_BINPUT, pickle.MEMOIZE):
        dispatch[_op[0]] = _wrap_memo(_BASE[_op[0]])

    def load_mark(self):
        if len(self.metastack) >= MAX_DEPTH:
            raise pickle.UnpicklingError(f"the pickle nests MARKs more than {MAX_DEPTH} deep")
        super().load_mark()
    dispatch[pickle.MARK[0]] = load_mark

    def _target(self, kind: type):
        target = self.stack[-1]
        if not self.fillable(target, kind):
            raise pickle.UnpicklingError(f"the pickle fills a {type(target).__name__} as a {kind.__name__}")
        return target

    def load_append(self):
        value = self.stack.pop()
        self._target(list).append(value)
    dispatch[pickle.APPEND[0]] = load_append

    def load_appends(self):
        items = self.pop_mark()
        target = self._target(list)
        extend = getattr(target, "extend", None)
        if extend is not None:
            extend(items)
        else:
            for item in items:
                target.append(item)
    dispatch[pickle.APPENDS[0]] = load_appends

    def _set_items(self, target, items):
        if len(items) % 2:
            raise pickle.UnpicklingError("the pickle sets a dict item without a value")
        for i in range(0, len(items), 2):
            self.check_hashable(items[i])
            target[items[i]] = items[i + 1]

    def load_setitem(self):
        value, key = self.stack.pop(), self.stack.pop()
        self._set_items(self._target(dict), [key, value])
    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self):
        items = self.pop_mark()
        self._set_items(self._target(dict), items)
    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_dict(self):
        items = self.pop_mark()
        result = {}
        self._set_items(result, items)
        self.append(result)
    dispatch[pickle.DICT[0]] = load_dict

    def load_additems(self):
        items = self.pop_mark()
        target = self._target(set)
        for item in items:
            self.check_hashable(item)
        target.update(items)
    dispatch[pickle.ADDITEMS[0]] = load_additems

    def load_frozenset(self):
        items = self.pop_mark()
        for item in items:
            self.check_hashable(item)
        self.append(frozenset(items))
    dispatch[pickle.FROZENSET[0]] = load_frozenset

    def load_reduce(self):
        args = self.stack.pop()
        if not isinstance(args, tuple):
            raise pickle.UnpicklingError(f"REDUCE arguments must be a tuple, got a {type(args).__name__}")
        self.stack[-1] = self.call(self.stack[-1], args)
    dispatch[pickle.REDUCE[0]] = load_reduce

    def _instantiate(self, klass, args):  # INST and OBJ
        self.append(self.call(klass, tuple(args)))

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        if not isinstance(args, tuple):
            raise pickle.UnpicklingError(f"NEWOBJ arguments must be a tuple, got a {type(args).__name__}")
        self.append(self.new(cls, args, {}))
    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        if not (isinstance(args, tuple) and isinstance(kwargs, dict) and all(type(k) is str for k in kwargs)):
            raise pickle.UnpicklingError("NEWOBJ_EX needs a tuple and a dict with str keys")
        self.append(self.new(cls, args, kwargs))
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def load_build(self):
        self.check_build(self.stack[-2], self.stack[-1])
        _BASE[pickle.BUILD[0]](self)
    dispatch[pickle.BUILD[0]] = load_build

    del _op, _wrap_memo


def check_nesting(obj, contents) -> None:
    """Raise UnpicklingError when `obj` nests containers more than MAX_DEPTH deep. Iterative, each object
    visited once (the longest path below it memoized), so neither depth nor sharing can blow it up.
    `contents(x)` gives what x holds (None for a leaf)."""
    depth_of = {}  # id -> longest path below, for finished objects
    on_path = set()
    todo = [(obj, None)]  # (object, its children once expanded)
    while todo:
        node, children = todo[-1]
        key = id(node)
        if children is None:
            held = contents(node)
            if held is None or key in depth_of or key in on_path:  # a leaf, done, or a cycle back-edge
                todo.pop()
                continue
            on_path.add(key)
            if len(on_path) > MAX_DEPTH:
                raise pickle.UnpicklingError(f"the pickle nests containers more than {MAX_DEPTH} deep")
            children = [c for c in held if contents(c) is not None]
            todo[-1] = (node, children)
            todo.extend((c, None) for c in children)
            continue
        todo.pop()
        on_path.discard(key)
        depth = 1 + max((depth_of.get(id(c), 0) for c in children), default=0)
        if depth > MAX_DEPTH:
            raise pickle.UnpicklingError(f"the pickle nests containers more than {MAX_DEPTH} deep")
        depth_of[key] = depth


def load_bounded(make_unpickler, file, max_bytes: int):
    """Unpickle the pickle at `file`'s position, reading at most `max_bytes` for it; the file is left just
    after the pickle. `make_unpickler(buffer, n_bytes)` builds the (Bounded)Unpickler over an in-memory copy."""
    max_bytes = max(0, max_bytes)
    start = file.tell()
    data = file.read(max_bytes + 1)
    cut = len(data) > max_bytes
    buffer = io.BytesIO(data[:max_bytes])
    try:
        obj = make_unpickler(buffer, len(data)).load()
    except Exception as err:  # noqa: BLE001 (re-raised unless it is the bound that cut the pickle)
        if cut and buffer.tell() >= max_bytes:  # ran into the bound, not into a real end
            raise pickle.UnpicklingError(f"the pickle is longer than the {max_bytes} bytes allowed for "
                                         "it (in proportion to the tensor data the file holds)") from err
        raise
    file.seek(start + buffer.tell())
    return obj
