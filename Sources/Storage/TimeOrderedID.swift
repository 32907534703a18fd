/// Record ids that sort by creation time (so inserts into a primary-key index append):
/// a prefix, 12 hex digits of Unix milliseconds, then 16 random hex digits.
public enum TimeOrderedID {
    public static func make(_ prefix: String, nowMs: Int64) -> String {
        let random = String(UInt64.random(in: .min ... .max), radix: 16)
        return lowerBound(prefix, atMs: nowMs) + String(repeating: "0", count: 16 - random.count) + random
    }

    /// Sorts at or below every id made at `atMs` or later, and above every id made before
    /// (times are clamped to 0 ... 0xFFFFFFFFFFFF, so `Int64.max` bounds every id).
    public static func lowerBound(_ prefix: String, atMs: Int64) -> String {
        let time = String(UInt64(min(max(0, atMs), 0xFFFF_FFFF_FFFF)), radix: 16)
        return prefix + String(repeating: "0", count: max(0, 12 - time.count)) + time
    }
}
