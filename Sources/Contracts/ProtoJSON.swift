internal import CContracts
import Foundation

/// Protobuf messages as JSON, driven by the protobuf-c descriptors (for tools such as
/// `arbiter call`, not for the services' hot paths). Follows the proto3 JSON mapping:
/// field names in lowerCamelCase (the .proto names are accepted too), enums by value name
/// (numbers accepted), 64-bit integers as strings (numbers accepted), bytes as base64,
/// maps as objects; fields at their default value are left out of the output.
public enum ProtoJSON {
    /// A field of a message, for listings.
    public struct Field: Sendable {
        public var name: String
        public var number: Int
        /// "string", "int64", "arbiter.common.v1.PersonRef", "map<string, string>", …
        public var type: String
        public var repeated: Bool
    }

    /// The fields of a message, in declaration order.
    public static func fields(of descriptor: ProtoDescriptor) -> [Field] {
        Message(descriptor.pointer).fields.map { field in
            let entry = field.mapEntry
            let type = entry.map { "map<\(typeName($0.fields[0])), \(typeName($0.fields[1]))>" } ?? typeName(field)
            return Field(name: field.jsonName, number: Int(field.raw.pointee.id), type: type,
                         repeated: field.repeated && entry == nil)
        }
    }

    /// Encodes a JSON object (as parsed by `JSONSerialization`) as the message's protobuf bytes.
    /// Throws `ProtoJSONError` naming the field for an unknown field or a value of the wrong type.
    public static func encode(_ json: Any, as descriptor: ProtoDescriptor) throws -> [UInt8] {
        var out: [UInt8] = []
        try encodeMessage(json, Message(descriptor.pointer), path: "", into: &out)
        return out
    }

    /// Decodes protobuf bytes of the message as a JSON object.
    public static func decode(_ bytes: [UInt8], as descriptor: ProtoDescriptor) throws -> [String: Any] {
        try bytes.withUnsafeBufferPointer { try decodeMessage($0[...], Message(descriptor.pointer), path: "") }
    }

    // MARK: - Descriptors

    struct Message {
        let raw: UnsafePointer<ProtobufCMessageDescriptor>
        init(_ raw: UnsafePointer<ProtobufCMessageDescriptor>) { self.raw = raw }
        var name: String { String(cString: raw.pointee.name) }
        var fields: [FieldDescriptor] {
            (0..<Int(raw.pointee.n_fields)).map { FieldDescriptor(raw: raw.pointee.fields + $0) }
        }
        func field(named key: String) -> FieldDescriptor? {
            fields.first { $0.jsonName == key || $0.protoName == key }
        }
        func field(number: UInt32) -> FieldDescriptor? { fields.first { $0.raw.pointee.id == number } }
    }

    struct FieldDescriptor {
        let raw: UnsafePointer<ProtobufCFieldDescriptor>
        var protoName: String { String(cString: raw.pointee.name) }
        var jsonName: String {
            var result = ""
            var upper = false
            for c in protoName {
                if c == "_" { upper = true; continue }
                result.append(upper ? Character(c.uppercased()) : c)
                upper = false
            }
            return result
        }
        var type: ProtobufCType { raw.pointee.type }
        var repeated: Bool { raw.pointee.label == PROTOBUF_C_LABEL_REPEATED }
        var message: Message? {
            type == PROTOBUF_C_TYPE_MESSAGE ? Message(raw.pointee.descriptor.assumingMemoryBound(to: ProtobufCMessageDescriptor.self)) : nil
        }
        var enumeration: UnsafePointer<ProtobufCEnumDescriptor>? {
            type == PROTOBUF_C_TYPE_ENUM ? raw.pointee.descriptor.assumingMemoryBound(to: ProtobufCEnumDescriptor.self) : nil
        }
        /// The entry message of a map field (protobuf-c sees a map as repeated entries).
        var mapEntry: Message? {
            guard repeated, let message, String(cString: message.raw.pointee.short_name).hasSuffix("Entry") else { return nil }
            let fields = message.fields
            guard fields.count == 2, fields[0].protoName == "key", fields[1].protoName == "value" else { return nil }
            return message
        }
    }

