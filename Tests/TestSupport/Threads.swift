import Foundation
import Synchronization

/// Runs blocking work (waiting for a child process, reading a pipe to its end, a SQLite call
/// that waits out its busy timeout) on a thread of its own, so that it never holds one of
/// the few threads of Swift's cooperative pool, which every test running at once shares: on
/// a 2-core machine two such waits stall all the others.
public func offPool<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        Thread.detachNewThread { continuation.resume(with: Result { try body() }) }
    }
}

/// Runs `body` on a thread of its own (never Swift's cooperative pool, which the tests share):
/// `body` calls `done` once it holds what it holds, and then waits inside `done` until the
/// returned function is called. Returns once `done` was called; rethrows an error of `body`
/// that came before it.
public func holdOnThread(_ body: @escaping @Sendable (_ done: () -> Void) throws -> Void) throws -> @Sendable () -> Void {
    let holding = DispatchSemaphore(value: 0), release = DispatchSemaphore(value: 0), finished = DispatchSemaphore(value: 0)
    let failure = Mutex<(any Error)?>(nil)
    Thread.detachNewThread {
        do {
            try body {
                holding.signal()
                release.wait()
            }
        } catch {
            failure.withLock { $0 = error }
            holding.signal()
        }
        finished.signal()
    }
    holding.wait()
    if let error = failure.withLock({ $0 }) { throw error }
    return {
        release.signal()
        finished.wait()
    }
}
