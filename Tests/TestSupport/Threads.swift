import Foundation

/// Runs blocking work (waiting for a child process, reading a pipe to its end, a SQLite call
/// that waits out its busy timeout) on a thread of its own, so that it never holds one of
/// the few threads of Swift's cooperative pool, which every test running at once shares: on
/// a 2-core machine two such waits stall all the others.
public func offPool<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        Thread.detachNewThread { continuation.resume(with: Result { try body() }) }
    }
}
