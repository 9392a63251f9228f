#!/usr/bin/env python3
"""Retarget Java 11+ class files to Java 8 (class version 52) so that Debian's ``dx`` dexes them.

ONNX Runtime's Android AAR (npm ``com.github.asus4.onnxruntime``) ships Java 17 class files. ``dx``
reads class versions up to 52 only, and three Java 11+ features in those files would break on a
device once the version byte is lowered:

- nestmates: a nested class reads a private member of its outer class (or the reverse) directly,
  with no synthetic accessor. ART refuses such private access across classes, so every private
  member that another class of the jar references loses ``ACC_PRIVATE`` (becomes package-private,
  same package), and a same-class ``invokespecial`` of such a method becomes ``invokevirtual``.
  A de-privatised method that a class of the jar would then override is an error (not silently
  changed behaviour).
- ``NestHost``/``NestMembers`` (and other post-8 class attributes) are dropped.
- lambdas (``invokedynamic`` + ``LambdaMetafactory``): Android has no ``LambdaMetafactory``. Each
  non-capturing lambda whose body is a static method becomes ``getstatic Holder.INSTANCE`` of a
  generated holder class (Java source written next to the output, compiled by the caller), which
  calls the lambda's body. Anything else (capturing lambdas, string-concat factories) is an error.

Usage: retarget_classes.py IN_DIR OUT_DIR HOLDER_SRC_DIR  (IN_DIR: an unpacked classes.jar).
Only the standard library; stdout lists what was changed.
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass
from pathlib import Path

ACC_PRIVATE, ACC_STATIC, ACC_INTERFACE, ACC_SYNTHETIC = 0x0002, 0x0008, 0x0200, 0x1000
DROP_ATTRS = {"NestHost", "NestMembers", "Record", "PermittedSubclasses", "Module", "ModulePackages", "ModuleMainClass"}
LAMBDA_BSM = ("java/lang/invoke/LambdaMetafactory", "metafactory")


class ClassFile:
    """A parsed class file; constant pool as a list of (tag, payload) with index 0 unused."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        if data[:4] != b"\xca\xfe\xba\xbe":
            raise ValueError("not a class file")
        self.minor, self.major = struct.unpack(">HH", data[4:8])
        n = struct.unpack(">H", data[8:10])[0]
        pos, self.cp = 10, [None] * n
        i = 1
        while i < n:
            tag = data[pos]
            if tag == 1:
                ln = struct.unpack(">H", data[pos + 1 : pos + 3])[0]
                self.cp[i] = (1, data[pos + 3 : pos + 3 + ln].decode("utf-8", "surrogatepass"))
                pos += 3 + ln
            elif tag in (3, 4):
                self.cp[i] = (tag, data[pos + 1 : pos + 5]); pos += 5
            elif tag in (5, 6):
                self.cp[i] = (tag, data[pos + 1 : pos + 9]); pos += 9; i += 1
            elif tag in (7, 8, 16, 19, 20):
                self.cp[i] = (tag, struct.unpack(">H", data[pos + 1 : pos + 3]))
                pos += 3
            elif tag in (9, 10, 11, 12, 17, 18):
                self.cp[i] = (tag, struct.unpack(">HH", data[pos + 1 : pos + 5])); pos += 5
            elif tag == 15:
                self.cp[i] = (15, (data[pos + 1], struct.unpack(">H", data[pos + 2 : pos + 4])[0])); pos += 4
            else:
                raise ValueError(f"constant pool tag {tag} unknown")
            i += 1
        self.access, self.this, self.super = struct.unpack(">HHH", data[pos : pos + 6]); pos += 6
        ni = struct.unpack(">H", data[pos : pos + 2])[0]; pos += 2
        self.interfaces = list(struct.unpack(f">{ni}H", data[pos : pos + 2 * ni])); pos += 2 * ni
        self.fields, pos = self._members(pos)
        self.methods, pos = self._members(pos)
        self.attrs, pos = self._attrs(pos)
        if pos != len(data):
            raise ValueError("trailing bytes")

    def _attrs(self, pos: int) -> tuple[list, int]:
        n = struct.unpack(">H", self.data[pos : pos + 2])[0]; pos += 2
        out = []
        for _ in range(n):
            name, ln = struct.unpack(">HI", self.data[pos : pos + 6])
            out.append([name, bytearray(self.data[pos + 6 : pos + 6 + ln])]); pos += 6 + ln
        return out, pos

    def _members(self, pos: int) -> tuple[list, int]:
        n = struct.unpack(">H", self.data[pos : pos + 2])[0]; pos += 2
        out = []
        for _ in range(n):
            acc, name, desc = struct.unpack(">HHH", self.data[pos : pos + 6])
            attrs, pos = self._attrs(pos + 6)
            out.append([acc, name, desc, attrs])
        return out, pos

    def utf(self, i: int) -> str:
        return self.cp[i][1]

    def class_name(self, i: int) -> str:
        return self.utf(self.cp[i][1][0])

    def ref(self, i: int) -> tuple[str, str, str]:
        """(owner, name, descriptor) of a Field/Method/InterfaceMethod ref."""
        cls, nat = self.cp[i][1]
        name, desc = self.cp[nat][1]
        return self.class_name(cls), self.utf(name), self.utf(desc)

    def add(self, entry) -> int:
        self.cp.append(entry)
        return len(self.cp) - 1

    def add_utf(self, s: str) -> int:
        for i, e in enumerate(self.cp):
            if e is not None and e[0] == 1 and e[1] == s:
                return i
        return self.add((1, s))

    def serialize(self) -> bytes:
        out = bytearray(b"\xca\xfe\xba\xbe") + struct.pack(">HHH", self.minor, self.major, len(self.cp))
        i = 1
        while i < len(self.cp):
            tag, v = self.cp[i]
            out.append(tag)
            if tag == 1:
                b = v.encode("utf-8", "surrogatepass")
                out += struct.pack(">H", len(b)) + b
            elif tag in (3, 4, 5, 6):
                out += v
                i += 1 if tag in (5, 6) else 0
            elif tag in (7, 8, 16, 19, 20):
                out += struct.pack(">H", *v)
            elif tag in (9, 10, 11, 12, 17, 18):
                out += struct.pack(">HH", *v)
            elif tag == 15:
                out += struct.pack(">BH", *v)
            i += 1
        out += struct.pack(">HHH", self.access, self.this, self.super)
        out += struct.pack(">H", len(self.interfaces)) + b"".join(struct.pack(">H", x) for x in self.interfaces)
        for members in (self.fields, self.methods):
            out += struct.pack(">H", len(members))
            for acc, name, desc, attrs in members:
                out += struct.pack(">HHH", acc, name, desc) + self._pack_attrs(attrs)
        return bytes(out + self._pack_attrs(self.attrs))

    @staticmethod
    def _pack_attrs(attrs: list) -> bytes:
        return struct.pack(">H", len(attrs)) + b"".join(struct.pack(">HI", n, len(b)) + bytes(b) for n, b in attrs)


