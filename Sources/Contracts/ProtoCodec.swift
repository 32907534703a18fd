// The bridge between the generated Swift value types and protobuf-c.
//
// Encoding builds a protobuf-c message in C memory and packs it with
// `protobuf_c_message_pack`. Decoding unpacks with `protobuf_c_message_unpack`
// (which rejects malformed input by returning NULL) and copies the fields into
// Swift values. Either way the C memory (every struct, string, byte array and
// sub-message) comes from one `ProtoArena`, freed at once afterwards. No other
// module sees a protobuf-c type.

internal import CContracts

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// A message type of the Arbiter contract: a Swift value that encodes to and
/// decodes from protobuf wire bytes through protobuf-c.
public protocol ProtoMessage: Sendable, Hashable {
    /// The fully qualified protobuf name, e.g. `grpc.health.v1.HealthCheckRequest`.
    static var protoName: String { get }
    /// The protobuf-c descriptor (opaque outside this module).
    static var protoDescriptor: ProtoDescriptor { get }
    /// A message with every field at its default value.
    init()
    /// Reads the fields from an unpacked protobuf-c message (generated code).
    init(reader: ProtoReader) throws
    /// Writes the fields into a protobuf-c message under construction (generated code).
    func write(to writer: ProtoWriter)
}

/// An enum of the contract. Open: unknown values received from a newer peer are kept.
public protocol ProtoEnum: Sendable, Hashable, RawRepresentable where RawValue == Int32 {
    init(rawValue: Int32)
    /// The fully qualified protobuf name of the enum.
    static var protoName: String { get }
    /// Every declared value with its protobuf name, in declaration order.
    static var valueNames: [(name: String, rawValue: Int32)] { get }
}

extension ProtoEnum {
    /// The protobuf name of this value (`SERVING`), or its number for a value this build does not know.
    public var protoValueName: String {
        Self.valueNames.first(where: { $0.rawValue == rawValue })?.name ?? String(rawValue)
    }
}

/// Bytes that are not a valid encoding of the expected message.
public struct ProtoDecodingError: Error, CustomStringConvertible, Hashable, Sendable {
    /// The fully qualified name of the message that was expected.
    public var messageName: String
    /// How many bytes were offered.
    public var byteCount: Int
    /// What is wrong, when known (e.g. "field message contains a NUL character").
    public var reason: String?
    public var description: String {
        if let reason { return "invalid \(messageName): \(reason)" }
        return "invalid \(messageName): \(byteCount) bytes are not a valid protobuf encoding of it"
    }
}

extension ProtoMessage {
    /// Decodes `bytes` as this message. Throws `ProtoDecodingError` for anything
    /// that is not a valid encoding; never crashes on arbitrary input.
    public init(serializedBytes bytes: some Collection<UInt8>) throws {
        let decoded: Self? = try bytes.withContiguousStorageIfAvailable { buffer in
            try Self.decode(buffer)
        } ?? Array(bytes).withUnsafeBufferPointer { buffer in
            try Self.decode(buffer)
        }
        self = decoded!
    }

    private static func decode(_ buffer: UnsafeBufferPointer<UInt8>) throws -> Self {
        let descriptor = protoDescriptor.pointer
        if let reason = StringFieldCheck.firstProblem(buffer, descriptor, depth: 0) {
            throw ProtoDecodingError(messageName: protoName, byteCount: buffer.count, reason: reason)
        }
        // protobuf-c needs a non-NULL data pointer even for zero bytes.
        var empty: UInt8 = 0
        let arena = ProtoArena()
        return try withExtendedLifetime(arena) {
            var allocator = arena.allocator
            let unpacked: UnsafeMutablePointer<ProtobufCMessage>? = withUnsafeMutablePointer(to: &empty) { emptyPointer in
                protobuf_c_message_unpack(descriptor, &allocator, buffer.count, buffer.baseAddress ?? UnsafePointer(emptyPointer))
            }
            guard let unpacked else {
                throw ProtoDecodingError(messageName: protoName, byteCount: buffer.count)
            }
            return try Self(reader: ProtoReader(UnsafeMutableRawPointer(unpacked), descriptor))
        }
    }

