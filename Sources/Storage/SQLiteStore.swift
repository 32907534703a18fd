import CSQLiteConfig
import Foundation
public import GRDB
import GRDBSQLite
import Logging
import ServiceLifecycle
import Synchronization

/// Opens a service's SQLite store: WAL journal, foreign keys, `secure_delete` (erased
/// rows are overwritten, not just unlinked), and migrations run before anything else.
///
/// Durability: WAL with `synchronous = NORMAL` survives a crash of the process
/// (`kill -9`): a write acknowledged to a client was committed to the WAL. A power loss
/// may lose the last transactions; set `synchronous` to `.full` for that.
public enum SQLiteStore {
    public enum Synchronous: String, Sendable { case normal = "NORMAL", full = "FULL" }

    /// Whether SQLite keeps no allocation statistics in this process (set as it loads, by
    /// the CSQLiteConfig target). With them on, SQLite's default, every allocation and free
    /// takes one mutex shared by every connection: in the profile bench's Track phase the
    /// store's threads (writer, state flush, checkpointers) slept there more than anywhere
    /// but idle.
    public static var allocationStatisticsOff: Bool { arbiter_sqlite_memstatus_result() == SQLITE_OK }

    /// `directory/name.sqlite`, created if missing, migrated with `migrator`. The files in
    /// `readersAttach` (schema name → path) are attached to the reader connections only, so
    /// one read transaction spans them; never to the writer, whose `BEGIN IMMEDIATE` would
    /// take their write locks too.
    public static func open(directory: String, name: String, migrator: DatabaseMigrator,
                            synchronous: Synchronous = .normal, readersAttach: [String: String] = [:]) throws -> DatabasePool {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        var configuration = Configuration()
        configuration.foreignKeysEnabled = true
        configuration.busyMode = .timeout(Double(busyTimeoutMs) / 1000)
        configuration.prepareDatabase { db in
            try db.execute(sql: "PRAGMA secure_delete = ON")
            try db.execute(sql: "PRAGMA synchronous = \(synchronous.rawValue)")
            // 16 MiB of page cache per connection (SQLite's default is 2 MiB): hot index
            // pages stay in memory instead of being read again from the OS on every call.
            try db.execute(sql: "PRAGMA cache_size = -16384")
            // Checkpoints run on a connection of their own (BackgroundCheckpointer); a
            // connection checkpoints by itself only when the WAL passes 64 MiB (a safety valve
            // for a checkpointer that falls behind). Measured on Track: 29k -> 34k events/s.
            try db.execute(sql: "PRAGMA wal_autocheckpoint = 16000")
            if db.configuration.readonly {
                for (schema, path) in readersAttach.sorted(by: { $0.key < $1.key }) {
                    try db.execute(sql: "ATTACH DATABASE ? AS \(schema)", arguments: [path])
                }
            }
        }
        let pool = try DatabasePool(path: (directory as NSString).appendingPathComponent("\(name).sqlite"),
                                    configuration: configuration)
        try migrator.migrate(pool)
        return pool
    }

    /// `open`, and the checkpointer that keeps the store's WAL short: keep both as long as
    /// the store.
    public static func openWithCheckpointer(directory: String, name: String, migrator: DatabaseMigrator,
                                            synchronous: Synchronous = .normal, readersAttach: [String: String] = [:],
                                            checkpoints: BackgroundCheckpointer.Pace = .standard) throws -> (DatabasePool, BackgroundCheckpointer) {
        let pool = try open(directory: directory, name: name, migrator: migrator, synchronous: synchronous, readersAttach: readersAttach)
        return (pool, try BackgroundCheckpointer(path: pool.path, pace: checkpoints))
    }

