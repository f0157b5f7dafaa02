"""Typed tables of cached activations: what a recorded block input refers to, and the two chains the walk holds.

A block input is either a slot (a tensor recorded from the teacher, named by an opaque string key such as "s0.1")
or an output of an earlier block in the same model call (`Out(block, index)`). A table maps these references to
(M, ...) tensors, one row per calibration point. The block-wise walk holds two tables (`Chains`): the
full-precision chain, and the quantized chain of calibrated blocks (sequential mode); both share the slot tensors.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Out:
    """Output `index` of block `block` (in the order calib.calls.flatten lists the block's return value)."""

    block: int
    index: int


def ref_of(node):
    """The table reference of a recorded wiring leaf: {"slot": key} -> key, {"out": [block, k]} -> Out."""
    return node["slot"] if "slot" in node else Out(*node["out"])


def ref_name(ref):
    """A reference as text, for the state files: slot keys as they are, outputs as "o<block>.<index>"."""
    return f"o{ref.block}.{ref.index}" if isinstance(ref, Out) else ref


def parse_ref(name):
    """The inverse of ref_name (recorded slot keys start with "s", so "o..." names are outputs)."""
    if name.startswith("o"):
        block, _, index = name[1:].partition(".")
        return Out(int(block), int(index))
    return name


@dataclass
class Chains:
    """The tables of the block-wise walk: `fp` (the FP chain) and `q` (the quantized chain; None when every block
    trains on FP inputs). Both start as the recorded slots; block outputs join them as the walk goes."""

    fp: dict
    q: dict | None = None

    @classmethod
    def from_slots(cls, slots, sequential):
        return cls(dict(slots), dict(slots) if sequential else None)

    @property
    def tables(self):
        return {"fp": self.fp} if self.q is None else {"fp": self.fp, "q": self.q}

    def slots(self):
        """The recorded slots (the entries that are not block outputs)."""
        return {ref: t for ref, t in self.fp.items() if not isinstance(ref, Out)}

    def to_tensors(self):
        """One flat {name: tensor} for safetensors: "<table>/<ref>", a tensor both tables hold (a slot) stored once
        as "shared/<ref>"."""
        out, tables = {}, self.tables
        for name, table in tables.items():
            for ref, t in table.items():
                shared = len(tables) > 1 and all(other.get(ref) is t for other in tables.values())
                out[f"shared/{ref_name(ref)}" if shared else f"{name}/{ref_name(ref)}"] = t
        return out

    @classmethod
    def from_tensors(cls, tensors, sequential):
        """The inverse of to_tensors (a shared tensor becomes one object in each table)."""
        chains = cls({}, {} if sequential else None)
        for flat, t in tensors.items():
            where, _, name = flat.partition("/")
            for table_name, table in chains.tables.items():
                if where in ("shared", table_name):
                    table[parse_ref(name)] = t
        return chains

    def advance(self, block, targets, q_outs, dying, release):
        """Block `block`'s FP outputs (`targets`) and quantized outputs join their tables; the references in `dying`
        (read by no later block) leave them, and `release(tensor)` frees each tensor no table holds any more."""
        for k, t in enumerate(targets):
            self.fp[Out(block, k)] = t
        for k, t in enumerate(q_outs or []):
            self.q[Out(block, k)] = t
        removed = [table.pop(ref) for table in self.tables.values() for ref in dying if ref in table]
        alive = {id(t) for table in self.tables.values() for t in table.values()}
        released = set()
        for t in removed:
            if id(t) not in alive and id(t) not in released:
                release(t)
                released.add(id(t))