    /// The protobuf wire encoding of this message.
    public func serializedBytes() -> [UInt8] {
        let arena = ProtoArena()
        return withExtendedLifetime(arena) {
            let writer = ProtoWriter(Self.protoDescriptor.pointer, arena)
            write(to: writer)
            let message = writer.message.assumingMemoryBound(to: ProtobufCMessage.self)
            let size = protobuf_c_message_get_packed_size(message)
            return [UInt8](unsafeUninitializedCapacity: size) { buffer, count in
                count = size == 0 ? 0 : protobuf_c_message_pack(message, buffer.baseAddress!)
            }
        }
    }
}

/// protobuf-c keeps strings as NUL-terminated C strings and does not check UTF-8: a
/// string holding U+0000 would be cut short without a word (so that "Bearer t\\0x" would
/// read as "Bearer t"), and invalid UTF-8 would pass. This walk over the wire bytes,
/// guided by the descriptors, rejects both before protobuf-c unpacks. Anything else
/// malformed is left for protobuf-c to reject.
enum StringFieldCheck {
    static func firstProblem(_ bytes: UnsafeBufferPointer<UInt8>, _ descriptor: UnsafePointer<ProtobufCMessageDescriptor>,
                             depth: Int) -> String? {
        var i = 0
        let n = bytes.count
        func varint() -> UInt64? {
            var value: UInt64 = 0
            var shift: UInt64 = 0
            while i < n && shift < 64 {
                let byte = bytes[i]
                i += 1
                value |= UInt64(byte & 0x7f) << shift
                if byte & 0x80 == 0 { return value }
                shift += 7
            }
            return nil
        }
        while i < n {
            guard let key = varint() else { return nil }
            switch key & 7 {
            case 0: guard varint() != nil else { return nil }
            case 1: i += 8
            case 5: i += 4
            case 2:
                guard let length = varint(), length <= UInt64(n - i) else { return nil }
                let start = i
                i += Int(length)
                guard key >> 3 <= UInt64(UInt32.max),
                      let field = protobuf_c_message_descriptor_get_field(descriptor, UInt32(key >> 3)) else { continue }
                let value = UnsafeBufferPointer(rebasing: bytes[start..<i])
                if field.pointee.type == PROTOBUF_C_TYPE_STRING {
                    // Most strings are ASCII without NUL: one pass over the bytes, no allocation.
                    if value.allSatisfy({ $0 != 0 && $0 < 0x80 }) { continue }
                    let name = String(cString: field.pointee.name)
                    if value.contains(0) { return "field \(name) contains a NUL character" }
                    if String(validating: value, as: UTF8.self) == nil { return "field \(name) is not valid UTF-8" }
                } else if field.pointee.type == PROTOBUF_C_TYPE_MESSAGE, depth < 100,
                          let sub = field.pointee.descriptor?.assumingMemoryBound(to: ProtobufCMessageDescriptor.self),
                          let problem = firstProblem(value, sub, depth: depth + 1) {
                    return "\(String(cString: field.pointee.name)).\(problem)"
                }
            default:
                return nil
            }
        }
        return nil
    }
}

/// Describes one RPC method of the contract: where it lives and its message types.
public struct MethodDescriptor<Input: ProtoMessage, Output: ProtoMessage>: AnyMethodDescriptor {
    public let service: String
    public let method: String
    /// True when calling twice has the effect of calling once (`idempotency_level`
    /// in the .proto): such methods may be retried after UNAVAILABLE.
    public let isIdempotent: Bool
    public var inputName: String { Input.protoName }
    public var outputName: String { Output.protoName }
    public var inputType: any ProtoMessage.Type { Input.self }
    public var outputType: any ProtoMessage.Type { Output.self }
    public init(service: String, method: String, isIdempotent: Bool) {
        self.service = service
        self.method = method
        self.isIdempotent = isIdempotent
    }
}

/// A method descriptor with its message types erased.
public protocol AnyMethodDescriptor: Sendable {
    var service: String { get }
    var method: String { get }
    var isIdempotent: Bool { get }
    var inputName: String { get }
    var outputName: String { get }
    var inputType: any ProtoMessage.Type { get }
    var outputType: any ProtoMessage.Type { get }
}

extension AnyMethodDescriptor {
    /// `service/method`, as in logs and metrics.
    public var fullName: String { "\(service)/\(method)" }
}

