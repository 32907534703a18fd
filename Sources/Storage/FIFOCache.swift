/// At most `capacity` values by key, and values whose `cost` add up to at most `costLimit`
/// (bytes, say); inserting past either forgets the keys inserted longest ago (first in, first
/// out; never the one just inserted). Not synchronized: keep it under the owner's lock.
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
    /// The slots from `oldest` on (round the ring) that `trim` emptied: no key is there, and
    /// the next `trim` starts after them (scanning them again made each insert O(capacity)
    /// once the cost limit held fewer keys than the capacity).
    private var emptied = 0
    public let capacity: Int
    public let costLimit: Int
    /// A value's cost (computed again when it goes, not stored).
    let cost: @Sendable (Value) -> Int
    /// What the values held cost together.
    public private(set) var totalCost = 0

    public init(capacity: Int, costLimit: Int = .max, cost: @escaping @Sendable (Value) -> Int = { _ in 0 }) {
        self.capacity = max(0, capacity)
        self.costLimit = max(0, costLimit)
        self.cost = cost
        values.reserveCapacity(self.capacity)
        order.reserveCapacity(self.capacity)
    }

    public subscript(key: Key) -> Value? { values[key]?.value }

    public var count: Int { values.count }

    /// Sets the value of `key`. A key already held keeps its place in line; a new one may
    /// push out the oldest; and one that takes the costs past `costLimit`, a new value of a
    /// key held too, pushes out the oldest others until they fit. With a capacity of 0,
    /// nothing is kept. Returns true when another key's value was forgotten to make room.
    @discardableResult
    public mutating func insert(_ key: Key, _ value: Value) -> Bool {
        guard capacity > 0 else { return false }
        let added = cost(value)
        if let held = values[key] {
            totalCost += added - cost(held.value)
            values[key] = (value, held.slot)
            return trim(keeping: key)
        }
        let slot: Int
        var evicted = false
        if order.count < capacity {
            slot = order.count
            order.append(key)
        } else {
            slot = oldest
            if emptied > 0 { emptied -= 1 }  // the slot is one trim emptied
            if let old = order[slot], let gone = values.removeValue(forKey: old) {
                totalCost -= cost(gone.value)
                evicted = true
            }
            order[slot] = key
            oldest = (oldest + 1) % capacity
        }
        values[key] = (value, slot)
        totalCost += added
        return trim(keeping: key) || evicted
    }

    /// Forgets the oldest keys (not `kept`) while the costs exceed `costLimit`.
    private mutating func trim(keeping kept: Key) -> Bool {
        var evicted = false
        // Oldest first: round the ring from `oldest` (0 while it is not full), past the slots
        // emptied before. The emptied run grows while every slot in it is empty.
        let length = order.count
        var offset = emptied
        var extending = true
        while totalCost > costLimit && values.count > 1 && offset < length {
            let slot = (oldest + offset) % length
            if let key = order[slot] {
                if key != kept, let gone = values.removeValue(forKey: key) {
                    totalCost -= cost(gone.value)
                    order[slot] = nil
                    evicted = true
                } else {
                    extending = false
                }
            }
            offset += 1
            if extending { emptied = offset }
        }
        return evicted
    }

    /// Forgets `key` (its slot is reused in turn).
    @discardableResult
    public mutating func remove(_ key: Key) -> Value? {
        guard let held = values.removeValue(forKey: key) else { return nil }
        order[held.slot] = nil
        totalCost -= cost(held.value)
        return held.value
    }

    /// Forgets everything and returns what was held, for the caller to free after releasing
    /// its lock (freeing 100,000 entries takes ~30 ms).
    public mutating func takeAll() -> FIFOCache {
        let held = self
        self = FIFOCache(capacity: capacity, costLimit: costLimit, cost: cost)
        return held
    }
}
