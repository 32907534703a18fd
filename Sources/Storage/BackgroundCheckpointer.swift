import Dispatch
import Foundation
import GRDB
import GRDBSQLite

/// Copies a store's WAL into its main file from a connection of its own, so that the writer
/// does not stop to checkpoint on its commit path. Every `pace.interval` it looks at the WAL's
/// modification time and, when something was written since its last look, runs a PASSIVE
/// checkpoint, which never blocks the writer or the readers; an idle store costs one `stat`
/// per tick. The writer still checkpoints by itself if the WAL outgrows the safety valve set
/// by `SQLiteStore.open`. Stops when released.
public final class BackgroundCheckpointer: Sendable {
    /// How often the checkpointer looks, and whether it flushes the main file.
    public struct Pace: Sendable {
        public var interval: DispatchTimeInterval
        /// After each checkpoint that copied something, flush the main file to disk (SQLite's
        /// own sync, on the checkpointer's thread, outside SQLite's locks). SQLite flushes the main file only
        /// when a checkpoint has copied the whole WAL, and only then lets the WAL start over.
        /// Under writes without pause a PASSIVE checkpoint never catches up, so that happens
        /// at the writer's own checkpoint at the safety valve, whose flush then writes every
        /// page copied since the last one while every commit waits.
        public var flushesFile: Bool

        /// 100 ms, no flush: stores written in bursts.
        public static let standard = Pace(interval: .milliseconds(100), flushesFile: false)
        /// 25 ms with a flush: a store written without pause (the decision log). The writer's
        /// own checkpoint then finds only the last moments' pages to copy and flush (measured
        /// at 2,000 decisions/s with an earlier form that flushed through a descriptor of its
        /// own after every checkpoint: the longest commits 7-12 ms instead of 25-36 ms).
        public static let continuous = Pace(interval: .milliseconds(25), flushesFile: true)
    }

    // Dispatch sources are thread-safe; the timer is only cancelled after init.
    nonisolated(unsafe) private let timer: any DispatchSourceTimer

    /// - Parameter path: the database file (the store's `pool.path`).
    public init(path: String, pace: Pace = .standard) throws {
        var configuration = Configuration()
        configuration.busyMode = .timeout(5)
        let connection = try DatabaseQueue(path: path, configuration: configuration)
        let wal = path + "-wal"
        let timer = DispatchSource.makeTimerSource(queue: DispatchQueue(label: "arbiter.sqlite.checkpoint"))
        nonisolated(unsafe) var lastSeen: Date?
        nonisolated(unsafe) var lastCopied = -1
        timer.schedule(deadline: .now() + pace.interval, repeating: pace.interval, leeway: .milliseconds(5))
        timer.setEventHandler {
            guard let modified = (try? FileManager.default.attributesOfItem(atPath: wal))?[.modificationDate] as? Date,
                  modified != lastSeen else { return }
            // A failed checkpoint (the file busy for 5 s, a disk error) is retried on the next
            // tick; meanwhile the writer's own automatic checkpoint keeps the WAL bounded.
            _ = try? connection.writeWithoutTransaction { db in
                let result = try db.checkpoint(.passive)
                // A WAL changed in the last moments is looked at again at the next tick: a
                // commit landing between the stat and this checkpoint may leave the file's
                // time as it was (timestamps are coarse, a few ms), and would otherwise stay
                // in the WAL, uncopied, until the next write (seen: 10 of 2,000 rows).
                lastSeen = Date().timeIntervalSince(modified) < 0.05 ? nil : modified
                if pace.flushesFile && result.checkpointedFrameCount != lastCopied {
                    lastCopied = result.checkpointedFrameCount
                    Self.flushMainFile(db)
                }
            }
        }
        timer.resume()
        self.timer = timer
    }

    /// Flushes the main file through SQLite's own handle: a descriptor of our own would,
    /// when closed, drop every POSIX lock this process holds on the file. No SQLite lock is
    /// held meanwhile, so the writer and the readers go on. A failed flush is harmless:
    /// SQLite flushes the file itself before the WAL starts over.
    private static func flushMainFile(_ db: Database) {
        var file: UnsafeMutablePointer<sqlite3_file>?
        guard sqlite3_file_control(db.sqliteConnection, "main", SQLITE_FCNTL_FILE_POINTER, &file) == SQLITE_OK,
              let file, let sync = file.pointee.pMethods?.pointee.xSync else { return }
        _ = sync(file, SQLITE_SYNC_NORMAL)
    }

    deinit { timer.cancel() }
}