/// A protobuf-c message descriptor. Opaque outside the contracts module.
public struct ProtoDescriptor: @unchecked Sendable {
    // Points at a `const` descriptor in the C data segment: immutable, lives forever.
    let pointer: UnsafePointer<ProtobufCMessageDescriptor>
    init(_ pointer: UnsafePointer<ProtobufCMessageDescriptor>) { self.pointer = pointer }
}

/// Reads fields out of an unpacked protobuf-c message. Used by generated code only.
public struct ProtoReader {
    let message: UnsafeMutableRawPointer
    let descriptor: UnsafePointer<ProtobufCMessageDescriptor>

    init(_ message: UnsafeMutableRawPointer, _ descriptor: UnsafePointer<ProtobufCMessageDescriptor>) {
        self.message = message
        self.descriptor = descriptor
    }

    private func field(_ number: Int) -> UnsafePointer<ProtobufCFieldDescriptor> {
        guard let field = protobuf_c_message_descriptor_get_field(descriptor, UInt32(number)) else {
            preconditionFailure("field \(number) is not in \(String(cString: descriptor.pointee.name))")
        }
        return field
    }

    private func load<T>(_ number: Int, as type: T.Type) -> T {
        message.load(fromByteOffset: Int(field(number).pointee.offset), as: T.self)
    }

    private func count(_ field: UnsafePointer<ProtobufCFieldDescriptor>) -> Int {
        message.load(fromByteOffset: Int(field.pointee.quantifier_offset), as: Int.self)
    }

    /// For a oneof member: whether it is the member set. For a message field: whether it is present.
    func has(_ number: Int) -> Bool {
        let f = field(number)
        if f.pointee.flags & UInt32(PROTOBUF_C_FIELD_FLAG_ONEOF.rawValue) != 0 {
            return message.load(fromByteOffset: Int(f.pointee.quantifier_offset), as: UInt32.self) == UInt32(number)
        }
        if f.pointee.type == PROTOBUF_C_TYPE_MESSAGE {
            return message.load(fromByteOffset: Int(f.pointee.offset), as: UnsafeRawPointer?.self) != nil
        }
        return true
    }

    func string(_ number: Int) -> String {
        guard let p = load(number, as: UnsafePointer<CChar>?.self) else { return "" }
        return String(cString: p)
    }

    func bytes(_ number: Int) -> [UInt8] {
        let data = load(number, as: ProtobufCBinaryData.self)
        guard data.len > 0, let p = data.data else { return [] }
        return Array(UnsafeBufferPointer(start: p, count: data.len))
    }

    func bool(_ number: Int) -> Bool { load(number, as: Int32.self) != 0 }
    func int32(_ number: Int) -> Int32 { load(number, as: Int32.self) }
    func int64(_ number: Int) -> Int64 { load(number, as: Int64.self) }
    func uint32(_ number: Int) -> UInt32 { load(number, as: UInt32.self) }
    func uint64(_ number: Int) -> UInt64 { load(number, as: UInt64.self) }
    func float(_ number: Int) -> Float { load(number, as: Float.self) }
    func double(_ number: Int) -> Double { load(number, as: Double.self) }
    func `enum`<E: ProtoEnum>(_ number: Int) -> E { E(rawValue: load(number, as: Int32.self)) }

    func messageValue<M: ProtoMessage>(_ number: Int) throws -> M? {
        guard let p = load(number, as: UnsafeMutableRawPointer?.self) else { return nil }
        return try M(reader: ProtoReader(p, M.protoDescriptor.pointer))
    }

    private func elements<T>(_ number: Int, _ type: T.Type) -> UnsafeBufferPointer<T> {
        let f = field(number)
        let n = count(f)
        guard n > 0, let p = message.load(fromByteOffset: Int(f.pointee.offset), as: UnsafePointer<T>?.self) else {
            return UnsafeBufferPointer(start: nil, count: 0)
        }
        return UnsafeBufferPointer(start: p, count: n)
    }

    func messages<M: ProtoMessage>(_ number: Int) throws -> [M] {
        try elements(number, UnsafeMutableRawPointer.self).map { try M(reader: ProtoReader($0, M.protoDescriptor.pointer)) }
    }

    func repeatedString(_ number: Int) -> [String] {
        elements(number, UnsafePointer<CChar>?.self).map { $0.map { String(cString: $0) } ?? "" }
    }

