public import RPC

/// Times clients send (Unix milliseconds), read the same way by every service: 0 means
/// now, and a time may be at most `maxAheadMs` past this service's clock (a client's clock
/// a little ahead is tolerated; a date centuries away is an error, not arithmetic to trap on).
public enum ClientTime {
    /// A day.
    public static let maxAheadMs: Int64 = 86_400_000

    /// `ms`, or `now` when it is 0; INVALID_ARGUMENT naming `field` when negative or more
    /// than `maxAheadMs` ahead of `now`.
    public static func read(_ ms: Int64, field: String, now: Int64) throws(RPCError) -> Int64 {
        if ms == 0 { return now }
        guard ms > 0 else { throw .invalidArgument(field: field, "must be a positive Unix time in milliseconds, got \(ms)") }
        guard ms <= now + maxAheadMs else { throw .invalidArgument(field: field, "is more than a day in the future") }
        return ms
    }
}