    static func typeName(_ field: FieldDescriptor) -> String {
        if let message = field.message { return message.name }
        if let e = field.enumeration { return String(cString: e.pointee.name) }
        switch field.type {
        case PROTOBUF_C_TYPE_INT32: return "int32"
        case PROTOBUF_C_TYPE_SINT32: return "sint32"
        case PROTOBUF_C_TYPE_SFIXED32: return "sfixed32"
        case PROTOBUF_C_TYPE_INT64: return "int64"
        case PROTOBUF_C_TYPE_SINT64: return "sint64"
        case PROTOBUF_C_TYPE_SFIXED64: return "sfixed64"
        case PROTOBUF_C_TYPE_UINT32: return "uint32"
        case PROTOBUF_C_TYPE_FIXED32: return "fixed32"
        case PROTOBUF_C_TYPE_UINT64: return "uint64"
        case PROTOBUF_C_TYPE_FIXED64: return "fixed64"
        case PROTOBUF_C_TYPE_FLOAT: return "float"
        case PROTOBUF_C_TYPE_DOUBLE: return "double"
        case PROTOBUF_C_TYPE_BOOL: return "bool"
        case PROTOBUF_C_TYPE_STRING: return "string"
        default: return "bytes"
        }
    }

    // MARK: - Encoding

    static func encodeMessage(_ json: Any, _ message: Message, path: String, into out: inout [UInt8]) throws {
        guard let object = json as? [String: Any] else { throw ProtoJSONError(path.isEmpty ? "request" : path, "must be a JSON object") }
        for key in object.keys.sorted() {
            let fieldPath = path.isEmpty ? key : "\(path).\(key)"
            guard let field = message.field(named: key) else {
                throw ProtoJSONError(fieldPath, "is not a field of \(message.name) (fields: \(message.fields.map(\.jsonName).joined(separator: ", ")))")
            }
            let value = object[key]!
            if value is NSNull { continue }
            if let entry = field.mapEntry {
                guard let map = value as? [String: Any] else { throw ProtoJSONError(fieldPath, "must be a JSON object (a map)") }
                for mapKey in map.keys.sorted() {
                    var body: [UInt8] = []
                    try encodeValue(mapKey, entry.fields[0], path: "\(fieldPath)[\(mapKey)]", into: &body)
                    try encodeValue(map[mapKey]!, entry.fields[1], path: "\(fieldPath)[\(mapKey)]", into: &body)
                    tag(field, wire: 2, into: &out)
                    varint(UInt64(body.count), into: &out)
                    out += body
                }
            } else if field.repeated {
                guard let array = value as? [Any] else { throw ProtoJSONError(fieldPath, "must be a JSON array") }
                for (i, element) in array.enumerated() { try encodeValue(element, field, path: "\(fieldPath)[\(i)]", into: &out) }
            } else {
                try encodeValue(value, field, path: fieldPath, into: &out)
            }
        }
    }

