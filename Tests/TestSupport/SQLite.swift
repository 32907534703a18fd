import Foundation
import GRDB
import Synchronization

/// Holds the write lock of the SQLite file at `path` (made a WAL database if new) on a thread of
/// its own, until the returned function is called (again: no effect).
public func holdWriteLock(_ path: String) async throws -> @Sendable () -> Void {
    try await holdTransaction(path, begin: "BEGIN IMMEDIATE")
}

/// Holds a read transaction on the SQLite file at `path`, on the snapshot current now, until the
/// returned function is called: a TRUNCATE checkpoint cannot finish meanwhile.
public func holdReadSnapshot(_ path: String) async throws -> @Sendable () -> Void {
    try await holdTransaction(path, begin: "BEGIN DEFERRED", then: "SELECT count(*) FROM sqlite_master")
}

func holdTransaction(_ path: String, begin: String, then statement: String? = nil) async throws -> @Sendable () -> Void {
    let held = DispatchSemaphore(value: 0), release = DispatchSemaphore(value: 0)
    var configuration = Configuration()
    configuration.busyMode = .timeout(30)
    let queue = try DatabaseQueue(path: path, configuration: configuration)
    try await queue.writeWithoutTransaction { try $0.execute(sql: "PRAGMA journal_mode = WAL") }
    let failure = Mutex<(any Error)?>(nil)
    Thread.detachNewThread {
        do {
            try queue.inDatabase { db in
                try db.execute(sql: begin)
                if let statement { _ = try Row.fetchAll(db, sql: statement) }
                held.signal()
                release.wait()
                try db.execute(sql: "COMMIT")
            }
        } catch {
            // Not held (BEGIN failed): the caller is told instead of waiting forever. (After
            // the release, nobody waits: the extra signal is harmless.)
            failure.withLock { $0 = error }
            held.signal()
        }
    }
    try await offPool { held.wait() }
    if let error = failure.withLock({ $0 }) { throw error }
    let once = Mutex(false)
    return { if !once.withLock({ let was = $0; $0 = true; return was }) { release.signal() } }
}

/// A new directory holding the store file `file` migrated by `migrator` up to `migration`
/// only, with `write` run in it: a store as an older version left it.
public func storeMigrated(upTo migration: String, by migrator: DatabaseMigrator, file: String, prefix: String = "arbiter-test",
                          _ write: (Database) throws -> Void) throws -> String {
    let directory = temporaryDirectory(prefix)
    let old = try DatabaseQueue(path: directory + "/" + file)
    try migrator.migrate(old, upTo: migration)
    try old.write(write)
    try old.close()
    return directory
}
