import Synchronization

/// Record ids that sort by creation time (so inserts into a primary-key index append):
/// a prefix, 12 hex digits of Unix milliseconds, then 16 hex digits that start at a random
/// value in each millisecond and grow by a random step within it, so that ids made by one
/// process in the same millisecond sort in the order they were made (a person's two
/// decisions in one millisecond are read back in order) and stay hard to guess.
public enum TimeOrderedID {
    /// The process's sequence.
    static let shared = Sequence()

    public static func make(_ prefix: String, nowMs: Int64) -> String { shared.make(prefix, nowMs: nowMs) }

    /// Ids in order within each millisecond (tests make their own, apart from the process's).
    public final class Sequence: Sendable {
        /// The last millisecond an id was made for, and the suffix it took.
        private let last = Mutex<(ms: Int64, suffix: UInt64)>((-1, 0))

        public init() {}

        public func make(_ prefix: String, nowMs: Int64) -> String {
            let suffix = last.withLock { last -> UInt64 in
                if nowMs == last.ms {
                    last.suffix += UInt64.random(in: 1...(1 << 32))
                } else if nowMs > last.ms || nowMs < last.ms - 1000 {
                    // A new millisecond, or the clock stepped back (a sequence from there on).
                    last = (nowMs, UInt64.random(in: 0...(1 << 62)))
                } else {
                    // A little earlier: a caller that read the clock before another took the
                    // lock. Used as it is, with a suffix of its own; the latest millisecond's
                    // sequence goes on (before, it restarted, and the next id of that
                    // millisecond could sort before the ones made in it already).
                    return UInt64.random(in: 0...(1 << 62))
                }
                return last.suffix
            }
            let digits = String(suffix, radix: 16)
            return lowerBound(prefix, atMs: nowMs) + String(repeating: "0", count: 16 - digits.count) + digits
        }
    }

    /// Whether `id` has the form `make(prefix, …)` gives: the prefix, then 28 lower-case hex digits.
    public static func isWellFormed(_ id: String, prefix: String) -> Bool {
        id.hasPrefix(prefix) && id.utf8.count == prefix.utf8.count + 28
            && id.utf8.dropFirst(prefix.utf8.count).allSatisfy { (48...57).contains($0) || (97...102).contains($0) }
    }

    /// Sorts at or below every id made at `atMs` or later, and above every id made before
    /// (times are clamped to 0 ... 0xFFFFFFFFFFFF, so `Int64.max` bounds every id).
    public static func lowerBound(_ prefix: String, atMs: Int64) -> String {
        let time = String(UInt64(min(max(0, atMs), 0xFFFF_FFFF_FFFF)), radix: 16)
        return prefix + String(repeating: "0", count: max(0, 12 - time.count)) + time
    }
}
