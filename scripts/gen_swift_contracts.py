#!/usr/bin/python3
"""Generates the Swift side of the contracts from a protobuf descriptor set.

Input: a FileDescriptorSet made by `protoc --include_imports
--include_source_info` over Protos/*.proto. Output:

  Sources/CContracts/arbiter_descriptors.c      one accessor per message, so
  Sources/CContracts/include/arbiter_descriptors.h  Swift gets stable pointers
  Sources/CContracts/include/CContracts.h       the umbrella header
  Sources/CContracts/include/module.modulemap   the module map naming it
  Sources/Contracts/Generated/<file>.swift      value types, enums, methods

The Swift value types are plain structs; their `read(from:)`/`write(to:)`
go through `ProtoReader`/`ProtoWriter` (Sources/Contracts/ProtoCodec.swift),
which walk protobuf-c's descriptors. Run it through
scripts/generate-contracts.sh, never by hand.
"""
import os
import re
import sys

from google.protobuf import descriptor_pb2

FD = descriptor_pb2.FieldDescriptorProto

# Proto package -> Swift namespace. Every package in Protos/ must be listed.
NAMESPACES = {
    "ttrpc": "TTRPC",
    "google.rpc": "GoogleRPC",
    "google.protobuf": "GoogleProtobuf",
    "grpc.health.v1": "HealthV1",
    "arbiter.common.v1": "CommonV1",
    "arbiter.echo.v1": "EchoV1",
    "arbiter.identity.v1": "IdentityV1",
    "arbiter.profile.v1": "ProfileV1",
    "arbiter.profile.store.v1": "ProfileStoreV1",
    "arbiter.decision.v1": "DecisionV1",
    "arbiter.routing.v1": "RoutingV1",
}

SWIFT_KEYWORDS = {"default", "case", "switch", "protocol", "extension", "class",
                  "struct", "enum", "func", "var", "let", "in", "is", "as",
                  "return", "self", "Self", "type", "init", "operator", "repeat",
                  "where", "while", "for", "if", "else", "do", "try", "throw",
                  "internal", "public", "private", "static", "import", "override"}

SCALARS = {
    FD.TYPE_INT32: ("Int32", "int32"), FD.TYPE_SINT32: ("Int32", "int32"),
    FD.TYPE_SFIXED32: ("Int32", "int32"), FD.TYPE_INT64: ("Int64", "int64"),
    FD.TYPE_SINT64: ("Int64", "int64"), FD.TYPE_SFIXED64: ("Int64", "int64"),
    FD.TYPE_UINT32: ("UInt32", "uint32"), FD.TYPE_FIXED32: ("UInt32", "uint32"),
    FD.TYPE_UINT64: ("UInt64", "uint64"), FD.TYPE_FIXED64: ("UInt64", "uint64"),
    FD.TYPE_FLOAT: ("Float", "float"), FD.TYPE_DOUBLE: ("Double", "double"),
    FD.TYPE_BOOL: ("Bool", "bool"), FD.TYPE_STRING: ("String", "string"),
    FD.TYPE_BYTES: ("[UInt8]", "bytes"),
}


def camel(name, upper=False):
    parts = [p for p in name.split("_") if p]
    if not parts:
        return name
    out = parts[0].lower() if not upper else parts[0][:1].upper() + parts[0][1:]
    for p in parts[1:]:
        out += p[:1].upper() + p[1:]
    return out


def ident(name):
    return "`%s`" % name if name in SWIFT_KEYWORDS else name


def c_lower(name):
    """protoc-c's CamelCase -> lower_case conversion for one name component."""
    out = ""
    for i, ch in enumerate(name):
        if ch.isupper():
            if i > 0:
                out += "_"
            out += ch.lower()
        else:
            out += ch
    return out


def enum_case_name(enum_name, value_name):
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum_name).upper() + "_"
    name = value_name[len(prefix):] if value_name.startswith(prefix) else value_name
    if name and name[0].isdigit():
        name = "v" + name
    return ident(camel(name.lower()))


