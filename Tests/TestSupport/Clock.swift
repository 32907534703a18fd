import Synchronization

/// A clock tests move by hand: 2023-11-14T22:13:30Z, half a minute past a minute.
public final class TestClock: Sendable {
    public let now = Mutex<Int64>(1_700_000_010_000)
    public init() {}
    /// The clock as services take it (Unix milliseconds).
    public var read: @Sendable () -> Int64 { { self.now.withLock { $0 } } }
    public func advance(seconds: Int64) { now.withLock { $0 += seconds * 1000 } }
}
