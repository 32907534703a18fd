import Dispatch
public import GRDB

/// Copies a store's WAL into its main file from a connection of its own every `interval`,
/// so that the writer does not stop to checkpoint on its commit path. PASSIVE checkpoints
/// never block the writer or the readers; the writer still checkpoints by itself if the WAL
/// outgrows the safety valve set by `SQLiteStore.open`. Stops when released.
public final class BackgroundCheckpointer: Sendable {
    // Dispatch sources are thread-safe; the timer is only cancelled after init.
    nonisolated(unsafe) private let timer: any DispatchSourceTimer

    /// - Parameter path: the database file (the store's `pool.path`).
    public init(path: String, interval: DispatchTimeInterval = .milliseconds(50)) throws {
        var configuration = Configuration()
        configuration.busyMode = .timeout(5)
        let connection = try DatabaseQueue(path: path, configuration: configuration)
        let timer = DispatchSource.makeTimerSource(queue: DispatchQueue(label: "arbiter.sqlite.checkpoint"))
        timer.schedule(deadline: .now() + interval, repeating: interval, leeway: .milliseconds(10))
        timer.setEventHandler {
            // A failed checkpoint (the file busy for 5 s, a disk error) is retried on the next
            // tick; meanwhile the writer's own automatic checkpoint keeps the WAL bounded.
            _ = try? connection.writeWithoutTransaction { db in try db.checkpoint(.passive) }
        }
        timer.resume()
        self.timer = timer
    }

    deinit { timer.cancel() }
}
