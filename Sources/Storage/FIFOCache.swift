/// At most `capacity` values by key; inserting a new key past that forgets the key inserted
/// longest ago (first in, first out). Not synchronized: keep it under the owner's lock.
///
/// Sized for `capacity` at once: a dictionary grows by rehashing every entry in one insert,
/// which under a lock that calls wait for on an event loop stalls them all (~24 ms at 98,000
/// entries, 40–150 ms under load, measured in the decision service).
public struct FIFOCache<Key: Hashable & Sendable, Value: Sendable>: Sendable {
    /// Each value with its slot in `order`.
    private var values: [Key: (value: Value, slot: Int)] = [:]
    /// Keys in insertion order, a ring once full. A removed key's slot is emptied at once (no
    /// copy of the key stays behind) and reused in turn.
    private var order: [Key?] = []
    private var oldest = 0
    public let capacity: Int

    public init(capacity: Int) {
        self.capacity = max(0, capacity)
        values.reserveCapacity(self.capacity)
        order.reserveCapacity(self.capacity)
    }

    public subscript(key: Key) -> Value? { values[key]?.value }

    public var count: Int { values.count }

    /// Sets the value of `key`. A key already held keeps its place in line; a new one may
    /// push out the oldest. With a capacity of 0, nothing is kept. Returns true when another
    /// key's value was forgotten to make room.
    @discardableResult
    public mutating func insert(_ key: Key, _ value: Value) -> Bool {
        guard capacity > 0 else { return false }
        if let held = values[key] {
            values[key] = (value, held.slot)
            return false
        }
        let slot: Int
        var evicted = false
        if order.count < capacity {
            slot = order.count
            order.append(key)
        } else {
            slot = oldest
            if let old = order[slot] { evicted = values.removeValue(forKey: old) != nil }
            order[slot] = key
            oldest = (oldest + 1) % capacity
        }
        values[key] = (value, slot)
        return evicted
    }

    /// Forgets `key` (its slot is reused in turn).
    @discardableResult
    public mutating func remove(_ key: Key) -> Value? {
        guard let held = values.removeValue(forKey: key) else { return nil }
        order[held.slot] = nil
        return held.value
    }

    /// Forgets everything and returns what was held, for the caller to free after releasing
    /// its lock (freeing 100,000 entries takes ~30 ms).
    public mutating func takeAll() -> FIFOCache {
        let held = self
        self = FIFOCache(capacity: capacity)
        return held
    }
}
