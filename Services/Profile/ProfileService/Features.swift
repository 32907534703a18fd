import Contracts
import Foundation
import RPC
import Rules

/// An event as the profile store keeps it: validated, with its person resolved.
public struct TrackedEvent: Sendable, Hashable {
    public var eventID: String
    public var personID: String
    public var type: String
    public var occurredAtMs: Int64
    public var value: Double
    public var properties: [String: RuleValue]
    /// When this service stored it (its own clock; 0 for events stored before migration v9).
    public var receivedAtMs: Int64 = 0

    /// When it counts as having happened: an event dated ahead of this service's clock (a
    /// client's clock may be up to a day ahead) counts when it arrived, or, stored before
    /// migration v9 with no arrival time, at `now`.
    public func countedAtMs(now: Int64) -> Int64 { min(occurredAtMs, receivedAtMs > 0 ? receivedAtMs : now) }

    public init(eventID: String, personID: String, type: String, occurredAtMs: Int64, value: Double = 0,
                properties: [String: RuleValue] = [:]) {
        self.eventID = eventID
        self.personID = personID
        self.type = type
        self.occurredAtMs = occurredAtMs
        self.value = value
        self.properties = properties
    }
}

/// A validated feature definition and the arithmetic of its incremental state.
///
/// Every aggregation is maintained at ingest in O(1) per event (bounded state, never a
/// scan of history): COUNT and SUM in time buckets (1/60 of the window, at least a
/// second; a windowed read counts the buckets that overlap the window, so its edge is
/// exact to one bucket), LAST as the newest value and its time, DISTINCT_COUNT as each
/// value's newest time (pruned past the window, at most `maxDistinct` values), and
/// DECAYED_SUM as one sum and the time it refers to: adding `v` at `t` and reading at
/// `now` gives `Σ v·2^(-(now−t)/half_life)` in any order of arrival.
public struct FeatureSpec: Sendable {
    public let definition: ProfileV1.FeatureDefinition
    public let version: UInt32
    /// The events it counts were received at or after this time: its definition's time for a
    /// feature defined without backfill (it starts empty, and stays so when a merge, an
    /// unmerge or a restart recomputes a person from the stored events); 0, every event, for
    /// one defined with backfill or before migration v9.
    public let countsFromMs: Int64
    /// Defined with a backfill that was done (since migration v10): the same definition with
    /// backfill again has nothing to do.
    public let backfilled: Bool
    let filter: Rule?
    let windowMs: Int64
    let bucketMs: Int64
    let halfLifeMs: Double

    public static let maxDistinct = 10_000
    static let maxWindowSeconds: Int64 = 400 * 86_400

    public var name: String { definition.name }

    /// Validates `definition`; errors name the field (`feature.window_seconds`, ...).
    public init(_ definition: ProfileV1.FeatureDefinition, version: UInt32 = 1, countsFromMs: Int64 = 0, backfilled: Bool = false) throws(RPCError) {
        self.definition = definition
        self.version = version
        self.countsFromMs = countsFromMs
        self.backfilled = backfilled
        try Names.check(definition.name, field: "feature.name")
        try Names.check(definition.eventType, field: "feature.event_type")
        let aggregation = definition.aggregation
        guard [.count, .sum, .last, .distinctCount, .decayedSum].contains(aggregation) else {
            throw .invalidArgument(field: "feature.aggregation", "must be COUNT, SUM, LAST, DISTINCT_COUNT or DECAYED_SUM")
        }
        guard definition.windowSeconds >= 0, definition.windowSeconds <= Self.maxWindowSeconds else {
            throw .invalidArgument(field: "feature.window_seconds", "must be between 0 (all time) and \(Self.maxWindowSeconds), got \(definition.windowSeconds)")
        }
        if aggregation == .decayedSum {
            guard definition.halfLifeSeconds > 0, definition.halfLifeSeconds <= Self.maxWindowSeconds else {
                throw .invalidArgument(field: "feature.half_life_seconds", "must be positive for DECAYED_SUM, got \(definition.halfLifeSeconds)")
            }
            guard definition.windowSeconds == 0 else {
                throw .invalidArgument(field: "feature.window_seconds", "must be 0 for DECAYED_SUM (the half-life does the forgetting)")
            }
        } else if definition.halfLifeSeconds != 0 {
            throw .invalidArgument(field: "feature.half_life_seconds", "is only for DECAYED_SUM")
        }
        if aggregation == .distinctCount, definition.property.isEmpty {
            throw .invalidArgument(field: "feature.property", "names the property whose distinct values DISTINCT_COUNT counts")
        }
        if aggregation == .count, !definition.property.isEmpty {
            throw .invalidArgument(field: "feature.property", "is not used by COUNT (use filter to count some events only)")
        }
        if !definition.property.isEmpty { try Names.check(definition.property, field: "feature.property") }
        filter = try Self.parseFilter(definition.filter)
        windowMs = definition.windowSeconds * 1000
        bucketMs = windowMs == 0 ? 0 : max(1000, windowMs / 60)
        halfLifeMs = Double(definition.halfLifeSeconds * 1000)
    }