    /// `pool.read`'s snapshot (one read transaction around `body`) for hot paths: GRDB's
    /// `read` parses `BEGIN DEFERRED TRANSACTION` anew on every call; this uses cached
    /// statements (GetProfile: that parse was ~4 % of the call's CPU, client included).
    public static func snapshotRead<T>(_ pool: DatabasePool, _ body: (Database) throws -> T) throws -> T {
        try pool.unsafeRead { db in
            try db.cachedStatement(sql: "BEGIN").execute()
            do {
                let value = try body(db)
                try db.cachedStatement(sql: "COMMIT").execute()
                return value
            } catch {
                try? db.cachedStatement(sql: "ROLLBACK").execute()
                throw error
            }
        }
    }

    /// How long a connection waits for a lock another holds (5 s).
    static let busyTimeoutMs: Int32 = 5000

    /// Moves everything in the WAL into the main file and truncates the WAL, so that
    /// data deleted with `secure_delete` leaves no copy in the WAL (used after erasure).
    /// A checkpoint already running (the store's BackgroundCheckpointer) makes SQLite answer
    /// BUSY at once, without waiting: this retries for up to `patience` (5 s). Waiting for
    /// readers to move on is bounded by the patience left too, so the writer (which every
    /// write of the store waits for) is held no longer than `patience`, not the connection's
    /// 5 s busy timeout per attempt. With no patience it makes one attempt that does not wait.
    public static func checkpoint(_ pool: DatabasePool, patience: Duration = .seconds(5)) throws {
        let end = ContinuousClock.now + patience
        while true {
            do {
                try pool.writeWithoutTransaction { db in
                    let leftMs = max(0, (end - ContinuousClock.now) / .milliseconds(1))
                    sqlite3_busy_timeout(db.sqliteConnection, Int32(min(Double(busyTimeoutMs), leftMs)))
                    defer { sqlite3_busy_timeout(db.sqliteConnection, busyTimeoutMs) }
                    _ = try db.checkpoint(.truncate)
                }
                return
            } catch let error as DatabaseError where error.resultCode == .SQLITE_BUSY && ContinuousClock.now < end {
                Thread.sleep(forTimeInterval: 0.01)
            }
        }
    }
}

extension DatabaseWriter {
    /// Runs `body` in a transaction on the writer, then, once it has committed and before the
    /// writer is released, what `body` returned to run then: the in-memory copy of what it
    /// wrote. A failed commit (write errors in WAL mode surface at COMMIT) leaves memory as the
    /// file is, so a retry compares against the file and writes again; and the next write
    /// sees this one's change.
    public func writeThenUpdate<T>(_ body: (Database) throws -> (T, afterCommit: () -> Void)) throws -> T {
        try writeWithoutTransaction { db in
            var result: (T, afterCommit: () -> Void)?
            try db.inTransaction {
                result = try body(db)
                return .commit
            }
            result!.afterCommit()
            return result!.0
        }
    }
}

/// The WAL truncation an erasure owes: until a TRUNCATE checkpoint succeeds, the erased rows'
/// old pages may still be in the WAL. `pay` checkpoints when something is owed; a failed
/// attempt (a reader kept the WAL busy) leaves it owed. Every service runs a `Retrier` for its
/// store, since neither the identity feed nor a client replays an erasure. A new store owes
/// one, for an erasure a crash cut off before its checkpoint.
public final class OwedTruncation: Sendable {
    /// Erasures owed so far, and how many of them a truncation covered (never reset: an
    /// erasure owed while a truncation runs stays owed).
    private let count: Mutex<(owed: UInt64, paid: UInt64)>
    /// `pay`s running: a retrier skips its turn rather than queue behind an Erase's.
    private let paying = Atomic<Int>(0)

    /// - Parameter owed: whether one is owed from the start (false only for a store that
    ///   truncates its WALs as it opens).
    public init(owed: Bool = true) {
        count = Mutex((owed ? 1 : 0, 0))
    }

    /// An erasure committed: a truncation is owed.
    public func owe() { count.withLock { $0.owed += 1 } }

    public var isOwed: Bool { count.withLock { $0.owed != $0.paid } }