class Gen:
    def __init__(self, fset):
        self.files = list(fset.file)
        self.types = {}      # ".pkg.Msg" -> (swift name, DescriptorProto or EnumDescriptorProto, file, c symbol)
        self.comments = {}   # (file name, path tuple) -> comment
        for f in self.files:
            ns = NAMESPACES.get(f.package)
            if ns is None:
                sys.exit("gen_swift_contracts: package %r has no Swift namespace; add it to NAMESPACES" % f.package)
            for loc in f.source_code_info.location:
                if loc.leading_comments:
                    self.comments[(f.name, tuple(loc.path))] = loc.leading_comments
            cprefix = "__".join(f.package.split(".")) + "__" if f.package else ""
            for i, m in enumerate(f.message_type):
                self._register_message(f, m, "." + f.package, ns, cprefix, (4, i))
            for i, e in enumerate(f.enum_type):
                self.types["." + f.package + "." + e.name] = (ns + "." + e.name, e, f, None, (5, i))

    def _register_message(self, f, m, scope, swift_scope, cprefix, path):
        full = scope + "." + m.name
        swift = swift_scope + "." + type_ident(m.name)
        csym = cprefix + c_lower(m.name)
        self.types[full] = (swift, m, f, csym, path)
        for i, n in enumerate(m.nested_type):
            self._register_message(f, n, full, swift, csym + "__", path + (3, i))
        for i, e in enumerate(m.enum_type):
            self.types[full + "." + e.name] = (swift + "." + e.name, e, f, None, path + (4, i))

    def doc(self, f, path, indent):
        text = self.comments.get((f.name, tuple(path)))
        if not text:
            return ""
        lines = text.rstrip("\n").split("\n")
        return "".join("%s///%s\n" % (indent, (" " + l.strip()) if l.strip() else "") for l in lines)

    def is_map(self, field):
        if field.type != FD.TYPE_MESSAGE or field.label != FD.LABEL_REPEATED:
            return False
        return self.types[field.type_name][1].options.map_entry

    def field_type(self, field):
        """(swift element type, reader kind) for a field's element."""
        if field.type in SCALARS:
            return SCALARS[field.type]
        if field.type == FD.TYPE_ENUM:
            return self.types[field.type_name][0], "enum"
        if field.type == FD.TYPE_MESSAGE:
            return self.types[field.type_name][0], "message"
        sys.exit("unsupported field type %s" % field.type)

    def default_value(self, swift_type, kind):
        return {"string": '""', "bytes": "[]", "bool": "false", "enum": "%s(rawValue: 0)" % swift_type}.get(kind, "0")

    # -- Swift ------------------------------------------------------------

    def swift_file(self, f):
        ns = NAMESPACES[f.package]
        out = ["// Generated by scripts/generate-contracts.sh from Protos/%s. Do not edit." % f.name, "",
               "internal import CContracts", ""]
        body = []
        for i, e in enumerate(f.enum_type):
            body += self.swift_enum(f, e, f.package + "." + e.name, (5, i), "    ")
        for i, m in enumerate(f.message_type):
            body += self.swift_message(f, m, "." + f.package + "." + m.name, (4, i), "    ")
        for i, s in enumerate(f.service):
            body += self.swift_service(f, s, (6, i), "    ")
        out.append("extension %s {" % ns)
        out += body
        out.append("}")
        out.append("")
        return "\n".join(out)

    def swift_enum(self, f, e, proto_name, path, ind):
        name = e.name
        out = [""]
        d = self.doc(f, path, ind)
        if d:
            out.append(d.rstrip("\n"))
        out.append("%spublic struct %s: ProtoEnum {" % (ind, name))
        out.append("%s    public var rawValue: Int32" % ind)
        out.append("%s    public init(rawValue: Int32) { self.rawValue = rawValue }" % ind)
        cases = []
        for j, v in enumerate(e.value):
            case = enum_case_name(name, v.name)
            vd = self.doc(f, path + (2, j), ind + "    ")
            if vd:
                out.append(vd.rstrip("\n"))
            out.append("%s    public static let %s = %s(rawValue: %d)" % (ind, case, name, v.number))
            cases.append((v.name, v.number))
        out.append("%s    public static let protoName = \"%s\"" % (ind, proto_name))
        out.append("%s    public static let valueNames: [(name: String, rawValue: Int32)] = [%s]" % (
            ind, ", ".join('("%s", %d)' % c for c in cases)))
        out.append("%s}" % ind)
        return out

    def swift_message(self, f, m, full, path, ind):
        if m.options.map_entry:
            return []
        swift, _, _, csym, _ = self.types[full]
        name = m.name
        out = [""]
        d = self.doc(f, path, ind)
        if d:
            out.append(d.rstrip("\n"))
        out.append("%spublic struct %s: ProtoMessage {" % (ind, type_ident(name)))
        i2 = ind + "    "
        # oneofs: single-member ones (presence) become optionals, others enums.
        oneof_members = {}
        for idx, field in enumerate(m.field):
            if field.HasField("oneof_index"):
                oneof_members.setdefault(field.oneof_index, []).append((idx, field))
        multi = {k: v for k, v in oneof_members.items() if len(v) > 1}
        props = []   # (decl lines, read line, write line)
        for idx, field in enumerate(m.field):
            fpath = path + (2, idx)
            fd = self.doc(f, fpath, i2)
            pname = ident(camel(field.name))
            etype, kind = self.field_type(field)
            if field.HasField("oneof_index") and field.oneof_index in multi:
                continue
            if self.is_map(field):
                entry = self.types[field.type_name][1]
                kt, kk = self.field_type(entry.field[0])
                vt, vk = self.field_type(entry.field[1])
                decl = "public var %s: [%s: %s] = [:]" % (pname, kt, vt)
                if vk == "message":
                    value_read = "try $0.messageValue(2) ?? %s()" % vt
                    value_write = "$0.setMessage(2, $2)"
                else:
                    value_read = "$0.%s(2)" % vk
                    value_write = "$0.set%s(2, $2)" % self.setter(vk)
                read = "%s = try reader.map(%d) { ($0.%s(1), %s) }" % (pname, field.number, kk, value_read)
                write = "writer.setMap(%d, %s) { $0.set%s(1, $1); %s }" % (
                    field.number, pname, self.setter(kk), value_write)
            elif field.label == FD.LABEL_REPEATED:
                decl = "public var %s: [%s] = []" % (pname, etype)
                if kind == "message":
                    read = "%s = try reader.messages(%d)" % (pname, field.number)
                elif kind == "enum":
                    read = "%s = reader.enums(%d)" % (pname, field.number)
                else:
                    read = "%s = reader.repeated%s(%d)" % (pname, self.setter(kind), field.number)
                write = "writer.setRepeated%s(%d, %s)" % ("Messages" if kind == "message" else ("Enums" if kind == "enum" else self.setter(kind)), field.number, pname)
            elif kind == "message" or field.HasField("oneof_index"):
                decl = "public var %s: %s? = nil" % (pname, etype)
                if kind == "message":
                    read = "%s = try reader.messageValue(%d)" % (pname, field.number)
                    write = "if let v = %s { writer.setMessage(%d, v) }" % (pname, field.number)
                else:
                    read = "%s = reader.has(%d) ? reader.%s(%d) : nil" % (pname, field.number, kind, field.number)
                    write = "if let v = %s { writer.set%s(%d, v) }" % (pname, self.setter(kind), field.number)
            else:
                decl = "public var %s: %s = %s" % (pname, etype, self.default_value(etype, kind))
                read = "%s = reader.%s(%d)" % (pname, kind, field.number)
                write = "writer.set%s(%d, %s)" % (self.setter(kind), field.number, pname)
            props.append((fd, decl, read, write))
        for oi, members in sorted(multi.items()):
            oname = m.oneof_decl[oi].name
            tname = "OneOf" + camel(oname, upper=True)
            pname = ident(camel(oname))
            enum_lines = ["public enum %s: Sendable, Hashable {" % tname]
            reads = []
            writes = ["switch %s {" % pname]
            for idx, field in members:
                etype, kind = self.field_type(field)
                cname = ident(camel(field.name))
                enum_lines.append("    case %s(%s)" % (cname, etype))
                if kind == "message":
                    reads.append("if reader.has(%d), let v: %s = try reader.messageValue(%d) { %s = .%s(v) }" % (
                        field.number, etype, field.number, pname, cname))
                    writes.append("case .%s(let v)?: writer.setMessage(%d, v)" % (cname, field.number))
                else:
                    reads.append("if reader.has(%d) { %s = .%s(reader.%s(%d)) }" % (field.number, pname, cname, kind, field.number))
                    writes.append("case .%s(let v)?: writer.set%s(%d, v)" % (cname, self.setter(kind), field.number))
            writes.append("case nil: break")
            writes.append("}")
            enum_lines.append("}")
            od = self.doc(f, path + (8, oi), i2)
            props.append((od, "\n".join(enum_lines) + "\n" + i2 + "public var %s: %s? = nil" % (pname, tname),
                          "\n".join(reads), "\n".join(writes)))
        for fd, decl, _, _ in props:
            if fd:
                out.append(fd.rstrip("\n"))
            out += [i2 + l if not l.startswith(i2) else l for l in decl.split("\n")]
        # nested enums and messages
        for j, e in enumerate(m.enum_type):
            out += self.swift_enum(f, e, full[1:] + "." + e.name, path + (4, j), i2)
        for j, n in enumerate(m.nested_type):
            out += self.swift_message(f, n, full + "." + n.name, path + (3, j), i2)
        out.append("")
        out.append("%spublic static let protoName = \"%s\"" % (i2, full[1:]))
        out.append("%spublic static let protoDescriptor = ProtoDescriptor(%s__descriptor_ptr())" % (i2, csym))
        out.append("%spublic init() {}" % i2)
        if props:
            out.append("%spublic init(reader: ProtoReader) throws {" % i2)
            for _, _, read, _ in props:
                out += [i2 + "    " + l for l in read.split("\n")]
            out.append("%s}" % i2)
            out.append("%spublic func write(to writer: ProtoWriter) {" % i2)
            for _, _, _, write in props:
                out += [i2 + "    " + l for l in write.split("\n")]
            out.append("%s}" % i2)
        else:
            out.append("%spublic init(reader: ProtoReader) throws {}" % i2)
            out.append("%spublic func write(to writer: ProtoWriter) {}" % i2)
        out.append("%s}" % ind)
        return out

    @staticmethod
    def setter(kind):
        return kind[:1].upper() + kind[1:]

    def swift_service(self, f, s, path, ind):
        full = (f.package + "." if f.package else "") + s.name
        out = [""]
        d = self.doc(f, path, ind)
        if d:
            out.append(d.rstrip("\n"))
        out.append("%spublic enum %s {" % (ind, s.name))
        out.append('%s    public static let name = "%s"' % (ind, full))
        names = []
        for j, m in enumerate(s.method):
            inp = self.types[m.input_type][0]
            outp = self.types[m.output_type][0]
            idem = m.options.idempotency_level in (descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS,
                                                    descriptor_pb2.MethodOptions.IDEMPOTENT)
            md = self.doc(f, path + (2, j), ind + "    ")
            if md:
                out.append(md.rstrip("\n"))
            mname = m.name[:1].lower() + m.name[1:]
            out.append('%s    public static let %s = MethodDescriptor<%s, %s>(service: name, method: "%s", isIdempotent: %s)' % (
                ind, ident(mname), inp, outp, m.name, "true" if idem else "false"))
            names.append(ident(mname))
        out.append("%s    public static let methods: [any AnyMethodDescriptor] = [%s]" % (ind, ", ".join(names)))
        out.append("%s}" % ind)
        return out

    # -- C accessors ------------------------------------------------------

    def c_accessors(self):
        syms = sorted(t[3] for t in self.types.values() if t[3] is not None)
        h = ["/* Generated by scripts/generate-contracts.sh. Do not edit. */",
             "#ifndef ARBITER_DESCRIPTORS_H", "#define ARBITER_DESCRIPTORS_H", "",
             "#include <protobuf-c/protobuf-c.h>", ""]
        c = ["/* Generated by scripts/generate-contracts.sh. Do not edit. */",
             '#include "arbiter_descriptors.h"']
        headers = sorted(set(os.path.splitext(f.name)[0] + ".pb-c.h" for f in self.files))
        for hd in headers:
            c.append('#include "%s"' % hd)
        c.append("")
        for s in syms:
            h.append("const ProtobufCMessageDescriptor *%s__descriptor_ptr(void);" % s)
            c.append("const ProtobufCMessageDescriptor *%s__descriptor_ptr(void) { return &%s__descriptor; }" % (s, s))
        h += ["", "#endif", ""]
        c.append("")
        umbrella = ["/* Generated by scripts/generate-contracts.sh. Do not edit. */",
                    "#include <protobuf-c/protobuf-c.h>", '#include "arbiter_descriptors.h"', ""]
        return "\n".join(h), "\n".join(c), "\n".join(umbrella)