    func enums<E: ProtoEnum>(_ number: Int) -> [E] {
        elements(number, Int32.self).map { E(rawValue: $0) }
    }

    /// A map field: repeated entry messages with key = 1 and value = 2.
    func map<K: Hashable, V>(_ number: Int, _ entry: (ProtoReader) throws -> (K, V)) throws -> [K: V] {
        let f = field(number)
        guard let entryDescriptor = f.pointee.descriptor?.assumingMemoryBound(to: ProtobufCMessageDescriptor.self) else {
            return [:]
        }
        var result: [K: V] = [:]
        for p in elements(number, UnsafeMutableRawPointer.self) {
            let (k, v) = try entry(ProtoReader(p, entryDescriptor))
            result[k] = v  // the last entry for a key wins, as protobuf specifies
        }
        return result
    }
}

/// The C memory of one message being encoded or decoded: every struct, string and array
/// of it and its sub-messages comes from a few chunks that are freed together when the
/// arena goes, instead of a malloc and a free per field.
final class ProtoArena {
    private var chunks: [UnsafeMutableRawPointer] = []
    private var cursor: UnsafeMutableRawPointer?
    private var remaining = 0

    /// `size` bytes, 16-byte aligned, uninitialized.
    func allocate(_ size: Int) -> UnsafeMutableRawPointer {
        let size = (max(size, 1) + 15) & ~15
        if size > remaining {
            // Chunks grow (1 KiB, 4 KiB, 16 KiB, ... at most 1 MiB) so that a small message
            // takes one malloc and a large one a few.
            let chunkSize = max(size, 1024 << (2 * min(chunks.count, 5)))
            let chunk = malloc(chunkSize)!
            chunks.append(chunk)
            cursor = chunk
            remaining = chunkSize
        }
        let p = cursor!
        cursor = p + size
        remaining -= size
        return p
    }

    deinit { for chunk in chunks { free(chunk) } }

    /// A protobuf-c allocator that takes its memory from this arena (its free does nothing:
    /// the arena frees everything at once). Valid while the arena lives.
    var allocator: ProtobufCAllocator {
        ProtobufCAllocator(
            alloc: { data, size in Unmanaged<ProtoArena>.fromOpaque(data!).takeUnretainedValue().allocate(size) },
            free: { _, _ in },
            allocator_data: Unmanaged.passUnretained(self).toOpaque())
    }
}

/// Builds a protobuf-c message in C memory owned by a `ProtoArena`. Used by generated code only.
public struct ProtoWriter {
    let message: UnsafeMutableRawPointer
    let descriptor: UnsafePointer<ProtobufCMessageDescriptor>
    let arena: ProtoArena

    init(_ descriptor: UnsafePointer<ProtobufCMessageDescriptor>, _ arena: ProtoArena) {
        self.descriptor = descriptor
        self.arena = arena
        message = arena.allocate(descriptor.pointee.sizeof_message)
        protobuf_c_message_init(descriptor, message)  // writes every field's default
    }

    private func field(_ number: Int) -> UnsafePointer<ProtobufCFieldDescriptor> {
        guard let field = protobuf_c_message_descriptor_get_field(descriptor, UInt32(number)) else {
            preconditionFailure("field \(number) is not in \(String(cString: descriptor.pointee.name))")
        }
        return field
    }

    /// Stores a value; for a oneof member also selects it.
    private func store<T>(_ f: UnsafePointer<ProtobufCFieldDescriptor>, _ number: Int, _ value: T) {
        message.storeBytes(of: value, toByteOffset: Int(f.pointee.offset), as: T.self)
        if Self.isOneof(f) {
            message.storeBytes(of: UInt32(number), toByteOffset: Int(f.pointee.quantifier_offset), as: UInt32.self)
        }
    }

    private func store<T>(_ number: Int, _ value: T) { store(field(number), number, value) }

    private static func isOneof(_ f: UnsafePointer<ProtobufCFieldDescriptor>) -> Bool {
        f.pointee.flags & UInt32(PROTOBUF_C_FIELD_FLAG_ONEOF.rawValue) != 0
    }