    /// Truncates `pool`'s WAL if a truncation is owed, retrying a busy WAL for `patience`;
    /// throws when it could not (and it stays owed).
    public func pay(_ pool: DatabasePool, patience: Duration = .seconds(5)) throws {
        try pay { try SQLiteStore.checkpoint(pool, patience: patience) }
    }

    /// Runs `truncate` if a truncation is owed; what was owed when it began is paid once it
    /// returns, and stays owed if it throws.
    public func pay(by truncate: () throws -> Void) throws {
        let owed = count.withLock { $0.owed != $0.paid ? $0.owed : nil }
        guard let owed else { return }
        paying.add(1, ordering: .relaxed)
        defer { paying.subtract(1, ordering: .relaxed) }
        try truncate()
        count.withLock { $0.paid = max($0.paid, owed) }
    }

    /// A `Retrier` that truncates `pool`'s WAL when owed.
    public func retrier(_ pool: DatabasePool, interval: Duration = .seconds(1), logger: Logger) -> Retrier {
        Retrier(self, interval: interval, logger: logger) { try SQLiteStore.checkpoint(pool, patience: .zero) }
    }

    /// Pays an owed truncation every `interval` while the service runs, so that an erasure's
    /// old pages do not wait in a WAL for the next write or Erase, which on a quiet system may
    /// never come. Each turn is one attempt that does not wait for readers (a reader that
    /// never lets go must not hold the writer at every turn), on a thread of its own (not
    /// Swift's shared pool, which the RPC handlers use), and is skipped while another `pay`
    /// runs (an Erase's own). A truncation still owed after a minute of turns is logged as a
    /// warning, once a minute; a failure other than a busy WAL as an error, at its first turn
    /// and then once a minute.
    public struct Retrier: Service {
        let truncation: OwedTruncation
        let interval: Duration
        let logger: Logger
        let truncate: @Sendable () throws -> Void
        private let queue = DispatchQueue(label: "arbiter.owed-truncation")

        /// - Parameters:
        ///   - interval: between turns; at least 1 ms.
        ///   - truncate: one attempt without patience, such as
        ///     `{ try SQLiteStore.checkpoint(pool, patience: .zero) }`.
        public init(_ truncation: OwedTruncation, interval: Duration = .seconds(1), logger: Logger,
                    truncate: @escaping @Sendable () throws -> Void) {
            self.truncation = truncation
            self.interval = max(interval, .milliseconds(1))
            self.logger = logger
            self.truncate = truncate
        }

        public func run() async throws {
            var failures = 0
            // Turns in a minute: a failure that lasts is logged once a minute, not at every turn.
            let perMinute = max(1, Int(Duration.seconds(60) / interval))
            while !Task.isCancelled && !Task.isShuttingDownGracefully {
                try? await cancelWhenGracefulShutdown { [interval] in try await Task.sleep(for: interval) }
                guard !Task.isCancelled && !Task.isShuttingDownGracefully else { break }
                guard truncation.isOwed else {
                    failures = 0
                    continue
                }
                guard truncation.paying.load(ordering: .relaxed) == 0 else { continue }
                do {
                    try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                        queue.async { [truncation, truncate] in continuation.resume(with: Result { try truncation.pay(by: truncate) }) }
                    }
                    failures = 0
                } catch let error as DatabaseError where error.resultCode == .SQLITE_BUSY || error.resultCode == .SQLITE_LOCKED {
                    failures += 1
                    let level: Logger.Level = failures % perMinute == 0 ? .warning : .debug
                    logger.log(level: level, "an erasure's WAL truncation is still owed after \(failures) attempts: a reader keeps the WAL busy (\(error))")
                } catch {
                    failures += 1
                    let level: Logger.Level = failures % perMinute == 1 || perMinute == 1 ? .error : .debug
                    logger.log(level: level, "an erasure's WAL truncation failed (\(failures) attempts so far, tried again in \(interval)): \(error)")
                }
            }
        }
    }
}