    /// Encodes one value of `field` with its tag (entries of a map: key 1, value 2).
    static func encodeValue(_ value: Any, _ field: FieldDescriptor, path: String, into out: inout [UInt8]) throws {
        func integer(_ range: ClosedRange<Double>) throws -> Int64 {
            if let s = value as? String, let n = Int64(s) { return n }
            if !isBoolean(value), let d = (value as? NSNumber)?.doubleValue, d == d.rounded(), range.contains(d) { return Int64(d) }
            throw ProtoJSONError(path, "must be an integer (\(typeName(field)))")
        }
        func unsigned() throws -> UInt64 {
            if let s = value as? String, let n = UInt64(s) { return n }
            if !isBoolean(value), let d = (value as? NSNumber)?.doubleValue, d == d.rounded(), d >= 0, d < 18_446_744_073_709_551_616 { return UInt64(d) }
            throw ProtoJSONError(path, "must be a non-negative integer (\(typeName(field)))")
        }
        func number() throws -> Double {
            if let s = value as? String, let d = Double(s) { return d }
            if !isBoolean(value), let d = (value as? NSNumber)?.doubleValue { return d }
            throw ProtoJSONError(path, "must be a number")
        }
        let int32Range = -2_147_483_648.0...2_147_483_647.0
        switch field.type {
        case PROTOBUF_C_TYPE_INT32, PROTOBUF_C_TYPE_INT64:
            let n = try integer(field.type == PROTOBUF_C_TYPE_INT32 ? int32Range : -9.3e18...9.3e18)
            tag(field, wire: 0, into: &out)
            varint(UInt64(bitPattern: n), into: &out)
        case PROTOBUF_C_TYPE_SINT32, PROTOBUF_C_TYPE_SINT64:
            let n = try integer(field.type == PROTOBUF_C_TYPE_SINT32 ? int32Range : -9.3e18...9.3e18)
            tag(field, wire: 0, into: &out)
            varint(UInt64(bitPattern: (n << 1) ^ (n >> 63)), into: &out)
        case PROTOBUF_C_TYPE_UINT32, PROTOBUF_C_TYPE_UINT64:
            let n = try unsigned()
            if field.type == PROTOBUF_C_TYPE_UINT32, n > UInt64(UInt32.max) { throw ProtoJSONError(path, "is out of range for uint32") }
            tag(field, wire: 0, into: &out)
            varint(n, into: &out)
        case PROTOBUF_C_TYPE_FIXED32, PROTOBUF_C_TYPE_SFIXED32, PROTOBUF_C_TYPE_FLOAT:
            let bits: UInt32 = field.type == PROTOBUF_C_TYPE_FLOAT ? Float(try number()).bitPattern
                : field.type == PROTOBUF_C_TYPE_FIXED32 ? UInt32(truncatingIfNeeded: try unsigned())
                : UInt32(bitPattern: Int32(truncatingIfNeeded: try integer(int32Range)))
            tag(field, wire: 5, into: &out)
            for shift in stride(from: 0, to: 32, by: 8) { out.append(UInt8(truncatingIfNeeded: bits >> UInt32(shift))) }
        case PROTOBUF_C_TYPE_FIXED64, PROTOBUF_C_TYPE_SFIXED64, PROTOBUF_C_TYPE_DOUBLE:
            let bits: UInt64 = field.type == PROTOBUF_C_TYPE_DOUBLE ? try number().bitPattern
                : field.type == PROTOBUF_C_TYPE_FIXED64 ? try unsigned() : UInt64(bitPattern: try integer(-9.3e18...9.3e18))
            tag(field, wire: 1, into: &out)
            for shift in stride(from: 0, to: 64, by: 8) { out.append(UInt8(truncatingIfNeeded: bits >> UInt64(shift))) }
        case PROTOBUF_C_TYPE_BOOL:
            guard isBoolean(value), let b = value as? Bool else { throw ProtoJSONError(path, "must be true or false") }
            tag(field, wire: 0, into: &out)
            out.append(b ? 1 : 0)
        case PROTOBUF_C_TYPE_ENUM:
            let e = field.enumeration!.pointee
            let values = (0..<Int(e.n_values)).map { (String(cString: e.values[$0].name), e.values[$0].value) }
            let n: Int32
            if let name = value as? String, let match = values.first(where: { $0.0 == name }) {
                n = match.1
            } else if !isBoolean(value), let d = (value as? NSNumber)?.doubleValue, d == d.rounded(), int32Range.contains(d) {
                n = Int32(d)
            } else {
                throw ProtoJSONError(path, "must be one of \(values.map(\.0).joined(separator: ", "))")
            }
            tag(field, wire: 0, into: &out)
            varint(UInt64(bitPattern: Int64(n)), into: &out)
        case PROTOBUF_C_TYPE_STRING:
            guard let s = value as? String else { throw ProtoJSONError(path, "must be a string") }
            tag(field, wire: 2, into: &out)
            varint(UInt64(s.utf8.count), into: &out)
            out += Array(s.utf8)
        case PROTOBUF_C_TYPE_BYTES:
            guard let s = value as? String, let data = Data(base64Encoded: s) else { throw ProtoJSONError(path, "must be base64") }
            tag(field, wire: 2, into: &out)
            varint(UInt64(data.count), into: &out)
            out += Array(data)
        default:  // MESSAGE
            var body: [UInt8] = []
            try encodeMessage(value, field.message!, path: path, into: &body)
            tag(field, wire: 2, into: &out)
            varint(UInt64(body.count), into: &out)
            out += body
        }
    }