    /// `kinds` as `Rule.init` takes it: given when a filter is written, not when read back.
    static func parseFilter(_ text: String, kinds: ((String, String) -> Rule.Kind?)? = nil) throws(RPCError) -> Rule? {
        guard !text.isEmpty else { return nil }
        do {
            return try Rule(text, check: eventPathCheck, kinds: kinds)
        } catch {
            throw .invalidArgument(field: "feature.filter", error.description)
        }
    }

    static func eventPathCheck(_ namespace: String, _ name: String) -> String? {
        namespace == "event" ? nil : "a filter reads event properties only: event.<property> or event.value"
    }

    /// Whether `event` feeds this feature.
    func matches(_ event: TrackedEvent) -> Bool {
        guard event.type == definition.eventType, event.receivedAtMs >= countsFromMs else { return false }
        guard let filter else { return true }
        return filter.evaluate { _, name in name == "value" ? .number(event.value) : event.properties[name] }
    }

    /// The number an event contributes to SUM and LAST: the property, else the event's value.
    func number(_ event: TrackedEvent) -> Double? {
        if definition.property.isEmpty { return event.value }
        if case .number(let n)? = event.properties[definition.property] { return n }
        return nil
    }

    func inWindow(_ t: Int64, now: Int64) -> Bool { windowMs == 0 || t > now - windowMs }

    /// Adds `event` (which `matches`) to `state`. `now` prunes what left the window.
    func apply(_ event: TrackedEvent, to state: inout ProfileStoreV1.FeatureState, now: Int64) {
        // Dated ahead, it would stay in a 1 h window for a day, hold LAST against every newer
        // event, and decaying back from the future would weigh it 2^(ahead/half-life).
        let t = event.countedAtMs(now: now)
        switch definition.aggregation {
        case .count, .sum:
            if definition.aggregation == .sum, number(event) == nil { return }
            let start = bucketMs == 0 ? 0 : (t / bucketMs) * bucketMs
            state.buckets.removeAll { windowMs != 0 && $0.startMs + bucketMs <= now - windowMs }
            guard bucketMs == 0 || start + bucketMs > now - windowMs else { return }  // already outside the window
            if let i = state.buckets.firstIndex(where: { $0.startMs == start }) {
                state.buckets[i].count += 1
                state.buckets[i].sum += number(event) ?? 0
            } else {
                var bucket = ProfileStoreV1.Bucket()
                bucket.startMs = start
                bucket.count = 1
                bucket.sum = number(event) ?? 0
                state.buckets.append(bucket)
            }
        case .last:
            guard let n = number(event) else { return }
            // Of events at the same time the greatest id wins, whatever order they arrive or
            // are rebuilt in.
            if !state.hasLast || t > state.lastAtMs || (t == state.lastAtMs && event.eventID >= state.lastEventId) {
                state.hasLast = true
                state.lastValue = n
                state.lastAtMs = t
                state.lastEventId = event.eventID
            }
        case .distinctCount:
            guard let raw = event.properties[definition.property] else { return }
            let key: UInt64
            if case .string(let s) = raw { key = Self.distinctHash(s) } else { key = Self.distinctHash(raw.description) }
            // Values a state written before hashes holds as text (every entry, hash 0; an empty
            // text is the empty string's): hashed now, once. Entries added since are hashed, so
            // the first tells.
            if state.distinct.first?.hash == 0 {
                for i in state.distinct.indices where state.distinct[i].hash == 0 {
                    state.distinct[i].hash = Self.distinctHash(state.distinct[i].value)
                    state.distinct[i].value = ""
                }
            }
            // In hash order, so that a value is found by binary search (a scan of up to
            // `maxDistinct` values per event before).
            if !state.distinctByHash {
                state.distinct.sort { $0.hash < $1.hash }
                state.distinctByHash = true
            }
            guard inWindow(t, now: now) else { return }
            func position(_ key: UInt64) -> Int {
                var (low, high) = (0, state.distinct.count)
                while low < high {
                    let mid = (low + high) / 2
                    if state.distinct[mid].hash < key { low = mid + 1 } else { high = mid }
                }
                return low
            }
            var i = position(key)
            if i < state.distinct.count && state.distinct[i].hash == key {
                state.distinct[i].lastMs = max(state.distinct[i].lastMs, t)
            } else {
                // A new value: first the values past the window go (reading counts only those
                // within it; this keeps the list short), then the oldest if it is full.
                if windowMs != 0 {
                    let before = state.distinct.count
                    state.distinct.removeAll { $0.lastMs <= now - windowMs }
                    if state.distinct.count != before { i = position(key) }
                }
                var entry = ProfileStoreV1.DistinctValue()
                entry.hash = key
                entry.lastMs = t
                state.distinct.insert(entry, at: i)
                if state.distinct.count > Self.maxDistinct {
                    var oldest = 0
                    for j in state.distinct.indices where state.distinct[j].lastMs < state.distinct[oldest].lastMs { oldest = j }
                    state.distinct.remove(at: oldest)
                }
            }
        case .decayedSum:
            guard let v = number(event) else { return }
            if state.decayRefMs == 0 && state.decayed == 0 {
                state.decayed = v
                state.decayRefMs = t
            } else if t > state.decayRefMs {
                state.decayed = state.decayed * decay(Double(t - state.decayRefMs)) + v
                state.decayRefMs = t
            } else {
                state.decayed += v * decay(Double(state.decayRefMs - t))
            }
        default:
            return
        }
    }