# Type names that Swift reserves; such a message name is written in backticks.
SWIFT_RESERVED_TYPES = {"Any", "Type", "Protocol", "Self", "Sendable"}


def type_ident(name):
    return "`%s`" % name if name in SWIFT_RESERVED_TYPES else name


def main():
    set_path, swift_dir, c_dir = sys.argv[1:4]
    fset = descriptor_pb2.FileDescriptorSet()
    with open(set_path, "rb") as fh:
        fset.ParseFromString(fh.read())
    g = Gen(fset)
    os.makedirs(swift_dir, exist_ok=True)
    namespaces = sorted(set(NAMESPACES[f.package] for f in g.files))
    ns_file = ["// Generated by scripts/generate-contracts.sh. Do not edit.", ""]
    for f in g.files:
        ns = NAMESPACES[f.package]
        ns_file.append("/// Types of the protobuf package `%s` (Protos/%s)." % (f.package, f.name))
        ns_file.append("public enum %s {}" % ns)
    with open(os.path.join(swift_dir, "Namespaces.swift"), "w") as fh:
        fh.write("\n".join(ns_file) + "\n")
    for f in g.files:
        base = os.path.basename(os.path.splitext(f.name)[0])
        name = "".join(camel(p, upper=True) for p in base.split("_"))
        with open(os.path.join(swift_dir, name + ".pb.swift"), "w") as fh:
            fh.write(g.swift_file(f))
    h, c, umbrella = g.c_accessors()
    with open(os.path.join(c_dir, "include", "arbiter_descriptors.h"), "w") as fh:
        fh.write(h)
    with open(os.path.join(c_dir, "arbiter_descriptors.c"), "w") as fh:
        fh.write(c)
    with open(os.path.join(c_dir, "include", "CContracts.h"), "w") as fh:
        fh.write(umbrella)
    # An explicit module map: the generated headers live in subdirectories
    # (google/protobuf/any.pb-c.h), which SwiftPM's implicit umbrella rules reject.
    with open(os.path.join(c_dir, "include", "module.modulemap"), "w") as fh:
        fh.write("// Generated by scripts/generate-contracts.sh. Do not edit.\n"
                 "module CContracts {\n    header \"CContracts.h\"\n    link \"protobuf-c\"\n    export *\n}\n")


if __name__ == "__main__":
    main()
