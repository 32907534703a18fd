import Contracts
import Logging

/// Request metadata: ordered key/value pairs; a key may repeat. Keys are compared lower-cased.
public struct Metadata: Sendable, Hashable, Sequence, ExpressibleByDictionaryLiteral {
    public private(set) var entries: [(key: String, value: String)]

    public init(_ entries: [(key: String, value: String)] = []) {
        self.entries = entries.map { (key: $0.key.lowercased(), value: $0.value) }
    }

    public init(dictionaryLiteral elements: (String, String)...) {
        self.init(elements.map { (key: $0.0, value: $0.1) })
    }

    public mutating func add(_ key: String, _ value: String) {
        entries.append((key: key.lowercased(), value: value))
    }

    /// The entries as a ttrpc request carries them.
    public var wire: [TTRPC.KeyValue] {
        entries.map {
            var kv = TTRPC.KeyValue()
            kv.key = $0.key
            kv.value = $0.value
            return kv
        }
    }

    /// The first value for `key`, if any.
    public subscript(key: String) -> String? {
        let key = key.lowercased()
        return entries.first(where: { $0.key == key })?.value
    }

    public func makeIterator() -> IndexingIterator<[(key: String, value: String)]> { entries.makeIterator() }

    public static func == (lhs: Metadata, rhs: Metadata) -> Bool {
        lhs.entries.elementsEqual(rhs.entries) { $0.key == $1.key && $0.value == $1.value }
    }

    public func hash(into hasher: inout Hasher) {
        for entry in entries {
            hasher.combine(entry.key)
            hasher.combine(entry.value)
        }
    }
}

/// Deadline propagation: while a handler runs, `RPCDeadline.current` holds its
/// request's deadline, and every `RPCClient` call made from it sends at most the
/// remaining budget as its own `timeout_nano`.
public enum RPCDeadline {
    @TaskLocal public static var current: ContinuousClock.Instant?

    /// What is left of the current deadline, or nil when there is none.
    public static var remaining: Duration? {
        current.map { ContinuousClock.now.duration(to: $0) }
    }
}

/// What a handler knows about the call it serves.
public struct RPCContext: Sendable {
    public var service: String
    public var method: String
    public var metadata: Metadata
    /// The call's deadline, from the request's `timeout_nano`; nil when it has none.
    public var deadline: ContinuousClock.Instant?
    /// A logger carrying `rpc.peer`, and `rpc.stream_id` when the level is `debug` or lower.
    public var logger: Logger

    public init(service: String, method: String, metadata: Metadata = [:],
                deadline: ContinuousClock.Instant? = nil, logger: Logger) {
        self.service = service
        self.method = method
        self.metadata = metadata
        self.deadline = deadline
        self.logger = logger
    }

    /// The budget left before the deadline (negative once it has passed), or nil without a deadline.
    public var remainingBudget: Duration? {
        deadline.map { ContinuousClock.now.duration(to: $0) }
    }
}

extension Duration {
    /// Whole nanoseconds, saturating at the bounds of Int64.
    public var nanoseconds: Int64 {
        let (seconds, attoseconds) = components
        let (scaled, overflow) = seconds.multipliedReportingOverflow(by: 1_000_000_000)
        if overflow { return seconds < 0 ? .min : .max }
        let (total, overflow2) = scaled.addingReportingOverflow(attoseconds / 1_000_000_000)
        if overflow2 { return seconds < 0 ? .min : .max }
        return total
    }
}