def instructions(code: bytes):
    """(offset, opcode) of every instruction in a Code attribute's bytecode."""
    fixed = {0x10: 2, 0x11: 3, 0x12: 2, 0x13: 3, 0x14: 3, 0x84: 3, 0xa9: 2, 0xbc: 2, 0xb9: 5, 0xba: 5, 0xc5: 4, 0xc8: 5, 0xc9: 5}
    pos = 0
    while pos < len(code):
        op = code[pos]
        yield pos, op
        if op in fixed:
            pos += fixed[op]
        elif 0x15 <= op <= 0x19 or 0x36 <= op <= 0x3a:
            pos += 2
        elif 0x99 <= op <= 0xa8 or 0xb2 <= op <= 0xb8 or op in (0xbb, 0xbd, 0xc0, 0xc1, 0xc6, 0xc7):
            pos += 3
        elif op in (0xaa, 0xab):
            p = (pos + 4) & ~3
            if op == 0xaa:
                low, high = struct.unpack(">ii", code[p + 4 : p + 12])
                pos = p + 12 + 4 * (high - low + 1)
            else:
                pos = p + 8 + 8 * struct.unpack(">i", code[p + 4 : p + 8])[0]
        elif op == 0xc4:
            pos += 6 if code[pos + 1] == 0x84 else 4
        elif op <= 0xc3:
            pos += 1
        else:
            raise ValueError(f"opcode {op:#x} unknown")


JAVA_PRIM = {"Z": "boolean", "B": "byte", "C": "char", "S": "short", "I": "int", "J": "long", "F": "float", "D": "double", "V": "void"}


def parse_desc(desc: str) -> tuple[list[str], str]:
    """Method descriptor -> (parameter Java types, return Java type)."""
    def one(i: int) -> tuple[str, int]:
        dims = 0
        while desc[i] == "[":
            dims += 1; i += 1
        if desc[i] == "L":
            j = desc.index(";", i)
            t, i = desc[i + 1 : j].replace("/", ".").replace("$", "."), j + 1
        else:
            t, i = JAVA_PRIM[desc[i]], i + 1
        return t + "[]" * dims, i

    params, i = [], 1
    while desc[i] != ")":
        t, i = one(i)
        params.append(t)
    return params, one(i + 1)[0]