    /// JSON true and false (Foundation parses them as a boolean NSNumber, which also casts to Bool
    /// from 0 and 1: tell them apart by type).
    static func isBoolean(_ value: Any) -> Bool {
        type(of: value) == Bool.self || String(describing: type(of: value)).contains("Boolean")
    }

    static func tag(_ field: FieldDescriptor, wire: UInt64, into out: inout [UInt8]) {
        varint(UInt64(field.raw.pointee.id) << 3 | wire, into: &out)
    }

    static func varint(_ value: UInt64, into out: inout [UInt8]) {
        var v = value
        while v >= 0x80 {
            out.append(UInt8(v & 0x7F) | 0x80)
            v >>= 7
        }
        out.append(UInt8(v))
    }

    // MARK: - Decoding

    struct Reader {
        var bytes: Slice<UnsafeBufferPointer<UInt8>>
        let path: String

        mutating func varint() throws -> UInt64 {
            var result: UInt64 = 0
            var shift: UInt64 = 0
            while let byte = bytes.first {
                bytes = bytes.dropFirst()
                guard shift < 64 else { break }
                result |= UInt64(byte & 0x7F) << shift
                if byte < 0x80 { return result }
                shift += 7
            }
            throw ProtoJSONError(path, "malformed varint")
        }

        mutating func take(_ count: Int) throws -> Slice<UnsafeBufferPointer<UInt8>> {
            guard count >= 0, bytes.count >= count else { throw ProtoJSONError(path, "truncated message") }
            let taken = bytes.prefix(count)
            bytes = bytes.dropFirst(count)
            return taken
        }

        mutating func fixed(_ width: Int) throws -> UInt64 {
            try take(width).reversed().reduce(0) { $0 << 8 | UInt64($1) }
        }
    }

    static func decodeMessage(_ bytes: Slice<UnsafeBufferPointer<UInt8>>, _ message: Message, path: String) throws -> [String: Any] {
        var reader = Reader(bytes: bytes, path: path.isEmpty ? message.name : path)
        var object: [String: Any] = [:]
        while !reader.bytes.isEmpty {
            let key = try reader.varint()
            let number = UInt32(truncatingIfNeeded: key >> 3), wire = key & 7
            guard let field = message.field(number: number) else {
                switch wire {  // unknown field: skip
                case 0: _ = try reader.varint()
                case 1: _ = try reader.take(8)
                case 2: _ = try reader.take(Int(try reader.varint()))
                case 5: _ = try reader.take(4)
                default: throw ProtoJSONError(reader.path, "unsupported wire type \(wire)")
                }
                continue
            }
            let name = field.jsonName
            if let entry = field.mapEntry {
                let body = try reader.take(Int(try reader.varint()))
                let pair = try decodeMessage(body, entry, path: "\(reader.path).\(name)")
                var map = object[name] as? [String: Any] ?? [:]
                map["\(pair["key"] ?? "")"] = pair["value"] ?? defaultJSON(entry.fields[1])
                object[name] = map
                continue
            }
            var values: [Any] = []
            let scalarPacked = wire == 2 && field.type != PROTOBUF_C_TYPE_STRING && field.type != PROTOBUF_C_TYPE_BYTES
                && field.type != PROTOBUF_C_TYPE_MESSAGE
            if scalarPacked {
                var packed = Reader(bytes: try reader.take(Int(try reader.varint())), path: reader.path)
                while !packed.bytes.isEmpty { values.append(try decodeScalar(&packed, field, wire: packedWire(field))) }
            } else {
                values.append(try decodeScalar(&reader, field, wire: wire))
            }
            if field.repeated {
                object[name] = (object[name] as? [Any] ?? []) + values
            } else {
                object[name] = values.last
            }
        }
        return object
    }

    static func packedWire(_ field: FieldDescriptor) -> UInt64 {
        switch field.type {
        case PROTOBUF_C_TYPE_FIXED32, PROTOBUF_C_TYPE_SFIXED32, PROTOBUF_C_TYPE_FLOAT: return 5
        case PROTOBUF_C_TYPE_FIXED64, PROTOBUF_C_TYPE_SFIXED64, PROTOBUF_C_TYPE_DOUBLE: return 1
        default: return 0
        }
    }