    private func cString(_ value: String) -> UnsafeMutablePointer<CChar> {
        var value = value
        return value.withUTF8 { utf8 in
            let p = arena.allocate(utf8.count + 1).assumingMemoryBound(to: CChar.self)
            if utf8.count > 0 { memcpy(p, utf8.baseAddress!, utf8.count) }
            p[utf8.count] = 0
            return p
        }
    }

    func setString(_ number: Int, _ value: String) {
        let f = field(number)
        // An empty plain string stays at protobuf-c's shared empty default (not sent).
        if value.isEmpty && !Self.isOneof(f) { return }
        store(f, number, UnsafeMutablePointer<CChar>?(cString(value)))
    }

    func setBytes(_ number: Int, _ value: [UInt8]) {
        let f = field(number)
        if value.isEmpty {
            if Self.isOneof(f) { store(f, number, ProtobufCBinaryData(len: 0, data: nil)) }
            return
        }
        let p = arena.allocate(value.count).assumingMemoryBound(to: UInt8.self)
        value.withUnsafeBufferPointer { _ = memcpy(p, $0.baseAddress!, value.count) }
        store(f, number, ProtobufCBinaryData(len: value.count, data: p))
    }

    func setBool(_ number: Int, _ value: Bool) { store(number, Int32(value ? 1 : 0)) }
    func setInt32(_ number: Int, _ value: Int32) { store(number, value) }
    func setInt64(_ number: Int, _ value: Int64) { store(number, value) }
    func setUint32(_ number: Int, _ value: UInt32) { store(number, value) }
    func setUint64(_ number: Int, _ value: UInt64) { store(number, value) }
    func setFloat(_ number: Int, _ value: Float) { store(number, value) }
    func setDouble(_ number: Int, _ value: Double) { store(number, value) }
    func setEnum<E: ProtoEnum>(_ number: Int, _ value: E) { store(number, value.rawValue) }

    private func build<M: ProtoMessage>(_ value: M) -> UnsafeMutableRawPointer {
        let writer = ProtoWriter(M.protoDescriptor.pointer, arena)
        value.write(to: writer)
        return writer.message
    }

    func setMessage<M: ProtoMessage>(_ number: Int, _ value: M) {
        store(number, UnsafeMutableRawPointer?(build(value)))
    }

    /// Stores a repeated field: the count at the quantifier offset, an array at the offset
    /// whose elements are `element(i)`, written straight into the arena.
    private func storeArray<T>(_ number: Int, count: Int, _ element: (Int) -> T) {
        guard count > 0 else { return }
        let f = field(number)
        let array = arena.allocate(MemoryLayout<T>.stride * count).bindMemory(to: T.self, capacity: count)
        for i in 0..<count { (array + i).initialize(to: element(i)) }
        message.storeBytes(of: count, toByteOffset: Int(f.pointee.quantifier_offset), as: Int.self)
        message.storeBytes(of: UnsafeMutablePointer<T>?(array), toByteOffset: Int(f.pointee.offset),
                           as: UnsafeMutablePointer<T>?.self)
    }

    func setRepeatedMessages<M: ProtoMessage>(_ number: Int, _ values: [M]) {
        storeArray(number, count: values.count) { UnsafeMutableRawPointer?(build(values[$0])) }
    }

    func setRepeatedString(_ number: Int, _ values: [String]) {
        storeArray(number, count: values.count) { UnsafeMutablePointer<CChar>?(cString(values[$0])) }
    }

    func setRepeatedEnums<E: ProtoEnum>(_ number: Int, _ values: [E]) {
        storeArray(number, count: values.count) { values[$0].rawValue }
    }

    /// A map field, written as entries sorted by key so that equal maps encode to equal bytes.
    func setMap<K: Comparable, V>(_ number: Int, _ values: [K: V], _ entry: (ProtoWriter, K, V) -> Void) {
        guard !values.isEmpty else { return }
        guard let entryDescriptor = field(number).pointee.descriptor?
            .assumingMemoryBound(to: ProtobufCMessageDescriptor.self) else { return }
        let entries = values.sorted { $0.key < $1.key }
        storeArray(number, count: entries.count) { i -> UnsafeMutableRawPointer? in
            let writer = ProtoWriter(entryDescriptor, arena)
            entry(writer, entries[i].key, entries[i].value)
            return writer.message
        }
    }
}