@dataclass
class Lambda:
    holder: str  # internal name
    iface: str  # internal name of the functional interface
    sam: str
    sam_desc: str
    impl_owner: str
    impl_name: str
    impl_desc: str


def holder_source(lam: Lambda) -> str:
    pkg, _, simple = lam.holder.rpartition("/")
    params, ret = parse_desc(lam.sam_desc)
    impl_params, impl_ret = parse_desc(lam.impl_desc)
    if len(params) != len(impl_params):
        raise ValueError(f"{lam.holder}: lambda arity differs from its body")
    args = ", ".join(f"{p} a{i}" for i, p in enumerate(params))
    call_args = ", ".join(f"({t}) a{i}" if t != p else f"a{i}" for i, (p, t) in enumerate(zip(params, impl_params)))
    call = f"{lam.impl_owner.replace('/', '.').replace('$', '.')}.{lam.impl_name}({call_args})"
    body = f"{call};" if ret == "void" else f"return {call};"
    iface = lam.iface.replace("/", ".").replace("$", ".")
    return (
        f"// Generated by android_demo/tools/retarget_classes.py: desugared non-capturing lambda.\n"
        f"package {pkg.replace('/', '.')};\n\n"
        f"@SuppressWarnings({{\"rawtypes\", \"unchecked\"}})\n"
        f"final class {simple} implements {iface} {{\n"
        f"    static final {simple} INSTANCE = new {simple}();\n"
        f"    public {ret} {lam.sam}({args}) {{\n"
        f"        try {{ {body} }} catch (Throwable t) {{ throw {simple}.<RuntimeException>rethrow(t); }}\n"
        f"    }}\n"
        f"    // the lambda's body may throw checked exceptions that the interface does not declare\n"
        f"    private static <T extends Throwable> RuntimeException rethrow(Throwable t) throws T {{ throw (T) t; }}\n"
        f"}}\n"
    )


def retarget(in_dir: Path, out_dir: Path, src_dir: Path) -> None:
    classes = {str(p.relative_to(in_dir))[:-6]: ClassFile(p.read_bytes()) for p in sorted(in_dir.rglob("*.class"))}
    for name, cf in classes.items():
        if cf.class_name(cf.this) != name:
            raise ValueError(f"{name}: file name and class name differ")
    # private members referenced from another class of the jar (nestmate access)
    cross: set[tuple[str, str, str]] = set()
    for name, cf in classes.items():
        for i, e in enumerate(cf.cp):
            if e is not None and e[0] in (9, 10, 11):
                owner, m, d = cf.ref(i)
                if owner != name and owner in classes:
                    cross.add((owner, m, d))
    lambdas: list[Lambda] = []
    for name, cf in classes.items():
        changed = []
        if cf.major > 52:
            changed.append(f"version {cf.major}->52")
            cf.major, cf.minor = 52, 0
        dropped = [cf.utf(n) for n, _ in cf.attrs if cf.utf(n) in DROP_ATTRS]
        cf.attrs = [a for a in cf.attrs if cf.utf(a[0]) not in DROP_ATTRS]
        if dropped:
            changed.append("dropped " + "/".join(dropped))
        opened: set[tuple[str, str]] = set()
        for kind, members in (("field", cf.fields), ("method", cf.methods)):
            for mem in members:
                key = (name, cf.utf(mem[1]), cf.utf(mem[2]))
                if mem[0] & ACC_PRIVATE and key in cross:
                    if cf.access & ACC_INTERFACE:
                        raise ValueError(f"{name}.{key[1]}: private interface member used by another class")
                    mem[0] &= ~ACC_PRIVATE
                    opened.add(key[1:])
                    changed.append(f"{kind} {key[1]} package-private")
        # bootstrap methods, for lambdas
        bsms = []
        for n, b in cf.attrs:
            if cf.utf(n) == "BootstrapMethods":
                count, p = struct.unpack(">H", b[:2])[0], 2
                for _ in range(count):
                    ref, nargs = struct.unpack(">HH", b[p : p + 4])
                    bsms.append((ref, list(struct.unpack(f">{nargs}H", b[p + 4 : p + 4 + 2 * nargs]))))
                    p += 4 + 2 * nargs
        for mem in cf.methods:
            for attr in mem[3]:
                if cf.utf(attr[0]) != "Code":
                    continue
                body = attr[1]
                code_len = struct.unpack(">I", body[4:8])[0]
                code = body[8 : 8 + code_len]
                for off, op in list(instructions(bytes(code))):
                    at = 8 + off
                    if op == 0xB7:  # invokespecial of a now package-private method of this class
                        owner, m, d = cf.ref(struct.unpack(">H", body[at + 1 : at + 3])[0])
                        if owner == name and m != "<init>" and (m, d) in opened:
                            body[at] = 0xB6
                            changed.append(f"invokespecial {m} -> invokevirtual")
                    elif op == 0xBA:
                        lam = _lambda(cf, name, struct.unpack(">H", body[at + 1 : at + 3])[0], bsms, len(lambdas))
                        lambdas.append(lam)
                        cls_i = cf.add((7, (cf.add_utf(lam.holder),)))
                        nat = cf.add((12, (cf.add_utf("INSTANCE"), cf.add_utf(f"L{lam.holder};"))))
                        field = cf.add((9, (cls_i, nat)))
                        body[at : at + 5] = bytes([0xB2]) + struct.pack(">H", field) + b"\x00\x00"  # getstatic; nop; nop
                        changed.append(f"lambda -> {lam.holder}")
                        if lam.impl_owner != name:
                            raise ValueError(f"{name}: lambda body in another class")
                        for other in cf.methods:
                            if cf.utf(other[1]) == lam.impl_name and cf.utf(other[2]) == lam.impl_desc:
                                other[0] &= ~(ACC_PRIVATE | ACC_SYNTHETIC)  # javac ignores synthetic methods
        if bsms:  # every invokedynamic was replaced (or we raised): no bootstrap data may remain for dx
            cf.attrs = [a for a in cf.attrs if cf.utf(a[0]) != "BootstrapMethods"]
            for i, e in enumerate(cf.cp):
                if e is not None and e[0] in (15, 16, 18):
                    cf.cp[i] = (1, "retargeted:unused")
        if changed:
            print(f"{name}: {'; '.join(dict.fromkeys(changed))}")
    _check_no_new_overrides(classes)
    for name, cf in classes.items():
        out = out_dir / f"{name}.class"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(cf.serialize())
    for lam in lambdas:
        src = src_dir / f"{lam.holder}.java"
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_text(holder_source(lam))
    print(f"{len(classes)} classes retargeted, {len(lambdas)} lambdas desugared")