    func decay(_ elapsedMs: Double) -> Double { exp2(-elapsedMs / halfLifeMs) }

    /// A DISTINCT_COUNT value's key: FNV-1a (64 bits) of its text's UTF-8 bytes. Stable across
    /// processes and releases (the state file keeps it); two values of 10,000 colliding has a
    /// chance of about 3e-12.
    static func distinctHash(_ text: String) -> UInt64 {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in text.utf8 {
            hash ^= UInt64(byte)
            hash &*= 0x0000_0100_0000_01b3
        }
        return hash
    }

    /// The feature's value at `now`, or nil when it has none (no events; LAST outside its window).
    func value(_ state: ProfileStoreV1.FeatureState?, now: Int64) -> Double? {
        guard let state, state.version == version else {
            return definition.aggregation == .last ? nil : 0
        }
        switch definition.aggregation {
        case .count:
            return Double(state.buckets.reduce(UInt64(0)) { $0 + (bucketMs == 0 || $1.startMs + bucketMs > now - windowMs ? $1.count : 0) })
        case .sum:
            return state.buckets.reduce(0.0) { $0 + (bucketMs == 0 || $1.startMs + bucketMs > now - windowMs ? $1.sum : 0) }
        case .last:
            return state.hasLast && inWindow(state.lastAtMs, now: now) ? state.lastValue : nil
        case .distinctCount:
            return Double(state.distinct.count { inWindow($0.lastMs, now: now) })
        case .decayedSum:
            return state.decayRefMs == 0 && state.decayed == 0 ? 0 : state.decayed * decay(Double(max(0, now - state.decayRefMs)))
        default:
            return nil
        }
    }
}

extension ProfileV1.FeatureDefinition {
    /// A definition in one expression (`window` and `halfLife` in seconds).
    public static func make(_ name: String, on eventType: String, _ aggregation: Aggregation, window: Int64 = 0,
                            halfLife: Int64 = 0, property: String = "", filter: String = "") -> Self {
        var definition = Self()
        definition.name = name
        definition.eventType = eventType
        definition.aggregation = aggregation
        definition.windowSeconds = window
        definition.halfLifeSeconds = halfLife
        definition.property = property
        definition.filter = filter
        return definition
    }
}
