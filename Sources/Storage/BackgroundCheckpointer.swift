import Dispatch
import Foundation
import GRDB

/// Copies a store's WAL into its main file from a connection of its own, so that the writer
/// does not stop to checkpoint on its commit path. Every `interval` it looks at the WAL's
/// modification time and, when something was written since its last look, runs a PASSIVE
/// checkpoint, which never blocks the writer or the readers; an idle store costs one `stat`
/// per tick. The writer still checkpoints by itself if the WAL outgrows the safety valve set
/// by `SQLiteStore.open`. Stops when released.
public final class BackgroundCheckpointer: Sendable {
    // Dispatch sources are thread-safe; the timer is only cancelled after init.
    nonisolated(unsafe) private let timer: any DispatchSourceTimer

    /// - Parameter path: the database file (the store's `pool.path`).
    public init(path: String, interval: DispatchTimeInterval = .milliseconds(100)) throws {
        var configuration = Configuration()
        configuration.busyMode = .timeout(5)
        let connection = try DatabaseQueue(path: path, configuration: configuration)
        let wal = path + "-wal"
        let timer = DispatchSource.makeTimerSource(queue: DispatchQueue(label: "arbiter.sqlite.checkpoint"))
        nonisolated(unsafe) var lastSeen: Date?
        timer.schedule(deadline: .now() + interval, repeating: interval, leeway: .milliseconds(20))
        timer.setEventHandler {
            guard let modified = (try? FileManager.default.attributesOfItem(atPath: wal))?[.modificationDate] as? Date,
                  modified != lastSeen else { return }
            // A failed checkpoint (the file busy for 5 s, a disk error) is retried on the next
            // tick; meanwhile the writer's own automatic checkpoint keeps the WAL bounded.
            if (try? connection.writeWithoutTransaction({ db in try db.checkpoint(.passive) })) != nil { lastSeen = modified }
        }
        timer.resume()
        self.timer = timer
    }

    deinit { timer.cancel() }
}