def _lambda(cf: ClassFile, name: str, indy: int, bsms: list, n: int) -> Lambda:
    bsm_i, nat = cf.cp[indy][1]
    sam, site_desc = (cf.utf(x) for x in cf.cp[nat][1])
    ref, args = bsms[bsm_i]
    kind, target = cf.cp[ref][1]
    owner, m, _ = cf.ref(target)
    if (owner, m) != LAMBDA_BSM:
        raise ValueError(f"{name}: invokedynamic with bootstrap {owner}.{m} is not supported")
    if not site_desc.startswith("()"):
        raise ValueError(f"{name}: capturing lambda ({site_desc}) is not supported")
    sam_desc = cf.utf(cf.cp[args[0]][1][0])
    impl_kind, impl_ref = cf.cp[args[1]][1]
    if impl_kind != 6:  # REF_invokeStatic
        raise ValueError(f"{name}: lambda body of method-handle kind {impl_kind} is not supported")
    impl_owner, impl_name, impl_desc = cf.ref(impl_ref)
    iface = site_desc[3:-1]
    return Lambda(f"{name}$$Lambda{n}", iface, sam, sam_desc, impl_owner, impl_name, impl_desc)


def _check_no_new_overrides(classes: dict[str, ClassFile]) -> None:
    """A de-privatised method must not be overridden by (or override) a method of the same
    signature elsewhere in its hierarchy inside the jar: that would change which code runs."""
    def supers(name: str):
        while name in classes:
            cf = classes[name]
            name = cf.class_name(cf.super) if cf.super else None
            if name:
                yield name

    methods = {n: {(cf.utf(m[1]), cf.utf(m[2])): m[0] for m in cf.methods} for n, cf in classes.items()}
    for name in classes:
        for sup in supers(name):
            for sig, acc in methods.get(sup, {}).items():
                if sig in methods[name] and sig[0] != "<init>" and not acc & (ACC_STATIC | ACC_PRIVATE):
                    orig = ClassFile(classes[sup].data)
                    was_private = any(orig.utf(m[1]) == sig[0] and orig.utf(m[2]) == sig[1] and m[0] & ACC_PRIVATE for m in orig.methods)
                    if was_private:
                        raise ValueError(f"{name}.{sig[0]} would now override de-privatised {sup}.{sig[0]}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    retarget(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
