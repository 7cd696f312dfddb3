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

MAX_DEPTH = 256  # real checkpoints nest < 30 levels (Lightning dicts, omegaconf configs); C recursion is safe
MAX_MEMO = 1 << 20  # memo entries; a full SDXL training checkpoint with optimizer state needs ~90,000
HASH_BUDGET = 1 << 22  # objects visited by hash() over a whole load; real keys are strings (1 each)
PICKLE_FLOOR = 2 << 20  # bytes a pickle may span whatever the file holds; real data.pkl: 0.1-1 MB
PICKLE_PER_DATA_BYTE = 1 / 4096  # ... plus this much per byte of tensor data the file holds (SD v1: 0.03%)

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
        # iterative post-order over the tuples/frozensets below obj, each distinct one measured once; a path
        # longer than MAX_DEPTH is refused as soon as it is seen
        containers = (tuple, frozenset)
        if not isinstance(obj, containers):
            return 1, 0
        if id(obj) in self._measured:
            return self._measured[id(obj)][1]
        cap = HASH_BUDGET + 1  # costs saturate here: beyond it only "too expensive" matters
        todo = [(obj, 1, False)]
        while todo:
            node, level, expanded = todo.pop()
            if id(node) in self._measured:
                continue
            if level > MAX_DEPTH:
                raise pickle.UnpicklingError(f"the pickle hashes an object nested more than {MAX_DEPTH} deep")
            if not expanded:
                todo.append((node, level, True))
                todo.extend((c, level + 1, False) for c in node
                            if isinstance(c, containers) and id(c) not in self._measured)
                continue
            cost, depth = 1, 0
            for child in node:
                if isinstance(child, containers):
                    child_cost, child_depth = self._measured[id(child)][1]
                    cost, depth = min(cost + child_cost, cap), max(depth, child_depth)
                else:
                    cost += 1
            self._measured[id(node)] = (node, (cost, depth + 1))
        return self._measured[id(obj)][1]

    # -------------------------------------------------------------------------------------- opcodes
    container_kinds = (list, tuple, dict, set, frozenset)  # what the nesting check walks into

    def load(self):
        obj = super().load()
        if isinstance(obj, self.container_kinds):
            check_nesting(obj, self.contents, self.container_kinds)
        return obj

    def contents(self, obj):
        """The objects a container holds, for the nesting check."""
        return [*obj.keys(), *obj.values()] if isinstance(obj, dict) else obj

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


# Checks of the arguments of the builtins a subclass may let REDUCE call (its `call` hook): each keeps the
# call's work in proportion to the pickle, copies charged against the element budget, members that will be
# hashed measured first. `unpickler` is the BoundedUnpickler, `args` the REDUCE arguments.
def _one_argument(args, what):
    if len(args) > 1:
        raise pickle.UnpicklingError(f"{what}() called with {len(args)} arguments")
    return args[0] if args else ()


def dict_arguments(unpickler, args):
    items = _one_argument(args, "dict")
    if isinstance(items, dict):
        keys = list(items)
    elif isinstance(items, (list, tuple)):  # pairs; anything else makes dict() raise
        keys = [pair[0] for pair in items if isinstance(pair, (list, tuple)) and len(pair) == 2]
    else:
        raise pickle.UnpicklingError(f"the pickle builds a dict from a {type(items).__name__}")
    unpickler.spend(len(items))
    for key in keys:
        unpickler.check_hashable(key)


def set_arguments(unpickler, args):
    items = _one_argument(args, "set")
    if not isinstance(items, (list, tuple, set, frozenset, dict)):
        raise pickle.UnpicklingError(f"the pickle builds a set from a {type(items).__name__}")
    unpickler.spend(len(items))
    for item in items:
        unpickler.check_hashable(item)


def copy_arguments(unpickler, args):
    unpickler.spend(sum(len(a) for a in args if isinstance(a, (str, bytes, list, tuple, dict, set, frozenset))))


def bytes_arguments(unpickler, args):
    if args and isinstance(args[0], int):  # bytes(n) allocates n zero bytes
        raise pickle.UnpicklingError("the pickle calls bytes() with a size")
    copy_arguments(unpickler, args)


BUILTIN_ARGUMENT_CHECKS = {dict: dict_arguments, set: set_arguments, frozenset: set_arguments, list: copy_arguments,
                           tuple: copy_arguments, bytes: bytes_arguments}


def check_nesting(obj, contents, kinds: tuple = (list, tuple, dict, set, frozenset)) -> None:
    """Raise UnpicklingError when `obj` nests containers more than MAX_DEPTH deep. Iterative, each container
    expanded once (the longest path below it memoized), so neither depth nor sharing can blow it up; empty
    containers and containers of leaves are not stored. `kinds`: the container types (an empty one is falsy),
    `contents(x)` what a container holds."""
    depth_of = {}  # id -> longest path below, for finished containers that hold containers
    on_path = set()
    todo = [(obj, None)]  # (container, its non-empty container children once expanded)
    while todo:
        node, children = todo.pop()
        key = id(node)
        if children is None:
            if key in depth_of or key in on_path:  # done, or a cycle's back edge
                continue
            children = [c for c in contents(node) if isinstance(c, kinds) and c]
            if not children:
                continue
            on_path.add(key)
            if len(on_path) > MAX_DEPTH:
                raise pickle.UnpicklingError(f"the pickle nests containers more than {MAX_DEPTH} deep")
            todo.append((node, children))
            todo.extend((c, None) for c in children)
            continue
        on_path.discard(key)
        depth = 1 + max(depth_of.get(id(c), 1) for c in children)
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
