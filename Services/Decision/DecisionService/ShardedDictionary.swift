/// A dictionary kept in 64 parts by the key's hash, for large maps changed under a lock
/// that an event loop waits for. A Swift dictionary grows by rehashing every entry in the
/// insert that crosses its load factor: ~24 ms at 98,000 entries on the 2-core machine,
/// 40–150 ms under load, which showed as Decide stalls at the same second of every
/// benchmark run. Here each part grows alone, moving a 64th of the entries.
struct ShardedDictionary<Key: Hashable & Sendable, Value: Sendable>: Sendable {
    /// How many parts.
    static var parts: Int { 64 }
    private var shards: [[Key: Value]] = Array(repeating: [:], count: parts)

    init() {}

    private func shard(_ key: Key) -> Int { Int(UInt(bitPattern: key.hashValue) % UInt(shards.count)) }

    subscript(key: Key) -> Value? {
        get { shards[shard(key)][key] }
        set { shards[shard(key)][key] = newValue }
    }

    /// Changes the value for `key` in place, inserting `defaultValue` first when it has none.
    mutating func update<R>(_ key: Key, default defaultValue: @autoclosure () -> Value, _ body: (inout Value) -> R) -> R {
        body(&shards[shard(key)][key, default: defaultValue()])
    }

    @discardableResult
    mutating func removeValue(forKey key: Key) -> Value? { shards[shard(key)].removeValue(forKey: key) }

    /// The keys of part `part` (`0..<parts`): every key is in exactly one.
    func keys(inPart part: Int) -> [Key] { Array(shards[part].keys) }

    var count: Int { shards.reduce(0) { $0 + $1.count } }
}