    static func decodeScalar(_ reader: inout Reader, _ field: FieldDescriptor, wire: UInt64) throws -> Any {
        guard wire == (field.type == PROTOBUF_C_TYPE_STRING || field.type == PROTOBUF_C_TYPE_BYTES || field.type == PROTOBUF_C_TYPE_MESSAGE ? 2 : packedWire(field)) else {
            throw ProtoJSONError("\(reader.path).\(field.jsonName)", "wire type \(wire) does not match \(typeName(field))")
        }
        switch field.type {
        case PROTOBUF_C_TYPE_INT32: return Int(Int32(truncatingIfNeeded: try reader.varint()))
        case PROTOBUF_C_TYPE_INT64: return String(Int64(bitPattern: try reader.varint()))
        case PROTOBUF_C_TYPE_UINT32: return Int(UInt32(truncatingIfNeeded: try reader.varint()))
        case PROTOBUF_C_TYPE_UINT64: return String(try reader.varint())
        case PROTOBUF_C_TYPE_SINT32, PROTOBUF_C_TYPE_SINT64:
            let z = try reader.varint()
            let n = Int64(bitPattern: (z >> 1) ^ (0 &- (z & 1)))
            return field.type == PROTOBUF_C_TYPE_SINT32 ? Int(n) as Any : String(n)
        case PROTOBUF_C_TYPE_BOOL: return try reader.varint() != 0
        case PROTOBUF_C_TYPE_FIXED32: return Int(UInt32(truncatingIfNeeded: try reader.fixed(4)))
        case PROTOBUF_C_TYPE_SFIXED32: return Int(Int32(bitPattern: UInt32(truncatingIfNeeded: try reader.fixed(4))))
        case PROTOBUF_C_TYPE_FLOAT: return Double(Float(bitPattern: UInt32(truncatingIfNeeded: try reader.fixed(4))))
        case PROTOBUF_C_TYPE_FIXED64: return String(try reader.fixed(8))
        case PROTOBUF_C_TYPE_SFIXED64: return String(Int64(bitPattern: try reader.fixed(8)))
        case PROTOBUF_C_TYPE_DOUBLE: return Double(bitPattern: try reader.fixed(8))
        case PROTOBUF_C_TYPE_ENUM:
            let n = Int32(truncatingIfNeeded: try reader.varint())
            let e = field.enumeration!.pointee
            return (0..<Int(e.n_values)).first { e.values[$0].value == n }.map { String(cString: e.values[$0].name) as Any } ?? Int(n)
        case PROTOBUF_C_TYPE_STRING:
            return String(decoding: try reader.take(Int(try reader.varint())), as: UTF8.self)
        case PROTOBUF_C_TYPE_BYTES:
            return Data(try reader.take(Int(try reader.varint()))).base64EncodedString()
        default:
            let body = try reader.take(Int(try reader.varint()))
            return try decodeMessage(body, field.message!, path: "\(reader.path).\(field.jsonName)")
        }
    }

    static func defaultJSON(_ field: FieldDescriptor) -> Any {
        switch field.type {
        case PROTOBUF_C_TYPE_STRING, PROTOBUF_C_TYPE_BYTES: return ""
        case PROTOBUF_C_TYPE_BOOL: return false
        case PROTOBUF_C_TYPE_MESSAGE: return [String: Any]()
        default: return 0
        }
    }
}

/// A JSON value that does not fit the message, with the path of the field.
public struct ProtoJSONError: Error, CustomStringConvertible {
    public var field: String
    public var problem: String
    public init(_ field: String, _ problem: String) {
        self.field = field
        self.problem = problem
    }
    public var description: String { "\(field): \(problem)" }
}

extension AnyMethodDescriptor {
    /// The request message's descriptor (for `ProtoJSON`).
    public var inputDescriptor: ProtoDescriptor { inputType.protoDescriptor }
    /// The response message's descriptor (for `ProtoJSON`).
    public var outputDescriptor: ProtoDescriptor { outputType.protoDescriptor }
}
